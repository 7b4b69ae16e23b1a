"""Putting LoRA layers into a model: the plain model (module names are checkpoint names) or a pipeline layer
(local names, mapped to checkpoint names by the caller), and freezing everything else.

Routed experts under DeepSpeed carry ``allreduce=False`` and ``group_name`` on their parameters (set by
``deepspeed.moe.experts.Experts``): the engine reduces such gradients over the expert-data-parallel group only,
files them into the MoE optimizer groups and saves them in the per-expert files. An adapter added to an expert's
layer gets the same two attributes, copied from the layer's base weight, so it is sharded, reduced and saved with
its expert.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from recipe.lora.config import LoraConfig
from recipe.model.lora import LoraLinear

# DeepSpeed's per-parameter MoE attributes (deepspeed/moe/experts.py, deepspeed/moe/utils.py:is_moe_param).
_EXPERT_PARAM_ATTRS = ("allreduce", "group_name")


def linear_names(root: nn.Module, name_of: Optional[Callable[[str], Optional[str]]] = None) -> list[str]:
    """Checkpoint names of every ``nn.Linear`` (LoRA layers included) under ``root``."""
    out = []
    for local, m in root.named_modules():
        if isinstance(m, nn.Linear) and not local.endswith((".lora_A", ".lora_B")):
            name = name_of(local) if name_of else local
            if name is not None:
                out.append(name)
    return out


def inject_lora(root: nn.Module, cfg: LoraConfig, seed: int,
                name_of: Optional[Callable[[str], Optional[str]]] = None) -> list[str]:
    """Replace every target ``nn.Linear`` under ``root`` by a :class:`LoraLinear` around it; returns the
    checkpoint names adapted. ``name_of(local module name)`` gives a module's checkpoint name (None: never adapt);
    by default the local name is the checkpoint name (the plain model). Does not check that every pattern matched:
    a pipeline rank holds only part of the model (``LoraConfig.targets`` checks the whole model)."""
    adapted = []
    for local, m in list(root.named_modules()):
        if type(m) is not nn.Linear or local.endswith((".lora_A", ".lora_B")):
            continue
        name = name_of(local) if name_of else local
        if name is None or not cfg.matches(name):
            continue
        layer = LoraLinear.wrap(m, cfg.rank, cfg.alpha, cfg.dropout, seed, name)
        for attr in _EXPERT_PARAM_ATTRS:
            if hasattr(m.weight, attr):
                for p in (layer.lora_A.weight, layer.lora_B.weight):
                    setattr(p, attr, getattr(m.weight, attr))
        parent_name, _, child = local.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, layer)
        adapted.append(name)
    return adapted


def freeze_all_but_lora(root: nn.Module) -> int:
    """requires_grad only on LoRA parameters; returns how many parameter tensors stay trainable."""
    n = 0
    for name, p in root.named_parameters():
        train = ".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B."))
        p.requires_grad_(train)
        n += train
    return n


def lora_state_dict(root: nn.Module) -> dict:
    """The LoRA tensors of ``root`` by local name (``<module>.lora_A.weight`` / ``.lora_B.weight``)."""
    return {k: v for k, v in root.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int) -> list[str]:
    """The plain model (checkpoint names): check the targets against the whole model, inject, freeze the rest.
    Returns the adapted module names."""
    cfg.targets(linear_names(model))  # every pattern adapts something
    adapted = inject_lora(model, cfg, seed)
    freeze_all_but_lora(model)
    return adapted


_LINEAR_SHAPES: dict = {}  # repr(VL2Config) -> {name: (in, out)}: a meta build of base takes seconds


def _linear_shapes(model_cfg) -> dict:
    """{checkpoint name: (in_features, out_features)} of every ``nn.Linear`` of the plain model for a ``VL2Config``,
    from a model built on the meta device (no memory, no init); cached per config."""
    key = repr(model_cfg)
    if key not in _LINEAR_SHAPES:
        import torch

        from recipe.model import DeepseekVLV2ForCausalLM

        with torch.device("meta"):
            model = DeepseekVLV2ForCausalLM(model_cfg)
        _LINEAR_SHAPES[key] = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
                               if isinstance(m, nn.Linear)}
    return _LINEAR_SHAPES[key]


def model_linear_names(model_cfg) -> list[str]:
    """Checkpoint names of every ``nn.Linear`` of the plain model: what ``LoraConfig.targets`` checks patterns
    against before any rank builds its layers."""
    return list(_linear_shapes(model_cfg))


def adapter_numels(model_cfg, cfg: LoraConfig) -> dict:
    """{adapted module name: (A numel, B numel)} = (r x in, out x r) for the whole model (the planner's count)."""
    shapes = _linear_shapes(model_cfg)
    return {n: (cfg.rank * shapes[n][0], shapes[n][1] * cfg.rank) for n in cfg.targets(shapes)}
