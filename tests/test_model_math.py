"""Each part of the model against an independent re-derivation written out from the reference sheet."""

import math

import pytest
import torch
import torch.nn.functional as F

from recipe.model import ops
from recipe.model.attention import MultiHeadAttention, MultiHeadLatentAttention, build_attention_mask
from recipe.model.moe import (
    DeepseekV2MoE,
    balance_groups,
    dispatch_local,
    load_balance_loss,
    routing_weights,
    select_experts,
)
from recipe.model.projector import downsample_merge
from recipe.model.vl2 import layout_image
from recipe.tools.tiny_config import tiny_config

torch.manual_seed(0)


def naive_attention(q_hd, k_hd, v_hd, allowed):
    """Per-head softmax attention over python-built score lists: q/k [T, d], v [T, e], allowed(t, s) -> bool."""
    T = q_hd.shape[0]
    out = []
    for t in range(T):
        keys = [s for s in range(T) if allowed(t, s)]
        scores = torch.stack([q_hd[t] @ k_hd[s] for s in keys]) / math.sqrt(q_hd.shape[1])
        probs = torch.softmax(scores.double(), 0).float()
        out.append(sum(p * v_hd[s] for p, s in zip(probs, keys)))
    return torch.stack(out)


def rotate_pairs(x_td, pairs, theta=10000.0):
    """Apply RoPE by rotating the listed (i, j) dimension pairs; pair n has frequency theta^(-2n/d)."""
    T, d = x_td.shape
    out = x_td.clone()
    for n, (i, j) in enumerate(pairs):
        for t in range(T):
            ang = t * theta ** (-2 * n / (2 * len(pairs)))
            c, s = math.cos(ang), math.sin(ang)
            out[t, i] = x_td[t, i] * c - x_td[t, j] * s
            out[t, j] = x_td[t, i] * s + x_td[t, j] * c
    return out


def test_mha_matches_naive_rope_half_rotation():
    lc = tiny_config("tiny").language_config  # 4 heads x 16 dims
    attn = MultiHeadAttention(lc).eval()
    T, H, d = 7, lc.num_attention_heads, lc.head_dim
    x = torch.randn(1, T, lc.hidden_size)
    got = attn(x, torch.arange(T)[None], None)[0]
    q = (x[0] @ attn.q_proj.weight.T).view(T, H, d)
    k = (x[0] @ attn.k_proj.weight.T).view(T, H, d)
    v = (x[0] @ attn.v_proj.weight.T).view(T, H, d)
    half = [(i, i + d // 2) for i in range(d // 2)]  # Llama: pairs (i, i + d/2)
    heads = [naive_attention(rotate_pairs(q[:, h], half), rotate_pairs(k[:, h], half), v[:, h],
                             lambda t, s: s <= t) for h in range(H)]
    want = torch.cat(heads, dim=-1) @ attn.o_proj.weight.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mla_matches_naive_interleaved_rope():
    lc = tiny_config("small").language_config  # 4 heads, nope 16, rope 8, v 16, kv rank 32
    attn = MultiHeadLatentAttention(lc).eval()
    with torch.no_grad():
        attn.kv_a_layernorm.weight.uniform_(0.5, 1.5)
    T, H, dn, dr, dv = 6, lc.num_attention_heads, lc.qk_nope_head_dim, lc.qk_rope_head_dim, lc.v_head_dim
    x = torch.randn(1, T, lc.hidden_size)
    got = attn(x, torch.arange(T)[None], None)[0]
    q = (x[0] @ attn.q_proj.weight.T).view(T, H, dn + dr)
    ckv = x[0] @ attn.kv_a_proj_with_mqa.weight.T
    c, k_rope = ckv[:, :lc.kv_lora_rank], ckv[:, lc.kv_lora_rank:]
    c = c / torch.sqrt((c * c).mean(-1, keepdim=True) + 1e-6) * attn.kv_a_layernorm.weight
    kv = (c @ attn.kv_b_proj.weight.T).view(T, H, dn + dv)
    inter = [(2 * i, 2 * i + 1) for i in range(dr // 2)]  # GPT-J: adjacent pairs, on the rope dims only
    k_rope = rotate_pairs(k_rope, inter)
    heads = []
    for h in range(H):
        qh = torch.cat([q[:, h, :dn], rotate_pairs(q[:, h, dn:], inter)], -1)
        kh = torch.cat([kv[:, h, :dn], k_rope], -1)  # one rope key shared by every head
        heads.append(naive_attention(qh, kh, kv[:, h, dn:], lambda t, s: s <= t))
    want = torch.cat(heads, -1) @ attn.o_proj.weight.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_mask_from_segments_padding_and_packing():
    seg = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2]])
    m = build_attention_mask(seg)[:, 0]
    assert m[0, 2].tolist() == [True, True, True, False, False]
    assert m[0, 4].tolist() == [False, False, False, True, True]  # padding sees only padding
    assert m[1, 3].tolist() == [False, False, True, True, False]  # a packed segment restarts
    assert build_attention_mask(torch.ones(2, 5, dtype=torch.long)) is None  # plain causal
    # one segment + right padding: causal attention already keeps real tokens off the padding
    assert build_attention_mask(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])) is None
    assert build_attention_mask(torch.tensor([[0, 1, 1, 1, 1]])) is not None  # left padding needs the mask


def test_right_padding_and_packing_do_not_change_real_tokens():
    lc = tiny_config("base").language_config
    attn = MultiHeadLatentAttention(lc).eval()
    x, y = torch.randn(1, 5, lc.hidden_size), torch.randn(1, 4, lc.hidden_size)
    alone_x = attn(x, torch.arange(5)[None], None)
    padded = torch.cat([x, torch.randn(1, 3, lc.hidden_size)], 1)
    seg = torch.tensor([[1] * 5 + [0] * 3])
    full = attn(padded, torch.arange(8)[None], build_attention_mask(seg))
    torch.testing.assert_close(full[:, :5], alone_x, rtol=1e-6, atol=1e-6)
    packed = torch.cat([x, y], 1)  # two samples in one row: positions restart, attention stays in its segment
    seg = torch.tensor([[1] * 5 + [2] * 4])
    pos = torch.tensor([list(range(5)) + list(range(4))])
    out = attn(packed, pos, build_attention_mask(seg))
    torch.testing.assert_close(out[:, :5], alone_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[:, 5:], attn(y, torch.arange(4)[None], None), rtol=1e-6, atol=1e-6)


# --- router -----------------------------------------------------------------------------------------------------

def topk_set(row, k):
    return set(sorted(range(len(row)), key=lambda e: -float(row[e]))[:k])


def test_greedy_is_topk_of_scores():
    scores = torch.rand(20, 8)
    idx = select_experts(scores, "greedy", 3)
    for t in range(20):
        assert set(idx[t].tolist()) == topk_set(scores[t], 3)


def test_group_limited_greedy_written_out():
    E, G, TG, K = 8, 4, 2, 3
    scores = torch.rand(30, E)
    idx = select_experts(scores, "group_limited_greedy", K, G, TG)
    per = E // G
    for t in range(30):
        group_best = [max(scores[t, g * per:(g + 1) * per]) for g in range(G)]
        keep = topk_set(group_best, TG)
        allowed = [e for e in range(E) if e // per in keep]
        want = set(sorted(allowed, key=lambda e: -float(scores[t, e]))[:K])
        assert set(idx[t].tolist()) == want


def test_noaux_tc_written_out_bias_only_steers_choice():
    E, G, TG, K = 8, 2, 1, 3
    scores = torch.rand(30, E).sigmoid()
    bias = torch.randn(E) * 0.3
    idx = select_experts(scores, "noaux_tc", K, G, TG, bias)
    per = E // G
    for t in range(30):
        biased = [float(scores[t, e] + bias[e]) for e in range(E)]
        group_score = [sum(sorted(biased[g * per:(g + 1) * per])[-2:]) for g in range(G)]
        keep = topk_set(group_score, TG)
        allowed = [e for e in range(E) if e // per in keep]
        assert set(idx[t].tolist()) == set(sorted(allowed, key=lambda e: -biased[e])[:K])
    w = routing_weights(scores, idx, norm_topk_prob=True, scaling_factor=2.0)
    want = scores.gather(1, idx)  # unbiased scores
    torch.testing.assert_close(w, want / want.sum(-1, keepdim=True) * 2.0)
    assert not torch.equal(idx.sort(1).values, select_experts(scores, "greedy", K).sort(1).values)


def test_routing_weights_without_norm_are_scaled_scores():
    scores = torch.rand(5, 8).softmax(-1)
    idx = select_experts(scores, "greedy", 3)
    torch.testing.assert_close(routing_weights(scores, idx, False, 1.5), scores.gather(1, idx) * 1.5)


def test_seq_aux_loss_written_out():
    B, T, E, K, alpha = 3, 5, 4, 2, 0.01
    scores = torch.rand(B * T, E).softmax(-1)
    idx = select_experts(scores, "greedy", K)
    groups, n = balance_groups(B, T, None, scores.device)
    got = load_balance_loss(scores, idx, groups, n, alpha, seq_aux=True)
    total = 0.0
    for b in range(B):
        rows = range(b * T, (b + 1) * T)
        for e in range(E):
            count = sum(int(e in idx[r].tolist()) for r in rows)
            f = count * E / (T * K)
            p = sum(float(scores[r, e]) for r in rows) / T
            total += f * p
    assert got.item() == pytest.approx(alpha * total / B, rel=1e-6)
    # not seq_aux: one group over every token
    flat = load_balance_loss(scores, idx, groups, n, alpha, seq_aux=False)
    f = [sum(int(e in idx[r].tolist()) for r in range(B * T)) * E / (B * T * K) for e in range(E)]
    p = scores.mean(0).tolist()
    assert flat.item() == pytest.approx(alpha * sum(a * b for a, b in zip(f, p)), rel=1e-6)


def test_aux_loss_excludes_padding_per_segment():
    scores = torch.rand(8, 4).softmax(-1)
    idx = select_experts(scores, "greedy", 2)
    seg = torch.tensor([[1, 1, 1, 0], [1, 1, 2, 2]])
    groups, n = balance_groups(2, 4, seg, scores.device)
    assert n == 3 and groups.tolist() == [0, 0, 0, -1, 1, 1, 2, 2]
    got = load_balance_loss(scores, idx, groups, n, 1.0, True)
    parts = []
    for rows in ([0, 1, 2], [4, 5], [6, 7]):
        gl, _ = balance_groups(1, len(rows), None, scores.device)
        parts.append(load_balance_loss(scores[rows], idx[rows], gl, 1, 1.0, True))
    torch.testing.assert_close(got, torch.stack(parts).mean())


def test_dispatch_matches_weighted_sum_over_chosen_experts():
    lc = tiny_config("tiny").language_config
    moe = DeepseekV2MoE(lc).eval()
    x = torch.randn(11, lc.hidden_size)
    r = moe.gate(x)
    got = dispatch_local(x, r.topk_idx, r.topk_weight, moe.experts)
    want = torch.stack([sum(r.topk_weight[t, j] * moe.experts[int(r.topk_idx[t, j])](x[t:t + 1])[0]
                            for j in range(r.topk_idx.shape[1])) for t in range(11)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    y, aux = moe(x[None])
    torch.testing.assert_close(y[0], want + moe.shared_experts(x), rtol=1e-5, atol=1e-6)
    assert aux is None  # eval mode, as the original


def test_gate_scores_in_fp32_for_bf16_inputs():
    lc = tiny_config("base").language_config
    moe = DeepseekV2MoE(lc).to(torch.bfloat16).train()
    x = torch.randn(1, 9, lc.hidden_size, dtype=torch.bfloat16)
    r = moe.gate(x[0])
    assert r.scores.dtype == torch.float32 and r.topk_weight.dtype == torch.float32
    want = F.linear(x[0].float(), moe.gate.weight.float()).sigmoid()
    torch.testing.assert_close(r.scores, want)
    y, aux = moe(x)
    assert y.dtype == torch.bfloat16 and aux.dtype == torch.float32


# --- projector and image layout ---------------------------------------------------------------------------------

def test_downsample_merge_is_channel_major_with_bottom_right_zero_pad():
    g, C = 3, 2
    feats = torch.arange(1, g * g * C + 1, dtype=torch.float32).view(1, g * g, C)
    merged = downsample_merge(feats, 2)  # [1, 4, C*4]
    assert merged.shape == (1, 4, 8)
    grid = feats.view(g, g, C)
    for i in range(2):
        for j in range(2):
            for c in range(C):
                for ki in range(2):
                    for kj in range(2):
                        r, s = 2 * i + ki, 2 * j + kj
                        want = grid[r, s, c] if r < g and s < g else 0.0
                        assert merged[0, i * 2 + j, c * 4 + ki * 2 + kj] == want


def test_layout_image_order_newlines_and_separator():
    h, D, tw, th = 2, 1, 3, 2
    glob = torch.arange(h * h, dtype=torch.float32).view(h * h, D) + 100
    # tile n (row-major over th x tw), token (a, b) -> value n*10 + a*h + b
    local = torch.stack([torch.tensor([n * 10 + a * h + b for a in range(h) for b in range(h)], dtype=torch.float32)
                         for n in range(tw * th)])[..., None]
    nl, sep = torch.tensor([-1.0]), torch.tensor([-2.0])
    seq = layout_image(glob, local, tw, th, nl, sep)[:, 0].tolist()
    cfg = tiny_config("tiny", image_size=42)
    assert len(seq) == cfg.num_image_tokens(tw, th)
    assert seq[:7] == [100, 101, -1, 102, 103, -1, -2]
    rows = [seq[7 + r * (tw * h + 1): 7 + (r + 1) * (tw * h + 1)] for r in range(th * h)]
    for r, row in enumerate(rows):
        assert row[-1] == -1
        ti, a = divmod(r, h)
        assert row[:-1] == [(ti * tw + tj) * 10 + a * h + b for tj in range(tw) for b in range(h)]
    tail = layout_image(glob, local, tw, th, nl, sep, global_first=False)[:, 0].tolist()
    assert tail[-7:] == [-2, 100, 101, -1, 102, 103, -1]


def test_fused_attention_matches_the_eager_reference():
    q, k = torch.randn(2, 3, 7, 12), torch.randn(2, 3, 7, 12)
    v = torch.randn(2, 3, 7, 8)  # MLA-style: value width differs from query/key width
    torch.testing.assert_close(ops.attention(q, k, v, None, 0.3), ops.attention_reference(q, k, v, None, 0.3))
    mask = build_attention_mask(torch.tensor([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0]]))
    torch.testing.assert_close(ops.attention(q, k, v, mask, 0.3), ops.attention_reference(q, k, v, mask, 0.3))
