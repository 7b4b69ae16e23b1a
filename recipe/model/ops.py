"""Hot operators behind one small interface, each with a plain-PyTorch reference.

The model calls these instead of spelling the math inline, so a faster kernel (torch_npu's fused operators on
Ascend) can be swapped in by device type without touching the model, and tested against the reference where it
can run. Selection is by the tensor's device: the model code stays free of accelerator imports.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-order RMSNorm: statistics in fp32, cast back to the input dtype, then scale by the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def attention(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, v_BHTe: torch.Tensor,
              mask_B1TT: Optional[torch.Tensor], scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention. ``mask_B1TT`` is a boolean "may attend" mask, or None for plain causal attention.

    q, k: [B, H, T, d]; v: [B, H, T, e] (e may differ from d, as in MLA); returns [B, H, T, e].
    """
    if mask_B1TT is None:
        return F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTe, is_causal=True, scale=scale,
                                              dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTe, attn_mask=mask_B1TT, scale=scale,
                                          dropout_p=dropout_p)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask_B1TT: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Eager attention as the original computes it: fp32 softmax of additive-masked scores, cast back."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    T = q.shape[-2]
    if mask_B1TT is None:
        mask_B1TT = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]
    scores = scores.masked_fill(~mask_B1TT, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
