"""Decoder self-attention: MHA (tiny; Llama-style half-rotation RoPE over the whole head) and MLA (small/base;
DeepSeek-V2 multi-head latent attention with interleaved RoPE on the rope dims only).

Both take the attention layout built once per forward by :func:`recipe.model.ops.build_attention_layout` from
per-token segment ids (0 = padding): plain causal, a boolean "may attend" mask, or segment lengths for a
variable-length kernel on accelerators, so right padding and packed sequences share one code path.

Shapes: B batch, T tokens, D hidden, H heads.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from recipe.config import LanguageConfig
from recipe.model import ops
from recipe.model.lora import effective_weight


def build_attention_mask(segment_ids_BT: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Causal mask restricted to equal segment ids: [B, T] -> [B, 1, T, T] bool, or None when plain causal
    attention gives the same result for every real token.

    Real tokens attend to earlier tokens of their own segment; padding (id 0) attends to earlier padding only, so
    no row is empty (its outputs are never used). One segment per row followed by right padding needs no mask:
    causality already keeps real tokens off the padding after them, and ``None`` lets fused (flash) kernels run.
    Training builds :func:`recipe.model.ops.build_attention_layout` instead, which on accelerators replaces the
    mask of packed rows by variable-length kernels' segment lengths.
    """
    if segment_ids_BT is None or ops.single_segment_right_padded(segment_ids_BT):
        return None
    return ops.segment_causal_mask(segment_ids_BT)


def rope_cos_sin(positions_BT: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, T, dim] for rotate-half RoPE, computed in fp32 and cast to the activation dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions_BT.device).float() / dim))
    freqs = positions_BT.float()[..., None] * inv_freq  # [B, T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    return x_BHTd * cos_BTd[:, None] + rotate_half(x_BHTd) * sin_BTd[:, None]


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., (d/2, 2)] -> [evens | odds]: turns GPT-J interleaved pairs into rotate-half pairs (same dot products)."""
    *lead, d = x.shape
    return x.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


class MultiHeadAttention(nn.Module):
    """MHA with optional grouped KV heads (``q_proj``/``k_proj``/``v_proj``/``o_proj``), RoPE on all head dims."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.dropout = cfg.attention_dropout
        D, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(D, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(D, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(D, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, D, bias=bias)

    def forward(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor, mask: Optional[torch.Tensor],
                cache=None) -> torch.Tensor:
        """``cache``: an :class:`recipe.model.generation.MHALayerCache` when generating (``mask`` then spans the
        cached slots, [B, 1, T, S]); None for the training/full-sequence path."""
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions_BT, self.head_dim, self.rope_theta, x_BTD.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: keep this step's keys/values, attend over every cached slot
            k, v = cache.update(k, v)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = ops.attention(q, k, v, mask, scale=self.head_dim ** -0.5,
                            dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class MultiHeadLatentAttention(nn.Module):
    """MLA. Queries: ``q_proj`` (or the ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj`` LoRA), per head
    [nope | rope]. Keys/values: ``kv_a_proj_with_mqa`` gives the latent c [r] and one shared k_rope [dr];
    c -> ``kv_a_layernorm`` -> ``kv_b_proj`` gives per head [k_nope | v]. Scores use scale (dn + dr)^-0.5.

    Computed in the up-projected form (not the absorbed one the original uses for decoding): the same scores
    and outputs, and standard attention kernels apply.
    """

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.num_heads = H = cfg.num_attention_heads
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.rope_theta = cfg.rope_theta
        self.dropout = cfg.attention_dropout
        D, bias = cfg.hidden_size, cfg.attention_bias
        q_out = H * (self.dn + self.dr)
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(H * self.dv, D, bias=bias)
        self.softmax_scale = (self.dn + self.dr) ** -0.5

    def forward(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor, mask: Optional[torch.Tensor],
                cache=None) -> torch.Tensor:
        """``cache``: an :class:`recipe.model.generation.MLALayerCache` when generating (see
        :meth:`forward_cached`); None for the training/full-sequence path."""
        if cache is not None:
            return self.forward_cached(x_BTD, positions_BT, mask, cache)
        B, T, _ = x_BTD.shape
        H, dn, dr, dv = self.num_heads, self.dn, self.dr, self.dv
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q = q.view(B, T, H, dn + dr).transpose(1, 2)
        q_nope, q_rope = q.split([dn, dr], dim=-1)
        c, k_rope = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, dr], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c)).view(B, T, H, dn + dv).transpose(1, 2)
        k_nope, v = kv.split([dn, dv], dim=-1)
        cos, sin = rope_cos_sin(positions_BT, dr, self.rope_theta, x_BTD.dtype)
        q_rope = apply_rope(deinterleave(q_rope), cos, sin)
        k_rope = apply_rope(deinterleave(k_rope[:, None]), cos, sin)  # one rope key shared by all heads
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, T, dr)], dim=-1)
        out = ops.attention(q, k, v, mask, scale=self.softmax_scale,
                            dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, dv]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * dv))

    # --- KV-cached generation (the cache and the decoding loop live in recipe/model/generation.py) ----------
    def forward_cached(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor, mask_B1TS: torch.Tensor,
                       cache) -> torch.Tensor:
        """The step's tokens [B, T, D] attending over every cached token (``mask`` [B, 1, T, S]).

        The cache keeps, per token, the normalised latent c [r] and the post-RoPE shared rope key [dr]. Attention
        over them runs up-projected (k_nope / v recomputed from every cached c by ``kv_b_proj``, as in training)
        or absorbed (``cache.absorbed``): with W_uk, W_uv the key and value halves of ``kv_b_proj`` per head,
        q_nope . (W_uk c) = (W_uk^T q_nope) . c and sum_j p_j W_uv c_j = W_uv (sum_j p_j c_j), so the queries move
        into latent space, all heads share one latent key [c | k_rope] and value c (multi-query attention of
        width r + dr), and the value half maps the result back; same scores, same scale (dn + dr)^-0.5.
        """
        B, T, _ = x_BTD.shape
        H, dn, dr, dv, r = self.num_heads, self.dn, self.dr, self.dv, self.kv_lora_rank
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_nope, q_rope = q.view(B, T, H, dn + dr).transpose(1, 2).split([dn, dr], dim=-1)
        c, k_rope = self.kv_a_proj_with_mqa(x_BTD).split([r, dr], dim=-1)
        cos, sin = rope_cos_sin(positions_BT, dr, self.rope_theta, x_BTD.dtype)
        q_rope = apply_rope(deinterleave(q_rope), cos, sin)
        k_rope = apply_rope(deinterleave(k_rope[:, None]), cos, sin)[:, 0]  # [B, T, dr], shared by all heads
        c_BSr, k_rope_BSd = cache.update(self.kv_a_layernorm(c), k_rope)
        S = c_BSr.shape[1]
        if cache.absorbed:
            w_kv = effective_weight(self.kv_b_proj).view(H, dn + dv, r)  # a LoRA adapter on kv_b_proj counts too
            q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_kv[:, :dn])
            # one shared key/value head: fold the heads into the query rows ([B, 1, H*T, .], row h*T + t)
            q_f = torch.cat([q_latent, q_rope], dim=-1).reshape(B, 1, H * T, r + dr)
            k_f = torch.cat([c_BSr, k_rope_BSd], dim=-1)[:, None]
            mask_f = mask_B1TS.expand(B, 1, T, S).repeat(1, 1, H, 1)
            out_latent = ops.attention(q_f, k_f, c_BSr[:, None], mask_f, scale=self.softmax_scale).view(B, H, T, r)
            out = torch.einsum("bhtr,hvr->bhtv", out_latent, w_kv[:, dn:])
        else:
            kv = self.kv_b_proj(c_BSr).view(B, S, H, dn + dv).transpose(1, 2)
            k_nope, v = kv.split([dn, dv], dim=-1)
            q_f = torch.cat([q_nope, q_rope], dim=-1)
            k_f = torch.cat([k_nope, k_rope_BSd[:, None].expand(B, H, S, dr)], dim=-1)
            out = ops.attention(q_f, k_f, v, mask_B1TS, scale=self.softmax_scale)  # [B, H, T, dv]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * dv))


def make_attention(cfg: LanguageConfig) -> nn.Module:
    return MultiHeadLatentAttention(cfg) if cfg.use_mla else MultiHeadAttention(cfg)
