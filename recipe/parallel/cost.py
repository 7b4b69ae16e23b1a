"""Per pipeline layer: parameters, activation bytes and forward FLOPs; the FLOPs-balanced decoder split.

Parameters come from the model itself (a meta-device build, cached per config), attributed to pipeline layers by
:mod:`recipe.parallel.layout`. FLOPs: 2 per multiply-accumulate over the matmuls and the causal attention scores
(T(T+1)/2 pairs), forward only; training is 3x forward (PaLM, appendix B). Activations: a per-token estimate.
The assumptions behind each figure: ``docs/planner.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence

from recipe.config import ConfigError, VL2Config
from recipe.model import state_specs
from recipe.model.loss import LM_HEAD_CHUNK_TOKENS
from recipe.parallel import layout

ACT_BYTES = 2  # bf16 activations


# =================================================================================================================
# Tensors of the model
# =================================================================================================================

class ModelTensor(NamedTuple):
    name: str       # HF checkpoint key
    numel: int
    kind: str       # "dense" | "expert" (routed, split over expert parallelism) | "buffer" (saved, never trained)


def model_tensors(cfg: VL2Config) -> tuple[ModelTensor, ...]:
    """Every tensor of ``cfg``'s checkpoint, as the model built on the meta device names and shapes it
    (:func:`recipe.model.state_specs`, cached per config, so the planner's layout search builds each model once)."""
    return tuple(ModelTensor(name, math.prod(spec.shape), "buffer" if spec.is_buffer else
                             "expert" if layout.parse_expert_key(name) else "dense")
                 for name, spec in state_specs(cfg).items())


# =================================================================================================================
# Per pipeline layer
# =================================================================================================================

@dataclass
class LayerInfo:
    index: int
    kind: str
    block: Optional[int]
    is_moe: bool
    dense: int = 0                  # non-expert parameters (all of them)
    dense_frozen: int = 0
    expert: int = 0                 # routed-expert parameters, all experts
    expert_frozen: int = 0
    buffers: int = 0
    expert_tensor_numels: list = field(default_factory=list, repr=False)  # one expert's tensors, module order
    act_full: int = 0               # bytes saved for backward per micro-batch (input included, output excluded)
    act_input: int = 0              # bytes of the layer's input per micro-batch (all a checkpointed layer keeps)
    flops: float = 0.0              # forward FLOPs per row (per sample unpacked)

    @property
    def params(self) -> int:
        return self.dense + self.expert + self.buffers


@dataclass
class Workload:
    """What one micro-batch looks like: ``micro_batch`` rows of ``seq_len`` tokens (padding included: activation
    memory) with ``views`` ViT views each. A row holds ``samples_per_row`` samples of ``sample_tokens`` real
    tokens each (default: one sample filling the row, the unpacked case); FLOPs count the real tokens, attention
    scores within each sample. "Per sample" figures divide a row's by ``samples_per_row``."""
    micro_batch: int
    seq_len: int
    views: float                    # ViT views (tiles) per row
    moe_padding: float              # DeepSpeed capacity buffer / actual routed tokens (dropless: max / mean load)
    samples_per_row: float = 1.0
    sample_tokens: Optional[float] = None  # real tokens per sample; None: seq_len

    @property
    def segment_tokens(self) -> float:
        return self.seq_len if self.sample_tokens is None else self.sample_tokens

    @property
    def real_tokens(self) -> float:
        """Real tokens per row."""
        return self.samples_per_row * self.segment_tokens


def packed_workload(micro_batch: int, seq_len: int, max_tiles_per_row: int, moe_padding: float, sample_tokens: float,
                    sample_views: float, fill: float) -> Workload:
    """The average row of a packed run: as many samples of ``sample_tokens`` tokens and ``sample_views`` ViT views
    as fill ``fill`` of ``seq_len`` tokens (first-fit-decreasing's fill, measured by ``bench/packing.py``), fewer
    when ``max_tiles_per_row`` binds first."""
    spr = fill * seq_len / sample_tokens
    if sample_views > 0:
        spr = min(spr, max_tiles_per_row / sample_views)
    spr = max(spr, 1.0)
    return Workload(micro_batch, seq_len, spr * sample_views, moe_padding, samples_per_row=spr,
                    sample_tokens=min(sample_tokens, seq_len))


def _attention_params(lc) -> int:
    D, H = lc.hidden_size, lc.num_attention_heads
    if lc.use_mla:
        q_out = H * (lc.qk_nope_head_dim + lc.qk_rope_head_dim)
        q = D * q_out if lc.q_lora_rank is None else D * lc.q_lora_rank + lc.q_lora_rank * q_out
        return (q + D * (lc.kv_lora_rank + lc.qk_rope_head_dim)
                + lc.kv_lora_rank * H * (lc.qk_nope_head_dim + lc.v_head_dim) + H * lc.v_head_dim * D)
    hd, kvH = lc.head_dim, lc.num_key_value_heads
    return D * H * hd + 2 * D * kvH * hd + H * hd * D


def _head_dims(lc) -> tuple[int, int]:
    """(query/key head dim, value head dim) as attention computes them."""
    return (lc.q_head_dim, lc.attn_v_head_dim)


def _layer_flops(cfg: VL2Config, layer: layout.PipeLayer, w: Workload) -> dict:
    """Forward FLOPs per row of one pipeline layer, by category (real tokens; attention within each sample)."""
    v, p, lc = cfg.vision_config, cfg.projector_config, cfg.language_config
    W, Hm, P, D, T = v.width, v.mlp_hidden, v.num_patches, lc.hidden_size, w.real_tokens
    L, n = w.segment_tokens, w.samples_per_row
    n_view_tokens = cfg.tokens_per_side ** 2
    f: dict = {}
    if layer.kind == layout.EMBED:
        f["vit"] = w.views * 2 * P * 3 * v.patch_size ** 2 * W
    elif layer.kind == layout.VIT_BLOCK:
        f["vit"] = w.views * (2 * P * (4 * W * W + 2 * W * Hm) + 4 * P * P * W)
    elif layer.kind == layout.PROJECTOR:
        hidden = p.n_embed * p.mlp_ratio
        macs = p.input_dim * p.downsample_ratio ** 2 * hidden + (p.depth - 2) * hidden ** 2 + hidden * p.n_embed
        f["projector"] = w.views * n_view_tokens * 2 * macs
    elif layer.kind == layout.DECODER:
        dq, dv = _head_dims(lc)
        f["attention_linear"] = 2 * T * _attention_params(lc)
        f["attention_scores"] = n * L * (L + 1) * lc.num_attention_heads * (dq + dv)  # 2 x L(L+1)/2 pairs x (dq + dv)
        if layer.is_moe:
            K, F, E = lc.num_experts_per_tok, lc.moe_intermediate_size, lc.n_routed_experts
            f["moe_router"] = 2 * T * D * E
            f["moe_routed"] = 2 * T * K * 3 * D * F
            f["moe_shared"] = 2 * T * 3 * D * lc.shared_intermediate_size
        else:
            f["dense_mlp"] = 2 * T * 3 * D * lc.intermediate_size
    elif layer.kind == layout.HEAD:
        f["lm_head"] = 2 * T * D * lc.vocab_size
    return f


def _layer_activations(cfg: VL2Config, layer: layout.PipeLayer, w: Workload) -> tuple[int, int]:
    """(bytes saved for backward, bytes of the layer's input) per micro-batch; see ``docs/planner.md``."""
    v, p, lc = cfg.vision_config, cfg.projector_config, cfg.language_config
    a = ACT_BYTES
    W, Hm, D, V = v.width, v.mlp_hidden, lc.hidden_size, lc.vocab_size
    S = w.micro_batch * w.seq_len                               # text tokens per micro-batch
    Nv = int(w.micro_batch * w.views * v.num_patches)           # ViT tokens
    Np = int(w.micro_batch * w.views * cfg.tokens_per_side ** 2)  # projector output tokens
    text_embeds = a * S * D
    if layer.kind == layout.EMBED:
        tiles = int(a * w.micro_batch * w.views * 3 * v.image_size ** 2)
        return tiles, tiles
    if layer.kind == layout.VIT_BLOCK:
        per_token = a * (8 * W + 2 * Hm) + 4 * v.heads + 16      # + flash softmax stats, 2 LayerNorm mean/rstd
        return Nv * per_token + text_embeds, a * Nv * W + text_embeds
    if layer.kind == layout.PROJECTOR:
        hidden = p.n_embed * p.mlp_ratio
        full = Nv * (2 * a * W + 8) + Np * (a * p.input_dim * p.downsample_ratio ** 2 + 2 * a * hidden)
        return full + text_embeds + S, a * Nv * W + text_embeds
    if layer.kind == layout.DECODER:
        H = lc.num_attention_heads
        dq, dv = _head_dims(lc)
        per_token = a * 4 * D + 8                                    # 2 norms: input and output, + rstd
        if lc.use_mla:
            per_token += a * (H * dq + 2 * lc.kv_lora_rank + H * dq + H * dv + H * dv)   # q, c x2, k, v, out
        else:
            kv = lc.num_key_value_heads * lc.head_dim
            per_token += a * (H * lc.head_dim + 2 * kv + H * lc.head_dim)
        per_token += 4 * H                                           # flash softmax stats
        if layer.is_moe:
            K, F, E = lc.num_experts_per_tok, lc.moe_intermediate_size, lc.n_routed_experts
            per_token += 4 * D + 4 * E + 12 * K                      # fp32 router input, scores, top-k ids/weights
            per_token += int(w.moe_padding * K * a * (2 * D + 3 * F))  # dispatched in, 3 intermediates, expert out
            per_token += 3 * a * lc.shared_intermediate_size
        else:
            per_token += 3 * a * lc.intermediate_size
        return S * per_token, a * S * D
    # head: its input, the norm output and the gathered labelled rows; the LM head and cross-entropy run a chunk of
    # tokens at a time, recomputed in backward (bf16 logits, fp32 logits, fp32 softmax, and their gradients)
    return S * (3 * a * D + 4) + min(S, LM_HEAD_CHUNK_TOKENS) * 16 * V, a * S * D


def layer_infos(cfg: VL2Config, workload: Workload, freeze: Optional[dict] = None) -> list[LayerInfo]:
    """Per pipeline layer: exact parameter counts, activation bytes and forward FLOPs."""
    freeze = freeze or {}
    pipe = layout.build_layout(cfg)
    infos = [LayerInfo(p.index, p.kind, p.block, p.is_moe) for p in pipe]
    first_expert = {}
    for t in model_tensors(cfg):
        info = infos[layout.layer_index_of(cfg, t.name)]
        frozen = bool(freeze.get(layout.freeze_group(t.name), False)) or t.name.startswith(layout.ALWAYS_FROZEN)
        if t.kind == "buffer":
            info.buffers += t.numel
        elif t.kind == "expert":
            info.expert += t.numel
            info.expert_frozen += t.numel if frozen else 0
            expert_id = layout.parse_expert_key(t.name)[1]
            if first_expert.setdefault(info.index, expert_id) == expert_id:
                info.expert_tensor_numels.append(t.numel)
        else:
            info.dense += t.numel
            info.dense_frozen += t.numel if frozen else 0
    for info, pipe_layer in zip(infos, pipe):
        info.act_full, info.act_input = _layer_activations(cfg, pipe_layer, workload)
        info.flops = float(sum(_layer_flops(cfg, pipe_layer, workload).values()))
    return infos


def flops_per_sample(cfg: VL2Config, workload: Workload) -> dict:
    """Forward FLOPs per sample by category (``vit``, ``projector``, ``attention_linear``, ``attention_scores``,
    ``dense_mlp``, ``moe_router``, ``moe_routed``, ``moe_shared``, ``lm_head``) and their ``total``: a row's
    FLOPs over its ``samples_per_row``."""
    out: dict = {}
    for pipe_layer in layout.build_layout(cfg):
        for k, val in _layer_flops(cfg, pipe_layer, workload).items():
            out[k] = out.get(k, 0) + val / workload.samples_per_row
    out["total"] = sum(out.values())
    return out


def activated_params(cfg: VL2Config, infos: Sequence[LayerInfo]) -> int:
    """Parameters one text token passes through: decoder layers and head, routed experts K of E."""
    lc = cfg.language_config
    n = sum(info.dense for info in infos if info.kind in (layout.DECODER, layout.HEAD))
    return n + sum(info.expert // lc.n_routed_experts * lc.num_experts_per_tok for info in infos if info.expert)


# =================================================================================================================
# Splitting the decoder layers between stages
# =================================================================================================================

def min_max_split(cost: Callable[[int, int, int], float], n_layers: int, stages: int) -> Optional[list]:
    """Decoder layers per stage minimising the largest ``cost(stage, first, count)`` (monotone in count); greedy
    feasibility inside a bisection on the cap. None when even one layer per later stage cannot be placed."""
    def feasible(cap):
        split, start = [], 0
        for s in range(stages):
            left_for_later = stages - 1 - s
            if s == stages - 1:
                n = n_layers - start
                if n < 1 or cost(s, start, n) > cap:
                    return None
            else:
                n = 0
                while start + n + 1 <= n_layers - left_for_later and cost(s, start, n + 1) <= cap:
                    n += 1
                if cost(s, start, n) > cap:
                    return None
            split.append(n)
            start += n
        return split

    lo, hi = 0.0, max(cost(s, 0, n_layers) for s in range(stages)) * 2 + 1
    best = feasible(hi)
    if best is None:
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        got = feasible(mid)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
    return best


def flops_balanced_split(cfg: VL2Config, infos: Sequence[LayerInfo], stages: int) -> Optional[list]:
    """Decoder layers per stage that minimise the largest stage's forward FLOPs (ViT, projector and embedding on
    stage 0, head on the last), every stage keeping at least one MoE layer when the model has experts."""
    first = layout.first_decoder_index(cfg)
    L = cfg.language_config.num_hidden_layers

    def cost(s, start, n):
        lo = 0 if s == 0 else first + start
        hi = first + start + n + (1 if s == stages - 1 else 0)
        return sum(info.flops for info in infos[lo:hi])

    split = min_max_split(cost, L, stages)
    if split is None or stages == 1 or not cfg.language_config.is_moe:
        return split
    while True:  # move layers forward until every stage has an MoE layer (only layer-0-like dense prefixes lack one)
        starts = [sum(split[:i]) for i in range(stages)]
        empty = [s for s in range(stages)
                 if not any(cfg.language_config.is_moe_layer(j) for j in range(starts[s], starts[s] + split[s]))]
        if not empty or empty[0] == stages - 1 or split[empty[0] + 1] <= 1:
            return split if not empty else None
        split[empty[0]] += 1
        split[empty[0] + 1] -= 1


def balanced_decoder_split(cfg: VL2Config, num_stages: int, seq_len: int = 4096, views: int = 10) -> list[int]:
    """Decoder layers per stage that minimise the costliest stage's forward FLOPs, for samples of ``seq_len``
    tokens with ``views`` ViT tiles, with at least one MoE layer on every stage; the split ``decoder_split: auto``
    (or none) means. For base on 2 stages: [13, 17], the seed cluster's split."""
    split = flops_balanced_split(cfg, layer_infos(cfg, Workload(1, seq_len, views, 1.0)), num_stages)
    if split is None:
        raise ConfigError(f"{cfg.language_config.num_hidden_layers} decoder layers cannot fill {num_stages} pipeline "
                          f"stages with an MoE layer on each; use fewer stages")
    return split
