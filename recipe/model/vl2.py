"""The whole DeepSeek-VL2 model: tiles -> ViT -> projector -> 2D layout (``image_newline`` per row,
``view_seperator`` between views, global view first) -> scatter into the text embeddings at ``images_seq_mask``
-> decoder -> fp32 logits and loss.

Parameter names are the HF checkpoint's, so ``from_pretrained`` / ``save_pretrained`` read and write the released
files directly. Single device; no DeepSpeed, no torch.distributed.

Shapes: B batch, T tokens, D hidden, N tiles, V vocabulary, h tokens per view side (14 for 384px tiles).
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from recipe.checkpoint.dtypes import parse_dtype
from recipe.checkpoint.hf import iter_tensors, parse_size, scan_hf, write_hf_shards
from recipe.checkpoint.validate import check_against_config
from recipe.config import VL2Config
from recipe.model import generation
from recipe.model.language import DeepseekV2ForCausalLM
from recipe.model.loss import causal_lm_loss
from recipe.model.projector import MlpProjector
from recipe.model.vision import VisionTransformer


@dataclass
class VL2Output:
    loss: Optional[torch.Tensor]      # ce_loss + aux_loss (what training minimises)
    logits: torch.Tensor              # [B, T, V] fp32
    aux_loss: Optional[torch.Tensor]  # summed MoE balance loss (training mode), already times aux_loss_alpha
    ce_loss: Optional[torch.Tensor]   # shifted token cross-entropy, mean over labelled tokens


def image_token_counts(cfg: VL2Config, spatial_crop: list) -> list[list[int]]:
    """Per sample, the image-token count of each image; a (0, 0) row ends a sample's images."""
    out = []
    for rows in spatial_crop:
        counts = []
        for w, h in rows:
            if w == 0 or h == 0:
                break
            counts.append(cfg.num_image_tokens(w, h))
        out.append(counts)
    return out


def check_image_positions(cfg: VL2Config, images_seq_mask: Optional[torch.Tensor], spatial_crop: list) -> None:
    """Raise unless every sample marks exactly as many image positions as its images produce tokens."""
    n_masked = [0] * len(spatial_crop) if images_seq_mask is None else images_seq_mask.sum(1).tolist()
    expected = [sum(c) for c in image_token_counts(cfg, spatial_crop)]
    if expected != n_masked:
        bad = next(b for b in range(len(expected)) if expected[b] != n_masked[b])
        if expected[bad] == 0:
            raise ValueError(f"sample {bad}: images_seq_mask marks {n_masked[bad]} image positions but no images "
                             f"were given")
        raise ValueError(f"sample {bad}: images_seq_mask marks {n_masked[bad]} positions but its images "
                         f"{spatial_crop[bad]} give {expected[bad]} tokens (truncated or misaligned sample?)")


def image_layout(spatial_crop: list) -> list[tuple[int, int, int]]:
    """One (sample, width_tiles, height_tiles) per image, in batch order; a (0, 0) row ends a sample's images."""
    out = []
    for b, rows in enumerate(spatial_crop):
        for w, h in rows:
            if w == 0 or h == 0:
                break
            out.append((b, w, h))
    return out


def select_tiles(images: torch.Tensor, spatial_crop: list) -> tuple[torch.Tensor, list]:
    """The tiles the images use, in batch order, without the zero padding tiles.

    images [B, max_tiles, 3, S, S], spatial_crop per sample a list of (width_tiles, height_tiles) ->
    (tiles [N, 3, S, S], :func:`image_layout`). Each image takes 1 + w*h consecutive tiles: the global view,
    then the local tiles in row-major order.
    """
    layout = image_layout(spatial_crop)
    chunks = []
    for b in range(len(spatial_crop)):
        n_b = sum(1 + w * h for s, w, h in layout if s == b)
        if n_b > images.shape[1]:
            raise ValueError(f"sample {b}: images_spatial_crop needs {n_b} tiles, images holds {images.shape[1]}")
        chunks.append(images[b, :n_b])
    return torch.cat(chunks), layout


def layout_image(global_PD: torch.Tensor, local_NPD: torch.Tensor, width_tiles: int, height_tiles: int,
                 newline_D: torch.Tensor, separator_D: torch.Tensor, global_first: bool = True) -> torch.Tensor:
    """One image's token sequence [n_tokens, D].

    global: h x h grid + a newline per row. local: tiles (row-major) stitched into a (th*h) x (tw*h) grid + a
    newline per row. Joined as [global, separator, local] (or [local, separator, global]).
    """
    h = int(round(global_PD.shape[0] ** 0.5))
    D = global_PD.shape[-1]
    glob = torch.cat([global_PD.view(h, h, D), newline_D.expand(h, 1, D)], dim=1).reshape(-1, D)
    loc = local_NPD.view(height_tiles, width_tiles, h, h, D).permute(0, 2, 1, 3, 4)
    loc = loc.reshape(height_tiles * h, width_tiles * h, D)
    loc = torch.cat([loc, newline_D.expand(height_tiles * h, 1, D)], dim=1).reshape(-1, D)
    parts = [glob, separator_D[None], loc] if global_first else [loc, separator_D[None], glob]
    return torch.cat(parts, dim=0)


def assemble_image_tokens(feats_NPD: torch.Tensor, layout: list, batch: int, newline_D: torch.Tensor,
                          separator_D: torch.Tensor, global_first: bool = True) -> list[torch.Tensor]:
    """Projected views [N, h*h, D] (in :func:`select_tiles` order) -> per sample [n_image_tokens_b, D]."""
    D = feats_NPD.shape[-1]
    per_sample: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    t = 0
    for b, w, h in layout:
        per_sample[b].append(layout_image(feats_NPD[t], feats_NPD[t + 1: t + 1 + w * h], w, h, newline_D,
                                          separator_D, global_first))
        t += 1 + w * h
    return [torch.cat(p) if p else feats_NPD.new_zeros(0, D) for p in per_sample]


class DeepseekVLV2ForCausalLM(nn.Module):
    """DeepSeek-VL2 (tiny / small / base) for training and evaluation."""

    def __init__(self, cfg: VL2Config):
        super().__init__()
        self.config = cfg
        D = cfg.projector_config.n_embed
        self.vision = VisionTransformer(cfg.vision_config)
        self.projector = MlpProjector(cfg.projector_config)
        self.image_newline = nn.Parameter(torch.randn(D) / D ** 0.5)
        self.view_seperator = nn.Parameter(torch.randn(D) / D ** 0.5)  # sic: the checkpoint's key name
        self.language = DeepseekV2ForCausalLM(cfg.language_config)

    # --- images -------------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor, spatial_crop: list) -> list[torch.Tensor]:
        """Image tokens per sample: ``images`` [B, max_tiles, 3, S, S], ``spatial_crop`` per sample a list of
        (width_tiles, height_tiles) -> list of B tensors [n_image_tokens_b, D] (empty for text-only samples)."""
        tiles, layout = select_tiles(images, spatial_crop)
        if not layout:
            return [self.image_newline.new_zeros(0, self.image_newline.shape[0]) for _ in spatial_crop]
        feats = self.projector(self.vision(tiles.to(self.image_newline.dtype)))  # [N, h*h, D]
        return assemble_image_tokens(feats, layout, len(spatial_crop), self.image_newline, self.view_seperator,
                                     self.config.global_view_pos == "head")

    def prepare_inputs_embeds(self, input_ids: torch.Tensor, images: Optional[torch.Tensor] = None,
                              images_seq_mask: Optional[torch.Tensor] = None,
                              images_spatial_crop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Text embeddings [B, T, D] with the image tokens scattered in at ``images_seq_mask`` (in order)."""
        embeds = self.language.get_input_embeddings()(input_ids)
        crop = [[] for _ in range(input_ids.shape[0])] if images_spatial_crop is None else images_spatial_crop.tolist()
        if images is None:
            crop = [[] for _ in crop]
        check_image_positions(self.config, images_seq_mask, crop)
        if not any(image_token_counts(self.config, crop)):
            return embeds
        tokens = torch.cat(self.encode_images(images, crop)).to(embeds.dtype)
        return embeds.masked_scatter(images_seq_mask.bool()[..., None], tokens)

    # --- forward -------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, images: Optional[torch.Tensor] = None,
                images_seq_mask: Optional[torch.Tensor] = None, images_spatial_crop: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None) -> VL2Output:
        """
        Args:
            input_ids: [B, T] token ids (image positions hold the ``<image>`` id).
            images: [B, max_tiles, 3, S, S] normalised tiles, or None for text-only.
            images_seq_mask: [B, T] bool, True at image-token positions.
            images_spatial_crop: [B, max_images, 2] (width_tiles, height_tiles), (0, 0) rows are padding.
            labels: [B, T] targets aligned with ``input_ids`` (not shifted), -100 = ignored.
            attention_mask: [B, T], 1 for real tokens, 0 for (right) padding.
            position_ids: [B, T]; default ``arange(T)`` for every row, as the original.
            segment_ids: [B, T] packed-sequence ids (0 = padding); overrides ``attention_mask``.
        """
        embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        B, T = input_ids.shape
        if segment_ids is None and attention_mask is not None:
            segment_ids = attention_mask.long()
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        hidden, aux = self.language.model(embeds, position_ids, segment_ids)
        logits = self.language.lm_head(hidden).float()
        ce = causal_lm_loss(logits, labels) if labels is not None else None
        loss = None if ce is None else (ce if aux is None else ce + aux)
        return VL2Output(loss=loss, logits=logits, aux_loss=aux, ce_loss=ce)

    # --- generation (recipe/model/generation.py) -----------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 images: Optional[torch.Tensor] = None, images_seq_mask: Optional[torch.Tensor] = None,
                 images_spatial_crop: Optional[torch.Tensor] = None, **kwargs) -> "generation.GenerationOutput":
        """KV-cached greedy (default) or sampled decoding of left- or right-padded prompts; keyword arguments
        (``max_new_tokens``, ``eos_token_id``, ``temperature``, ``top_k``, ``top_p``, ``generator``, ...) as
        :func:`recipe.model.generation.generate`."""
        return generation.generate(self, input_ids, attention_mask, images, images_seq_mask, images_spatial_crop,
                                   **kwargs)

    # --- checkpoints ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: Union[torch.dtype, str, None] = None,
                        device: Union[str, torch.device] = "cpu") -> "DeepseekVLV2ForCausalLM":
        """Load a released-layout checkpoint directory (``config.json`` + sharded safetensors with index, or one
        ``model.safetensors``). Strict: a missing or unexpected tensor, or a shape mismatch, is an error naming
        the file and key.

        ``torch_dtype``: None or "auto" keeps each tensor's stored dtype; otherwise floating tensors are cast.
        """
        cfg = VL2Config.from_json(path)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        weight_map, sources = scan_hf(path)
        check_against_config(cfg, {k: src.shape for k, src in sources.items()},
                             lambda k: os.path.join(path, weight_map[k]), path, expected)
        dtype = parse_dtype(torch_dtype)
        loaded = {}
        for name, tensor in iter_tensors(path, weight_map=weight_map):
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            loaded[name] = tensor.to(device)
        model.load_state_dict(loaded, strict=True, assign=True)
        return model

    def save_pretrained(self, path: str, max_shard_size: Union[int, str] = "5GB") -> None:
        """Write ``config.json``, released-style safetensors shards and ``model.safetensors.index.json``."""
        os.makedirs(path, exist_ok=True)
        self.config.save_json(os.path.join(path, "config.json"))
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        specs = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        write_hf_shards(specs, state.items(), path, parse_size(max_shard_size))


@dataclass(frozen=True)
class StateSpec:
    """One tensor of the model's state_dict: shape, dtype as built, and whether it is a (persistent) buffer."""
    shape: tuple
    dtype: torch.dtype
    is_buffer: bool


def state_specs(cfg: VL2Config) -> "OrderedDict[str, StateSpec]":
    """Every tensor (parameters and persistent buffers) of the model built from ``cfg`` -> :class:`StateSpec`, in
    state_dict order: the one list of names and shapes, read off the model built on the meta device (no memory;
    about 1.5 s for base, cached per config)."""
    return OrderedDict(_state_specs(json.dumps(cfg.to_dict(), sort_keys=True)))


def state_shapes(cfg: VL2Config) -> "OrderedDict[str, tuple]":
    """Name -> shape of every tensor of the model built from ``cfg`` (see :func:`state_specs`)."""
    return OrderedDict((k, v.shape) for k, v in state_specs(cfg).items())


@functools.lru_cache(maxsize=16)
def _state_specs(config_json: str) -> tuple:
    cfg = VL2Config.from_dict(json.loads(config_json), validate=False)
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(cfg)
    buffers = {name for name, _ in model.named_buffers()}
    return tuple((k, StateSpec(tuple(v.shape), v.dtype, k in buffers)) for k, v in model.state_dict().items())
