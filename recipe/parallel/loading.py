"""Loading pretrained weights into this rank's pipeline layers and experts, whatever the PP split and EP size.

Sources: a converted directory (``converters/hf_to_ds.py``: one file per pipeline layer, experts by global id,
read memory-mapped so a rank touches only its own experts' bytes) or, as a convenience, a Hugging Face checkpoint
directory (read tensor by tensor from the safetensors shards). Weights are loaded before ``deepspeed.initialize``,
so the optimizer's fp32 master copies start from exactly these values.
"""

from __future__ import annotations

import os
from typing import Callable

from recipe.hf_checkpoint import INDEX_NAME, SINGLE_NAME, iter_tensors, load_weight_map
from recipe.parallel import layout as L
from recipe.parallel.checkpoint import MANIFEST_NAME, load_manifest, read_layer
from recipe.parallel.pipeline import VL2Pipeline, load_layers


def converted_source(ds_dir: str) -> Callable:
    manifest = load_manifest(ds_dir)

    def fetch(layer: L.PipeLayer, expert_ids):
        return read_layer(ds_dir, layer.index, expert_ids if layer.is_moe else None, manifest=manifest)
    return fetch


def hf_source(hf_dir: str) -> Callable:
    weight_map = load_weight_map(hf_dir)

    def fetch(layer: L.PipeLayer, expert_ids):
        return dict(iter_tensors(hf_dir, L.keys_for_rank(weight_map, layer, expert_ids), weight_map=weight_map))
    return fetch


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
