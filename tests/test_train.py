"""Training under DeepSpeed's real pipeline engine and MoE layer: several CPU processes over gloo.

- PP=2 x DP=2 with EP=2 gives the single-process loss, step after step (MHA/softmax and MLA/sigmoid/noaux_tc);
  PP=4 x GAS=4 the single-process loss and pre-clip gradient norm.
- A converted checkpoint loads into PP=1/2 x EP=1/2 with the same first-step loss.
- train.py: resume (3 + 3 steps) equals 6 uninterrupted steps; wrong configs fail before training.
"""

import json
import os

import pytest

from helpers.launch import REPO, deepspeed_launch, torchrun
from helpers.reference import reference_losses, reference_run
from helpers.runs import write_config

pytestmark = pytest.mark.slow
DRIVER = os.path.join(REPO, "tests", "workers", "train_pipeline.py")
# fp32 on CPU: the pipeline sums the same terms in another order (micro-batches, stages, all-to-all), so losses
# agree to rounding, not bit for bit. Measured: <= 2e-7 relative.
RTOL = 1e-5


def run_driver(tmp_path, ckpt, nprocs, stages, ep, steps, mbs=1, gas=2, extra=()):
    out = tmp_path / f"losses-pp{stages}-ep{ep}-n{nprocs}.json"
    torchrun(DRIVER, nprocs, ["--ckpt", ckpt, "--stages", str(stages), "--ep", str(ep), "--steps", str(steps),
                              "--mbs", str(mbs), "--gas", str(gas), "--out", str(out), *extra],
             str(out) + ".log")
    return json.loads(out.read_text())


@pytest.mark.parametrize("like", ["tiny", "base"])
def test_pp2_dp2_ep2_matches_single_process(tiny_ckpt, tmp_path, like):
    ckpt = tiny_ckpt(like=like, image_size=42)
    got = run_driver(tmp_path, ckpt, nprocs=4, stages=2, ep=2, steps=3)
    want = reference_losses(ckpt, global_batch=4, steps=3)
    assert got["losses"] == pytest.approx(want, rel=RTOL)
    # the engine's separately logged parts add up to the loss
    for loss, extra in zip(got["losses"], got["extras"]):
        assert extra["ce"] + extra["aux"] == pytest.approx(loss, rel=1e-6)
        assert extra["aux"] > 0


def test_four_stages_match_single_process(tiny_ckpt, tmp_path):
    """Middle stages both receive activations and send gradients (a DeepSpeed buffer-reuse trap: see the tuple
    order in recipe/parallel/pipeline.py); PP=4 x GAS=4 must still give the single-process losses and pre-clip
    global gradient norms (a gradient scale error under pipeline + accumulation would hide behind equal losses:
    AdamW ignores a per-tensor scale)."""
    ckpt = tiny_ckpt(like="base", image_size=42, num_hidden_layers=5)
    got = run_driver(tmp_path, ckpt, nprocs=4, stages=4, ep=1, steps=3, gas=4)
    want = reference_run(ckpt, global_batch=4, steps=3)
    assert got["losses"] == pytest.approx(want["losses"], rel=RTOL)
    assert [e["grad_norm"] for e in got["extras"]] == pytest.approx(want["grad_norms"], rel=RTOL)


@pytest.mark.parametrize("nprocs, stages, ep", [(2, 1, 1), (2, 1, 2), (2, 2, 1), (4, 2, 2)])
def test_converted_checkpoint_loads_into_any_layout(converted, tmp_path, nprocs, stages, ep):
    hf, ds = converted
    dp = nprocs // stages
    got = run_driver(tmp_path, hf, nprocs, stages, ep, steps=1, gas=4 // dp, extra=["--converted", ds])
    want = reference_losses(hf, global_batch=4, steps=1)
    assert got["losses"] == pytest.approx(want, rel=RTOL)


def test_activation_checkpointing_and_freezing(tiny_ckpt, tmp_path):
    """Non-reentrant recomputation of every ViT block and decoder layer changes no loss; frozen parts stay put and
    the rest trains exactly like one process with the same parts frozen."""
    ckpt = tiny_ckpt(like="base", image_size=42)
    got = run_driver(tmp_path, ckpt, nprocs=4, stages=2, ep=2, steps=3,
                     extra=["--act-ckpt", "--freeze", "vision,projector"])
    want = reference_losses(ckpt, global_batch=4, steps=3,
                            frozen_prefixes=("vision.", "projector.", "image_newline", "view_seperator"))
    assert got["losses"] == pytest.approx(want, rel=RTOL)
    assert got["frozen_tensors"] > 30 and got["frozen_changed"] == 0


# --- train.py ---------------------------------------------------------------------------------------------------

def losses(save_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(save_dir, "train_log.jsonl"))]


def test_resume_continues_with_the_same_samples_and_losses(run_inputs, tmp_path):
    """Packed (the default): step 3 ends inside a packing window, and the resumed run rebuilds exactly the rows of
    steps 4-6 from the saved consumed-sample count."""
    full = tmp_path / "full"
    monitor = {"csv_monitor": {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "full"}}
    deepspeed_launch(4, ["--deepspeed", write_config(tmp_path / "full.json", run_inputs, full, ds=monitor)],
                     str(tmp_path / "full.log"))
    split = tmp_path / "split"
    cfg = write_config(tmp_path / "split.json", run_inputs, split, save_interval=3)
    deepspeed_launch(4, ["--deepspeed", cfg, "--train-steps", "3"], str(tmp_path / "first.log"))
    assert open(split / "latest").read().strip() == "global_step3"
    deepspeed_launch(4, ["--deepspeed", cfg], str(tmp_path / "second.log"))  # resume: auto
    assert "resumed from" in open(tmp_path / "second.log").read()
    want, got = losses(full), losses(split)
    assert len(want) == 6 and len(got) == 6
    assert got == want  # same samples, same optimizer and scheduler state: identical losses
    assert want[-1] < want[0]
    log = json.loads(open(split / "train_log.jsonl").readlines()[-1])
    for key in ("lr", "grad_norm", "samples_per_s", "tokens_per_s", "padding_ratio", "ce", "aux", "step_time",
                "samples_per_row"):
        assert log[key] is not None, key
    records = [json.loads(line) for line in open(split / "train_log.jsonl")]
    assert all(r["samples_per_row"] > 1.5 for r in records)  # several samples per row
    consumed = sum(r["samples_per_row"] * 4 for r in records[:3])  # 4 rows per step
    assert 0 < consumed % 60 < 60  # 60 records: the checkpoint sits inside a packing window
    # the same figures went to DeepSpeed's CSV monitor, one file per series
    for series in ("loss", "ce", "aux", "lr", "tokens_per_s", "samples_per_row", "padding_ratio"):
        rows = open(tmp_path / "monitor" / "full" / f"Train_{series}.csv").read().strip().splitlines()
        assert len(rows) == 1 + 6, series  # header + one row per step
    assert "SPS" in open(tmp_path / "full.log").read() and "TPS" in open(tmp_path / "full.log").read()


@pytest.mark.parametrize("recipe, message", [
    ({"expert_parallel_size": 3}, "expert_parallel_size=3 does not divide the data-parallel size 2"),
    ({"expert_parallel_size": 16}, "does not divide the data-parallel size"),
    ({"decoder_split": [1, 1]}, "must be non-negative and add up to"),
    ({"decoder_split": [2, 1, 0]}, "has 3 entries for 2 pipeline stages"),
    ({"decoder_split": [1, 2]}, "holds no MoE layer"),
    ({"train_data": "/nonexistent/data.jsonl"}, "recipe.train_data='/nonexistent/data.jsonl': no such file"),
    ({"image_root": "/nonexistent"}, "recipe.image_root='/nonexistent': not a directory"),
    ({"model_dir": "/nonexistent"}, "no config.json there; convert a checkpoint with"),
    ({"pipeline_stages": 3}, "pipeline_stages=3 does not divide the world size 4"),
    ({"freeze": {"vit": True}}, "unknown parts"),
    ({"max_seq_len": 0}, "recipe.max_seq_len=0: must be a positive integer"),
    ({"no_such_key": 1}, "unknown keys ['no_such_key']"),
])
def test_wrong_config_is_refused_with_a_clear_message(run_inputs, tmp_path, recipe, message):
    from recipe.config import ConfigError
    from recipe.train import parse_args, prepare_run

    cfg = write_config(tmp_path / "bad.json", run_inputs, tmp_path / "save", **recipe)
    with pytest.raises(ConfigError) as err:
        prepare_run(parse_args(["--deepspeed", cfg]), world_size=4)
    assert message in str(err.value)


def test_batch_arithmetic_is_checked(run_inputs, tmp_path):
    from recipe.config import ConfigError
    from recipe.train import parse_args, prepare_run

    cfg = write_config(tmp_path / "bad.json", run_inputs, tmp_path / "save")
    raw = json.loads(open(cfg).read())
    raw["train_batch_size"] = 6
    open(cfg, "w").write(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"train_batch_size=6 != train_micro_batch_size_per_gpu 1 x "
                                          r"gradient_accumulation_steps 2 x data-parallel size 2"):
        prepare_run(parse_args(["--deepspeed", cfg]), world_size=4)


def test_launcher_stops_before_building_anything(run_inputs, tmp_path):
    cfg = write_config(tmp_path / "bad.json", run_inputs, tmp_path / "save", expert_parallel_size=3)
    proc = deepspeed_launch(4, ["--deepspeed", cfg], str(tmp_path / "bad.log"), check=False)
    text = open(tmp_path / "bad.log").read()
    assert proc.returncode != 0
    assert "configuration error" in text and "expert_parallel_size=3 does not divide" in text
    assert "Creating MoE layer" not in text and "SEED_LAYERS" not in text  # no model, no process group
