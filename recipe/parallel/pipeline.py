"""DeepSeek-VL2 as a flat list of DeepSpeed ``LayerSpec``s under ``PipelineModule``.

The layer list follows ``layout.py`` (embed | ViT block x n_vit | projector | decoder x n_decoder | head); each layer
module is built from the plain model's parts, and its state_dict uses the local names ``layout.hf_to_local``
defines. Loading weights into it: ``loading.py``.

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
- inside a stage that holds decoder layers, the micro-batch's attention layout rides at the end of every tuple
  (``ops.build_attention_layout`` of its segment ids as tensors, ``AttentionLayout.to_tensors``: nothing for plain
  causal attention, a [B,1,T,T] bool mask, or for packed rows on an accelerator the varlen kernels' cumulative
  segment lengths on the device and on the host), built once per micro-batch by :meth:`VL2Pipeline.forward`
  before the stage's first layer and removed after its last, so it never crosses a stage boundary. Building it
  costs host syncs; built there, outside every checkpointed layer, activation checkpointing's recomputation reuses
  it instead of building it again. DeepSpeed's layers pass tensors or tuples of tensors, hence the tensor form.
- last stage labels (from the data iterator): ``(labels [B,T] int64, ce_scale fp32 scalar)``, where ce_scale
  normalises the summed token cross-entropy so that the engine's average over micro-batches and data-parallel
  ranks is the mean over every labelled token of the global batch, as one process would compute it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint
from torch import nn

from recipe.config import VL2Config
from recipe.model.attention import RMSNorm
from recipe.model.language import DecoderLayer
from recipe.model.loss import lm_head_loss_sum
from recipe.model.ops import AttentionLayout, build_attention_layout
from recipe.model.projector import MlpProjector
from recipe.model.vision import LN_EPS, AttentionPoolLatent, Block, PatchEmbed
from recipe.model.vl2 import assemble_image_tokens, check_image_positions, image_layout, select_tiles
from recipe.parallel import layout
from recipe.parallel.cost import balanced_decoder_split
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
        input_ids, images, images_seq_mask, spatial_crop, position_ids, segment_ids, *mask = inputs
        embeds = self.embed_tokens(input_ids)
        tiles, tile_layout = select_tiles(images, spatial_crop.tolist())
        if not tile_layout:
            tiles = images.new_zeros(1, *images.shape[2:])
        vit = self.patch_embed(tiles.to(self.pos_embed.dtype)) + self.pos_embed
        aux = _zero_dependency(embeds, vit)
        return (embeds, vit, images_seq_mask, spatial_crop, position_ids, segment_ids, aux, *mask)


class VitBlockPipe(Block):
    """Layers 1..n_vit: one SigLIP block on the ViT activations; everything else passes through."""

    def forward(self, x):
        embeds, vit, *rest = x
        return (embeds, super().forward(vit), *rest)


class ProjectorPipe(nn.Module):
    """Layer n_vit+1: final ViT norm, projector, 2D layout with image_newline / view_seperator, scatter into the
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
        embeds, vit, images_seq_mask, spatial_crop, position_ids, segment_ids, aux, *mask = x
        feats = self.projector(self.norm(vit))  # [N, h*h, D]
        crop = spatial_crop.tolist()
        check_image_positions(self.cfg, images_seq_mask, crop)
        views = image_layout(crop)
        if views:
            tokens = assemble_image_tokens(feats, views, len(crop), self.image_newline, self.view_seperator,
                                           self.cfg.global_view_pos == "head")
            hidden = embeds.masked_scatter(images_seq_mask.bool()[..., None], torch.cat(tokens).to(embeds.dtype))
        else:
            hidden = embeds + _zero_dependency(feats, self.image_newline, self.view_seperator).to(embeds.dtype)
        return (hidden, aux, position_ids, segment_ids, *mask)


class DecoderPipe(DecoderLayer):
    """Decoder layers: the plain layer, with DeepSpeed's expert-parallel MoE in MoE layers; adds its balance
    loss to the running ``aux``. The stage's attention layout comes last in the tuple (see the module docstring)."""

    def __init__(self, cfg: VL2Config, layer_idx: int, ep_size: int, moe_dispatcher: str = "exact"):
        super().__init__(cfg.language_config, layer_idx,
                         moe_factory=lambda lc: ExpertParallelMoE(lc, ep_size, moe_dispatcher))

    def forward(self, x):
        hidden, aux, position_ids, segment_ids, *attn = x
        hidden, layer_aux = super().forward(hidden, position_ids, AttentionLayout.from_tensors(attn), segment_ids)
        if layer_aux is not None:
            aux = aux + layer_aux
        return (hidden, aux, position_ids, segment_ids, *attn)


class HeadPipe(nn.Module):
    """Last layer: final RMSNorm; the LM head itself runs inside the loss, on labelled positions only."""

    def __init__(self, cfg: VL2Config):
        super().__init__()
        lc = cfg.language_config
        self.norm = RMSNorm(lc.hidden_size, lc.rms_norm_eps)
        self.lm_head = nn.Linear(lc.hidden_size, lc.vocab_size, bias=False)

    def forward(self, x):
        hidden, aux, *_ = x  # positions, segment ids and the stage's attention mask end here
        return self.norm(hidden), aux


# The module class of each layer kind.
LAYER_CLASSES = {layout.EMBED: EmbedPipe, layout.VIT_BLOCK: VitBlockPipe, layout.PROJECTOR: ProjectorPipe,
                 layout.DECODER: DecoderPipe, layout.HEAD: HeadPipe}


def _layer_spec(cfg: VL2Config, layer: layout.PipeLayer, ep_size: int, moe_dispatcher: str = "exact") -> LayerSpec:
    cls = LAYER_CLASSES[layer.kind]
    if layer.kind == layout.VIT_BLOCK:
        return LayerSpec(cls, cfg.vision_config)
    if layer.kind == layout.DECODER:
        return LayerSpec(cls, cfg, layer.block, ep_size, moe_dispatcher)
    return LayerSpec(cls, cfg)


def layer_specs(cfg: VL2Config, ep_size: int, moe_dispatcher: str = "exact") -> list[LayerSpec]:
    """One LayerSpec per ``layout.build_layout`` entry, in order."""
    return [_layer_spec(cfg, layer, ep_size, moe_dispatcher) for layer in layout.build_layout(cfg)]


class VL2Pipeline(PipelineModule):
    """The pipeline: exact stage boundaries from ``layout.stage_parts``, dynamic shapes (micro-batches are padded
    to length buckets), optional non-reentrant activation checkpointing of each ViT block and decoder layer
    (``layout.CHECKPOINTED_KINDS``), the attention mask built once per micro-batch and stage, and the
    token-normalised loss (LM head ``recipe.model.loss.LM_HEAD_CHUNK_TOKENS`` tokens at a time).
    ``get_additional_losses`` reports ``ce`` and ``aux`` separately."""

    def __init__(self, cfg: VL2Config, num_stages: int, ep_size: int = 1,
                 decoder_split: Optional[Sequence[int]] = None, activation_checkpointing: bool = False,
                 moe_dispatcher: str = "exact"):
        self.cfg = cfg
        self.ep_size = ep_size
        split = decoder_split if decoder_split is not None else balanced_decoder_split(cfg, num_stages)
        self.parts_override = layout.stage_parts(cfg, num_stages, split)
        super().__init__(layers=layer_specs(cfg, ep_size, moe_dispatcher), num_stages=num_stages, loss_fn=self.loss,
                         partition_method="explicit",
                         activation_checkpoint_interval=1 if activation_checkpointing else 0,
                         activation_checkpoint_func=non_reentrant_checkpoint,
                         checkpointable_layers=[LAYER_CLASSES[kind].__name__ for kind in layout.CHECKPOINTED_KINDS],
                         dynamic_shape=True)
        self._precompute_checkpointable_values()  # the engine does this too; here so the module also runs alone
        self.pipe_layers = layout.build_layout(cfg)
        kinds = [layer.kind for layer, _ in self.local_layers()]
        self.builds_mask = layout.DECODER in kinds  # this stage's decoder layers need the attention mask
        self.holds_head = kinds[-1] == layout.HEAD
        self._losses = OrderedDict(ce=torch.zeros(()), aux=torch.zeros(()))
        for layer, m in self.local_layers():
            for name, p in m.named_parameters():
                if layout.local_to_hf(layer, name).startswith(layout.ALWAYS_FROZEN):
                    p.requires_grad_(False)

    # DeepSpeed's built-in partition methods cannot express an arbitrary split (e.g. ViT + 13 | 17 + head).
    def _partition_layers(self, method="explicit"):
        self.parts = list(self.parts_override)
        if len(self.parts) != self.num_stages + 1 or self.parts[-1] != len(self._layer_specs):
            raise ValueError(f"stage boundaries {self.parts} do not cover the {len(self._layer_specs)} layers in "
                             f"{self.num_stages} stages")
        self._set_bounds(start=self.parts[self.stage_id], stop=self.parts[self.stage_id + 1])

    def forward(self, forward_input):
        """One micro-batch through this stage's layers. The stage's input (the data batch on stage 0, the
        boundary tuple after it) ends with the segment ids; the attention mask built from them is appended for the
        decoder layers, and taken off again before the output leaves a stage that does not end with the head."""
        if not self.builds_mask:
            return super().forward(forward_input)
        attn = build_attention_layout(forward_input[-1]).to_tensors()
        out = super().forward((*forward_input, *attn))
        return out if self.holds_head or not attn else out[:-len(attn)]

    # --- which layers and experts this rank holds --------------------------------------------------------------
    def local_layers(self) -> list[tuple[layout.PipeLayer, nn.Module]]:
        """(layout entry, module) for every layer on this stage."""
        return [(self.pipe_layers[self._local_start + i], m) for i, m in enumerate(self.forward_funcs)]

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
        ce = lm_head_loss_sum(hidden, head.lm_head.weight, labels_BT) * ce_scale.float()
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


def freeze(module: VL2Pipeline, **parts: bool) -> list[str]:
    """Freeze parts of this rank's pipeline layers; returns the HF names of the parameters frozen.

    ``parts`` are the switches of ``recipe.freeze`` (``layout.FREEZE_GROUPS``), each tensor going by
    ``layout.freeze_group``: vision (patch/position embedding, ViT blocks, final ViT norm), projector (projector
    MLP, image_newline, view_seperator), language (decoder layers, final norm, LM head), embeddings (the token
    embedding table). Pipeline modules only (a TypeError otherwise): a plain model has no pipeline layers to map
    names through; set ``requires_grad`` on its parameters directly.
    """
    if not isinstance(module, VL2Pipeline):
        raise TypeError(f"freeze() takes a VL2Pipeline, not {type(module).__name__}")
    unknown = sorted(set(parts) - set(layout.FREEZE_GROUPS))
    if unknown:
        raise ValueError(f"unknown parts {unknown} to freeze; expected some of {layout.FREEZE_GROUPS}")
    frozen = []
    for layer, m in module.local_layers():
        for local_name, p in m.named_parameters():
            hf = layout.local_to_hf(layer, local_name)
            if parts.get(layout.freeze_group(hf)):
                p.requires_grad_(False)
                frozen.append(hf)
    return frozen
