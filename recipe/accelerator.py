"""The one place recipe code asks which accelerator it runs on, for its device and its memory figures.

Everything goes through DeepSpeed's ``get_accelerator()``, so the same code runs on Ascend NPUs (``npu``, HCCL),
NVIDIA GPUs (``cuda``, NCCL) and CPU (``cpu``, gloo); ``DS_ACCELERATOR`` picks one, otherwise DeepSpeed detects it.
``torch_npu`` (the ``npu`` extra) is imported only when the accelerator is the NPU.
``tests/test_accelerator_agnostic.py`` keeps ``recipe/``, ``converters/`` and ``bench/`` free of device-specific names.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

NPU = "npu"


def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def accelerator_name() -> str:
    """``npu``, ``cuda``, ``cpu``, ... as DeepSpeed resolved it (``DS_ACCELERATOR`` or auto-detection)."""
    return _accelerator()._name


def import_npu_if_needed():
    """Import ``torch_npu`` when running on Ascend NPUs; return the module, or None on other accelerators.

    NPU is chosen by ``DS_ACCELERATOR=npu`` (checked first, so a missing ``torch_npu`` gives this message rather than
    DeepSpeed's) or by DeepSpeed's auto-detection. Raises ImportError naming the fix when ``torch_npu`` is missing.
    """
    wanted = os.environ.get("DS_ACCELERATOR", "").strip().lower() == NPU
    if not wanted and accelerator_name() != NPU:
        return None
    try:
        return importlib.import_module("torch_npu")
    except ImportError as e:
        raise ImportError(
            f"DS_ACCELERATOR=npu (or DeepSpeed detected an Ascend NPU) but torch_npu cannot be imported ({e}). "
            f"Install the torch_npu release built for torch {torch.__version__.split('+')[0]} (see docs/scale_out.md) "
            f"and source the CANN toolkit's set_env.sh before launching.") from e


def device() -> torch.device:
    """This rank's device: ``npu:LOCAL_RANK`` / ``cuda:LOCAL_RANK`` / ``cpu``."""
    acc = _accelerator()
    if acc._name == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", acc.current_device()))
    return torch.device(acc.device_name(local_rank))


def _proc_status_bytes(field: str) -> Optional[int]:
    """A ``VmRSS``-style field of ``/proc/self/status`` in bytes (None where the file does not exist)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # the kernel always reports these in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_stats() -> dict:
    """Memory figures for logs, in bytes.

    ``allocated`` / ``reserved`` / ``peak``: what the accelerator's caching allocator reports (peak = max allocated
    since the process started); None on CPU, where DeepSpeed's accelerator only echoes process
    RSS. ``rss`` / ``peak_rss``: host memory of this process from ``/proc/self/status`` (VmRSS / VmHWM), on every
    accelerator (None where ``/proc`` is missing).
    """
    acc = _accelerator()
    stats = {"allocated": None, "reserved": None, "peak": None,
             "rss": _proc_status_bytes("VmRSS"), "peak_rss": _proc_status_bytes("VmHWM")}
    if acc._name != "cpu":
        stats.update(allocated=int(acc.memory_allocated()), reserved=int(acc.memory_reserved()),
                     peak=int(acc.max_memory_allocated()))
    return stats
