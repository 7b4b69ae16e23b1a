"""SigLIP-SO400M vision tower (``vision.*``): patch embedding, pre-norm blocks, final LayerNorm.

Matches the original trimmed timm ``VisionTransformer`` as DeepSeek-VL2 runs it: no class token, learned absolute
position embedding added without interpolation, LayerNorm eps 1e-6, tanh-GELU MLP, plain softmax attention with
scale 1/sqrt(head_dim), and the final ``norm`` applied (the output is the last layer, post-norm). The MAP pooling
head ``attn_pool`` is built so its checkpoint weights are kept and saved, but it is never run.

Shapes: N views (tiles), S = image_size, P = grid**2 patches, W = width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recipe.config import VisionConfig

LN_EPS = 1e-6


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=True)

    def forward(self, x_N3SS: torch.Tensor) -> torch.Tensor:
        if x_N3SS.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"vision tower expects {self.image_size}x{self.image_size} tiles, "
                             f"got {tuple(x_N3SS.shape[-2:])}")
        return self.proj(x_N3SS).flatten(2).transpose(1, 2)  # [N, P, W]


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.heads
        self.head_dim = cfg.width // cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=True)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=True)

    def forward(self, x_NPW: torch.Tensor) -> torch.Tensor:
        N, P, W = x_NPW.shape
        # qkv rows: [Q | K | V], each split into heads of head_dim rows
        qkv = self.qkv(x_NPW).view(N, P, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [N, H, P, Dh]
        return self.proj(out.transpose(1, 2).reshape(N, P, W))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SigLIP uses the tanh approximation (the projector, by contrast, uses exact GELU)
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden)

    def forward(self, x_NPW: torch.Tensor) -> torch.Tensor:
        x_NPW = x_NPW + self.attn(self.norm1(x_NPW))
        return x_NPW + self.mlp(self.norm2(x_NPW))


class AttentionPoolLatent(nn.Module):
    """Parameters of timm's MAP head, kept only so checkpoints round-trip; DeepSeek-VL2 never runs it."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        W = cfg.width
        self.latent = nn.Parameter(torch.zeros(1, 1, W))
        self.q = nn.Linear(W, W, bias=True)
        self.kv = nn.Linear(W, 2 * W, bias=True)
        self.proj = nn.Linear(W, W, bias=True)
        self.norm = nn.LayerNorm(W, eps=LN_EPS)
        self.mlp = Mlp(W, cfg.mlp_hidden)


class VisionTransformer(nn.Module):
    """``vision``: tiles [N, 3, S, S] (normalised to [-1, 1]) -> features [N, P, W]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.attn_pool = AttentionPoolLatent(cfg) if cfg.has_attn_pool else None

    def embed(self, tiles_N3SS: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(tiles_N3SS) + self.pos_embed

    def forward(self, tiles_N3SS: torch.Tensor) -> torch.Tensor:
        x = self.embed(tiles_N3SS)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
