"""The pipeline's layer list as data: pipeline layer index -> kind and the HF tensors it owns.

The one source of truth shared by the pipeline builder (``pipeline.py``), the checkpoint loader and
``converters/``: every HF tensor belongs to exactly one pipeline layer, whatever the stage split or EP size.

Layers, in order (V vision blocks, L decoder layers; V + L + 3 in all):

    0            embed      language.model.embed_tokens.*, vision.patch_embed.*, vision.pos_embed
    1 .. V       vit_block  vision.blocks.{i}.*
    V + 1        projector  vision.norm.*, vision.attn_pool.* (kept, never run), projector.*, image_newline,
                            view_seperator
    V + 2 ..     decoder    language.model.layers.{j}.*
    V + L + 2    head       language.model.norm.*, language.lm_head.*

Vision, projector and embedding always sit on stage 0; the decoder layers are split between stages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from recipe.config import ConfigError, VL2Config

EMBED, VIT_BLOCK, PROJECTOR, DECODER, HEAD = "embed", "vit_block", "projector", "decoder", "head"

_EXPERT_RE = re.compile(r"^language\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$")
_VIT_RE = re.compile(r"^vision\.blocks\.(\d+)\.")
_DEC_RE = re.compile(r"^language\.model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class PipeLayer:
    index: int                   # position in the PipelineModule's layer list
    kind: str                    # embed | vit_block | projector | decoder | head
    block: Optional[int]         # ViT block or decoder layer number, None for the others
    hf_prefixes: tuple           # HF key prefixes (or exact names) this layer owns
    is_moe: bool = False

    def owns(self, hf_key: str) -> bool:
        return any(hf_key == p or (p.endswith(".") and hf_key.startswith(p)) for p in self.hf_prefixes)


def build_layout(cfg: VL2Config) -> list[PipeLayer]:
    V = cfg.vision_config.layers
    L = cfg.language_config.num_hidden_layers
    layers = [PipeLayer(0, EMBED, None, ("language.model.embed_tokens.", "vision.patch_embed.", "vision.pos_embed"))]
    layers += [PipeLayer(1 + i, VIT_BLOCK, i, (f"vision.blocks.{i}.",)) for i in range(V)]
    layers.append(PipeLayer(V + 1, PROJECTOR, None,
                            ("vision.norm.", "vision.attn_pool.", "projector.", "image_newline", "view_seperator")))
    layers += [PipeLayer(V + 2 + j, DECODER, j, (f"language.model.layers.{j}.",),
                         is_moe=cfg.language_config.is_moe_layer(j)) for j in range(L)]
    layers.append(PipeLayer(V + L + 2, HEAD, None, ("language.model.norm.", "language.lm_head.")))
    return layers


def layer_index_of(cfg: VL2Config, hf_key: str) -> int:
    """Pipeline layer index that owns ``hf_key``; KeyError for a key no layer owns."""
    V = cfg.vision_config.layers
    m = _VIT_RE.match(hf_key)
    if m:
        i = int(m.group(1))
        if i < V:
            return 1 + i
        raise KeyError(f"{hf_key}: vision block {i} but vision_config.layers={V}")
    m = _DEC_RE.match(hf_key)
    if m:
        j = int(m.group(1))
        if j < cfg.language_config.num_hidden_layers:
            return V + 2 + j
        raise KeyError(f"{hf_key}: decoder layer {j} but language_config.num_hidden_layers="
                       f"{cfg.language_config.num_hidden_layers}")
    for layer in build_layout_head(cfg):
        if layer.owns(hf_key):
            return layer.index
    raise KeyError(f"{hf_key}: not a DeepSeek-VL2 tensor name")


def build_layout_head(cfg: VL2Config) -> list[PipeLayer]:
    """The three non-repeated layers (embed, projector, head), for key lookup without the full list."""
    V, L = cfg.vision_config.layers, cfg.language_config.num_hidden_layers
    return [PipeLayer(0, EMBED, None, ("language.model.embed_tokens.", "vision.patch_embed.", "vision.pos_embed")),
            PipeLayer(V + 1, PROJECTOR, None,
                      ("vision.norm.", "vision.attn_pool.", "projector.", "image_newline", "view_seperator")),
            PipeLayer(V + L + 2, HEAD, None, ("language.model.norm.", "language.lm_head."))]


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
    return cfg.vision_config.layers + 2


def stage_parts(cfg: VL2Config, num_stages: int, decoder_split: Optional[Sequence[int]] = None) -> list[int]:
    """Layer boundaries per stage, DeepSpeed's ``parts`` (stage s owns layers parts[s] .. parts[s+1]-1).

    Stage 0 always holds embed, the ViT and the projector before its decoder layers; the last stage ends with the
    head. ``decoder_split`` gives the decoder layers per stage (the seed cluster: [13, 17]); without it
    :func:`balanced_decoder_split` evens out the stages' FLOPs.
    """
    L = cfg.language_config.num_hidden_layers
    first = first_decoder_index(cfg)
    if num_stages < 1:
        raise ConfigError(f"pipeline stages={num_stages}: must be >= 1")
    if decoder_split is None:
        decoder_split = balanced_decoder_split(cfg, num_stages)
    decoder_split = list(decoder_split)
    if len(decoder_split) != num_stages:
        raise ConfigError(f"decoder_split={decoder_split} has {len(decoder_split)} entries for "
                          f"{num_stages} pipeline stages; give one count per stage")
    if sum(decoder_split) != L or any(n < 0 for n in decoder_split):
        raise ConfigError(f"decoder_split={decoder_split} must be non-negative and add up to "
                          f"language_config.num_hidden_layers={L} (it adds up to {sum(decoder_split)})")
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


def balanced_decoder_split(cfg: VL2Config, num_stages: int, seq_len: int = 4096, views: int = 10) -> list[int]:
    """Decoder layers per stage that minimise the costliest stage's forward FLOPs, for samples of ``seq_len``
    tokens with ``views`` ViT tiles (the planner's FLOPs model: ViT, projector and embedding on stage 0, head on
    the last), with at least one MoE layer on every stage. For base on 2 stages: [13, 17], the seed cluster's split.
    """
    from recipe.plan import Workload, flops_balanced_split, layer_infos  # planner imports this module

    split = flops_balanced_split(cfg, layer_infos(cfg, Workload(1, seq_len, views, 1.0)), num_stages)
    if split is None:
        raise ConfigError(f"{cfg.language_config.num_hidden_layers} decoder layers cannot fill {num_stages} pipeline "
                          f"stages with an MoE layer on each; use fewer stages")
    return split


def ckpt_layer_file(index: int) -> str:
    """DeepSpeed's layer-wise file name for pipeline layer ``index`` (tensor-parallel rank 0)."""
    return f"layer_{index:02d}-model_00-model_states.pt"


# --- names inside the pipeline layer modules -----------------------------------------------------------------
# Each pipeline layer module's state_dict uses these local names (the contract ``pipeline.py`` builds to and the
# loader / converters read by). MoE layers put the router and routed experts inside DeepSpeed's ``MoE`` module
# (``mlp.moe``), which saves experts by global id under ``deepspeed_moe.experts.deepspeed_experts.{e}``; the
# shared experts stay outside it so DeepSpeed never files them as routed experts.

MOE_EXPERTS = "mlp.moe.deepspeed_moe.experts.deepspeed_experts."
MOE_ROUTER = "mlp.moe.deepspeed_moe.gate.router."
_EXPERT_LOCAL_RE = re.compile(r"^" + re.escape(MOE_EXPERTS) + r"(\d+)\.(.+)$")


def _prefix_map(layer: PipeLayer) -> tuple:
    """(HF prefix, local prefix) pairs for a layer's non-expert tensors."""
    if layer.kind == EMBED:
        return (("language.model.embed_tokens.", "embed_tokens."), ("vision.patch_embed.", "patch_embed."),
                ("vision.pos_embed", "pos_embed"))
    if layer.kind == VIT_BLOCK:
        return ((f"vision.blocks.{layer.block}.", ""),)
    if layer.kind == PROJECTOR:
        return (("vision.norm.", "norm."), ("vision.attn_pool.", "attn_pool."), ("projector.", "projector."),
                ("image_newline", "image_newline"), ("view_seperator", "view_seperator"))
    if layer.kind == HEAD:
        return (("language.model.norm.", "norm."), ("language.lm_head.", "lm_head."))
    prefix = f"language.model.layers.{layer.block}."
    pairs = []
    if layer.is_moe:
        pairs.append((prefix + "mlp.gate.", MOE_ROUTER))
    pairs.append((prefix, ""))
    return tuple(pairs)


def hf_to_local(layer: PipeLayer, hf_key: str) -> str:
    """HF tensor name -> the pipeline layer module's name (routed experts keep their global id)."""
    if layer.is_moe:
        parsed = parse_expert_key(hf_key)
        if parsed is not None:
            return f"{MOE_EXPERTS}{parsed[1]}.{parsed[2]}"
    for hf_prefix, local_prefix in _prefix_map(layer):
        if hf_key == hf_prefix or (hf_prefix.endswith(".") and hf_key.startswith(hf_prefix)):
            return local_prefix + hf_key[len(hf_prefix):]
    raise KeyError(f"{hf_key}: not owned by pipeline layer {layer.index} ({layer.kind})")


def local_to_hf(layer: PipeLayer, local_name: str) -> str:
    """Inverse of :func:`hf_to_local` (expert ids in ``local_name`` must be global)."""
    m = _EXPERT_LOCAL_RE.match(local_name)
    if m:
        return f"language.model.layers.{layer.block}.mlp.experts.{m.group(1)}.{m.group(2)}"
    for hf_prefix, local_prefix in _prefix_map(layer):
        if local_prefix == "" or local_name == local_prefix or \
                (local_prefix.endswith(".") and local_name.startswith(local_prefix)):
            return hf_prefix + local_name[len(local_prefix):]
    raise KeyError(f"{local_name}: not a tensor of pipeline layer {layer.index} ({layer.kind})")


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
