"""The closest this machine comes to the cluster: a real two-node DeepSpeed job on one host.

Two launchers with ``--no_ssh`` (what a cluster without passwordless ssh runs: one launcher per host), node ranks
0 and 1, master on 127.0.0.1, two ranks per "node"; pipeline stage 0 on node 0 and stage 1 on node 1 (PP=2 across
the nodes), experts split over the two ranks inside each node (EP=2).
"""

import json
import os
import subprocess

import pytest

from helpers.launch import BIN, REPO, cpu_env, free_port, tail
from helpers.runs import write_config

pytestmark = pytest.mark.slow


def test_two_node_job_trains_and_saves(run_inputs, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    save = tmp_path / "save"
    cfg = write_config(tmp_path / "two_nodes.json", run_inputs, save, train_steps=3)
    port = str(free_port())
    procs, logs = [], []
    for node in (0, 1):
        log = open(tmp_path / f"node{node}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [os.path.join(BIN, "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
             "--master_addr", "127.0.0.1", "--master_port", port, "recipe/train.py", "--deepspeed", cfg],
            cwd=REPO, env=cpu_env(), stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
        for log in logs:
            log.close()
    assert codes == [0, 0], "\n".join(tail(str(tmp_path / f"node{n}.log")) for n in (0, 1))
    node0 = open(tmp_path / "node0.log").read()
    assert "2 pipeline stages [0, 6, 8], expert parallel 2" in node0
    # node 1's launcher ran global ranks 2 and 3: the second pipeline stage
    assert "'node1': [2, 3]" in open(tmp_path / "node1.log").read()
    log = [json.loads(line) for line in open(save / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in log)
    tag = save / "global_step3"
    assert (tag / "mp_rank_00_model_states.pt").exists() and (tag / "mp_rank_01_model_states.pt").exists()
    assert (save / "latest").read_text().strip() == "global_step3"
