"""LoRA fine-tuning (recipe.lora): the layer, the routed experts' grouped adapters, the settings, and one run under
DeepSpeed's pipeline engine that trains, saves, resumes and exports.

- zero-initialised B: the adapted model gives the base model's loss exactly; the grouped expert path equals the
  per-expert loop (forward and gradients);
- settings: defaults, bad blocks and patterns that adapt nothing are refused with the key named;
- PP=2 x DP=2 with EP=2, ZeRO-1, activation checkpointing, packed rows, adapters on every target kind (routed
  experts and ViT included), one launch (tests/workers/lora_pipeline.py): loss and pre-clip gradient norm equal the
  single-process LoRA reference (fp32, 1e-5) step after step; resume from step 1 repeats step 2 bit for bit;
  only adapters train and only they are in the optimizer; expert adapters carry DeepSpeed's expert tags;
  ds_to_hf --merge-lora equals base + B@A*scale bit for bit in fp32 and the merged model gives the trained model's
  logits, as do the PEFT adapter directory applied by peft itself and recipe.evaluate's loader reading the training
  checkpoint; wrong export options fail clearly.
"""

import json
import os
import sys

import pytest
import torch

from recipe.config import ConfigError
from recipe.lora.config import DEFAULT_TARGETS, OPTIONAL_TARGETS, LoraConfig
from recipe.lora.inject import apply_lora
from recipe.model import DeepseekVLV2ForCausalLM
from recipe.model.lora import LoraLinear
from recipe.tools.synthetic_batches import collate, synthetic_samples

from helpers.launch import REPO, torchrun

WORKER = os.path.join(REPO, "tests", "workers", "lora_pipeline.py")
ALL_TARGETS = list(DEFAULT_TARGETS) + [p for group in OPTIONAL_TARGETS.values() for p in group]
RTOL = 1e-5


def batch_and_model(ckpt, n=4):
    model = DeepseekVLV2ForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).train()
    return collate(synthetic_samples(model.config, n, 7)), model


def test_zero_b_gives_the_base_loss_exactly(tiny_ckpt):
    batch, model = batch_and_model(tiny_ckpt(like="base", image_size=42))
    base = model(**batch).loss
    adapted = apply_lora(model, LoraConfig(rank=4, target_modules=ALL_TARGETS), seed=1)
    assert any(".experts." in n for n in adapted) and any(n.startswith("vision.") for n in adapted)
    assert torch.equal(model(**batch).loss, base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(adapted)


def test_grouped_expert_adapters_equal_the_per_expert_loop(tiny_ckpt, monkeypatch):
    """Routed experts run their adapters as grouped GEMMs; the modules' own forward (one expert at a time, which
    is also how PEFT-wrapped experts run) must give the same loss and gradients."""
    import recipe.model.moe as moe

    batch, model = batch_and_model(tiny_ckpt(like="base", image_size=42))
    apply_lora(model, LoraConfig(rank=4, target_modules=["language.model.layers.*.mlp.experts.*.*"]), seed=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.1)

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = run()
    monkeypatch.setattr(moe, "expert_lora", lambda experts: None)  # force the per-expert loop
    loop_loss, loop_grads = run()
    torch.testing.assert_close(loss, loop_loss, rtol=RTOL, atol=0)
    for n, g in grads.items():
        torch.testing.assert_close(g, loop_grads[n], rtol=RTOL, atol=1e-7, msg=n)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".lora_A." in n)


def test_lora_settings_are_checked(tiny_ckpt):
    from recipe.config import VL2Config
    from recipe.train_config import RunLayout, TrainConfig

    tc = TrainConfig.from_dict({"lora": {}}, require_paths=False)
    assert tc.lora_config == LoraConfig() and tc.lora_config.scale == 2.0
    for block, message in [({"rank": 0}, "recipe.lora.rank=0"), ({"rnk": 4}, "unknown keys ['rnk']"),
                           ({"dropout": 1.5}, "recipe.lora.dropout=1.5"),
                           ({"target_modules": "q_proj"}, "recipe.lora.target_modules=\"q_proj\"")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            TrainConfig.from_dict({"lora": block}, require_paths=False)
    with pytest.raises(ConfigError, match="LoRA already freezes every base weight"):
        TrainConfig.from_dict({"lora": {}, "freeze": {"vision": True}}, require_paths=False)
    cfg = VL2Config.from_json(tiny_ckpt(like="base", image_size=42))
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2}
    layout = {"pipeline_stages": 2, "expert_parallel_size": 2}
    RunLayout.from_config({**layout, "lora": {}}, ds, cfg, 4)
    for targets, message in [(["language.lm_head"], "never adapted: the LM head runs inside the loss"),
                             (["language.model.layers.*.q_proj"], "matches no linear layer"),
                             (["language.model.layers.2.mlp.experts.*.*"], "no adapter on pipeline stage 0")]:
        with pytest.raises(ConfigError, match=message):
            RunLayout.from_config({**layout, "lora": {"target_modules": targets}}, ds, cfg, 4)


@pytest.mark.slow
def test_lora_pipeline_run_resume_and_export(tiny_ckpt, tmp_path):
    from converters.ds_to_hf import main as ds_to_hf
    from recipe.checkpoint.hf import iter_tensors, load_weight_map
    from recipe.checkpoint.training import read_training_checkpoint
    from recipe.eval.loading import load_for_inference
    from recipe.lora.adapter import load_adapter

    from helpers.reference import reference_run

    sys.path.insert(0, os.path.dirname(WORKER))
    from lora_pipeline import LORA

    ckpt = tiny_ckpt(like="base", image_size=42)
    save_dir, out = tmp_path / "save", tmp_path / "result.json"
    torchrun(WORKER, 4, ["--ckpt", ckpt, "--save-dir", str(save_dir), "--out", str(out)], str(out) + ".log")
    got = json.loads(out.read_text())
    want = reference_run(ckpt, global_batch=8, steps=2, lora=LORA)
    assert got["losses"] == pytest.approx(want["losses"], rel=RTOL)
    assert got["grad_norms"] == pytest.approx(want["grad_norms"], rel=RTOL)
    # resumed from global_step1: step 2 and the final adapters repeat bit for bit
    assert got["resumed_at"] == 1 and got["resumed_losses"] == got["losses"][1:]
    assert got["resumed_grad_norms"] == got["grad_norms"][1:] and got["same_adapters"]
    assert got["only_lora_trainable"] and got["base_moved"] == 0 and got["optimized"] == got["lora_params"]
    assert got["expert_tags_ok"] and all(n > 0 for n in got["expert_adapters"])

    # export: options that make no sense fail with a message, nothing written
    exported = tmp_path / "exported"
    assert ds_to_hf(["--ds-dir", str(save_dir), "--out", str(exported / "base-only"), "--no-progress"]) == 1
    assert ds_to_hf(["--ds-dir", str(save_dir), "--merge-lora", "--no-progress"]) == 1
    assert not os.path.exists(exported / "base-only")
    merged, adapter = exported / "merged", exported / "adapter"
    assert ds_to_hf(["--ds-dir", str(save_dir), "--merge-lora", "--out", str(merged), "--lora-adapter-out",
                     str(adapter), "--dtype", "fp32", "--no-progress"]) == 0

    # merged = base + B @ A * scale, bit for bit in fp32; every other tensor is the base's
    training = read_training_checkpoint(str(save_dir))
    lora = training.lora_tensors()
    scale = LORA["alpha"] / LORA["rank"]
    base = dict(iter_tensors(ckpt, weight_map=load_weight_map(ckpt)))
    out_tensors = dict(iter_tensors(str(merged), weight_map=load_weight_map(str(merged))))
    assert set(out_tensors) == set(base)
    adapted = {k[:-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")}
    for name, t in out_tensors.items():
        module = name[:-len(".weight")]
        if module in adapted:
            a, b = lora[module + ".lora_A.weight"], lora[module + ".lora_B.weight"]
            assert torch.equal(t, base[name].float() + (b.float() @ a.float()) * scale), name
        else:
            assert torch.equal(t, base[name]), name
    assert any(".experts." in m for m in adapted) and any(m.startswith("vision.") for m in adapted)

    # the trained model: the base with the checkpoint's adapters; merged and PEFT-applied models give its logits
    batch, trained = batch_and_model(ckpt)
    apply_lora(trained, LoraConfig.from_dict(LORA), seed=0)
    trained.load_state_dict(lora, strict=False)
    trained.eval()
    with torch.no_grad():
        want_logits = trained(**batch).logits
        merged_logits = DeepseekVLV2ForCausalLM.from_pretrained(str(merged)).eval()(**batch).logits
        torch.testing.assert_close(merged_logits, want_logits, rtol=RTOL, atol=1e-5)
        ours = DeepseekVLV2ForCausalLM.from_pretrained(ckpt).eval()
        load_adapter(ours, str(adapter))
        assert torch.equal(ours(**batch).logits, want_logits)
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(DeepseekVLV2ForCausalLM.from_pretrained(ckpt).eval(), str(adapter))
        torch.testing.assert_close(peft_model(**batch).logits, want_logits, rtol=RTOL, atol=1e-5)
        # inference straight from the training checkpoint merges the adapters too (never the bare base)
        loaded = load_for_inference(str(save_dir), dtype=torch.float32, device="cpu").model
        torch.testing.assert_close(loaded(**batch).logits, want_logits, rtol=RTOL, atol=1e-5)


def test_planner_counts_the_adapters_and_fits_base_lora_on_one_host(tiny_ckpt):
    """The planner's adapter count equals a real model's LoRA parameters, split between dense and expert ones as
    the ranks hold them; the shipped base LoRA config fits 8 x 64 GB devices with adapter-only optimizer state."""
    from recipe.config import VL2Config
    from recipe.plan import plan
    from recipe.plan.cli import resolve_model

    ckpt = tiny_ckpt(like="base", image_size=42)
    cfg = VL2Config.from_json(ckpt)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"},
          "recipe": {"pipeline_stages": 2, "expert_parallel_size": 2, "max_seq_len": 256,
                     "lora": {"rank": 4, "target_modules": ALL_TARGETS}}}
    p = plan(cfg, ds, world_size=4)
    model = DeepseekVLV2ForCausalLM.from_pretrained(ckpt)
    apply_lora(model, LoraConfig(rank=4, target_modules=ALL_TARGETS), seed=0)
    want = sum(q.numel() for q in model.parameters() if q.requires_grad)
    experts = sum(q.numel() for n, q in model.named_parameters() if q.requires_grad and ".experts." in n)
    assert p.lora_params == p.trainable_params == want
    assert sum(s.dense_trainable for s in p.stages) == want - experts
    assert sum(s.expert_trainable_rank for s in p.stages) * 2 == experts
    assert all(s.lp_grad_bytes == 2 * (s.dense_trainable + s.expert_trainable_rank) for s in p.stages)

    name, base = resolve_model("base")
    shipped = json.load(open(os.path.join(REPO, "ds_configs", "lora_base_1x8.json")))
    p = plan(base, shipped, model_name=name)
    assert p.topology.world_size == 8 and 20e6 < p.lora_params == p.trainable_params < 25e6
    assert all(s.fits and s.peak_bytes < 24 * 1024 ** 3 for s in p.stages)


def test_absorbed_mla_decoding_sees_an_adapter_on_kv_b_proj():
    """Absorbed MLA decoding reads kv_b_proj's weight instead of calling the layer; with an adapter there it must
    use W + scale * B @ A, so both decoding forms still agree."""
    from recipe.model.attention import MultiHeadLatentAttention
    from recipe.model.generation import KVCache
    from recipe.tools.tiny_config import tiny_config

    cfg = tiny_config("small").language_config
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(cfg).eval()
    attn.kv_b_proj = LoraLinear.wrap(attn.kv_b_proj, rank=4, alpha=8.0, dropout=0.0, seed=0, name="kv_b_proj")
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)  # B too: the adapter changes the output
    x = torch.randn(1, 6, cfg.hidden_size)
    positions = torch.arange(6)[None]
    outs = {}
    for absorb in (True, False):
        cache = KVCache(cfg, batch=1, capacity=6, absorb=absorb)
        ys = []
        for sl in (slice(0, 4), slice(4, 5), slice(5, 6)):
            mask = cache.begin(sl.stop - sl.start, torch.ones(1, sl.stop - sl.start), x.device)
            ys.append(attn(x[:, sl], positions[:, sl], mask, cache=cache.layers[0]))
            cache.end()
        outs[absorb] = torch.cat(ys, 1)
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=0)
