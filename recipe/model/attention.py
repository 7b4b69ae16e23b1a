"""Decoder self-attention: MHA (tiny; Llama-style half-rotation RoPE over the whole head) and MLA (small/base;
DeepSeek-V2 multi-head latent attention with interleaved RoPE on the rope dims only).

Both take a boolean "may attend" mask built once per forward by :func:`build_attention_mask` from per-token
segment ids (0 = padding), so right padding and packed sequences share one code path.

Shapes: B batch, T tokens, D hidden, H heads.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from recipe.config import LanguageConfig
from recipe.model import ops


def build_attention_mask(segment_ids_BT: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Causal mask restricted to equal segment ids: [B, T] -> [B, 1, T, T] bool, or None when plain causal
    attention gives the same result for every real token.

    Real tokens attend to earlier tokens of their own segment; padding (id 0) attends to earlier padding only, so
    no row is empty (its outputs are never used). One segment per row followed by right padding needs no mask:
    causality already keeps real tokens off the padding after them, and ``None`` lets fused (flash) kernels run.
    """
    if segment_ids_BT is None:
        return None
    single_segment_right_padded = bool((segment_ids_BT <= 1).all()) and bool(
        (segment_ids_BT[:, 1:] <= segment_ids_BT[:, :-1]).all())
    if single_segment_right_padded:
        return None
    T = segment_ids_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids_BT.device).tril()
    same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return (same & causal)[:, None]


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

    def forward(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions_BT, self.head_dim, self.rope_theta, x_BTD.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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

    def forward(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
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


def make_attention(cfg: LanguageConfig) -> nn.Module:
    return MultiHeadLatentAttention(cfg) if cfg.use_mla else MultiHeadAttention(cfg)
