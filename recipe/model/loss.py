"""Causal-LM loss: logits at t predict labels at t+1; fp32 cross-entropy; -100 ignored."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
LM_HEAD_CHUNK_TOKENS = 2048  # tokens per chunk of lm_head_loss_sum; the planner sizes the head activations by it


def causal_lm_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Shifted token cross-entropy in fp32. ``reduction="mean"`` averages over labelled tokens (as the original,
    NaN when none is labelled); ``"sum"`` returns the sum, for callers that normalise over a larger batch."""
    V = logits_BTV.shape[-1]
    logits = logits_BTV[:, :-1].reshape(-1, V).float()
    targets = labels_BT[:, 1:].reshape(-1)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


def _chunk_ce_sum(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden_ND, weight_VD).float(), targets_N, reduction="sum")


def lm_head_loss_sum(hidden_BTD: torch.Tensor, lm_head_weight_VD: torch.Tensor, labels_BT: torch.Tensor,
                     chunk_tokens: int = LM_HEAD_CHUNK_TOKENS) -> torch.Tensor:
    """Sum of the shifted token cross-entropies, computing the LM head only at labelled positions and a chunk of
    tokens at a time (each chunk recomputed in backward), so the [tokens, V] fp32 logits never exist whole.

    Equals ``causal_lm_loss(lm_head(hidden), labels, reduction="sum")``. A micro-batch without labels gives a
    zero that still depends on the head, so every rank runs the same backward.
    """
    D = hidden_BTD.shape[-1]
    hidden = hidden_BTD[:, :-1].reshape(-1, D)
    targets = labels_BT[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    total = (hidden_BTD.float().sum() + lm_head_weight_VD.float().sum()) * 0.0
    for i in range(0, targets.numel(), chunk_tokens):
        total = total + checkpoint(_chunk_ce_sum, hidden[i:i + chunk_tokens], lm_head_weight_VD,
                                   targets[i:i + chunk_tokens], use_reentrant=False)
    return total
