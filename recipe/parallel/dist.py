"""Process-group start-up through DeepSpeed's accelerator abstraction (gloo on CPU, hccl on NPU, nccl on GPU)."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed via DeepSpeed with the accelerator's backend; returns (rank, world size).

    Works under the ``deepspeed`` launcher, ``torchrun``, or a plain single process (RANK/WORLD_SIZE/MASTER_* are
    filled in for one rank, so tools and tests need no launcher).
    """
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the module object is patched below)
    from deepspeed.accelerator import get_accelerator

    from recipe.accelerator import import_npu_if_needed

    import_npu_if_needed()  # torch_npu registers the NPU device with torch (optional extra; NPU only)
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        # DeepSpeed compiles a shared-memory all-reduce for CPU inference inside init_distributed (~50 s with g++ on
        # a fresh machine). Training never calls it; skip the build.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name())
    import torch.distributed as dist
    return dist.get_rank(), dist.get_world_size()
