"""Causal-LM loss: logits at t predict labels at t+1; fp32 cross-entropy; -100 ignored."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Shifted token cross-entropy in fp32. ``reduction="mean"`` averages over labelled tokens (as the original,
    NaN when none is labelled); ``"sum"`` returns the sum, for callers that normalise over a larger batch."""
    V = logits_BTV.shape[-1]
    logits = logits_BTV[:, :-1].reshape(-1, V).float()
    targets = labels_BT[:, 1:].reshape(-1)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)
