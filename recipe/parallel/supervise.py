"""Keep a job's processes tied to their launcher and one job per ``save_dir`` (issue 9, items 7 and 8).

**Launcher watchdog.** What the DeepSpeed launcher starts (measured, DeepSpeed 0.19.8 on Linux)::

    deepspeed (runner: python .../bin/deepspeed ...)              one per job (per host with --no_ssh)
     └─ python -m deepspeed.launcher.launch ...                   one per host
         ├─ python -u recipe/train.py --local_rank=0 ...           the ranks
         └─ python -u recipe/train.py --local_rank=1 ...

A rank's parent is the per-host ``deepspeed.launcher.launch`` process, not the ``deepspeed`` runner. SIGKILL of the
runner does not reach ``launch``: it is re-parented (to pid 1 here) and it and every rank train on. Under pdsh the
runner is on another host and ``launch`` runs under the remote shell; under torchrun the ranks' parent is torchrun.
So each rank watches its parent and every launcher above it (``launch`` -> ``deepspeed`` runner, stopping at the
first process that is not a launcher, e.g. the shell) and stops when any of them is gone:

- ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (Linux): the kernel sends SIGTERM the moment the parent exits, even while
  the rank sits in a collective. Set after recording the parent; if the parent changed meanwhile, the rank stops.
- a daemon thread that every second compares ``os.getppid()`` with the recorded parent and checks the launchers
  above it (by pid and start time, a zombie counts as dead: its parent may not have reaped it). When one is gone
  it logs ``launcher (pid N) died; stopping rank R``, sends itself SIGTERM and, should a handler swallow that,
  ``os._exit`` after a short grace, so a collective that never returns cannot keep the rank alive.

When a rank stops this way ``launch`` sees a non-zero exit and terminates the other ranks of its host itself.

**save_dir lock.** Rank 0 holds an exclusive lock on ``<save_dir>/.lock`` from start-up to exit, with its host, pid
and start time written in the file; a second job on the same ``save_dir`` fails at start-up naming the holder. The
lock is a POSIX record lock (``fcntl.lockf``), which the kernel drops when the holding process dies (a killed job
leaves no stale lock) and which, unlike ``flock``, forked children (DataLoader workers) do not inherit, so a dead
rank 0's workers cannot keep it held. NFS (v3 with lockd, v4) supports it; on Lustre mount with ``-o flock``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

from recipe.config import ConfigError

logger = logging.getLogger(__name__)

WATCHDOG_ENV = "DSVL2_LAUNCHER_WATCHDOG"  # "0" turns the launcher watchdog off
POLL_S = 1.0
GRACE_S = 5.0
LOCK_NAME = ".lock"

# argv[0] / argv[1] base names and ``-m`` modules of the launchers whose death must stop a rank
_LAUNCHER_SCRIPTS = {"deepspeed", "deepspeed.pt", "ds", "torchrun"}  # (ds, deepspeed.pt: the runner too)
_LAUNCHER_MODULES = {"deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                     "torch.distributed.launch"}

_watchdog = None
_locks: dict = {}


# --- launcher watchdog --------------------------------------------------------------------------------------------

def is_launcher(cmdline: list) -> bool:
    """Whether a process's argv is the deepspeed runner, deepspeed's per-host launch, or torchrun (run directly, or
    as ``python [options] <script>`` / ``python [options] -m <module>``)."""
    if not cmdline:
        return False
    exe = os.path.basename(cmdline[0])
    if exe in _LAUNCHER_SCRIPTS:
        return True
    if not exe.startswith("python"):
        return False
    for i in range(1, min(len(cmdline), 5)):
        if cmdline[i] == "-m":
            return i + 1 < len(cmdline) and cmdline[i + 1] in _LAUNCHER_MODULES
        if not cmdline[i].startswith("-"):
            return os.path.basename(cmdline[i]) in _LAUNCHER_SCRIPTS
    return False


class _Proc:
    """A process watched by pid and start time (a recycled pid is a different process)."""

    def __init__(self, proc):
        self.proc = proc
        self.pid = proc.pid
        try:
            self.what = " ".join(proc.cmdline())[:160]
        except Exception:  # noqa: BLE001 (psutil.Error: gone or not ours)
            self.what = "?"

    def alive(self) -> bool:
        import psutil

        try:
            return self.proc.is_running() and self.proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        except psutil.Error:
            return False


def launcher_chain(parent_pid: int) -> list:
    """The parent and every launcher above it (``launch`` -> ``deepspeed`` runner), nearest first. Needs psutil (a
    DeepSpeed dependency); without it only the parent is returned."""
    try:
        import psutil
    except ImportError:
        return []
    try:
        proc = psutil.Process(parent_pid)
        chain = [_Proc(proc)]
        while is_launcher(proc.cmdline()):
            up = proc.parent()
            if up is None or up.pid <= 1 or not is_launcher(up.cmdline()):
                break
            chain.append(_Proc(up))
            proc = up
        return chain
    except psutil.Error:
        return []


class LauncherWatchdog:
    def __init__(self, rank: str, parent: int, chain: list, poll_s: float, grace_s: float):
        self.rank, self.parent, self.chain, self.poll_s, self.grace_s = rank, parent, chain, poll_s, grace_s
        self.thread = threading.Thread(target=self._run, name="dsvl2-launcher-watchdog", daemon=True)

    def dead(self):
        """The first watched launcher that is gone, as (pid, what), or None."""
        if os.getppid() != self.parent:
            return self.parent, self.chain[0].what if self.chain else "parent"
        for p in self.chain[1:]:
            if not p.alive():
                return p.pid, p.what
        return None

    def _run(self):
        time.sleep(self.poll_s)  # (logging is set up by then)
        logger.info("rank %s stops when any of its launchers dies: %s", self.rank,
                    ", ".join(f"pid {p.pid} ({p.what[:70]})" for p in self.chain) or f"pid {self.parent}")
        while True:
            time.sleep(self.poll_s)
            gone = self.dead()
            if gone is not None:
                stop(f"launcher (pid {gone[0]}) died; stopping rank {self.rank} (it was: {gone[1]})", self.grace_s)


def stop(message: str, grace_s: float = GRACE_S) -> None:
    """Log, then end this process: SIGTERM to itself (the launcher's own way of stopping a rank), ``os._exit``
    if it is still alive after ``grace_s`` (a handler that cannot run while a collective blocks the main thread)."""
    logger.error(message)
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:  # noqa: BLE001
            pass
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os._exit(1)


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _pid1_is_launcher() -> bool:
    try:
        import psutil

        return is_launcher(psutil.Process(1).cmdline())
    except Exception:  # noqa: BLE001 (no psutil, or pid 1 not readable: do not stop on a guess)
        return True


def start_watchdog(poll_s: float = POLL_S, grace_s: float = GRACE_S):
    """Stop this rank when its launcher dies (see the module docstring). Runs only in a process a launcher started
    (``LOCAL_RANK`` set) unless ``DSVL2_LAUNCHER_WATCHDOG=0``: a plain ``python recipe/train.py`` under nohup must
    outlive its shell. Idempotent; returns the watchdog or None."""
    global _watchdog
    if _watchdog is not None:
        return _watchdog
    if os.environ.get(WATCHDOG_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if "LOCAL_RANK" not in os.environ:
        return None
    rank = os.environ.get("RANK", os.environ["LOCAL_RANK"])
    parent = os.getppid()
    if parent == 1 and not _pid1_is_launcher():  # (in a container the launcher itself may be pid 1)
        stop(f"launcher died before rank {rank} started (its parent is now pid 1); stopping rank {rank}", 0)
    _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:  # the parent exited between getppid() and prctl(): no signal will come
        stop(f"launcher (pid {parent}) died; stopping rank {rank}", 0)
    chain = launcher_chain(parent)
    _watchdog = LauncherWatchdog(rank, parent, chain, poll_s, grace_s)
    _watchdog.thread.start()
    return _watchdog


# --- one job per save_dir -----------------------------------------------------------------------------------------

class SaveDirInUse(ConfigError):
    pass


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.loads(f.read() or "{}")
        return f"pid {info['pid']} on host {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another job (it has not written its pid yet)"


def lock_save_dir(save_dir: str):
    """Take ``<save_dir>/.lock`` for this process until it exits; raise :class:`SaveDirInUse` (a ConfigError)
    naming the holder when another job has it. Returns the open file descriptor (None where there is no fcntl or
    the file system has no locks, with a warning)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    key = os.path.realpath(save_dir)
    if key in _locks:
        return _locks[key]
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (11, 13):  # EAGAIN / EACCES: held
            raise SaveDirInUse(f"save_dir {save_dir} is in use by {_holder(path)}; stop that job or choose another "
                               f"save_dir") from None
        logger.warning("save_dir %s: cannot lock %s (%s); nothing stops a second job from writing there",
                       save_dir, path, e)
        return None
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    os.fsync(fd)
    _locks[key] = fd  # held (open) until the process exits: closing any descriptor of the file would release it
    return fd


def save_dir_holder(save_dir: str):
    """Who holds ``save_dir``'s lock (a string), or None when it is free. For tools and tests; never call it from
    the holding process (closing its probe descriptor would drop a POSIX lock held there)."""
    import fcntl

    if os.path.realpath(save_dir) in _locks:
        return "this process"
    path = os.path.join(save_dir, LOCK_NAME)
    if not os.path.exists(path):
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _holder(path)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
