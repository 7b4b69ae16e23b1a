"""Filling this rank's pipeline layers and experts from a tensor source, whatever the PP split and EP size.

A tensor source is ``fetch(layer: layout.PipeLayer, expert_ids) -> {hf_key: tensor}``: the layer's tensors under
their HF names, routed experts only for the global ids asked for. Sources: a converted directory
(``converters/hf_to_ds.py``: one file per pipeline layer, experts by global id, read memory-mapped so a rank touches
only its own experts' bytes), a Hugging Face checkpoint directory (read tensor by tensor from the safetensors
shards), or a full HF-named state dict in memory (tests, a plain model). Weights are loaded before
``deepspeed.initialize``, so the optimizer's fp32 master copies start from exactly these values.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from recipe.checkpoint.converted import MANIFEST_NAME, load_manifest, read_layer
from recipe.checkpoint.hf import INDEX_NAME, SINGLE_NAME, iter_tensors, load_weight_map
from recipe.parallel import layout
from recipe.parallel.pipeline import VL2Pipeline

# --- tensor sources ------------------------------------------------------------------------------------------------

def tensor_source_from_state_dict(state_dict: dict) -> Callable:
    """A tensor source over a full HF-named state dict (tests, and loading a plain model)."""
    def fetch(layer: layout.PipeLayer, expert_ids: Sequence[int]) -> dict:
        return {k: state_dict[k] for k in layout.keys_for_rank(state_dict, layer, expert_ids)}
    return fetch


def converted_source(ds_dir: str) -> Callable:
    manifest = load_manifest(ds_dir)

    def fetch(layer: layout.PipeLayer, expert_ids):
        return read_layer(ds_dir, layer.index, expert_ids if layer.is_moe else None, manifest=manifest)
    return fetch


def hf_source(hf_dir: str) -> Callable:
    weight_map = load_weight_map(hf_dir)

    def fetch(layer: layout.PipeLayer, expert_ids):
        return dict(iter_tensors(hf_dir, layout.keys_for_rank(weight_map, layer, expert_ids), weight_map=weight_map))
    return fetch


# --- filling the layers --------------------------------------------------------------------------------------------

def _global_hf_name(layer: layout.PipeLayer, local_name: str, first_expert: int) -> str:
    e = layout.expert_id_of_local(local_name)
    return layout.local_to_hf(layer, local_name if e is None else layout.renumber_expert(local_name, e + first_expert))


@torch.no_grad()
def load_layers(module: VL2Pipeline, fetch: Callable) -> int:
    """Fill this rank's layers from the tensor source ``fetch``, taking only this rank's experts and renumbering
    them from global to rank-local ids. Strict: every local tensor must be filled, none may be left over, shapes
    must agree (errors name the pipeline layer and the HF names). Returns the number of tensors loaded."""
    expert_ids = module.local_expert_ids()
    first = expert_ids[0] if expert_ids else 0
    n = 0
    for layer, m in module.local_layers():
        local = {}  # rank-local name -> (HF name, tensor)
        for hf_key, t in fetch(layer, expert_ids).items():
            name = layout.hf_to_local(layer, hf_key)
            e = layout.expert_id_of_local(name)
            if e is not None:
                name = layout.renumber_expert(name, e - first)
            local[name] = (hf_key, t)
        own = m.state_dict()
        missing = sorted(_global_hf_name(layer, name, first) for name in set(own) - set(local))
        extra = sorted(local[name][0] for name in set(local) - set(own))
        if missing or extra:
            raise KeyError(f"pipeline layer {layer.index} ({layer.kind}): missing {missing[:6]}, unexpected "
                           f"{extra[:6]}")
        for name, (hf_key, t) in local.items():
            if own[name].shape != t.shape:
                raise ValueError(f"pipeline layer {layer.index} ({layer.kind}): {hf_key} has shape "
                                 f"{tuple(t.shape)}, the model expects {tuple(own[name].shape)}")
            own[name].copy_(t)
            n += 1
    return n


def load_pretrained(module: VL2Pipeline, model_dir: str) -> int:
    """Load this rank's layers (and its experts only) from ``model_dir``; returns the number of tensors."""
    if os.path.isfile(os.path.join(model_dir, MANIFEST_NAME)):
        fetch = converted_source(model_dir)
    elif os.path.isfile(os.path.join(model_dir, INDEX_NAME)) or os.path.isfile(os.path.join(model_dir, SINGLE_NAME)):
        fetch = hf_source(model_dir)
    else:
        raise FileNotFoundError(f"{model_dir}: neither a converted checkpoint ({MANIFEST_NAME}) nor a Hugging Face "
                                f"one ({INDEX_NAME} or {SINGLE_NAME})")
    return load_layers(module, fetch)


def check_expert_groups(module: VL2Pipeline) -> None:
    """After ``deepspeed.initialize``: the expert-parallel rank DeepSpeed assigned must be the one the weights were
    loaded for (experts are picked before the groups exist)."""
    from deepspeed.utils import groups

    from recipe.parallel.experts import ExpertParallelMoE

    for layer, m in module.local_layers():
        mlp = getattr(m, "mlp", None)
        if isinstance(mlp, ExpertParallelMoE):
            name = mlp.moe.expert_group_name
            got = groups._get_expert_parallel_rank(name)
            if got != module.ep_rank:
                raise RuntimeError(f"pipeline layer {layer.index}: DeepSpeed put this rank at expert-parallel rank "
                                   f"{got}, but experts {module.local_expert_ids()} (rank {module.ep_rank}) were "
                                   f"loaded; DeepSpeed's group layout changed, update VL2Pipeline.ep_rank")
            return
