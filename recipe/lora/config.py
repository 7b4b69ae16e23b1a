"""The ``recipe.lora`` block of the run JSON: rank, alpha, dropout and the target modules, by checkpoint names.

Targets are patterns over the released checkpoint's module names, where ``*`` stands for one name part (no dots):
``language.model.layers.*.self_attn.*`` is every linear layer of every attention block. Only ``nn.Linear`` modules
the model runs through their forward are adapted; the LM head (the loss reads its weight directly) and the unused
``vision.attn_pool`` never are. A pattern that adapts nothing is an error. Standard library only (the planner and
the config checks import this without torch).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Iterable

from recipe.config import ConfigError
from recipe.settings import check_value, field_types, kind_of, show

# What the defaults adapt: attention projections, shared experts, dense MLPs (the first_k_dense_replace layers)
# and the projector; the ViT and the routed experts are opt-in (OPTIONAL_TARGETS, documented in the README).
DEFAULT_TARGETS = ("language.model.layers.*.self_attn.*", "language.model.layers.*.mlp.shared_experts.*",
                   "language.model.layers.*.mlp.*", "projector.layers.*")
OPTIONAL_TARGETS = {"vision": ("vision.blocks.*.attn.*", "vision.blocks.*.mlp.*"),
                    "routed_experts": ("language.model.layers.*.mlp.experts.*.*",)}
# Linear layers never adapted: the head runs inside the loss on its raw weight; attn_pool is kept, never run.
NOT_ADAPTABLE = ("language.lm_head", "vision.attn_pool.")

LORA_MARKERS = (".lora_A.", ".lora_B.")


def is_lora_key(name: str) -> bool:
    """A LoRA tensor name (``<module>.lora_A.weight`` / ``<module>.lora_B.weight``)."""
    return any(m in name for m in LORA_MARKERS)


def lora_module_of(name: str) -> tuple[str, str]:
    """``<module>.lora_A.weight`` -> (``<module>``, "A"); likewise for B."""
    for m in LORA_MARKERS:
        if m in name:
            module, _, rest = name.partition(m)
            if rest != "weight":
                break
            return module, m[-2]
    raise KeyError(f"{name}: not a LoRA tensor name (<module>.lora_A.weight or <module>.lora_B.weight)")


def pattern_regex(pattern: str) -> re.Pattern:
    """A target pattern as a regex over whole module names (``*`` = one name part)."""
    return re.compile("".join("[^.]+" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern)))


@dataclass
class LoraConfig:
    """``recipe.lora``: train low-rank adapters on the target modules, everything else frozen."""

    rank: int = 8
    """r: the adapters' rank (A is [r, in], B is [out, r])."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank (PEFT's lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapters' input (PEFT's lora_dropout); 0 disables it."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Module-name patterns of the released checkpoint (``*`` = one name part). Default: attention projections,
    shared experts, dense MLPs and projector. Add "vision.blocks.*.attn.*", "vision.blocks.*.mlp.*" for the ViT
    and "language.model.layers.*.mlp.experts.*.*" for the routed experts."""

    @classmethod
    def from_dict(cls, raw, where: str = "recipe.lora") -> "LoraConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}={show(raw)}: expected a JSON object (rank, alpha, dropout, target_modules), "
                              f"got {kind_of(raw)}")
        types = field_types(cls)
        unknown = sorted(set(raw) - set(types))
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(types)}")
        cfg = cls(**{k: check_value(f"{where}.{k}", v, types[k]) for k, v in raw.items()})
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "recipe.lora") -> None:
        if self.rank <= 0:
            raise ConfigError(f"{where}.rank={self.rank}: must be a positive integer")
        if self.alpha <= 0:
            raise ConfigError(f"{where}.alpha={self.alpha}: must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout={self.dropout}: must be in [0, 1)")
        if not self.target_modules:
            raise ConfigError(f"{where}.target_modules is empty: name at least one module pattern")
        for i, p in enumerate(self.target_modules):
            if not p or p.startswith(".") or p.endswith(".") or ".." in p:
                raise ConfigError(f"{where}.target_modules[{i}]={show(p)}: not a dotted module name pattern")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def targets(self, linear_names: Iterable[str], where: str = "recipe.lora") -> list[str]:
        """The names among ``linear_names`` (every ``nn.Linear`` of the model, checkpoint names) that get an adapter,
        in the given order. Raises ConfigError for a pattern that adapts nothing."""
        names = list(linear_names)
        adaptable = [n for n in names if not n.startswith(NOT_ADAPTABLE)]
        regexes = [pattern_regex(p) for p in self.target_modules]
        for i, (p, rx) in enumerate(zip(self.target_modules, regexes)):
            if not any(rx.fullmatch(n) for n in adaptable):
                excluded = [n for n in names if rx.fullmatch(n) and n.startswith(NOT_ADAPTABLE)]
                why = (f" (it matches only {excluded[:3]}, which are never adapted: the LM head runs inside the "
                       f"loss, attn_pool is never run)" if excluded else "")
                raise ConfigError(f"{where}.target_modules[{i}]={show(p)} matches no linear layer of this model"
                                  f"{why}; '*' stands for one name part, e.g. "
                                  f"\"language.model.layers.*.self_attn.*\"")
        return [n for n in adaptable if any(rx.fullmatch(n) for rx in regexes)]

    def matches(self, name: str) -> bool:
        """Whether one module name is a target (no check that every pattern matches something)."""
        return not name.startswith(NOT_ADAPTABLE) and any(pattern_regex(p).fullmatch(name)
                                                         for p in self.target_modules)
