"""Process failures (issue 9, items 7 and 8), with real processes on CPU.

- Killing the ``deepspeed`` launcher with SIGKILL stops every rank within seconds: the per-host
  ``deepspeed.launcher.launch`` survives its runner, so each rank watches the whole launcher chain
  (``recipe/parallel/supervise.py``), and the save_dir lock and the master port are free afterwards.
- A second job on a ``save_dir`` in use fails at start-up naming the holder; the first trains on.
- A node that fails its start-up checks makes the other node stop at once with the cause, the rendezvous address
  and the missing ranks; a node that never starts makes it stop at ``DSVL2_INIT_TIMEOUT_S``.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from helpers.launch import BIN, REPO, cpu_env, free_port, tail
from helpers.runs import write_config

pytestmark = pytest.mark.slow


def ranks_of(marker: str) -> list:
    """Live train.py processes whose command line contains ``marker`` (a config path unique to the test)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if "recipe/train.py --local_rank=" in cmd and marker in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def steps_logged(save_dir) -> int:
    path = os.path.join(save_dir, "train_log.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


class Job:
    """A ``deepspeed`` launcher in its own session (so cleanup can end exactly its processes), output in a log."""

    def __init__(self, args: list, log_path, env: dict | None = None):
        self.log_path = str(log_path)
        self.log = open(self.log_path, "w")
        self.start = time.monotonic()
        self.proc = subprocess.Popen([os.path.join(BIN, "deepspeed"), *args], cwd=REPO, env=env or cpu_env(),
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launcher still running after {timeout} s:\n{tail(self.log_path)}") from None

    def text(self) -> str:
        return open(self.log_path, errors="replace").read()

    def cleanup(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session this test started, nothing else (stopped or not)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def single_node(cfg: str, port: int, train_args=()) -> list:
    return ["--num_gpus", "4", "--master_port", str(port), "recipe/train.py", "--deepspeed", cfg, *train_args]


def test_killing_the_launcher_stops_every_rank(run_inputs, tmp_path):
    from recipe.parallel.supervise import save_dir_holder

    save = tmp_path / "save"
    cfg = write_config(tmp_path / "sigkill.json", run_inputs, save, train_steps=200)
    port = free_port()
    job = Job(single_node(cfg, port), tmp_path / "job.log")
    try:
        wait_for(lambda: steps_logged(save) >= 1 or job.proc.poll() is not None, 240, "the first training step")
        assert job.proc.poll() is None, tail(job.log_path)
        ranks = ranks_of(cfg)
        assert len(ranks) == 4, [r.cmdline() for r in ranks]
        launch = psutil.Process(ranks[0].ppid())  # the per-host deepspeed.launcher.launch, child of the runner
        assert "deepspeed.launcher.launch" in " ".join(launch.cmdline()) and launch.ppid() == job.proc.pid
        assert save_dir_holder(str(save)) is not None

        os.kill(job.proc.pid, signal.SIGKILL)  # the top `deepspeed` process only; left unreaped (a zombie)
        killed = time.monotonic()
        wait_for(lambda: not any(r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in ranks + [launch]),
                 20, "every rank and the per-host launcher to stop")
        stopped_in = time.monotonic() - killed
        steps = steps_logged(save)
        time.sleep(2)
        assert steps_logged(save) == steps < 200  # nobody writes save_dir any more
        assert f"launcher (pid {job.proc.pid}) died; stopping rank" in job.text()
        assert save_dir_holder(str(save)) is None  # a restart may take save_dir ...
        with socket.socket() as s:  # ... and the master port (no listener left; TIME_WAIT is fine, as for TCPStore)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
        print(f"ranks stopped {stopped_in:.1f} s after SIGKILL of the launcher")
    finally:
        job.cleanup()
    # the same command again (one step, a fresh port as a user would pick) takes the save_dir and finishes
    again = Job(single_node(cfg, free_port(), ["--train-steps", "1"]), tmp_path / "restart.log")
    try:
        assert again.wait(240) == 0, tail(again.log_path)
        assert (save / "latest").read_text().strip() == "global_step1"
    finally:
        again.cleanup()


def test_a_second_job_on_the_same_save_dir_fails_fast(run_inputs, tmp_path):
    from recipe.parallel.supervise import save_dir_holder

    save = tmp_path / "save"
    cfg_a = write_config(tmp_path / "job_a.json", run_inputs, save, train_steps=100000)
    cfg_b = write_config(tmp_path / "job_b.json", run_inputs, save, train_steps=100000)
    a = Job(single_node(cfg_a, free_port()), tmp_path / "a.log")
    b = None
    try:
        wait_for(lambda: save_dir_holder(str(save)) or a.proc.poll() is not None, 240, "job A to take save_dir")
        assert a.proc.poll() is None, tail(a.log_path)
        rank0 = [p for p in ranks_of(cfg_a) if "--local_rank=0" in p.cmdline()]
        assert len(rank0) == 1
        # A holds the lock; pause it while B runs (2 cores: A training flat out would slow B's start-up several-fold)
        os.killpg(a.proc.pid, signal.SIGSTOP)

        b = Job(single_node(cfg_b, free_port()), tmp_path / "b.log")
        code = b.wait(240)
        b_took = time.monotonic() - b.start
        os.killpg(a.proc.pid, signal.SIGCONT)
        text = b.text()
        assert code == 2, tail(b.log_path)
        holder = f"save_dir {save} is in use by pid {rank0[0].pid} on host {socket.gethostname()} since "
        assert holder in text and "stop that job or choose another save_dir" in text, tail(b.log_path)
        # every rank of B stopped on its own (rank 0's message reached them), none built a model
        assert "start-up aborted at the rendezvous" in text, tail(b.log_path)
        assert "Creating MoE layer" not in text and not ranks_of(cfg_b)

        # A is unaffected: all its ranks alive, and it trains on
        assert len(ranks_of(cfg_a)) == 4 and a.proc.poll() is None
        done = steps_logged(save)
        wait_for(lambda: steps_logged(save) > done or a.proc.poll() is not None, 240, "job A's next step")
        assert a.proc.poll() is None, tail(a.log_path)
        assert "Traceback" not in a.text() and "start-up" not in a.text(), tail(a.log_path)
        print(f"job B exited {code} after {b_took:.1f} s")
    finally:
        a.cleanup()
        if b is not None:
            b.cleanup()


def two_node_launch(tmp_path, node: int, cfg: str, port: int, env: dict) -> Job:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    return Job(["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1",
                "--master_port", str(port), "recipe/train.py", "--deepspeed", cfg], tmp_path / f"node{node}.log", env)


def test_a_node_failing_its_checks_stops_the_other_node(run_inputs, tmp_path):
    save = tmp_path / "save"
    good = write_config(tmp_path / "node0.json", run_inputs, save, train_steps=3)
    bad = write_config(tmp_path / "node1.json", run_inputs, save, train_steps=3,
                       train_data=str(tmp_path / "missing_on_node1.jsonl"))  # this host lacks the data file
    port = free_port()
    env = cpu_env(DSVL2_INIT_TIMEOUT_S=120)  # long: node 0 must stop on node 1's posted failure, not at the timeout
    node0 = two_node_launch(tmp_path, 0, good, port, env)
    node1 = two_node_launch(tmp_path, 1, bad, port, env)
    try:
        assert node1.wait(120) == 2, tail(node1.log_path)
        code0 = node0.wait(120)
        took = time.monotonic() - node0.start
        text = node0.text()
        assert code0 == 2, tail(node0.log_path)
        waited = re.search(rf"start-up aborted at the rendezvous 127\.0\.0\.1:{port} after (\d+) s: ", text)
        assert waited and int(waited.group(1)) < 100, tail(node0.log_path)  # (not the timeout: 120 s)
        assert "missing ranks 2-3" in text and "(node 1) failed its start-up checks: configuration error: " \
            f"recipe.train_data='{tmp_path / 'missing_on_node1.jsonl'}': no such file" in text, tail(node0.log_path)
        assert "Creating MoE layer" not in text and not ranks_of(good) and not ranks_of(bad)
        print(f"node 0 exited {code0} after {took:.1f} s")
    finally:
        node0.cleanup()
        node1.cleanup()


def test_a_node_that_never_starts_times_out_naming_the_missing_ranks(run_inputs, tmp_path):
    cfg = write_config(tmp_path / "alone.json", run_inputs, tmp_path / "save", train_steps=3)
    port = free_port()
    node0 = two_node_launch(tmp_path, 0, cfg, port, cpu_env(DSVL2_INIT_TIMEOUT_S=12))
    try:
        code = node0.wait(120)
        took = time.monotonic() - node0.start
        text = node0.text()
        assert code == 1, tail(node0.log_path)
        assert f"waiting for 4 ranks at 127.0.0.1:{port} (timeout 12 s)" in text, tail(node0.log_path)
        assert f"rendezvous at 127.0.0.1:{port} timed out after 1" in text and "DSVL2_INIT_TIMEOUT_S=12" in text
        assert "2 of 4 ranks arrived; missing ranks 2-3" in text, tail(node0.log_path)
        assert not ranks_of(cfg)
        print(f"node 0 exited {code} after {took:.1f} s")
    finally:
        node0.cleanup()


# --- the watchdog and the lock on their own (no DeepSpeed job: seconds) --------------------------------------------

RANK_SCRIPT = textwrap.dedent("""
    import logging, sys, time
    sys.path.insert(0, {repo!r})
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True)
    from recipe.parallel import supervise
    supervise.start_watchdog(poll_s=0.2)
    print("watching", flush=True)
    time.sleep(120)
""")

# a stand-in for a launcher: named like one (so the rank's watchdog treats it as one), starts the next stage and waits
LAUNCHER_SCRIPT = textwrap.dedent("""
    import subprocess, sys
    subprocess.Popen(sys.argv[1:]).wait()
""")


def fake_chain(tmp_path):
    """deepspeed (runner) -> torchrun (per host) -> rank, like the real chain; returns (runner, log path)."""
    for name in ("deepspeed", "torchrun"):
        (tmp_path / name).write_text(LAUNCHER_SCRIPT)
    (tmp_path / "rank.py").write_text(RANK_SCRIPT.format(repo=REPO))
    log = tmp_path / "rank.log"
    env = dict(os.environ, LOCAL_RANK="0", RANK="5", PYTHONUNBUFFERED="1")
    runner = subprocess.Popen([sys.executable, str(tmp_path / "deepspeed"), sys.executable, str(tmp_path / "torchrun"),
                               sys.executable, str(tmp_path / "rank.py")], stdout=open(log, "w"),
                              stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_for(lambda: "watching" in log.read_text(), 60, "the rank's watchdog")
    return runner, log


def chain_pids(runner) -> tuple:
    launch = psutil.Process(runner.pid).children()[0]
    return launch, launch.children()[0]


@pytest.mark.parametrize("kill", ["runner", "per-host launcher"])
def test_watchdog_stops_the_rank_when_any_launcher_dies(tmp_path, kill):
    runner, log = fake_chain(tmp_path)
    try:
        launch, rank = chain_pids(runner)
        victim = runner.pid if kill == "runner" else launch.pid
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not rank.is_running() or rank.status() == psutil.STATUS_ZOMBIE, 10, "the rank to stop")
        if kill == "runner":  # the per-host launcher outlives a killed runner; only the watchdog stops the rank
            assert f"launcher (pid {runner.pid}) died; stopping rank 5" in log.read_text(), log.read_text()
        # (killing the per-host launcher, the rank's parent, stops it at once by PR_SET_PDEATHSIG: no log line)
    finally:
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()


def test_what_counts_as_a_launcher_and_how_missing_ranks_read():
    from recipe.parallel.dist import _ranges
    from recipe.parallel.supervise import is_launcher

    py = "/venv/bin/python3.11"
    assert is_launcher([py, "/venv/bin/deepspeed", "--num_gpus", "4", "recipe/train.py"])  # the runner
    assert is_launcher([py, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30="])  # per host
    assert is_launcher(["/venv/bin/torchrun", "--nproc_per_node", "2", "x.py"])
    assert is_launcher([py, "-m", "torch.distributed.run", "x.py"])
    assert not is_launcher([py, "-u", "recipe/train.py", "--local_rank=0"])  # a rank
    assert not is_launcher(["timeout", "120", "/venv/bin/deepspeed"]) and not is_launcher(["bash", "-c", "ds x"])
    assert not is_launcher([])
    assert _ranges([2, 3]) == "2-3" and _ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and _ranges([]) == "none"


HOLD_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from recipe.config import ConfigError
    from recipe.parallel.supervise import lock_save_dir
    try:
        lock_save_dir(sys.argv[1])
    except ConfigError as e:
        print(e, flush=True)
        sys.exit(2)
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_save_dir_lock_names_its_holder_and_dies_with_it(tmp_path):
    from recipe.parallel.supervise import save_dir_holder

    script = tmp_path / "hold.py"
    script.write_text(HOLD_SCRIPT.format(repo=REPO))
    save = str(tmp_path / "save")
    holder = subprocess.Popen([sys.executable, str(script), save, "120"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        info = json.loads(open(os.path.join(save, ".lock")).read())
        assert info["pid"] == holder.pid and info["host"] == socket.gethostname()
        assert save_dir_holder(save).startswith(f"pid {holder.pid} on host {socket.gethostname()} since ")
        second = subprocess.run([sys.executable, str(script), save, "0"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert second.stdout.startswith(f"save_dir {save} is in use by pid {holder.pid} on host ")
        assert second.stdout.rstrip().endswith("; stop that job or choose another save_dir")
    finally:
        holder.kill()
        holder.wait()
    assert save_dir_holder(save) is None  # SIGKILL leaves no stale lock
    again = subprocess.run([sys.executable, str(script), save, "0"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == "locked"
