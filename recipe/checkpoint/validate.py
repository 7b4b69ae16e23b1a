"""Does a checkpoint hold what ``config.json`` says? The one strict check of tensor names and shapes, with
messages that name the file and diagnose the usual mismatches (layer and expert counts). The expected names and
shapes come from the model itself (:func:`recipe.model.state_shapes`), never from a second hand-written list.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

from recipe.checkpoint import CheckpointError
from recipe.config import VL2Config


def _ids(names: Iterable[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for n in names for m in [rx.match(n)] if m})


def _count_hints(cfg: VL2Config, names: Iterable[str]) -> list[str]:
    """Plain-language diagnoses of the usual config/checkpoint mismatches: layer and expert counts."""
    names = list(names)
    hints = []
    vc, lc = cfg.vision_config, cfg.language_config
    blocks = _ids(names, r"^vision\.blocks\.(\d+)\.")
    if blocks and len(blocks) != vc.layers:
        hints.append(f"the checkpoint has {len(blocks)} vision blocks (ids {blocks[0]}..{blocks[-1]}), "
                     f"config.json vision_config.layers={vc.layers}")
    layers = _ids(names, r"^language\.model\.layers\.(\d+)\.")
    if layers and len(layers) != lc.num_hidden_layers:
        hints.append(f"the checkpoint has {len(layers)} decoder layers (ids {layers[0]}..{layers[-1]}), "
                     f"config.json language_config.num_hidden_layers={lc.num_hidden_layers}")
    experts = _ids(names, r"^language\.model\.layers\.\d+\.mlp\.experts\.(\d+)\.")
    if experts and len(experts) != (lc.n_routed_experts or 0):
        hints.append(f"the checkpoint has {len(experts)} routed experts per layer (ids {experts[0]}..{experts[-1]}),"
                     f" config.json language_config.n_routed_experts={lc.n_routed_experts}")
    moe_layers = _ids(names, r"^language\.model\.layers\.(\d+)\.mlp\.gate\.weight$")
    if moe_layers != [j for j in lc.moe_layer_ids if j in layers]:
        hints.append(f"the checkpoint has MoE layers {moe_layers}, config.json implies {lc.moe_layer_ids} "
                     f"(first_k_dense_replace={lc.first_k_dense_replace}, moe_layer_freq={lc.moe_layer_freq})")
    return hints


def check_against_config(cfg: VL2Config, found: dict, where: Callable[[str], str], source: str,
                         expected: dict) -> dict:
    """Compare ``found`` (name -> shape) with ``expected`` (name -> shape: what the model built from ``cfg``
    holds, :func:`recipe.model.state_shapes`); raise :class:`CheckpointError` listing missing keys, unexpected
    keys (with the file holding them, from ``where``) and shape mismatches, with hints about layer and expert
    counts. Returns ``expected``."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and tuple(found[k]) != expected[k]]
    if not (missing or extra or wrong):
        return expected
    lines = [f"{source}: tensors do not match config.json "
             f"({len(missing)} missing, {len(extra)} unexpected, {len(wrong)} with the wrong shape)"]
    lines += [f"  hint: {h}" for h in _count_hints(cfg, found)]
    show = 10
    lines += [f"  missing tensor {k!r} (shape {list(expected[k])})" for k in missing[:show]]
    lines += [f"  unexpected tensor {k!r} in {where(k)}" for k in extra[:show]]
    lines += [f"  tensor {k!r} in {where(k)} has shape {list(found[k])}, config.json implies {list(expected[k])}"
              for k in wrong[:show]]
    if max(len(missing), len(extra), len(wrong)) > show:
        lines.append(f"  (only the first {show} of each kind are listed)")
    raise CheckpointError("\n".join(lines))
