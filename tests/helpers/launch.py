"""Start real multi-process jobs for tests (torchrun / the deepspeed launcher on CPU with gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_logged(cmd: list, log_path: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root with its output in ``log_path``; on failure the tail of the log is in
    the assertion message."""
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env or cpu_env(), stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout)
    return proc


def tail(path: str, n: int = 60) -> str:
    with open(path, errors="replace") as f:
        lines = [line for line in f if "Warning" not in line and "warn(" not in line]
    return "".join(lines[-n:])


def torchrun(script: str, nprocs: int, args: list, log_path: str, timeout: int = 600):
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(nprocs), "--master_port", str(free_port()),
           script, *args]
    proc = run_logged(cmd, log_path, timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail(log_path)}"


def deepspeed_launch(nprocs: int, args: list, log_path: str, timeout: int = 600, check: bool = True):
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()),
           "recipe/train.py", *args]
    proc = run_logged(cmd, log_path, timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail(log_path)}"
    return proc
