"""LoRA in the pipeline: adapters on this rank's layers and experts, named as in the released checkpoint.

Each pipeline layer module uses local names (``layout.hf_to_local``); routed experts are numbered locally from 0 on
every expert-parallel rank. An adapter is named, initialised and matched by its module's checkpoint name (experts
by global id), so every layout starts from the same adapter and saves it under names export can map back.
"""

from __future__ import annotations

from typing import Optional

from recipe.lora.config import LoraConfig
from recipe.lora.inject import freeze_all_but_lora, inject_lora
from recipe.parallel import layout
from recipe.parallel.pipeline import VL2Pipeline


def apply_lora(module: VL2Pipeline, cfg: LoraConfig, seed: int) -> list[str]:
    """Inject adapters into this rank's layers (after the base weights are loaded, before ``deepspeed.initialize``)
    and freeze every base parameter. Returns the checkpoint names of the modules adapted on this rank."""
    expert_ids = module.local_expert_ids()
    first = expert_ids[0] if expert_ids else 0
    adapted = []
    for layer, m in module.local_layers():
        def name_of(local: str, layer=layer) -> Optional[str]:
            weight = local + ".weight"
            e = layout.expert_id_of_local(weight)
            if e is not None:
                weight = layout.renumber_expert(weight, e + first)
            try:
                return layout.local_to_hf(layer, weight)[:-len(".weight")]
            except KeyError:
                return None
        adapted += inject_lora(m, cfg, seed, name_of)
    freeze_all_but_lora(module)
    return adapted
