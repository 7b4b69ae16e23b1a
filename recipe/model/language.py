"""DeepSeek-V2 decoder (``language.*``): embedding, pre-norm decoder layers (attention + dense MLP or MoE),
final RMSNorm, untied LM head.

Shapes: B batch, T tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from recipe.config import LanguageConfig
from recipe.model import ops
from recipe.model.attention import RMSNorm, make_attention
from recipe.model.moe import MLP, DeepseekV2MoE


class DecoderLayer(nn.Module):
    """``model.layers.{i}``: h += attn(input_layernorm(h)); h += mlp(post_attention_layernorm(h)).

    ``moe_factory(cfg)`` builds the MoE block of MoE layers (default: the single-device :class:`DeepseekV2MoE`;
    the pipeline passes the expert-parallel one). Either is called as ``mlp(x, segment_ids) -> (y, aux)``.
    """

    def __init__(self, cfg: LanguageConfig, layer_idx: int,
                 moe_factory: Optional[Callable[[LanguageConfig], nn.Module]] = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = make_attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = (moe_factory or DeepseekV2MoE)(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h_BTD: torch.Tensor, positions_BT: torch.Tensor, mask: Optional[torch.Tensor],
                segment_ids_BT: Optional[torch.Tensor] = None, cache=None):
        """Returns (h [B, T, D], aux loss or None). ``cache``: this layer's KV cache when generating
        (``recipe/model/generation.py``)."""
        if cache is None:
            h_BTD = h_BTD + self.self_attn(self.input_layernorm(h_BTD), positions_BT, mask)
        else:
            h_BTD = h_BTD + self.self_attn(self.input_layernorm(h_BTD), positions_BT, mask, cache=cache)
        x = self.post_attention_layernorm(h_BTD)
        if self.is_moe:
            y, aux = self.mlp(x, segment_ids_BT)
        else:
            y, aux = self.mlp(x), None
        return h_BTD + y, aux


class DeepseekV2Model(nn.Module):
    """``language.model``: ``embed_tokens``, ``layers``, ``norm``."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds_BTD: torch.Tensor, positions_BT: torch.Tensor,
                segment_ids_BT: Optional[torch.Tensor] = None, cache=None):
        """Returns (normed hidden [B, T, D], summed aux loss or None).

        ``cache``: a :class:`recipe.model.generation.KVCache` when generating: these T tokens are appended to it
        and attend over everything cached (segment ids > 0 mark real tokens; positions are the caller's).
        """
        if cache is not None:
            return self._forward_cached(embeds_BTD, positions_BT, segment_ids_BT, cache)
        mask = ops.build_attention_layout(segment_ids_BT)  # once per forward: a mask, or varlen segment lengths
        h, aux_total = embeds_BTD, None
        for layer in self.layers:
            h, aux = layer(h, positions_BT, mask, segment_ids_BT)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return self.norm(h), aux_total

    # --- KV-cached generation (recipe/model/generation.py) -------------------------------------------------
    def _forward_cached(self, embeds_BTD, positions_BT, segment_ids_BT, cache):
        mask = cache.begin(embeds_BTD.shape[1], segment_ids_BT, embeds_BTD.device)
        h, aux_total = embeds_BTD, None
        for layer, layer_cache in zip(self.layers, cache.layers):
            h, aux = layer(h, positions_BT, mask, segment_ids_BT, cache=layer_cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        cache.end()
        return self.norm(h), aux_total


class DeepseekV2ForCausalLM(nn.Module):
    """``language``: the decoder plus ``lm_head``."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DeepseekV2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens
