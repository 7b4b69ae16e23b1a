"""DeepSeek-VL2 as a flat list of DeepSpeed ``LayerSpec``s under ``PipelineModule``.

The layer list follows ``layout.py`` (embed | ViT block x V | projector | decoder x L | head); each layer module is
built from the plain model's parts, and its state_dict uses the local names ``layout.hf_to_local`` defines.

What travels through the pipe:
- stage 0 input (from the data iterator): ``(input_ids, images, images_seq_mask, images_spatial_crop,
  position_ids, segment_ids)``; inside stage 0 the ViT activations travel beside the text embeddings.
- between stages, after the projector: ``(hidden [B,T,D] float, aux fp32 scalar, position_ids [B,T] int64,
  segment_ids [B,T] int64)``. Integer tensors get no gradient (DeepSpeed requires a gradient for every float it
  sends); ``aux`` is the running MoE balance loss, part of the graph from stage 0 on, so the balance gradient of
  early layers flows back through the pipe. The floats come first on purpose: DeepSpeed 0.19 keeps one receive
  buffer per tuple position and reuses it for the gradients of the float outputs whatever its dtype, so a middle
  stage (PP >= 3) with ``(hidden, positions, ..., aux)`` would receive aux's gradient into the int64 positions
  buffer (its float bits read as an integer).
- last stage labels (from the data iterator): ``(labels [B,T] int64, ce_scale fp32 scalar)``, where ce_scale
  normalises the summed token cross-entropy so that the engine's average over micro-batches and data-parallel
  ranks is the mean over every labelled token of the global batch, as one process would compute it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint
from torch import nn

from recipe.config import VL2Config
from recipe.model.attention import RMSNorm, build_attention_mask
from recipe.model.language import DecoderLayer
from recipe.model.loss import lm_head_loss_sum
from recipe.model.projector import MlpProjector
from recipe.model.vision import LN_EPS, AttentionPoolLatent, Block, PatchEmbed
from recipe.model.vl2 import assemble_image_tokens, check_image_positions, image_layout, select_tiles
from recipe.parallel import layout as L
from recipe.parallel.experts import ExpertParallelMoE


def _zero_dependency(*tensors: torch.Tensor) -> torch.Tensor:
    """A fp32 zero that depends on ``tensors``: keeps parameters in the graph (so every data-parallel rank runs the
    same backward and reduces the same gradients) without changing any value."""
    return sum(t.float().sum() for t in tensors) * 0.0


class EmbedPipe(nn.Module):
    """Layer 0: token embedding, and the ViT input (patch embedding + position embedding) of the used tiles.

    A micro-batch without images still runs one zero tile through the vision side; its features are multiplied
    by zero in the projector layer, so every rank runs the same graph.
    """

    def __init__(self, cfg: VL2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.language_config.vocab_size, cfg.language_config.hidden_size)
        self.patch_embed = PatchEmbed(cfg.vision_config)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.vision_config.num_patches, cfg.vision_config.width))

    def forward(self, inputs):
        input_ids, images, images_seq_mask, spatial_crop, position_ids, segment_ids = inputs
        embeds = self.embed_tokens(input_ids)
        tiles, layout = select_tiles(images, spatial_crop.tolist())
        if not layout:
            tiles = images.new_zeros(1, *images.shape[2:])
        vit = self.patch_embed(tiles.to(self.pos_embed.dtype)) + self.pos_embed
        aux = _zero_dependency(embeds, vit)
        return embeds, vit, images_seq_mask, spatial_crop, position_ids, segment_ids, aux


class VitBlockPipe(Block):
    """Layers 1..V: one SigLIP block on the ViT activations; everything else passes through."""

    def forward(self, x):
        embeds, vit, *rest = x
        return (embeds, super().forward(vit), *rest)


class ProjectorPipe(nn.Module):
    """Layer V+1: final ViT norm, projector, 2D layout with image_newline / view_seperator, scatter into the
    text embeddings. ``attn_pool`` is kept (frozen) only so checkpoints round-trip; it is never run."""

    def __init__(self, cfg: VL2Config):
        super().__init__()
        self.cfg = cfg
        D = cfg.projector_config.n_embed
        self.norm = nn.LayerNorm(cfg.vision_config.width, eps=LN_EPS)
        self.attn_pool = AttentionPoolLatent(cfg.vision_config) if cfg.vision_config.has_attn_pool else None
        self.projector = MlpProjector(cfg.projector_config)
        self.image_newline = nn.Parameter(torch.zeros(D))
        self.view_seperator = nn.Parameter(torch.zeros(D))

    def forward(self, x):
        embeds, vit, images_seq_mask, spatial_crop, position_ids, segment_ids, aux = x
        feats = self.projector(self.norm(vit))  # [N, h*h, D]
        crop = spatial_crop.tolist()
        check_image_positions(self.cfg, images_seq_mask, crop)
        layout = image_layout(crop)
        if layout:
            tokens = assemble_image_tokens(feats, layout, len(crop), self.image_newline, self.view_seperator,
                                           self.cfg.global_view_pos == "head")
            hidden = embeds.masked_scatter(images_seq_mask.bool()[..., None], torch.cat(tokens).to(embeds.dtype))
        else:
            hidden = embeds + _zero_dependency(feats, self.image_newline, self.view_seperator).to(embeds.dtype)
        return hidden, aux, position_ids, segment_ids


class DecoderPipe(DecoderLayer):
    """Decoder layers: the plain layer, with DeepSpeed's expert-parallel MoE in MoE layers; adds its balance
    loss to the running ``aux``."""

    def __init__(self, cfg: VL2Config, layer_idx: int, ep_size: int):
        super().__init__(cfg.language_config, layer_idx, moe_factory=lambda lc: ExpertParallelMoE(lc, ep_size))

    def forward(self, x):
        hidden, aux, position_ids, segment_ids = x
        hidden, layer_aux = super().forward(hidden, position_ids, build_attention_mask(segment_ids), segment_ids)
        if layer_aux is not None:
            aux = aux + layer_aux
        return hidden, aux, position_ids, segment_ids


class HeadPipe(nn.Module):
    """Last layer: final RMSNorm; the LM head itself runs inside the loss, on labelled positions only."""

    def __init__(self, cfg: VL2Config):
        super().__init__()
        lc = cfg.language_config
        self.norm = RMSNorm(lc.hidden_size, lc.rms_norm_eps)
        self.lm_head = nn.Linear(lc.hidden_size, lc.vocab_size, bias=False)

    def forward(self, x):
        hidden, aux, _, _ = x
        return self.norm(hidden), aux


def layer_specs(cfg: VL2Config, ep_size: int) -> list[LayerSpec]:
    """One LayerSpec per ``layout.build_layout`` entry, in order."""
    specs = []
    for layer in L.build_layout(cfg):
        if layer.kind == L.EMBED:
            specs.append(LayerSpec(EmbedPipe, cfg))
        elif layer.kind == L.VIT_BLOCK:
            specs.append(LayerSpec(VitBlockPipe, cfg.vision_config))
        elif layer.kind == L.PROJECTOR:
            specs.append(LayerSpec(ProjectorPipe, cfg))
        elif layer.kind == L.DECODER:
            specs.append(LayerSpec(DecoderPipe, cfg, layer.block, ep_size))
        else:
            specs.append(LayerSpec(HeadPipe, cfg))
    return specs


class VL2Pipeline(PipelineModule):
    """The pipeline: exact stage boundaries from ``layout.stage_parts``, dynamic shapes (micro-batches are padded
    to length buckets), optional non-reentrant activation checkpointing of ViT and decoder layers, and the
    token-normalised loss. ``get_additional_losses`` reports ``ce`` and ``aux`` separately."""

    def __init__(self, cfg: VL2Config, num_stages: int, ep_size: int = 1,
                 decoder_split: Optional[Sequence[int]] = None, activation_checkpointing: bool = False,
                 lm_loss_chunk: int = 2048):
        self.cfg = cfg
        self.ep_size = ep_size
        self.parts_override = L.stage_parts(cfg, num_stages, decoder_split)
        self.lm_loss_chunk = lm_loss_chunk
        super().__init__(layers=layer_specs(cfg, ep_size), num_stages=num_stages, loss_fn=self.loss,
                         partition_method="explicit",
                         activation_checkpoint_interval=1 if activation_checkpointing else 0,
                         activation_checkpoint_func=non_reentrant_checkpoint,
                         checkpointable_layers=["VitBlockPipe", "DecoderPipe"], dynamic_shape=True)
        self.layout = L.build_layout(cfg)
        self._losses = OrderedDict(ce=torch.zeros(()), aux=torch.zeros(()))
        for name, p in self.named_parameters():
            if ".attn_pool." in name:
                p.requires_grad_(False)  # never computed

    # DeepSpeed's built-in partition methods cannot express an arbitrary split (e.g. ViT + 13 | 17 + head).
    def _partition_layers(self, method="explicit"):
        self.parts = list(self.parts_override)
        if len(self.parts) != self.num_stages + 1 or self.parts[-1] != len(self._layer_specs):
            raise ValueError(f"stage boundaries {self.parts} do not cover the {len(self._layer_specs)} layers in "
                             f"{self.num_stages} stages")
        self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])

    # --- which layers and experts this rank holds --------------------------------------------------------------
    def local_layers(self) -> list[tuple[L.PipeLayer, nn.Module]]:
        """(layout entry, module) for every layer on this stage."""
        return [(self.layout[self._local_start + i], m) for i, m in enumerate(self.forward_funcs)]

    @property
    def dp_rank(self) -> int:
        return self._topo.get_coord(self.global_rank).data

    @property
    def ep_rank(self) -> int:
        """This rank's place in its expert-parallel group. DeepSpeed groups ``ep_size`` consecutive data-parallel
        ranks of a stage (``groups._create_expert_and_data_parallel``); checked after ``deepspeed.initialize``
        by :func:`recipe.parallel.loading.check_expert_groups`."""
        return self.dp_rank % self.ep_size

    def local_expert_ids(self) -> list[int]:
        n_local = self.cfg.language_config.n_routed_experts // self.ep_size if self.cfg.language_config.is_moe else 0
        return list(range(self.ep_rank * n_local, (self.ep_rank + 1) * n_local))

    # --- loss ----------------------------------------------------------------------------------------------------
    def loss(self, outputs, labels):
        hidden, aux = outputs
        labels_BT, ce_scale = labels
        head = self.forward_funcs[-1]
        ce = lm_head_loss_sum(hidden, head.lm_head.weight, labels_BT, self.lm_loss_chunk) * ce_scale.float()
        self._losses = OrderedDict(ce=ce.detach().clone(), aux=aux.detach().float().clone())
        return ce + aux

    def get_additional_losses(self):
        # Every stage must answer with the same keys: the engine sizes a broadcast from it on non-last stages.
        return OrderedDict((k, v.to(self._losses_device())) for k, v in self._losses.items())

    def _losses_device(self):
        return next(self.parameters()).device


def pipe_batch(batch: dict, ce_scale: float) -> tuple[tuple, tuple]:
    """A collated micro-batch (recipe.data's collator contract) -> the (inputs, labels) pair the engine reads."""
    inputs = (batch["input_ids"], batch["images"], batch["images_seq_mask"], batch["images_spatial_crop"],
              batch["position_ids"], batch["segment_ids"])
    return inputs, (batch["labels"], torch.tensor(float(ce_scale)))


def freeze(module: nn.Module, vision: bool = False, projector: bool = False, language: bool = False,
           embeddings: bool = False) -> list[str]:
    """Freeze parts of a pipeline (or plain) model by HF-name family; returns the frozen parameter names.

    vision: patch/position embedding, ViT blocks, final ViT norm. projector: projector MLP, image_newline,
    view_seperator. language: decoder layers, final norm, LM head. embeddings: the token embedding table.
    """
    frozen = []
    if not isinstance(module, VL2Pipeline):
        raise TypeError("freeze() expects a VL2Pipeline")
    for layer, m in module.local_layers():
        for local_name, p in m.named_parameters():
            hf = L.local_to_hf(layer, local_name)
            part = ("embeddings" if hf.startswith("language.model.embed_tokens") else
                    "language" if hf.startswith("language.") else
                    "projector" if hf.startswith(("projector.", "image_newline", "view_seperator")) else "vision")
            if {"vision": vision, "projector": projector, "language": language, "embeddings": embeddings}[part]:
                p.requires_grad_(False)
                frozen.append(hf)
    return frozen


def tensor_source_from_state_dict(state_dict: dict) -> Callable:
    """A layer-tensor source over a full HF-named state dict (tests, and loading a plain model)."""
    def fetch(layer: L.PipeLayer, expert_ids: Sequence[int]) -> dict:
        return {k: state_dict[k] for k in L.keys_for_rank(state_dict, layer, expert_ids)}
    return fetch


@torch.no_grad()
def load_layers(module: VL2Pipeline, fetch: Callable) -> int:
    """Fill this rank's layers from a tensor source ``fetch(layer, expert_ids) -> {hf_key: tensor}`` (the
    converted checkpoint, or a plain model's state dict), taking only this rank's experts and renumbering them
    from global to rank-local ids. Strict: every local tensor must be filled, none may be left over.
    Returns the number of tensors loaded."""
    expert_ids = module.local_expert_ids()
    first = expert_ids[0] if expert_ids else 0
    n = 0
    for layer, m in module.local_layers():
        tensors = fetch(layer, expert_ids)
        local = {}
        for hf_key, t in tensors.items():
            name = L.hf_to_local(layer, hf_key)
            e = L.expert_id_of_local(name)
            if e is not None:
                name = L.renumber_expert(name, e - first)
            local[name] = t
        own = m.state_dict()
        missing = sorted(set(own) - set(local))
        extra = sorted(set(local) - set(own))
        if missing or extra:
            raise KeyError(f"pipeline layer {layer.index} ({layer.kind}): missing {missing[:6]}, unexpected "
                           f"{extra[:6]}")
        for name, t in local.items():
            if own[name].shape != t.shape:
                raise ValueError(f"pipeline layer {layer.index}: {L.local_to_hf(layer, name)} has shape "
                                 f"{tuple(t.shape)}, the model expects {tuple(own[name].shape)}")
            own[name].copy_(t)
            n += 1
    return n
