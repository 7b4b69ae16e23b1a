"""What survives what (docs/checkpoints.md): training checkpoints under kills, truncation, tampering and hostile
names. Real train.py runs (PP=2 x DP=2, EP=2, 4 CPU ranks over gloo) killed at exact points of the save protocol
by ``DSVL2_FAILPOINT``, and damaged copies of a real checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from recipe.checkpoint import CheckpointError
from recipe.checkpoint.commit import COMPLETE_NAME, complete_tags, resolve_tag, trim_log, verify_complete
from recipe.checkpoint.files import file_sha256, load_torch, resolve_inside

from helpers.launch import BIN, cpu_env, free_port, run_logged, tail
from helpers.runs import write_config

STEPS = 4


def launch(tmp_path, name, cfg, env=None, check=True, extra=()):
    log = str(tmp_path / f"{name}.log")
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "4", "--master_port", str(free_port()), "recipe/train.py",
           "--deepspeed", cfg, *extra]
    proc = run_logged(cmd, log, timeout=300, env=cpu_env(**(env or {})))
    if check:
        assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{tail(log)}"
    return proc, open(log, errors="replace").read()


def log_steps(save_dir):
    return [json.loads(line) for line in open(os.path.join(save_dir, "train_log.jsonl"))]


@pytest.fixture(scope="module")
def baseline(run_inputs, tmp_path_factory):
    """An uninterrupted 4-step run saving every 2 steps: its losses, and its save dir (global_step2 and 4)."""
    tmp = tmp_path_factory.mktemp("baseline")
    save = tmp / "save"
    cfg = write_config(tmp / "cfg.json", run_inputs, save, train_steps=STEPS, save_interval=2)
    launch(tmp, "baseline", cfg)
    return {"losses": [r["loss"] for r in log_steps(save)], "save_dir": str(save)}


# --- killed at exact points; resume gives the uninterrupted losses ----------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("point", [
    "train_step@1@4",                    # mid-training, before step 4 (the last complete save is step 2)
    "after_first_file@3@global_step4",   # mid-save: some of rank 3's files written, no completion record
    "before_latest@0@global_step4",      # the record written, before `latest` moves
])
def test_killed_rank_resumes_from_the_last_complete_checkpoint(run_inputs, baseline, tmp_path, point):
    save = tmp_path / "save"
    cfg = write_config(tmp_path / "cfg.json", run_inputs, save, train_steps=STEPS, save_interval=2)
    proc, text = launch(tmp_path, "killed", cfg, env={"DSVL2_FAILPOINT": point}, check=False)
    assert proc.returncode != 0 and f"failpoint {point} reached" in text
    assert open(save / "latest").read().strip() == "global_step2"
    # global_step4, where it exists, has no completion record; killed just before `latest` moved, it is complete
    # but not yet named, and the resume still starts from global_step2
    want = ["global_step2", "global_step4"] if point.startswith("before_latest") else ["global_step2"]
    assert complete_tags(str(save)) == want
    _, text = launch(tmp_path, "resumed", cfg)
    assert "resumed from" in text and "global_step2" in text
    steps = log_steps(save)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # the killed run's step records are dropped, not repeated
    assert [r["loss"] for r in steps] == baseline["losses"]
    assert open(save / "latest").read().strip() == "global_step4"


# --- damaged checkpoints: a clear error naming the file, the previous complete tag offered ------------------------

def copy_save(baseline, tmp_path):
    dst = tmp_path / "save"
    shutil.copytree(baseline["save_dir"], dst)
    return str(dst)


def test_complete_checkpoint_verifies(baseline, tmp_path):
    save = copy_save(baseline, tmp_path)
    assert complete_tags(save) == ["global_step2", "global_step4"]
    record = verify_complete(save, "global_step4")
    names = set(record["files"])
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "run_config.json"} <= names
    assert {f"rng_state_rank{r:05d}.pt" for r in range(4)} <= names
    assert any(n.startswith("layer_0_expert_") for n in names) and any("optim_states" in n for n in names)
    for name, rec in record["files"].items():  # sizes and sha256 as written
        path = os.path.join(save, "global_step4", name)
        assert os.path.getsize(path) == rec["size"] and file_sha256(path) == rec["sha256"]
    # every non-tensor type DeepSpeed wrote is on the loader's allow-list (a DeepSpeed upgrade that adds one fails
    # here, not in a user's resume)
    from recipe.parallel.checkpointing import deepspeed_safe_globals
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in deepspeed_safe_globals()}
    for name in names:
        if name.endswith(".pt"):
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(save, "global_step4", name)))
            assert unsafe <= allowed, (name, unsafe - allowed)


@pytest.mark.parametrize("victim", ["mp_rank_01_model_states.pt", "layer_0_expert_1_mp_rank_00_model_states.pt",
                                    "optim_states", "rng_state_rank00002.pt"])
def test_truncated_file_is_named(baseline, tmp_path, victim):
    save = copy_save(baseline, tmp_path)
    tag_dir = os.path.join(save, "global_step4")
    name = next(n for n in sorted(os.listdir(tag_dir)) if victim in n)
    path = os.path.join(tag_dir, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError) as err:
        verify_complete(save, resolve_tag(save, "auto"))
    assert path in str(err.value) and "truncated" in str(err.value)
    assert "--resume global_step2" in str(err.value)


def test_latest_problems_are_named(baseline, tmp_path):
    save = copy_save(baseline, tmp_path)
    open(os.path.join(save, "latest"), "w").close()
    with pytest.raises(CheckpointError, match=r"latest: empty; .*--resume global_step4"):
        resolve_tag(save, "auto")
    open(os.path.join(save, "latest"), "w").write("global_step9")
    with pytest.raises(CheckpointError, match=r"names 'global_step9': no checkpoint directory"):
        resolve_tag(save, "auto")
    os.remove(os.path.join(save, "global_step4", COMPLETE_NAME))
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint .*--resume global_step2"):
        verify_complete(save, "global_step4")


@pytest.mark.parametrize("tag", ["../outside", "/etc", "a/../../b", "..", ""])
def test_tags_stay_inside_save_dir(baseline, tmp_path, tag):
    save = copy_save(baseline, tmp_path)
    os.makedirs(tmp_path / "outside", exist_ok=True)
    with pytest.raises(CheckpointError):
        resolve_tag(save, tag) if tag else resolve_inside(save, tag)
    open(os.path.join(save, "latest"), "w").write(tag or " ")
    with pytest.raises(CheckpointError):
        resolve_tag(save, "auto")


def test_symlinked_tag_outside_is_refused(baseline, tmp_path):
    save = copy_save(baseline, tmp_path)
    shutil.copytree(os.path.join(save, "global_step4"), tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", os.path.join(save, "sneaky"))
    with pytest.raises(CheckpointError, match="outside"):
        resolve_tag(save, "sneaky")


class _Payload:
    """Unpickling this runs ``touch <path>``: the shape of a malicious checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"0.w": torch.zeros(2)}, "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_torch(str(path))
    assert not marker.exists()
    with open(tmp_path / "plain.pkl", "wb") as f:  # not even a zip: the legacy pickle path is refused too
        pickle.dump(_Payload(marker), f)
    with pytest.raises(CheckpointError):
        load_torch(str(tmp_path / "plain.pkl"))
    assert not marker.exists()


@pytest.mark.slow
def test_resume_refuses_tampered_optimizer_state(run_inputs, baseline, tmp_path):
    """Doubling fp32 master weights inside an optimizer shard (same size, valid pickle) is caught by the sha256
    check before DeepSpeed unpickles it; every rank stops, the message names the file."""
    save = copy_save(baseline, tmp_path)
    tag_dir = os.path.join(save, "global_step4")
    name = next(n for n in sorted(os.listdir(tag_dir)) if "optim_states" in n)
    path = os.path.join(tag_dir, name)
    state = torch.load(path, weights_only=False)
    opt = state["optimizer_state_dict"]
    groups = opt.get("single_partition_of_fp32_groups") or opt.get("fp32_flat_groups")
    with torch.no_grad():
        groups[0][:200] *= 2
    torch.save(state, path)
    cfg = write_config(tmp_path / "cfg.json", run_inputs, save, train_steps=STEPS + 2, save_interval=2)
    proc, text = launch(tmp_path, "tampered", cfg, check=False)
    assert proc.returncode != 0
    assert path in text and ("sha256 differs" in text or "recorded" in text)
    assert not any(json.loads(line)["step"] > STEPS for line in open(os.path.join(save, "train_log.jsonl")))


def test_trim_log_keeps_steps_up_to_resume(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4, 5)) + "garbage\n")
    assert trim_log(str(path), 3) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()[:3]] == [1, 2, 3]
    assert path.read_text().splitlines()[-1] == "garbage"
