"""The pipeline's layer list as data: pipeline layer index -> kind and the HF tensors it owns.

The one source of truth shared by the pipeline builder (``pipeline.py``), the checkpoint loader, the cost model and
``converters/``: every HF tensor belongs to exactly one pipeline layer, whatever the stage split or EP size.

Layers, in order (n_vit vision blocks, n_decoder decoder layers; n_vit + n_decoder + 3 in all):

    0                      embed      language.model.embed_tokens.*, vision.patch_embed.*, vision.pos_embed
    1 .. n_vit             vit_block  vision.blocks.{i}.*
    n_vit + 1              projector  vision.norm.*, vision.attn_pool.* (kept, never run), projector.*,
                                      image_newline, view_seperator
    n_vit + 2 ..           decoder    language.model.layers.{j}.*
    n_vit + n_decoder + 2  head       language.model.norm.*, language.lm_head.*

Vision, projector and embedding always sit on stage 0; the decoder layers are split between stages.
Imports nothing above it (``recipe.config`` and the standard library only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from recipe.config import ConfigError, VL2Config

EMBED, VIT_BLOCK, PROJECTOR, DECODER, HEAD = "embed", "vit_block", "projector", "decoder", "head"

# --- names inside the pipeline layer modules -------------------------------------------------------------------
# Each pipeline layer module's state_dict uses local names (the contract ``pipeline.py`` builds to and the loader /
# converters read by). MoE layers put the router and routed experts inside DeepSpeed's ``MoE`` module (``mlp.moe``),
# which saves experts by global id under ``deepspeed_moe.experts.deepspeed_experts.{e}``; the shared experts stay
# outside it so DeepSpeed never files them as routed experts.

MOE_EXPERTS = "mlp.moe.deepspeed_moe.experts.deepspeed_experts."
MOE_ROUTER = "mlp.moe.deepspeed_moe.gate.router."

# The one name table: per layer kind, (HF prefix, local prefix) pairs, "{}" standing for the ViT block or decoder
# layer number. A name ending in "." is a prefix, any other an exact tensor name. The HF prefixes are what a layer
# owns (``PipeLayer.hf_prefixes``); HF -> local renames by the pairs, local -> HF by the same pairs swapped.
PREFIXES = {
    EMBED: (("language.model.embed_tokens.", "embed_tokens."), ("vision.patch_embed.", "patch_embed."),
            ("vision.pos_embed", "pos_embed")),
    VIT_BLOCK: (("vision.blocks.{}.", ""),),
    PROJECTOR: (("vision.norm.", "norm."), ("vision.attn_pool.", "attn_pool."), ("projector.", "projector."),
                ("image_newline", "image_newline"), ("view_seperator", "view_seperator")),
    DECODER: (("language.model.layers.{}.", ""),),
    HEAD: (("language.model.norm.", "norm."), ("language.lm_head.", "lm_head.")),
}
# MoE decoder layers rename these first (router into DeepSpeed's gate, routed experts keep their global id).
MOE_PREFIXES = (("language.model.layers.{}.mlp.gate.", MOE_ROUTER),
                ("language.model.layers.{}.mlp.experts.", MOE_EXPERTS))

# --- facts about the layer kinds and HF names that other modules act on ------------------------------------------
CHECKPOINTED_KINDS = (VIT_BLOCK, DECODER)  # recomputed in backward under activation checkpointing
ALWAYS_FROZEN = ("vision.attn_pool.",)     # HF prefixes kept for checkpoints, never run: never trained
FREEZE_GROUPS = ("vision", "projector", "language", "embeddings")  # the switches of recipe.freeze


def freeze_group(hf_key: str) -> str:
    """Which ``recipe.freeze`` switch covers a tensor: vision | projector | embeddings | language."""
    if hf_key.startswith("vision."):
        return "vision"
    if hf_key.startswith("projector.") or hf_key in ("image_newline", "view_seperator"):
        return "projector"
    if hf_key.startswith("language.model.embed_tokens."):
        return "embeddings"
    return "language"


def _matches(name: str, prefix: str) -> bool:
    """``prefix`` names ``name``: equal, a prefix ending in ".", or the empty prefix (a whole ViT / decoder layer)."""
    return prefix == "" or name == prefix or (prefix.endswith(".") and name.startswith(prefix))


def _block_re(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{}"), r"(\d+)"))


_BLOCK_RE = {kind: _block_re(PREFIXES[kind][0][0]) for kind in (VIT_BLOCK, DECODER)}
_FIXED_KINDS = tuple(kind for kind, pairs in PREFIXES.items() if "{}" not in pairs[0][0])
_EXPERT_RE = re.compile(_block_re(MOE_PREFIXES[1][0]).pattern + r"(\d+)\.(.+)$")
_EXPERT_LOCAL_RE = re.compile(r"^" + re.escape(MOE_EXPERTS) + r"(\d+)\.(.+)$")


@dataclass(frozen=True)
class PipeLayer:
    index: int                   # position in the PipelineModule's layer list
    kind: str                    # embed | vit_block | projector | decoder | head
    block: Optional[int]         # ViT block or decoder layer number, None for the others
    hf_prefixes: tuple           # HF key prefixes (or exact names) this layer owns
    is_moe: bool = False

    def owns(self, hf_key: str) -> bool:
        return any(_matches(hf_key, p) for p in self.hf_prefixes)

    def name_pairs(self) -> tuple:
        """(HF prefix, local prefix) pairs of this layer, most specific first."""
        pairs = (MOE_PREFIXES if self.is_moe else ()) + PREFIXES[self.kind]
        return tuple((hf.format(self.block), local) for hf, local in pairs)


def _index(cfg: VL2Config, kind: str, block: Optional[int] = None) -> int:
    n_vit, n_decoder = cfg.vision_config.layers, cfg.language_config.num_hidden_layers
    return {EMBED: 0, VIT_BLOCK: 1 + (block or 0), PROJECTOR: n_vit + 1, DECODER: n_vit + 2 + (block or 0),
            HEAD: n_vit + n_decoder + 2}[kind]


def _layer(cfg: VL2Config, kind: str, block: Optional[int] = None) -> PipeLayer:
    return PipeLayer(_index(cfg, kind, block), kind, block,
                     tuple(hf.format(block) for hf, _ in PREFIXES[kind]),
                     is_moe=kind == DECODER and cfg.language_config.is_moe_layer(block))


def build_layout(cfg: VL2Config) -> list[PipeLayer]:
    layers = [_layer(cfg, EMBED)]
    layers += [_layer(cfg, VIT_BLOCK, i) for i in range(cfg.vision_config.layers)]
    layers.append(_layer(cfg, PROJECTOR))
    layers += [_layer(cfg, DECODER, j) for j in range(cfg.language_config.num_hidden_layers)]
    layers.append(_layer(cfg, HEAD))
    return layers


def layer_index_of(cfg: VL2Config, hf_key: str) -> int:
    """Pipeline layer index that owns ``hf_key``; KeyError for a key no layer owns."""
    counts = {VIT_BLOCK: ("vision block", "vision_config.layers", cfg.vision_config.layers),
              DECODER: ("decoder layer", "language_config.num_hidden_layers", cfg.language_config.num_hidden_layers)}
    for kind, block_re in _BLOCK_RE.items():
        m = block_re.match(hf_key)
        if m:
            what, field, count = counts[kind]
            block = int(m.group(1))
            if block < count:
                return _index(cfg, kind, block)
            raise KeyError(f"{hf_key}: {what} {block} but {field}={count}")
    for kind in _FIXED_KINDS:
        if any(_matches(hf_key, hf) for hf, _ in PREFIXES[kind]):
            return _index(cfg, kind)
    raise KeyError(f"{hf_key}: not a DeepSeek-VL2 tensor name")


def keys_by_layer(cfg: VL2Config, names: Iterable[str]) -> dict[int, list[str]]:
    """Tensor names grouped by owning pipeline layer, in layer order (names keep their given order within a
    layer)."""
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(layer_index_of(cfg, name), []).append(name)
    return dict(sorted(groups.items()))


def parse_expert_key(hf_key: str) -> Optional[tuple[int, int, str]]:
    """``language.model.layers.{j}.mlp.experts.{e}.{rest}`` -> (j, e, rest); None for non-expert tensors."""
    m = _EXPERT_RE.match(hf_key)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def keys_for_rank(keys, layer: PipeLayer, expert_ids) -> list[str]:
    """The keys ``layer`` owns, keeping routed experts only when their global id is in ``expert_ids``."""
    keep = set(expert_ids)
    out = []
    for k in keys:
        if layer.owns(k):
            parsed = parse_expert_key(k)
            if parsed is None or parsed[1] in keep:
                out.append(k)
    return out


def first_decoder_index(cfg: VL2Config) -> int:
    return _index(cfg, DECODER, 0)


def stage_parts(cfg: VL2Config, num_stages: int, decoder_split: Sequence[int]) -> list[int]:
    """Layer boundaries per stage, DeepSpeed's ``parts`` (stage s owns layers parts[s] .. parts[s+1]-1).

    Stage 0 always holds embed, the ViT and the projector before its decoder layers; the last stage ends with the
    head. ``decoder_split`` gives the decoder layers per stage (the seed cluster: [13, 17]); for ``auto``, callers
    pass ``recipe.parallel.cost.balanced_decoder_split`` (which evens out the stages' FLOPs).
    """
    n_decoder = cfg.language_config.num_hidden_layers
    first = first_decoder_index(cfg)
    if num_stages < 1:
        raise ConfigError(f"pipeline stages={num_stages}: must be >= 1")
    decoder_split = list(decoder_split)
    if len(decoder_split) != num_stages:
        raise ConfigError(f"decoder_split={decoder_split} has {len(decoder_split)} entries for "
                          f"{num_stages} pipeline stages; give one count per stage")
    if sum(decoder_split) != n_decoder or any(n < 0 for n in decoder_split):
        raise ConfigError(f"decoder_split={decoder_split} must be non-negative and add up to "
                          f"language_config.num_hidden_layers={n_decoder} (it adds up to {sum(decoder_split)})")
    if num_stages > 1 and decoder_split[-1] == 0:
        raise ConfigError(f"decoder_split={decoder_split}: the last stage holds the head and needs >= 1 decoder "
                          f"layer so the head is not a stage of its own")
    lc = cfg.language_config
    if lc.is_moe and num_stages > 1:
        start = 0
        for s, n in enumerate(decoder_split):
            if not any(lc.is_moe_layer(j) for j in range(start, start + n)):
                raise ConfigError(
                    f"decoder_split={decoder_split}: stage {s} (decoder layers {start}..{start + n - 1}) holds no "
                    f"MoE layer. DeepSpeed creates the expert groups and reduces expert gradient norms with "
                    f"collectives that only stages holding MoE layers join, so such a stage hangs the run; give "
                    f"every stage at least one MoE layer (layers >= first_k_dense_replace={lc.first_k_dense_replace})")
            start += n
    parts = [0, first + decoder_split[0]]
    for n in decoder_split[1:]:
        parts.append(parts[-1] + n)
    parts[-1] += 1  # the head
    return parts


def ckpt_layer_file(index: int) -> str:
    """DeepSpeed's layer-wise file name for pipeline layer ``index`` (tensor-parallel rank 0)."""
    return f"layer_{index:02d}-model_00-model_states.pt"


def _rename(name: str, pairs) -> Optional[str]:
    for src, dst in pairs:
        if _matches(name, src):
            return dst + name[len(src):]
    return None


def hf_to_local(layer: PipeLayer, hf_key: str) -> str:
    """HF tensor name -> the pipeline layer module's name (routed experts keep their global id)."""
    local = _rename(hf_key, layer.name_pairs())
    if local is None:
        raise KeyError(f"{hf_key}: not owned by pipeline layer {layer.index} ({layer.kind})")
    return local


def local_to_hf(layer: PipeLayer, local_name: str) -> str:
    """Inverse of :func:`hf_to_local` (expert ids in ``local_name`` must be global)."""
    hf_key = _rename(local_name, [(local, hf) for hf, local in layer.name_pairs()])
    if hf_key is None:
        raise KeyError(f"{local_name}: not a tensor of pipeline layer {layer.index} ({layer.kind})")
    return hf_key


def expert_id_of_local(local_name: str) -> Optional[int]:
    """The expert id in a routed-expert local name, None for other tensors."""
    m = _EXPERT_LOCAL_RE.match(local_name)
    return int(m.group(1)) if m else None


def renumber_expert(local_name: str, new_id: int) -> str:
    """Replace the expert id of a routed-expert local name (global <-> rank-local numbering)."""
    m = _EXPERT_LOCAL_RE.match(local_name)
    if not m:
        raise KeyError(f"{local_name}: not a routed-expert tensor")
    return f"{MOE_EXPERTS}{new_id}.{m.group(2)}"
