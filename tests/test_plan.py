"""recipe.plan: per-layer counts equal to a meta build, optimizer-state bytes equal to what the real DeepSpeed engine
allocates, and the seed cluster config checked for fit. The cost model itself: test_cost.py."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from recipe.config import ConfigError, VL2Config
from recipe.model import DeepseekVLV2ForCausalLM
from recipe.parallel import layout
from recipe.plan import ATLAS_800T_A2_BF16_TFLOPS, ORIGINAL_RECIPE_SPS, GiB, format_plan, main, plan
from recipe.plan.cli import released_size
from recipe.tools.tiny_config import tiny_config

from helpers.launch import REPO, torchrun

RELEASED = os.path.join(REPO, "recipe", "released_configs")
EP8 = os.path.join(REPO, "ds_configs", "ep8.json")
RELEASED_TOTALS = {"tiny": 3_370_501_440, "small": 16_148_349_504, "base": 27_480_134_248}


def released(name: str) -> VL2Config:
    return VL2Config.from_json(os.path.join(RELEASED, f"{name}.json"))


def ep8() -> dict:
    with open(EP8) as f:
        return json.load(f)


TINY_VARIANTS = {
    "tiny-like": lambda: tiny_config("tiny"),
    "small-like": lambda: tiny_config("small"),
    "base-like": lambda: tiny_config("base"),
    "q-lora+bias+freq2": lambda: tiny_config("small", q_lora_rank=16, attention_bias=True, moe_layer_freq=2,
                                             num_hidden_layers=5),
    "gqa, no shared experts": lambda: tiny_config("tiny", num_key_value_heads=2, n_shared_experts=None),
    "dense, deep projector": lambda: VL2Config.from_dict({
        **tiny_config("tiny").to_dict(),
        "projector_config": {**tiny_config("tiny").to_dict()["projector_config"], "depth": 3, "mlp_ratio": 2},
        "language_config": {**tiny_config("tiny").to_dict()["language_config"], "n_routed_experts": None}}),
}


def _meta_state(cfg: VL2Config) -> dict:
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(RELEASED_TOTALS) + list(TINY_VARIANTS))
def test_per_layer_counts_match_a_meta_build(name):
    cfg = released(name) if name in RELEASED_TOTALS else TINY_VARIANTS[name]()
    built = _meta_state(cfg)
    per_layer: dict = {}
    for key, shape in built.items():
        row = per_layer.setdefault(layout.layer_index_of(cfg, key), [0, 0, 0])
        buffer = key.endswith("e_score_correction_bias")
        row[2 if buffer else 1 if layout.parse_expert_key(key) else 0] += math.prod(shape)
    p = plan(cfg, ep8(), pipeline_stages=1, expert_parallel_size=1, decoder_split="auto", suggest=False)
    assert {i: [d, e, b] for i, _, _, d, e, b in p.layer_params} == per_layer
    assert p.total_params == sum(math.prod(s) for s in built.values())


@pytest.mark.slow
def test_optimizer_state_bytes_equal_the_real_engine(tmp_path):
    """PP=2 x DP=2 with EP=2 on 4 CPU ranks, bf16 + fp32 accumulation + ZeRO-1 (BF16_Optimizer), embeddings frozen,
    one train_batch: every rank's weights, bf16 grads, fp32 accumulation buffers, fp32 master partition and Adam
    state equal the plan to the byte (tolerance 0: padding and group splits are modelled, not approximated)."""
    ds = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
          "gradient_clipping": 1.0, "steps_per_print": 100, "bf16": {"enabled": True},
          "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
          "recipe": {"pipeline_stages": 2, "decoder_split": [2, 1], "expert_parallel_size": 2, "max_seq_len": 64,
                     "activation_checkpointing": True, "freeze": {"embeddings": True}}}
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(ds))
    torchrun(os.path.join(REPO, "tests", "workers", "engine_memory.py"), 4,
             ["--ds-config", str(config), "--out", str(tmp_path / "out"), "--like", "base"],
             str(tmp_path / "engine_memory.log"), timeout=300)

    expected = plan(tiny_config("base", image_size=42), ds, suggest=False).stages
    keys = ("weights_bytes", "lp_grad_bytes", "grad_accum_bytes", "master_bytes", "optimizer_bytes")
    for rank in range(4):
        got = json.loads((tmp_path / "out" / f"rank{rank}.json").read_text())
        assert got["optimizer"] == "BF16_Optimizer"
        want = expected[got["stage"]]
        assert {k: got[k] for k in keys} == {k: getattr(want, k) for k in keys}, (rank, got["groups"])


def test_seed_cluster_config_fits_base():
    p = plan(released("base"), ep8(), model_name="base")
    t = p.topology
    assert (t.world_size, t.pipeline_stages, t.data_parallel, t.expert_parallel) == (32, 2, 16, 8)
    assert t.grad_accum_steps == 5  # 80 packed rows: about the original recipe's 256 samples per step
    assert t.optimizer == "BF16_Optimizer" and t.parts == [0, 42, 60]
    assert all(s.fits for s in p.stages) and all(s.peak_bytes < 48 * GiB for s in p.stages)
    assert [s.in_flight for s in p.stages] == [2, 1]
    assert sum(s.dense_params for s in p.stages) == p.dense_params
    assert sum(s.expert_params_stage for s in p.stages) == p.expert_params
    assert all(s.expert_params_rank * 8 == s.expert_params_stage for s in p.stages)
    assert p.bubble_fraction == pytest.approx(1 / 6)
    assert p.packing and 3.0 < p.samples_per_row < 3.2 and 230 < p.samples_per_step < 260
    # packed rows carry ~18 ViT views per 4096 tokens (the original's padded samples 10): the ViT stage needs fewer
    # decoder layers; padded samples give the original recipe's split, from FLOPs alone
    assert p.flops_balanced_split == [11, 19]
    assert plan(released("base"), ep8(), packing=False).flops_balanced_split == [13, 17]
    # the original recipe's figure is counted on its own work: every sample padded to 4096 tokens, 10 views
    assert p.reference_mfu == pytest.approx(ORIGINAL_RECIPE_SPS * 3 * p.reference_flops_per_sample
                                            / (ATLAS_800T_A2_BF16_TFLOPS * 1e12 * 32))
    assert 0.055 < p.reference_mfu < 0.065
    assert p.reference_flops_per_sample > 2.5 * p.flops_per_sample["total"]  # a real sample is ~1/3 of a padded one
    assert p.samples_per_s * 3 * p.flops_per_sample["total"] == pytest.approx(0.3 * 354e12 * 32)
    unpacked = plan(released("base"), ep8(), model_name="base", packing=False)
    assert not unpacked.packing and unpacked.flops_per_sample["total"] == pytest.approx(p.reference_flops_per_sample)
    assert p.samples_per_s > 3 * unpacked.samples_per_s
    assert not [w for w in p.warnings if "needs" in w or "hangs" in w]


def test_original_recipe_mfu_is_quoted_for_the_released_base_only():
    base = released("base")
    resaved = base.to_dict()
    resaved["transformers_version"] = "9.9"  # HF bookkeeping, not read by the recipe
    assert released_size(base) == "base" and released_size(VL2Config.from_dict(resaved)) == "base"
    changed = base.to_dict()
    changed["language_config"]["num_hidden_layers"] = 29
    assert released_size(VL2Config.from_dict(changed)) is None and released_size(tiny_config("base")) is None
    assert released_size(released("small")) == "small"
    p = plan(base, ep8(), model_name="my-checkpoint")
    assert "The original recipe's 4.924 samples/s" in format_plan(p, released="base")
    assert "original recipe" not in format_plan(p, released=None)


def test_state_bytes_scale_with_dp_and_ep():
    cfg = released("base")
    a = plan(cfg, ep8(), suggest=False).stages[1]
    b = plan(cfg, ep8(), expert_parallel_size=4, suggest=False).stages[1]
    assert b.expert_params_rank == 2 * a.expert_params_rank
    assert b.weights_bytes - a.weights_bytes == pytest.approx(2 * a.expert_params_rank, rel=1e-6)  # bf16
    # expert master + Adam state are partitioned over expert-DP = DP / EP: twice the experts on twice the ranks
    assert b.master_bytes == pytest.approx(a.master_bytes, rel=1e-6)
    on = plan(cfg, ep8(), suggest=False).stages
    off = plan(cfg, ep8(), activation_checkpointing=False, suggest=False).stages
    for x, y in zip(on, off):
        assert x.activation_bytes < y.activation_bytes
        assert (x.activation_bytes, x.activation_bytes_other) == (y.activation_bytes_other, y.activation_bytes)
    frozen = plan(cfg, ep8(), freeze={"vision": True, "projector": True}, suggest=False).stages[0]
    assert frozen.weights_bytes == pytest.approx(on[0].weights_bytes, rel=1e-3)
    assert frozen.grad_accum_bytes < on[0].grad_accum_bytes and frozen.optimizer_bytes < on[0].optimizer_bytes


@pytest.mark.parametrize("change, message", [
    ({"expert_parallel_size": 3}, "must divide the data-parallel size"),
    ({"expert_parallel_size": 16}, "must divide n_routed_experts"),  # 72 experts
    ({"decoder_split": [10, 10]}, "add up to"),
    ({"_ds": {"train_batch_size": 81}}, "train_batch_size"),
    ({"_ds": {"zero_optimization": {"stage": 2}}}, "ZeRO 0 and 1"),
    ({"freeze": {"vit": True}}, "unknown parts"),
])
def test_invalid_layouts_are_named(change, message):
    change = dict(change)
    cfg = released(change.pop("_model", "base"))
    ds = {**ep8(), **change.pop("_ds", {})}
    with pytest.raises(ConfigError, match=message):
        plan(cfg, ds, suggest=False, **change)


def test_stage_without_moe_layer_is_refused():
    cfg = tiny_config("base")
    ds = {**ep8(), "train_batch_size": 4, "gradient_accumulation_steps": 2}
    with pytest.raises(ConfigError, match="stage 0 .* holds no MoE layer"):
        plan(cfg, ds, decoder_split=[1, 2], expert_parallel_size=1, suggest=False)


def test_cli_table_json_and_a_layout_that_fits(capsys):
    assert main(["--deepspeed", EP8, "--model", "base"]) == 0
    table = capsys.readouterr().out
    assert "| 0 | 0-41 | 13 (12) |" in table and "implies MFU" in table

    assert main(["--deepspeed", EP8, "--model", "base", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_params"] == RELEASED_TOTALS["base"] and len(data["stages"]) == 2

    assert main(["--deepspeed", EP8, "--model", "base", "--device-memory-gb", "36", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert any(not s["fits"] for s in data["stages"]) and data["suggestions"]
    best = data["suggestions"][0]
    again = plan(released("base"), ep8(), device_memory_gb=36, suggest=False, decoder_split=best["decoder_split"],
                 pipeline_stages=best["pipeline_stages"], expert_parallel_size=best["expert_parallel_size"],
                 activation_checkpointing=best["activation_checkpointing"])
    assert all(s.fits for s in again.stages)

    assert main(["--deepspeed", EP8, "--model", "small"]) == 2  # ep8's [13, 17] split does not fit 27 layers
    assert "add up to" in capsys.readouterr().err
    assert main(["--deepspeed", EP8, "--model", "small", "--decoder-split", "auto", "--json"]) == 0
