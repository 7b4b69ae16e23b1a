"""The PEFT adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``, as ``peft`` writes and
reads it, with the released checkpoint's module names.

Tensor names are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (PEFT drops the adapter name
when saving); ``target_modules`` lists the adapted modules by their full names, which PEFT matches exactly (a
pattern such as ``self_attn.*`` would also catch the attention's norms, which LoRA cannot wrap). Apply it with
``PeftModel.from_pretrained(model, dir)`` on our plain model, or :func:`load_adapter` without peft.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from recipe.checkpoint import CheckpointError
from recipe.checkpoint.files import atomic_output_dir
from recipe.lora.config import LoraConfig, lora_module_of
from recipe.lora.inject import freeze_all_but_lora, inject_lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_config(cfg: LoraConfig, modules: list[str], base_model: Optional[str] = None) -> dict:
    """PEFT's ``LoraConfig`` fields for an adapter over ``modules`` (plain LoRA: no DoRA, no rsLoRA, no biases)."""
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "inference_mode": True,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": sorted(modules),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}


def write_adapter(out_dir: str, cfg: LoraConfig, tensors: dict, overwrite: bool = False,
                  base_model: Optional[str] = None) -> list[str]:
    """Write ``tensors`` ({``<module>.lora_A.weight`` / ``.lora_B.weight``: tensor}) as a PEFT adapter directory
    (atomically). Every module needs both A [r, in] and B [out, r]. Returns the adapted module names."""
    pairs: dict = {}
    for name, t in tensors.items():
        module, which = lora_module_of(name)
        pairs.setdefault(module, {})[which] = t
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{module}: LoRA needs both lora_A and lora_B, found only lora_{''.join(ab)}")
        if ab["A"].shape[0] != cfg.rank or ab["B"].shape[1] != cfg.rank:
            raise CheckpointError(f"{module}: lora_A {tuple(ab['A'].shape)} / lora_B {tuple(ab['B'].shape)} do not "
                                  f"have rank {cfg.rank} (recipe.lora.rank of the run)")
    modules = sorted(pairs)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        save_file({PEFT_PREFIX + k: v.detach().contiguous() for k, v in sorted(tensors.items())},
                  os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(peft_config(cfg, modules, base_model), f, indent=2)
            f.write("\n")
    return modules


def read_adapter(adapter_dir: str) -> tuple[LoraConfig, list[str], dict]:
    """(settings, adapted module names, {``<module>.lora_A.weight``: tensor}) of a PEFT LoRA adapter directory."""
    path = os.path.join(adapter_dir, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the adapter config ({e})") from None
    if raw.get("peft_type") != "LORA" or raw.get("use_dora") or raw.get("use_rslora") or \
            raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise CheckpointError(f"{path}: only plain LoRA adapters (peft_type LORA, no DoRA / rsLoRA / per-module "
                              f"ranks) are supported")
    modules = raw.get("target_modules")
    if not isinstance(modules, list):
        raise CheckpointError(f"{path}: target_modules must be the list of adapted module names")
    cfg = LoraConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0)),
                     target_modules=list(modules))
    weights = load_file(os.path.join(adapter_dir, WEIGHTS_NAME))
    bad = [k for k in weights if not k.startswith(PEFT_PREFIX)]
    if bad:
        raise CheckpointError(f"{os.path.join(adapter_dir, WEIGHTS_NAME)}: tensor {bad[0]!r} lacks the "
                              f"{PEFT_PREFIX!r} prefix")
    return cfg, modules, {k[len(PEFT_PREFIX):]: v for k, v in weights.items()}


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str) -> list[str]:
    """Put a PEFT adapter directory's LoRA layers into our plain model (no peft needed) and freeze the base.
    Strict: every adapter tensor must land in the model, every adapted module must get its A and B."""
    cfg, modules, tensors = read_adapter(adapter_dir)
    adapted = inject_lora(model, cfg, seed=0)
    if sorted(adapted) != sorted(modules):
        raise CheckpointError(f"{adapter_dir}: target_modules name {len(modules)} modules, the model has "
                              f"{len(adapted)} of them (first difference: "
                              f"{sorted(set(modules) ^ set(adapted))[:3]})")
    own = model.state_dict()
    missing = [k for k in own if (".lora_A." in k or ".lora_B." in k) and k not in tensors]
    extra = [k for k in tensors if k not in own]
    if missing or extra:
        raise CheckpointError(f"{adapter_dir}: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, t in tensors.items():
        if own[k].shape != t.shape:
            raise CheckpointError(f"{adapter_dir}: {k} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(own[k].shape)}")
        own[k].copy_(t)
    freeze_all_but_lora(model)
    return adapted
