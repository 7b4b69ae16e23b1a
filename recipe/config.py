"""Model configuration, read from a checkpoint's own ``config.json`` (the processor's: recipe/data/processor_config.py).

The dataclasses mirror the HF schema of DeepSeek-VL2 (``vision_config``, ``projector_config``, ``language_config``
and the top-level keys) with the original defaults, so the sparse released configs parse to the released models.
Invalid values raise :class:`ConfigError` naming the key; keys we do not know are kept (so a config round-trips)
and reported once in the log.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

logger = logging.getLogger(__name__)

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")

# Keys every HF PretrainedConfig may write; accepted and kept without a warning.
_HF_GENERIC_KEYS = frozenset(
    """architectures auto_map model_type torch_dtype dtype transformers_version _name_or_path _commit_hash
    _attn_implementation_autoset return_dict output_hidden_states output_attentions torchscript use_bfloat16
    tf_legacy_loss pruned_heads chunk_size_feed_forward is_encoder_decoder is_decoder cross_attention_hidden_size
    add_cross_attention tie_encoder_decoder max_length min_length do_sample early_stopping num_beams
    num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty length_penalty
    no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens finetuning_task id2label label2id
    tokenizer_class prefix sep_token_id decoder_start_token_id task_specific_params problem_type
    lm_head rm_head""".split()
)


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


def load_json(path: str, what: str = "config") -> dict:
    """Read a JSON file; a missing or malformed file is a ConfigError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _fail(where: str, key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{where}.{key}={value!r}: {why}")


def _split_known(cls, raw: dict, where: str) -> tuple[dict, dict]:
    """Split ``raw`` into dataclass fields of ``cls`` and the rest (kept verbatim)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
    known = {k: v for k, v in raw.items() if k in names}
    extra = {k: v for k, v in raw.items() if k not in names}
    unknown = sorted(k for k in extra if k not in _HF_GENERIC_KEYS)
    if unknown:
        logger.warning("%s: keys not used by this recipe (kept as is): %s", where, ", ".join(unknown))
    return known, extra


@dataclass
class VisionConfig:
    """SigLIP ViT settings (``vision_config``). Defaults are the original ``VisionEncoderConfig`` defaults."""

    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False
    num_classes: int = 0
    use_checkpoint: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def grid(self) -> int:
        """Patches per side: the conv stride drops the last ``image_size % patch_size`` pixels."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def has_attn_pool(self) -> bool:
        """The MAP head is built (and stored in checkpoints) but never run."""
        return self.global_pool == "map"

    def validate(self) -> None:
        w = "vision_config"
        for key in ("image_size", "patch_size", "width", "layers", "heads"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                _fail(w, key, getattr(self, key), "must be a positive integer")
        if self.patch_size > self.image_size:
            _fail(w, "patch_size", self.patch_size, f"larger than image_size={self.image_size}")
        if self.width % self.heads:
            _fail(w, "heads", self.heads, f"must divide width={self.width}")
        if self.mlp_ratio <= 0:
            _fail(w, "mlp_ratio", self.mlp_ratio, "must be positive")
        if self.class_token:
            _fail(w, "class_token", self.class_token,
                  "DeepSeek-VL2's tower has no class token; only false is supported")
        if not self.ignore_head or self.num_classes:
            _fail(w, "ignore_head", self.ignore_head,
                  "the VL2 tower returns patch features; the pooling head is unused")
        if self.global_pool not in ("map", "", "avg", "token", None):
            _fail(w, "global_pool", self.global_pool, "expected 'map' (released) or no pooling")


@dataclass
class ProjectorConfig:
    """The 2x2 downsample MLP projector (``projector_config``)."""

    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def validate(self) -> None:
        w = "projector_config"
        if self.projector_type != "downsample_mlp_gelu":
            _fail(w, "projector_type", self.projector_type,
                  "only 'downsample_mlp_gelu' (all released DeepSeek-VL2 models) is supported")
        if self.token_pooling:
            _fail(w, "token_pooling", self.token_pooling, "unused by the released models; not supported")
        for key in ("input_dim", "n_embed", "depth", "mlp_ratio", "downsample_ratio"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                _fail(w, key, getattr(self, key), "must be a positive integer")
        if self.depth < 2:
            _fail(w, "depth", self.depth, "downsample_mlp_gelu needs depth >= 2 (Linear, GELU, Linear)")


@dataclass
class LanguageConfig:
    """DeepSeek-V2 decoder (``language_config``). Defaults are the original ``DeepseekV2Config`` defaults;
    released configs are sparse and rely on them (base: layer count, heads, MLA dims)."""

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    n_shared_experts: Optional[int] = None
    n_routed_experts: Optional[int] = None
    ep_size: int = 1
    routed_scaling_factor: float = 1.0
    kv_lora_rank: Optional[int] = 512
    q_lora_rank: Optional[int] = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "gready"  # sic: the original default, rejected by validate()
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 100000
    eos_token_id: Optional[int] = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_mla: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    # --- derived sizes -------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts is not None

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer ``layer_idx`` uses MoE iff experts exist, it is past the dense prefix and on the frequency."""
        return (self.is_moe and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def head_dim(self) -> int:
        """MHA head size (tiny: 1280 / 10 = 128)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.use_mla else self.head_dim

    @property
    def attn_v_head_dim(self) -> int:
        return self.v_head_dim if self.use_mla else self.head_dim

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * (self.n_shared_experts or 0)

    def validate(self) -> None:
        w = "language_config"
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "moe_layer_freq"):
            v = getattr(self, key)
            if not isinstance(v, int) or v <= 0:
                _fail(w, key, v, "must be a positive integer")
        if self.first_k_dense_replace < 0:
            _fail(w, "first_k_dense_replace", self.first_k_dense_replace, "must be >= 0")
        if self.hidden_act != "silu":
            _fail(w, "hidden_act", self.hidden_act, "only 'silu' is used by DeepSeek-V2 and supported here")
        if self.pretraining_tp != 1:
            _fail(w, "pretraining_tp", self.pretraining_tp, "only 1 is supported")
        if self.tie_word_embeddings:
            _fail(w, "tie_word_embeddings", True, "DeepSeek-VL2 stores an untied lm_head; tied heads are not supported")
        if self.rope_scaling is not None:
            _fail(w, "rope_scaling", self.rope_scaling, "no released DeepSeek-VL2 model scales RoPE; not supported")
        if not 0.0 <= self.attention_dropout < 1.0:
            _fail(w, "attention_dropout", self.attention_dropout, "must be in [0, 1)")
        if self.use_mla:
            if not isinstance(self.kv_lora_rank, int) or self.kv_lora_rank <= 0:
                _fail(w, "kv_lora_rank", self.kv_lora_rank, "MLA (use_mla=true) needs a positive kv_lora_rank")
            if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
                _fail(w, "q_lora_rank", self.q_lora_rank, "must be null or a positive integer")
            for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                    _fail(w, key, getattr(self, key), "MLA needs a positive size")
            if self.qk_rope_head_dim % 2:
                _fail(w, "qk_rope_head_dim", self.qk_rope_head_dim, "RoPE rotates pairs; must be even")
        else:
            if self.hidden_size % self.num_attention_heads:
                _fail(w, "num_attention_heads", self.num_attention_heads,
                      f"must divide hidden_size={self.hidden_size} for MHA")
            if self.num_attention_heads % self.num_key_value_heads:
                _fail(w, "num_key_value_heads", self.num_key_value_heads,
                      f"must divide num_attention_heads={self.num_attention_heads}")
            if self.head_dim % 2:
                _fail(w, "num_attention_heads", self.num_attention_heads, "head_dim must be even for RoPE")
        if not self.is_moe:
            return
        E = self.n_routed_experts
        if not isinstance(E, int) or E <= 0:
            _fail(w, "n_routed_experts", E, "must be a positive integer (or null for a dense model)")
        if self.topk_method not in TOPK_METHODS:
            hint = " (the original code's default is this typo; set the method explicitly)" if \
                self.topk_method == "gready" else ""
            _fail(w, "topk_method", self.topk_method, f"unknown routing method{hint}; expected one of {TOPK_METHODS}")
        if self.scoring_func not in SCORING_FUNCS:
            _fail(w, "scoring_func", self.scoring_func, f"expected one of {SCORING_FUNCS}")
        k = self.num_experts_per_tok
        if not isinstance(k, int) or not 0 < k <= E:
            _fail(w, "num_experts_per_tok", k, f"must be an integer in [1, n_routed_experts={E}]")
        if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
            _fail(w, "moe_intermediate_size", self.moe_intermediate_size, "must be a positive integer")
        if self.n_shared_experts is not None and (not isinstance(self.n_shared_experts, int)
                                                  or self.n_shared_experts < 0):
            _fail(w, "n_shared_experts", self.n_shared_experts, "must be null or a non-negative integer")
        if self.topk_method != "greedy":
            g = self.n_group
            if not isinstance(g, int) or g <= 0:
                _fail(w, "n_group", g, f"topk_method={self.topk_method!r} needs a positive n_group")
            if E % g:
                _fail(w, "n_group", g, f"must divide n_routed_experts={E} (experts are split into equal groups)")
            tg = self.topk_group
            if not isinstance(tg, int) or not 0 < tg <= g:
                _fail(w, "topk_group", tg, f"must be an integer in [1, n_group={g}]")
            if k > tg * (E // g):
                _fail(w, "num_experts_per_tok", k, f"more than the {tg * (E // g)} experts the kept groups hold")
            if self.topk_method == "noaux_tc" and E // g < 2:
                _fail(w, "n_group", g, "noaux_tc scores each group by its top-2 experts; groups need >= 2 experts")
        if self.routed_scaling_factor <= 0:
            _fail(w, "routed_scaling_factor", self.routed_scaling_factor, "must be positive")
        if self.aux_loss_alpha < 0:
            _fail(w, "aux_loss_alpha", self.aux_loss_alpha, "must be >= 0")
        if not self.moe_layer_ids:
            _fail(w, "first_k_dense_replace", self.first_k_dense_replace,
                  "leaves no MoE layer although experts are set")


def _tile_candidates(image_size: int, max_tiles: int = 9) -> list[list[int]]:
    """Tile grids (m*s, n*s) with m*n <= ``max_tiles`` in the released order (the 23 pairs of
    ``processor_config.json`` for s = 384): by tile count, then the most elongated first, tall before wide."""
    pairs = [(m, n) for m in range(1, max_tiles + 1) for n in range(1, max_tiles + 1) if m * n <= max_tiles]
    pairs.sort(key=lambda mn: (mn[0] * mn[1], -max(mn), -mn[1]))
    return [[m * image_size, n * image_size] for m, n in pairs]


@dataclass
class VL2Config:
    """The whole model: ``DeepseekVLV2Config`` (vision, projector, language, tile layout)."""

    vision_config: VisionConfig = field(default_factory=VisionConfig)
    projector_config: ProjectorConfig = field(default_factory=ProjectorConfig)
    language_config: LanguageConfig = field(default_factory=LanguageConfig)
    tile_tag: str = "tile_tag"  # sic: the original __init__ default; validate() requires "2D"
    global_view_pos: str = "head"
    candidate_resolutions: list = field(default_factory=lambda: [[384, 384]])
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict, validate: bool = True) -> "VL2Config":
        raw = copy.deepcopy(raw)
        known, extra = _split_known(cls, raw, "config")
        subs = {}
        for key, sub_cls in (("vision_config", VisionConfig), ("projector_config", ProjectorConfig),
                             ("language_config", LanguageConfig)):
            sub_known, sub_extra = _split_known(sub_cls, known.pop(key, {}) or {}, key)
            subs[key] = sub_cls(**sub_known, extra=sub_extra)
        cfg = cls(**subs, **known, extra=extra)
        if validate:
            cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str, validate: bool = True) -> "VL2Config":
        """Read ``config.json`` (a file, or a checkpoint directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        raw = load_json(path, "config")
        try:
            return cls.from_dict(raw, validate=validate)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """The HF ``config.json`` form, unknown keys included."""
        def flat(obj) -> dict:
            d = {f.name: copy.deepcopy(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "extra"}
            d.update(copy.deepcopy(obj.extra))
            return d
        out = flat(self)
        for key in ("vision_config", "projector_config", "language_config"):
            out[key] = flat(getattr(self, key))
        out.setdefault("model_type", "deepseek_vl_v2")
        return out

    def save_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")

    def validate(self) -> None:
        if self.tile_tag != "2D":
            _fail("config", "tile_tag", self.tile_tag,
                  "only '2D' (image_newline / view_seperator layout, all released models) is supported; "
                  "the original __init__ default 'tile_tag' is a bug, set '2D'")
        if self.global_view_pos not in ("head", "tail"):
            _fail("config", "global_view_pos", self.global_view_pos, "expected 'head' (released) or 'tail'")
        self.vision_config.validate()
        self.projector_config.validate()
        self.language_config.validate()
        if self.projector_config.input_dim != self.vision_config.width:
            _fail("projector_config", "input_dim", self.projector_config.input_dim,
                  f"must equal vision_config.width={self.vision_config.width}")
        if self.projector_config.n_embed != self.language_config.hidden_size:
            _fail("projector_config", "n_embed", self.projector_config.n_embed,
                  f"must equal language_config.hidden_size={self.language_config.hidden_size}")

    # --- derived image-token geometry ---------------------------------------------------------------------
    @property
    def tokens_per_side(self) -> int:
        """Tokens per side of one view after the projector: ceil(grid / downsample_ratio) (27 -> 14)."""
        return math.ceil(self.vision_config.grid / self.projector_config.downsample_ratio)

    def num_image_tokens(self, width_tiles: int, height_tiles: int) -> int:
        """Image-token count of one image: global view with newlines, separator, local grid with newlines."""
        h = self.tokens_per_side
        return h * (h + 1) + 1 + (height_tiles * h) * (width_tiles * h + 1)
