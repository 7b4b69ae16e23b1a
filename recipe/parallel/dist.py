"""Process-group start-up through DeepSpeed's accelerator abstraction (gloo on CPU, hccl on NPU, nccl on GPU), with
bounded waits (issue 9, item 8).

Before the process group forms, every rank meets the others at the rendezvous store on ``MASTER_ADDR:MASTER_PORT``
(hosted by rank 0, or by torchrun's agent) and waits, at most ``DSVL2_INIT_TIMEOUT_S`` seconds (default 300), until
all ``WORLD_SIZE`` ranks have arrived. A rank that fails its start-up checks (configuration error, ``save_dir`` in
use) posts its message there first (:func:`report_startup_failure`), so the others stop within a second instead of
waiting; a rank that never arrives (its node is down, its launcher never ran) makes the others stop at the timeout
with a message naming the address, the world size, the ranks missing and the time waited. Then DeepSpeed builds
the process group on the same store (rank 0's server is shared, multi-tenant) with ``DSVL2_DIST_TIMEOUT_S``
(default 1800 s, or ``DEEPSPEED_TIMEOUT`` minutes when set) as the timeout of every collective and p2p operation
of the world group and of every group created later (DeepSpeed's pipeline, data- and expert-parallel groups).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from datetime import timedelta

logger = logging.getLogger(__name__)

INIT_TIMEOUT_ENV = "DSVL2_INIT_TIMEOUT_S"
DIST_TIMEOUT_ENV = "DSVL2_DIST_TIMEOUT_S"
DEFAULT_DIST_TIMEOUT_S = 1800.0
DEFAULT_INIT_TIMEOUT_S = 300.0
POLL_S = 0.5

_store = None  # the rendezvous store; rank 0's must live as long as the process group uses its server


class StartupError(RuntimeError):
    """The job cannot start; the message says what was waited for and why it failed. ``exit_code`` is 2 when a
    configuration error (here or on another rank) is the cause, 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise StartupError(f"{name}={raw!r}: expected a positive number of seconds", exit_code=2)
    return value


def init_timeout() -> float:
    """Seconds a rank waits at start-up for all ranks to arrive."""
    return _seconds(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT_S)


def dist_timeout() -> float:
    """Seconds a collective or p2p operation may take: ``$DSVL2_DIST_TIMEOUT_S``, else DeepSpeed's
    ``DEEPSPEED_TIMEOUT`` minutes when set, else 1800 s: long enough for the slowest rank's checkpoint save while
    the others wait, and equal to the ``HCCL_EXEC_TIMEOUT`` of ``recipe/npu_env.sh``."""
    if os.environ.get("DEEPSPEED_TIMEOUT"):
        from deepspeed.constants import default_pg_timeout  # DEEPSPEED_TIMEOUT minutes

        return _seconds(DIST_TIMEOUT_ENV, default_pg_timeout.total_seconds())
    return _seconds(DIST_TIMEOUT_ENV, DEFAULT_DIST_TIMEOUT_S)


def _ranges(ranks) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, ranks = [], sorted(ranks)
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ", ".join(out) or "none"


class Rendezvous:
    """The start-up meeting of all ranks on the store at ``MASTER_ADDR:MASTER_PORT`` (keys under ``dsvl2/``)."""

    def __init__(self, timeout_s: float):
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.addr, self.port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.where = f"{self.addr}:{self.port}"
        self.timeout_s = timeout_s
        self.start = time.monotonic()
        # torchrun's agent hosts the store and keeps it over restarts: a prefix per attempt
        self.agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
        self.prefix = f"dsvl2/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.hosting = self.rank == 0 and not self.agent_store
        node = os.environ.get("CROSS_RANK", os.environ.get("GROUP_RANK"))
        self.me = f"rank {self.rank} on host {socket.gethostname()}" + (f" (node {node})" if node else "")
        self.store = None

    @staticmethod
    def available() -> bool:
        return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))

    def waited(self) -> float:
        return time.monotonic() - self.start

    def connect(self, timeout_s: float):
        global _store
        from torch.distributed import TCPStore

        try:
            self.store = TCPStore(self.addr, self.port, self.world, self.hosting, timeout=timedelta(seconds=timeout_s),
                                  wait_for_workers=False, multi_tenant=True)
        except RuntimeError as e:  # DistNetworkError / DistStoreError
            if self.hosting:
                busy = "EADDRINUSE" in str(e) or "address already in use" in str(e)
                raise StartupError(
                    f"rank 0 cannot host the rendezvous at {self.where}: "
                    + (f"port {self.port} is in use on this host (another job, or ranks of a killed job still "
                       f"running); choose another --master_port" if busy else str(e).splitlines()[0])) from None
            raise StartupError(
                f"{self.me} could not reach the rendezvous at {self.where} (hosted by rank 0) within "
                f"{self.waited():.0f} s while waiting for {self.world} ranks; is rank 0 running? Its node may have "
                f"failed its start-up checks: see its log ({INIT_TIMEOUT_ENV}={self.timeout_s:g})") from None
        _store = self.store
        return self.store

    def _key(self, name: str) -> str:
        return self.prefix + name

    def missing(self) -> list:
        return [r for r in range(self.world) if not self.store.check([self._key(f"rank/{r}")])]

    def _lost(self, e: Exception) -> StartupError:
        return StartupError(f"{self.me} lost the rendezvous at {self.where} after {self.waited():.0f} s (rank 0 "
                            f"exited: see its log): {str(e).splitlines()[0]}")

    def join(self) -> None:
        """Arrive and wait for all ranks; raise StartupError on a posted failure or at the timeout."""
        logger.info("waiting for %d ranks at %s (timeout %g s)", self.world, self.where, self.timeout_s)
        store = self.connect(self.timeout_s)
        try:
            store.set(self._key(f"rank/{self.rank}"), self.me)
            store.add(self._key("joined"), 1)
            while True:
                if store.check([self._key("failed")]):
                    cause = store.get(self._key("failed")).decode(errors="replace")
                    missing = self.missing()
                    if self.rank != 0:
                        store.add(self._key("ack"), 1)
                    else:
                        self.linger()
                    raise StartupError(
                        f"start-up aborted at the rendezvous {self.where} after {self.waited():.0f} s: {cause} "
                        f"({self.world - len(missing)} of {self.world} ranks had arrived; missing ranks "
                        f"{_ranges(missing)})", exit_code=2)
                joined = store.add(self._key("joined"), 0)
                if joined >= self.world:
                    break
                if self.waited() > self.timeout_s:
                    missing = self.missing()
                    raise StartupError(
                        f"rendezvous at {self.where} timed out after {self.waited():.0f} s ({INIT_TIMEOUT_ENV}="
                        f"{self.timeout_s:g}): {self.world - len(missing)} of {self.world} ranks arrived; missing "
                        f"ranks {_ranges(missing)}. Their launchers did not start, or they failed before reaching "
                        f"the rendezvous: see their logs")
                time.sleep(POLL_S)
        except StartupError:
            raise
        except RuntimeError as e:  # the store went away under us
            raise self._lost(e) from None
        logger.info("all %d ranks arrived at %s in %.1f s", self.world, self.where, self.waited())

    def linger(self) -> None:
        """Rank 0 hosts the store: keep it up until every other rank has seen the failure (or the rendezvous
        timeout has passed), so none of them waits for a store that is gone."""
        if not self.hosting:
            return
        deadline = self.start + self.timeout_s
        while time.monotonic() < deadline:
            try:
                if self.store.add(self._key("ack"), 0) >= self.world - 1:
                    return
            except RuntimeError:
                return
            time.sleep(POLL_S)

    def report(self, message: str) -> None:
        """Post this rank's start-up failure for the others (first failure wins)."""
        logger.info("telling the other ranks through the rendezvous at %s (up to %g s)", self.where, self.timeout_s)
        try:
            store = self.connect(self.timeout_s)
            store.compare_set(self._key("failed"), "", f"{self.me} failed its start-up checks: {message}")
            if self.rank != 0:
                store.add(self._key("ack"), 1)
            else:
                self.linger()
        except (StartupError, RuntimeError) as e:
            logger.warning("could not tell the other ranks about this failure: %s", str(e).splitlines()[0])


def report_startup_failure(message: str) -> None:
    """Called by a rank that cannot start (after logging why): make the other ranks of the job stop now, with this
    message, instead of waiting for it until the rendezvous timeout. Does nothing in a single-process run."""
    if not Rendezvous.available() or int(os.environ["WORLD_SIZE"]) <= 1:
        return
    try:
        init_s = init_timeout()
    except StartupError:
        init_s = DEFAULT_INIT_TIMEOUT_S
    Rendezvous(init_s).report(message)


def _bound_new_groups(timeout: timedelta) -> None:
    """torch gives a group made without a timeout (DeepSpeed's pipeline, data- and expert-parallel groups) its
    module default (30 min for gloo), not the world group's: make that default ours."""
    import torch.distributed.distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), timedelta):
            setattr(c10d, name, timeout)


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed via DeepSpeed with the accelerator's backend; returns (rank, world size).

    Works under the ``deepspeed`` launcher, ``torchrun``, or a plain single process (RANK/WORLD_SIZE/MASTER_* are
    filled in for one rank, so tools and tests need no launcher). Raises :class:`StartupError` when the ranks do
    not all arrive in time or one of them reported a start-up failure.
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
    init_s, dist_s = init_timeout(), dist_timeout()
    if Rendezvous.available() and int(os.environ["WORLD_SIZE"]) > 1:
        Rendezvous(init_s).join()  # (MPI discovery, without RANK & co, goes straight to DeepSpeed)
    timeout = timedelta(seconds=dist_s)
    _bound_new_groups(timeout)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), timeout=timeout)
    import torch.distributed as dist
    if dist.get_rank() == 0:
        logger.info("process group of %d ranks (%s); collectives time out after %g s (%s)", dist.get_world_size(),
                    dist.get_backend(), dist_s, DIST_TIMEOUT_ENV)
    return dist.get_rank(), dist.get_world_size()
