"""Packed rows train exactly like the same samples unpacked: per-sample losses and gradients in one process (dense
mask and varlen layouts), and PP=2 x DP=2 with EP=2 under DeepSpeed's engine. The varlen attention path (TND
layout, cumulative segment lengths, MLA's narrower values) against the masked reference."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from recipe.model import DeepseekVLV2ForCausalLM, ops
from recipe.model.ops import attention_kernels
from recipe.tools.synthetic_batches import collate, collate_packed, label_count, synthetic_samples
from recipe.tools.tiny_config import tiny_config

TOL = 1e-5


def per_sample_ce(logits_BTV, labels_BT, segment_ids_BT) -> list:
    """Summed shifted cross-entropy of every (row, segment), in row-major segment order."""
    ce = F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1).float(), labels_BT[:, 1:].flatten(), reduction="none",
                         ignore_index=-100).view(labels_BT.shape[0], -1)
    seg = segment_ids_BT[:, 1:]  # the target's segment (a sample's first label is ignored when packed)
    out = []
    for b in range(labels_BT.shape[0]):
        for s in range(1, int(segment_ids_BT[b].max()) + 1):
            out.append(float(ce[b][seg[b] == s].sum().detach()))
    return out


def loss_and_grads(model, batch, n_labels):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum",
                         ignore_index=-100) / n_labels
    loss = ce + (out.aux_loss if out.aux_loss is not None else 0.0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss.item(), grads


@pytest.mark.parametrize("like", ["tiny", "base"])
@pytest.mark.parametrize("impl", ["dense", "varlen"])
def test_packed_rows_give_the_unpacked_losses_and_gradients(like, impl, monkeypatch):
    """Five samples (images, text-only, multi-image) as five padded rows vs packed into two rows: the same
    per-sample losses, loss, balance loss and gradients (every tensor, and their norms), fp32 within 1e-5."""
    monkeypatch.setenv(ops.ATTENTION_ENV, impl)
    torch.manual_seed(0)
    model = DeepseekVLV2ForCausalLM(tiny_config(like, image_size=42)).train()
    samples = synthetic_samples(model.config, 5, seed=11, text_only_every=3)
    unpacked = collate(samples)
    packed = collate_packed([samples[:3], samples[3:]])
    assert packed["segment_ids"].max(1).values.tolist() == [3, 2]
    assert ops.build_attention_layout(packed["segment_ids"]).kind == impl
    n = label_count(unpacked)
    assert label_count(packed) == n  # the ignored first labels were never targets

    out_u, loss_u, grads_u = loss_and_grads(model, unpacked, n)
    out_p, loss_p, grads_p = loss_and_grads(model, packed, n)
    assert per_sample_ce(out_p.logits, packed["labels"], packed["segment_ids"]) == pytest.approx(
        per_sample_ce(out_u.logits, unpacked["labels"], unpacked["segment_ids"]), rel=TOL, abs=TOL)
    assert loss_p == pytest.approx(loss_u, rel=TOL)
    if out_u.aux_loss is not None:
        assert out_p.aux_loss.item() == pytest.approx(out_u.aux_loss.item(), rel=TOL)
    assert grads_p.keys() == grads_u.keys()
    norm_u = torch.sqrt(sum(g.double().pow(2).sum() for g in grads_u.values()))
    norm_p = torch.sqrt(sum(g.double().pow(2).sum() for g in grads_p.values()))
    assert float(norm_p) == pytest.approx(float(norm_u), rel=TOL)
    for name, g in grads_u.items():
        assert float(grads_p[name].norm()) == pytest.approx(float(g.norm()), rel=1e-4, abs=1e-7), name
        torch.testing.assert_close(grads_p[name], g, rtol=1e-4, atol=1e-6, msg=name)


# --- the varlen path against the masked reference ---------------------------------------------------------------

def test_varlen_layout_cuts_rows_into_runs():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3]])
    layout = ops.build_attention_layout(seg, impl="varlen")
    assert layout.kind == "varlen" and layout.cu_seqlens.dtype == torch.int32
    assert layout.cu_seqlens_host.tolist() == [0, 3, 5, 7, 8, 11, 14] and layout.max_seqlen == 3
    again = ops.AttentionLayout.from_tensors(layout.to_tensors())
    assert again.kind == "varlen" and again.max_seqlen == 3 and torch.equal(again.cu_seqlens, layout.cu_seqlens)
    assert ops.build_attention_layout(torch.tensor([[1, 1, 0]]), impl="varlen").kind == "causal"
    assert ops.build_attention_layout(seg, impl="dense").kind == "dense"
    assert ops.AttentionLayout.from_tensors(()).kind == "causal"
    assert ops.AttentionLayout.from_tensors((torch.empty(0, dtype=torch.bool),)).kind == "causal"


def test_attention_backend_follows_the_device_and_the_override(monkeypatch):
    from types import SimpleNamespace

    def on(kind):  # stands in for a tensor on a device of this kind (only CPU exists here)
        return SimpleNamespace(is_cuda=kind == "cuda", device=SimpleNamespace(type=kind))

    monkeypatch.delenv(ops.ATTENTION_ENV, raising=False)
    assert ops.attention_impl(torch.zeros(1)) == ops.attention_impl(on("cpu")) == "varlen"
    assert ops.attention_impl(on("cuda")) == ops.attention_impl(on("npu")) == "varlen"
    assert not ops.has_varlen_kernel(torch.zeros(1)) and ops.has_varlen_kernel(on("cuda"))
    assert ops.has_varlen_kernel(on("npu"))
    assert ops.build_attention_layout(torch.tensor([[1, 1, 2, 2, 0]])).kind == "varlen"
    monkeypatch.setenv(ops.ATTENTION_ENV, "dense")
    assert ops.attention_impl(on("cuda")) == "dense"
    monkeypatch.setenv(ops.ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="expected auto, dense or varlen"):
        ops.attention_impl(on("cpu"))


@pytest.mark.parametrize("dv", [16, 24], ids=["mla-narrow-v", "same-width"])
def test_varlen_attention_matches_the_masked_reference(dv):
    """Forward and backward: the per-run kernel on the TND layout, and the fused kernels' v padding (driven here
    with the per-run kernel standing in for the fused one), equal the dense-mask reference."""
    torch.manual_seed(1)
    seg = torch.tensor([[1] * 5 + [2] * 9 + [3] * 2 + [0] * 4, [1] * 11 + [2] * 9]).long()
    B, T, H, d = 2, 20, 3, 24
    q, k = torch.randn(B, H, T, d, requires_grad=True), torch.randn(B, H, T, d, requires_grad=True)
    v = torch.randn(B, H, T, dv, requires_grad=True)
    dense = ops.build_attention_layout(seg, impl="dense")
    varlen = ops.build_attention_layout(seg, impl="varlen")
    want = ops.attention_reference(q, k, v, dense, 0.2)
    dy = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), dy)
    got = ops.attention(q, k, v, varlen, 0.2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), dy), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # the fused kernels' path: v zero-padded to the q/k width, the output sliced back
    padded = ops.varlen_attention(q, k, v, varlen, 0.2, kernel="reference")
    torch.testing.assert_close(padded, want, rtol=1e-5, atol=1e-6)

    def fake_fused(q_, k_, v_, layout, scale):
        assert v_.shape[-1] == q_.shape[-1]  # what a flash / npu_fusion_attention kernel is given
        return ops.varlen_attention_reference(q_, k_, v_, layout.cu_seqlens_host.tolist(), scale)

    orig = attention_kernels._varlen_flash
    attention_kernels._varlen_flash = fake_fused
    try:
        fused = ops.varlen_attention(q, k, v, varlen, 0.2, kernel="flash")
    finally:
        attention_kernels._varlen_flash = orig
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(torch.autograd.grad(fused, (q, k, v), dy), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# --- PP=2 x DP=2, EP=2 --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_pipeline_packed_equals_unpacked(tiny_ckpt, tmp_path):
    """The distributed driver on the same samples, unpacked (micro-batch = 3 padded rows) and packed (micro-batch
    = 1 row holding those 3 samples, varlen layout through the stages): the same loss, ce, aux and gradient norm
    at every step, and both equal one process."""
    from helpers.launch import REPO, torchrun
    from helpers.reference import reference_run

    driver = os.path.join(REPO, "tests", "workers", "train_pipeline.py")
    ckpt = tiny_ckpt(like="base", image_size=42)
    runs = {}
    for name, extra in (("unpacked", ["--mbs", "3"]), ("packed", ["--pack", "3", "--attention", "varlen"])):
        out = tmp_path / f"{name}.json"
        torchrun(driver, 4, ["--ckpt", ckpt, "--stages", "2", "--ep", "2", "--steps", "2", "--gas", "2",
                             "--out", str(out), *extra], str(out) + ".log")
        runs[name] = json.loads(out.read_text())
    u, p = runs["unpacked"], runs["packed"]
    assert p["losses"] == pytest.approx(u["losses"], rel=TOL)
    for eu, ep in zip(u["extras"], p["extras"]):
        for key in ("ce", "aux", "grad_norm"):
            assert ep[key] == pytest.approx(eu[key], rel=TOL), key
    want = reference_run(ckpt, global_batch=12, steps=2)
    assert p["losses"] == pytest.approx(want["losses"], rel=TOL)
    assert [e["grad_norm"] for e in p["extras"]] == pytest.approx(want["grad_norms"], rel=TOL)


def test_planner_counts_packed_rows_per_sample():
    """A packed row's FLOPs: linear layers over its real tokens, attention scores within each sample; per sample =
    the row's over its samples. One sample filling the row is the unpacked workload."""
    from recipe.parallel.cost import Workload, flops_per_sample, packed_workload

    cfg = tiny_config("base", image_size=384)
    lc = cfg.language_config
    padded = flops_per_sample(cfg, Workload(1, 1024, 4, 1.0))
    row = Workload(1, 1024, 8, 1.0, samples_per_row=2, sample_tokens=512)
    packed = flops_per_sample(cfg, row)
    alone = flops_per_sample(cfg, Workload(1, 512, 4, 1.0))
    for key in alone:
        assert packed[key] == pytest.approx(alone[key]), key  # two samples of 512 in a row = one sample of 512
    dq, dv = lc.q_head_dim, lc.attn_v_head_dim
    per_layer = 512 * 513 * lc.num_attention_heads * (dq + dv)  # one sample's L(L+1)/2 pairs, 2 FLOPs each
    assert packed["attention_scores"] == pytest.approx(lc.num_hidden_layers * per_layer)
    assert padded["attention_scores"] > 3.9 * packed["attention_scores"]
    w = packed_workload(1, 4096, 20, 1.0, sample_tokens=1000, sample_views=6, fill=0.95)
    assert w.samples_per_row == pytest.approx(20 / 6)  # the tile limit binds before 3.9 samples of tokens
    assert packed_workload(1, 4096, 40, 1.0, 1000, 6, 0.95).samples_per_row == pytest.approx(0.95 * 4.096)
