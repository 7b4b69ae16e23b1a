"""Validation during training (recipe.eval_data): the pipeline engine's eval_batch over a fixed held-out set.

- The validation loss of PP=2 x DP=2, EP=2 (packed training rows) and of PP=4 (whose middle stages only relay;
  unpacked) equals the token-mean loss of the plain single-process model in eval mode on the same records, loaded
  from the checkpoint of that step.
- Validating after every step changes no training loss, no gradient norm and no saved random-generator state (the
  eval loader, eval mode, the random generators and the routers' expert-load counts leave training as it was), with
  the noaux_tc bias update on.
- The figures land in train_log.jsonl and DeepSpeed's CSV monitor (Eval/loss, and not DeepSpeed's own per-batch
  eval events).
- The settings and the schedule, without processes.
"""

import json
import os

import pytest
import torch

from helpers.launch import deepspeed_launch
from helpers.runs import write_config

# fp32 on CPU: the pipeline sums the same terms in another order (micro-batches, ranks, all-to-all).
RTOL = 1e-5
EVAL_SAMPLES = 8  # two eval steps of the test configs' global batch of 4
EVAL_KEYS = ("eval_loss", "eval_tokens", "eval_samples", "eval_time")


def read_log(save_dir):
    return [json.loads(line) for line in open(os.path.join(save_dir, "train_log.jsonl"))]


@pytest.fixture(scope="module")
def split_data(run_inputs, tmp_path_factory):
    """The session's synthetic ai2d records split by prepare_ai2d.py into training and held-out files."""
    from recipe.prepare_ai2d import prepare

    out = tmp_path_factory.mktemp("split")
    raw = run_inputs["image_root"]
    train, val = str(out / "train.jsonl"), str(out / "val.jsonl")
    report = prepare(os.path.join(raw, "ai2d_train.jsonl"), raw, train, progress=False, val_fraction=0.3,
                     val_output_path=val)
    assert report["val_records"] >= EVAL_SAMPLES
    return dict(run_inputs, train_data=train, eval_data=val)


@pytest.fixture(scope="module")
def runs(split_data, tmp_path_factory):
    """train.py on 4 CPU ranks (PP=2 x DP=2, EP=2, noaux_tc bias update on), 3 steps, with validation after every
    step (a checkpoint per step, CSV monitor on) and without validation."""
    root = tmp_path_factory.mktemp("validation-runs")
    inputs = {k: split_data[k] for k in ("model_dir", "train_data", "image_root")}
    common = dict(train_steps=3, correction_bias_update_rate=0.01)
    monitor = {"csv_monitor": {"enabled": True, "output_path": str(root / "monitor"), "job_name": "eval"}}
    out = {"eval": root / "eval", "plain": root / "plain", "monitor": root / "monitor" / "eval"}
    cfg = write_config(root / "eval.json", inputs, out["eval"], ds=monitor, eval_data=split_data["eval_data"],
                       eval_interval=1, eval_samples=EVAL_SAMPLES, save_interval=1, **common)
    deepspeed_launch(4, ["--deepspeed", cfg], str(root / "eval.log"))
    cfg = write_config(root / "plain.json", inputs, out["plain"], **common)
    deepspeed_launch(4, ["--deepspeed", cfg], str(root / "plain.log"))
    return out


def plain_heldout_loss(save_dir, step, eval_data, image_root, max_seq_len=1024):
    """The plain model loaded from the training checkpoint of ``step``, in eval mode, fp32: token-mean loss of the
    first EVAL_SAMPLES held-out records (answer-only labels, as the run trains)."""
    from recipe.data.processor import DeepseekVLV2Processor
    from recipe.eval.loading import load_for_inference
    from recipe.eval.loss import heldout_loss

    loaded = load_for_inference(str(save_dir), tag=f"global_step{step}", dtype="fp32", device="cpu")
    processor = DeepseekVLV2Processor.from_pretrained(str(save_dir), mask_prompt=True, max_seq_len=max_seq_len)
    return heldout_loss(loaded.model, processor, eval_data, image_root, num_samples=EVAL_SAMPLES, batch_size=3)


def test_validation_after_every_step_changes_no_training_figure(runs):
    with_eval, without = read_log(runs["eval"]), read_log(runs["plain"])
    assert [r["step"] for r in with_eval] == [r["step"] for r in without] == [1, 2, 3]
    for key in ("loss", "ce", "aux", "grad_norm"):
        assert [r[key] for r in with_eval] == [r[key] for r in without], key  # bit for bit
    assert all(k not in r for r in without for k in EVAL_KEYS)
    # what a resume restores: every rank's random generator state, saved with the last checkpoint, is the same
    for rank in range(4):
        name = f"global_step3/rng_state_rank{rank:05d}.pt"
        states = [torch.load(runs[run] / name, weights_only=True)["torch"] for run in ("eval", "plain")]
        assert torch.equal(*states), name


def test_pp2_dp2_ep2_validation_loss_equals_the_plain_model(runs, split_data):
    log = read_log(runs["eval"])
    for rec in log:
        want = plain_heldout_loss(runs["eval"], rec["step"], split_data["eval_data"], split_data["image_root"])
        assert rec["eval_loss"] == pytest.approx(want["loss"], rel=RTOL), rec["step"]
        assert rec["eval_tokens"] == want["tokens"] and rec["eval_samples"] == want["samples"] == EVAL_SAMPLES
    assert log[-1]["eval_loss"] != log[0]["eval_loss"]  # the model trained in between


def test_eval_figures_land_in_the_log_and_the_csv_monitor(runs):
    log = read_log(runs["eval"])
    for rec in log:
        assert all(rec[k] is not None for k in EVAL_KEYS) and rec["eval_time"] > 0
    rows = open(runs["monitor"] / "Eval_loss.csv").read().strip().splitlines()
    assert len(rows) == 1 + 3  # header + one row per validation
    assert [float(r.split(",")[1]) for r in rows[1:]] == pytest.approx([r["eval_loss"] for r in log], rel=1e-6)
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3]
    assert not (runs["monitor"] / "Train_Samples_eval_loss.csv").exists()  # DeepSpeed's own per-batch events
    assert (runs["monitor"] / "Train_loss.csv").exists()


def test_middle_pipeline_stages_relay_validation(split_data, tiny_ckpt, tmp_path):
    """PP=4 (DP=1): stages 1 and 2 hold neither data nor labels and pass None to eval_batch; the loss is still
    the plain model's. Training without packing here (the other runs pack); validation only after the last step
    (eval_interval 0)."""
    model_dir = tiny_ckpt(like="base", image_size=42, num_hidden_layers=5)
    save = tmp_path / "pp4"
    inputs = {"model_dir": model_dir, "train_data": split_data["train_data"], "image_root": split_data["image_root"]}
    cfg = write_config(tmp_path / "pp4.json", inputs, save, ds={"gradient_accumulation_steps": 4},
                       pipeline_stages=4, decoder_split=[2, 1, 1, 1], expert_parallel_size=1, train_steps=2,
                       packing=False, eval_data=split_data["eval_data"], eval_samples=EVAL_SAMPLES)
    deepspeed_launch(4, ["--deepspeed", cfg], str(tmp_path / "pp4.log"))
    log = read_log(save)
    assert "eval_loss" not in log[0]
    want = plain_heldout_loss(save, 2, split_data["eval_data"], split_data["image_root"])
    assert log[1]["eval_loss"] == pytest.approx(want["loss"], rel=RTOL)


# --- settings and schedule (no processes) ------------------------------------------------------------------------

def test_eval_policy_runs_every_interval_and_after_the_last_step():
    from recipe.validation import EvalPolicy

    every3 = EvalPolicy(enabled=True, interval=3, last_step=10)
    assert [s for s in range(1, 11) if every3.should_eval(s)] == [3, 6, 9, 10]
    assert [s for s in range(1, 6) if EvalPolicy(True, 0, 5).should_eval(s)] == [5]
    assert not any(EvalPolicy(False, 1, 5).should_eval(s) for s in range(1, 6))


def test_eval_set_size_rounds_up_to_whole_global_batches(tmp_path):
    from recipe.train_config import TrainConfig
    from recipe.train_data import DataError
    from recipe.validation import eval_set_size

    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(10)) + "\n")

    class Run:
        global_batch = 4

    def size(samples):
        tc = TrainConfig.from_dict({"model_dir": "m", "train_data": "d", "image_root": "i", "eval_data": str(data),
                                    "eval_samples": samples})
        return eval_set_size(tc, Run)

    assert [size(None), size(1), size(4), size(5), size(100)] == [12, 4, 4, 8, 12]
    data.write_text("\n")
    with pytest.raises(DataError, match="no records to validate on"):
        size(None)


@pytest.mark.parametrize("recipe, message", [
    ({"eval_interval": 5}, "recipe.eval_interval=5 needs recipe.eval_data"),
    ({"eval_data": "v.jsonl", "eval_interval": -1}, "recipe.eval_interval=-1: must be a non-negative integer"),
    ({"eval_data": "v.jsonl", "eval_samples": 0}, "recipe.eval_samples=0: must be a positive integer or null"),
    ({"eval_data": "v.jsonl", "eval_interval": "5"}, 'recipe.eval_interval="5": expected an integer'),
    ({"eval_data": ""}, 'recipe.eval_data="": expected a non-empty string (a path) or null'),
    ({"eval_data": "v.jsonl", "eval_samples": 2.0}, "recipe.eval_samples=2.0: expected an integer or null"),
])
def test_eval_settings_are_checked(recipe, message):
    from recipe.config import ConfigError
    from recipe.train_config import TrainConfig

    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"model_dir": "m", "train_data": "d", "image_root": "i", **recipe})
    assert message in str(err.value)


def test_eval_paths_are_checked_before_start(run_inputs, tmp_path):
    from recipe.config import ConfigError
    from recipe.train import parse_args, prepare_run

    cfg = write_config(tmp_path / "c.json", run_inputs, tmp_path / "save")
    with pytest.raises(ConfigError, match=r"recipe.eval_data='/nonexistent/val.jsonl': no such file; hold out"):
        prepare_run(parse_args(["--deepspeed", cfg, "--eval-data", "/nonexistent/val.jsonl"]), world_size=4)
    cfg = write_config(tmp_path / "d.json", run_inputs, tmp_path / "save", eval_data=run_inputs["train_data"],
                       eval_image_root="/nonexistent")
    with pytest.raises(ConfigError, match=r"recipe.eval_image_root='/nonexistent': not a directory"):
        prepare_run(parse_args(["--deepspeed", cfg]), world_size=4)


def test_a_dataloader_iterator_draws_from_torch_rng_and_validation_puts_it_back():
    """Why validation runs under rng_preserved: starting a DataLoader iterator draws its workers' base seed from
    torch's default generator, so every later draw of training would shift."""
    from torch.utils.data import DataLoader

    from recipe.validation import rng_preserved

    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    next(iter(DataLoader(range(4), batch_size=2)))
    assert not torch.equal(torch.rand(3), want)
    torch.manual_seed(0)
    with rng_preserved():
        next(iter(DataLoader(range(4), batch_size=2)))
        torch.rand(5)
    assert torch.equal(torch.rand(3), want)
