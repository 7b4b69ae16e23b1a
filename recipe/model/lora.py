"""LoRA: a low-rank update beside a frozen linear layer, ``y = x W^T + b + scale * B(A(dropout(x)))``.

:class:`LoraLinear` keeps the base layer's own parameters (``weight``, ``bias``) and adds ``lora_A`` [r, in] and
``lora_B`` [out, r] as child ``nn.Linear`` modules, so a LoRA module named ``M`` holds ``M.weight``,
``M.lora_A.weight`` and ``M.lora_B.weight``: PEFT's names (its saved adapters drop the adapter name and prefix
``base_model.model.``), the same whether the layer sits in the plain model or in a pipeline layer. ``scale`` is
``alpha / r``, PEFT's default scaling (no rsLoRA).

Routed experts run as grouped GEMMs (``recipe.model.moe.grouped_experts``) and never call their layers' forward;
:func:`grouped_lora_delta` gives them the same update as two more grouped GEMMs per projection,
``x -> grouped(A) [N, r] -> grouped(B) [N, out]``, on the rows the base GEMM already has grouped by expert.

Shape legend: N rows (all experts), r rank, G experts.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch
from torch import nn

from recipe.model import ops


class LoraLinear(nn.Linear):
    """An ``nn.Linear`` (the base, frozen by the caller) plus ``scale * lora_B(lora_A(dropout(x)))``.

    Built from an existing layer with :meth:`wrap`: the base parameters are the same ``Parameter`` objects (and
    DeepSpeed's attributes on them stay), so weights loaded before or after wrapping are the ones used."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_lora(self.lora_A.weight, self.lora_B.weight, generator)

    @classmethod
    def wrap(cls, base: nn.Linear, rank: int, alpha: float, dropout: float, seed: int, name: str) -> "LoraLinear":
        """A LoRA layer around ``base``; its A is drawn from a generator seeded by ``seed`` and the module's
        checkpoint name, so an adapter starts the same whatever the pipeline split or expert-parallel size."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return cls(base, rank, alpha, dropout, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


@torch.no_grad()
def init_lora(a_rk: torch.Tensor, b_or: torch.Tensor, generator: torch.Generator) -> None:
    """PEFT's default init: A Kaiming-uniform (a = sqrt(5), nn.Linear's), B zero, so the adapted layer starts as
    the base layer exactly. Drawn in fp32 on the host (the same numbers on every device), then copied."""
    a = torch.empty(a_rk.shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(a, a=5 ** 0.5, generator=generator)
    if a_rk.device.type != "meta":
        a_rk.copy_(a)
        b_or.zero_()


def grouped_lora_delta(x_NK: torch.Tensor, tokens_per_expert_G: torch.Tensor,
                       layers: Sequence[LoraLinear]) -> torch.Tensor:
    """``scale * B_g(A_g(dropout(x)))`` for every expert g on its block of rows, as two grouped GEMMs.

    x [N, K] grouped by expert (``tokens_per_expert_G`` rows each), ``layers[g]`` expert g's LoRA layer of one
    projection (same rank, scale and dropout for all). Returns [N, out] in x's dtype."""
    first = layers[0]
    h_NR = ops.grouped_linear(first.lora_dropout(x_NK), [[m.lora_A.weight] for m in layers], tokens_per_expert_G)
    return ops.grouped_linear(h_NR, [[m.lora_B.weight] for m in layers], tokens_per_expert_G) * first.scale


def merged_weight(weight: torch.Tensor, a_rk: torch.Tensor, b_or: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + (B @ A) * scale`` in fp32 (the merge of an adapter into its base weight), [out, in] fp32."""
    return weight.float() + (b_or.float() @ a_rk.float()) * scale


def effective_weight(layer: nn.Linear) -> torch.Tensor:
    """The [out, in] weight a linear layer applies (dropout aside): W, or for a :class:`LoraLinear`
    ``W + scale * B @ A`` in W's dtype; for code that reads a layer's weight instead of calling it."""
    if isinstance(layer, LoraLinear):
        return (layer.weight + (layer.lora_B.weight @ layer.lora_A.weight) * layer.scale).to(layer.weight.dtype)
    return layer.weight
