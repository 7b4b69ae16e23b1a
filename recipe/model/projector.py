"""The 2x2 channel-major downsample MLP projector (``projector.*``, type ``downsample_mlp_gelu``).

ViT features [N, g*g, C] -> zero-pad the g x g grid at the bottom/right to a multiple of r (27 -> 28) ->
``F.unfold`` with kernel = stride = r, which orders each merged vector channel-major (c*r*r + ki*r + kj) ->
Linear, exact GELU, ..., Linear -> [N, (g'/r)**2, D].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recipe.config import ProjectorConfig


def downsample_merge(features_NPC: torch.Tensor, ratio: int) -> torch.Tensor:
    """Merge each ratio x ratio neighbourhood of the square patch grid: [N, g*g, C] -> [N, h*h, C*ratio^2]."""
    N, P, C = features_NPC.shape
    g = math.isqrt(P)
    if g * g != P:
        raise ValueError(f"projector expects a square patch grid, got {P} patches")
    pad = (-g) % ratio
    x = features_NPC.reshape(N, g, g, C)
    if pad:
        x = F.pad(x, (0, 0, 0, pad, 0, pad))  # zeros after the last column and the last row
    x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=ratio, stride=ratio)  # [N, C*r*r, h*h]
    return x.transpose(1, 2)


class MlpProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.ratio = cfg.downsample_ratio
        hidden = cfg.n_embed * cfg.mlp_ratio
        mods: list[nn.Module] = [nn.Linear(cfg.input_dim * self.ratio ** 2, hidden)]
        for _ in range(cfg.depth - 2):
            mods += [nn.GELU(), nn.Linear(hidden, hidden)]
        mods += [nn.GELU(), nn.Linear(hidden, cfg.n_embed)]
        self.layers = nn.Sequential(*mods)

    def forward(self, features_NPC: torch.Tensor) -> torch.Tensor:
        return self.layers(downsample_merge(features_NPC, self.ratio))
