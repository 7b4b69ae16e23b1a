"""Capacity planner: memory per pipeline stage and rank, communication, FLOPs and throughput of a run.

    python -m recipe.plan --deepspeed ds_configs/ep8.json --model base            # a released size, or a checkpoint dir
    python -m recipe.plan --deepspeed ds_configs/ep8.json --model base --json     # machine-readable

Everything is derived analytically from ``config.json`` and the DeepSpeed JSON (its standard keys plus the ``recipe``
block), so it works for any size without building the model. What it assumes, so a reader can check it:

Parameters
    Every tensor of the HF checkpoint is listed by name and shape (:func:`checkpoint_tensors`) and attributed to its
    pipeline layer with ``recipe.parallel.layout``; ``tests/test_plan.py`` checks the list against a meta-device
    build. Totals include the ``noaux_tc`` router bias (a buffer, not trained) and the unused ViT ``attn_pool``
    (frozen by the pipeline: weights only).

Placement and optimizer state (DeepSpeed 0.19.8, read from ``runtime/engine.py``, ``runtime/bf16_optimizer.py``,
``moe/utils.py``)
    bf16 + ``data_types.grad_accum_dtype: fp32`` + ZeRO stage 1 selects ``BF16_Optimizer``. Per optimizer param
    group it keeps: the bf16 weights moved into one flat buffer padded to a multiple of 2 x group size; a flat
    gradient accumulation buffer of the same padded size in the accumulation dtype, **not partitioned** (every rank
    holds the whole group's fp32 gradients); the fp32 master copy of this rank's 1/group-size partition; the
    optimizer's state on that partition (Adam/AdamW: exp_avg + exp_avg_sq, 8 bytes/param). The bf16 ``.grad`` of
    every trainable parameter also stays allocated between micro-batches (zeroed, not freed, until the step).
    Groups: dense parameters form one group partitioned over data parallel (DP); routed experts (E/EP per rank per
    MoE layer) form groups of at most 178,956,971 elements partitioned over expert-data-parallel (DP/EP). Frozen
    parameters (``recipe.freeze``) hold bf16 weights only. The gradient all-reduce casts each fp32 group buffer to
    ``communication_data_type`` (default bf16), a transient copy of the largest group.

Activations (per micro-batch; bf16, fused attention that stores no T x T scores, fused RMSNorm/SwiGLU)
    Saved tensors per token (a = 2 bytes): ViT block a(8W + 2Hm) + LayerNorm stats; decoder layer: norms and
    projections a(4D) + attention (MHA: q, k, v, out; MLA: q, latent c twice, k, v, out) + MLP (dense: gate, up,
    product = 3aI; MoE: an fp32 copy of the router input and scores, then per routed slot the dispatched input,
    3 expert intermediates and the expert output, times the dropless padding factor of DeepSpeed's capacity
    buffer, plus the shared experts 3aF_s); head: its input, norm output, the labelled rows, and for one chunk of
    2048 tokens 16 bytes per vocabulary entry (the loss computes and recomputes the LM head chunk by chunk: bf16
    and fp32 logits, fp32 softmax, their gradients). With activation checkpointing (ViT blocks and decoder layers
    are checkpointed; embed, projector and head are not) a layer keeps only its input and one layer's full
    activations exist at a time during its recomputation. Stage s of S holds min(S - s, GAS) micro-batches in
    flight under DeepSpeed's 1F1B schedule.

FLOPs (2 per multiply-accumulate; forward; training counts 3x, checkpointing adds a 4th forward that MFU ignores)
    ViT (patch embedding, blocks with full attention over 729 patches), projector, decoder attention projections,
    causal attention scores (T(T+1)/2 pairs), dense MLP, activated MoE (router, K routed + shared experts), LM head.
    Views per sample default to one image at the largest tiling (1 global + 9 local); sequence length to
    ``recipe.max_seq_len`` (the original recipe pads every sample to it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

from recipe.config import ConfigError, VL2Config
from recipe.parallel import layout

GiB = 1024 ** 3
ACT_BYTES = 2  # bf16 activations

# Atlas 800T A2 (Ascend 910B, 64 GB HBM) dense fp16/bf16 peak per NPU: 354 TFLOPS, the figure verl's MFU counter uses
# for "910B" (volcengine/verl, verl/utils/flops_counter.py, _DEVICE_FLOPS). Public bf16 GEMM measurements reach
# 315 TFLOPS (910B2, 4096^3) to 328 TFLOPS, consistent with it. Override with --peak-tflops.
ATLAS_800T_A2_BF16_TFLOPS = 354.0
DEVICE_MEMORY_GB = 64.0
# The original MindSpeed-MM DeepSeek-VL2 recipe: 4.924 samples/s end to end on 4 x 8 Atlas 800T A2 (its README).
ORIGINAL_RECIPE_SPS = 4.924
ORIGINAL_RECIPE_DEVICES = 32

MOE_MAX_GROUP_SIZE = 178956971  # deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer default
BF16_ALIGNMENT_FACTOR = 2       # BF16_Optimizer.nccl_start_alignment_factor: flat buffers pad to 2 x group size
OPTIMIZER_STATE_BYTES = {"adam": 8, "adamw": 8, "fusedadam": 8, "lamb": 8, "onebitadam": 8, "zerooneadam": 8,
                         "onebitlamb": 8, "lion": 4, "muon": 4, "sgd": 4, "adagrad": 4}
CHECKPOINTED_KINDS = (layout.VIT_BLOCK, layout.DECODER)
LM_LOSS_CHUNK = 2048            # recipe.parallel.pipeline.VL2Pipeline(lm_loss_chunk=...)
ALWAYS_FROZEN = ("vision.attn_pool.",)  # kept for checkpoints, never run: VL2Pipeline freezes it
FREEZE_GROUPS = ("vision", "projector", "language", "embeddings")
RELEASED_SIZES = ("tiny", "small", "base")
RELEASED_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "released_configs")


# =================================================================================================================
# Tensors of the checkpoint
# =================================================================================================================

@dataclass(frozen=True)
class TensorSpec:
    name: str                # HF checkpoint key
    shape: tuple
    buffer: bool = False     # persistent buffer (noaux_tc router bias): saved, never trained
    expert: bool = False     # routed expert weight: split over expert parallelism

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def checkpoint_tensors(cfg: VL2Config) -> list[TensorSpec]:
    """Every tensor of the HF checkpoint of ``cfg``, by name and shape, in module order."""
    v, p, lc = cfg.vision_config, cfg.projector_config, cfg.language_config
    W, Hm, D = v.width, v.mlp_hidden, lc.hidden_size
    out: list[TensorSpec] = []

    def lin(prefix: str, n_out: int, n_in: int, bias: bool) -> None:
        out.append(TensorSpec(prefix + ".weight", (n_out, n_in)))
        if bias:
            out.append(TensorSpec(prefix + ".bias", (n_out,)))

    def norm(prefix: str, n: int, bias: bool) -> None:
        out.append(TensorSpec(prefix + ".weight", (n,)))
        if bias:
            out.append(TensorSpec(prefix + ".bias", (n,)))

    # vision
    out.append(TensorSpec("vision.patch_embed.proj.weight", (W, 3, v.patch_size, v.patch_size)))
    out.append(TensorSpec("vision.patch_embed.proj.bias", (W,)))
    out.append(TensorSpec("vision.pos_embed", (1, v.num_patches, W)))
    for i in range(v.layers):
        b = f"vision.blocks.{i}."
        norm(b + "norm1", W, True)
        lin(b + "attn.qkv", 3 * W, W, True)
        lin(b + "attn.proj", W, W, True)
        norm(b + "norm2", W, True)
        lin(b + "mlp.fc1", Hm, W, True)
        lin(b + "mlp.fc2", W, Hm, True)
    norm("vision.norm", W, True)
    if v.has_attn_pool:
        out.append(TensorSpec("vision.attn_pool.latent", (1, 1, W)))
        lin("vision.attn_pool.q", W, W, True)
        lin("vision.attn_pool.kv", 2 * W, W, True)
        lin("vision.attn_pool.proj", W, W, True)
        norm("vision.attn_pool.norm", W, True)
        lin("vision.attn_pool.mlp.fc1", Hm, W, True)
        lin("vision.attn_pool.mlp.fc2", W, Hm, True)
    # projector: Linear, (GELU, Linear) x (depth - 2), GELU, Linear
    hidden = p.n_embed * p.mlp_ratio
    lin("projector.layers.0", hidden, p.input_dim * p.downsample_ratio ** 2, True)
    for k in range(p.depth - 2):
        lin(f"projector.layers.{2 + 2 * k}", hidden, hidden, True)
    lin(f"projector.layers.{2 * (p.depth - 1)}", p.n_embed, hidden, True)
    out.append(TensorSpec("image_newline", (p.n_embed,)))
    out.append(TensorSpec("view_seperator", (p.n_embed,)))
    # language
    out.append(TensorSpec("language.model.embed_tokens.weight", (lc.vocab_size, D)))
    bias = lc.attention_bias
    for j in range(lc.num_hidden_layers):
        b = f"language.model.layers.{j}."
        norm(b + "input_layernorm", D, False)
        a = b + "self_attn."
        H = lc.num_attention_heads
        if lc.use_mla:
            q_out = H * (lc.qk_nope_head_dim + lc.qk_rope_head_dim)
            if lc.q_lora_rank is None:
                lin(a + "q_proj", q_out, D, False)
            else:
                lin(a + "q_a_proj", lc.q_lora_rank, D, bias)
                norm(a + "q_a_layernorm", lc.q_lora_rank, False)
                lin(a + "q_b_proj", q_out, lc.q_lora_rank, False)
            lin(a + "kv_a_proj_with_mqa", lc.kv_lora_rank + lc.qk_rope_head_dim, D, bias)
            norm(a + "kv_a_layernorm", lc.kv_lora_rank, False)
            lin(a + "kv_b_proj", H * (lc.qk_nope_head_dim + lc.v_head_dim), lc.kv_lora_rank, False)
            lin(a + "o_proj", D, H * lc.v_head_dim, bias)
        else:
            hd, kvH = lc.head_dim, lc.num_key_value_heads
            lin(a + "q_proj", H * hd, D, bias)
            lin(a + "k_proj", kvH * hd, D, bias)
            lin(a + "v_proj", kvH * hd, D, bias)
            lin(a + "o_proj", D, H * hd, bias)
        norm(b + "post_attention_layernorm", D, False)
        m = b + "mlp."
        if lc.is_moe_layer(j):
            F, E = lc.moe_intermediate_size, lc.n_routed_experts
            out.append(TensorSpec(m + "gate.weight", (E, D)))
            if lc.topk_method == "noaux_tc":
                out.append(TensorSpec(m + "gate.e_score_correction_bias", (E,), buffer=True))
            for e in range(E):
                x = f"{m}experts.{e}."
                out += [TensorSpec(x + "gate_proj.weight", (F, D), expert=True),
                        TensorSpec(x + "up_proj.weight", (F, D), expert=True),
                        TensorSpec(x + "down_proj.weight", (D, F), expert=True)]
            if lc.n_shared_experts:
                Fs = lc.shared_intermediate_size
                lin(m + "shared_experts.gate_proj", Fs, D, False)
                lin(m + "shared_experts.up_proj", Fs, D, False)
                lin(m + "shared_experts.down_proj", D, Fs, False)
        else:
            lin(m + "gate_proj", lc.intermediate_size, D, False)
            lin(m + "up_proj", lc.intermediate_size, D, False)
            lin(m + "down_proj", D, lc.intermediate_size, False)
    norm("language.model.norm", D, False)
    out.append(TensorSpec("language.lm_head.weight", (lc.vocab_size, D)))
    return out


def freeze_group(hf_key: str) -> str:
    """Which ``recipe.freeze`` switch covers a tensor: vision | projector | embeddings | language."""
    if hf_key.startswith("vision."):
        return "vision"
    if hf_key.startswith("projector.") or hf_key in ("image_newline", "view_seperator"):
        return "projector"
    if hf_key.startswith("language.model.embed_tokens."):
        return "embeddings"
    return "language"


# =================================================================================================================
# Per pipeline layer: parameters, activations, FLOPs
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
    flops: float = 0.0              # forward FLOPs per sample

    @property
    def params(self) -> int:
        return self.dense + self.expert + self.buffers


@dataclass
class Workload:
    """What one micro-batch looks like."""
    micro_batch: int
    seq_len: int
    views: int                      # ViT views (tiles) per sample
    moe_padding: float              # DeepSpeed capacity buffer / actual routed tokens (dropless: max / mean load)


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
    """Forward FLOPs per sample of one pipeline layer, by category."""
    v, p, lc = cfg.vision_config, cfg.projector_config, cfg.language_config
    W, Hm, P, D, T = v.width, v.mlp_hidden, v.num_patches, lc.hidden_size, w.seq_len
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
        f["attention_scores"] = T * (T + 1) * lc.num_attention_heads * (dq + dv)  # 2 x T(T+1)/2 pairs x (dq + dv)
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
    """(bytes saved for backward, bytes of the layer's input) per micro-batch; see the module docstring."""
    v, p, lc = cfg.vision_config, cfg.projector_config, cfg.language_config
    a = ACT_BYTES
    W, Hm, D, V = v.width, v.mlp_hidden, lc.hidden_size, lc.vocab_size
    S = w.micro_batch * w.seq_len                               # text tokens per micro-batch
    Nv = w.micro_batch * w.views * v.num_patches                # ViT tokens
    Np = w.micro_batch * w.views * cfg.tokens_per_side ** 2     # projector output tokens
    text_embeds = a * S * D
    if layer.kind == layout.EMBED:
        tiles = a * w.micro_batch * w.views * 3 * v.image_size ** 2
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
    return S * (3 * a * D + 4) + min(S, LM_LOSS_CHUNK) * 16 * V, a * S * D


def layer_infos(cfg: VL2Config, workload: Workload, freeze: Optional[dict] = None,
                tensors: Optional[list] = None) -> list[LayerInfo]:
    """Per pipeline layer: exact parameter counts, activation bytes and forward FLOPs."""
    freeze = freeze or {}
    pipe = layout.build_layout(cfg)
    infos = [LayerInfo(l.index, l.kind, l.block, l.is_moe) for l in pipe]
    first_expert = {}
    for t in tensors if tensors is not None else checkpoint_tensors(cfg):
        info = infos[layout.layer_index_of(cfg, t.name)]
        frozen = bool(freeze.get(freeze_group(t.name), False)) or t.name.startswith(ALWAYS_FROZEN)
        if t.buffer:
            info.buffers += t.numel
        elif t.expert:
            info.expert += t.numel
            info.expert_frozen += t.numel if frozen else 0
            parsed = layout.parse_expert_key(t.name)
            if first_expert.setdefault(info.index, parsed[1]) == parsed[1]:
                info.expert_tensor_numels.append(t.numel)
        else:
            info.dense += t.numel
            info.dense_frozen += t.numel if frozen else 0
    for info, l in zip(infos, pipe):
        info.act_full, info.act_input = _layer_activations(cfg, l, workload)
        info.flops = float(sum(_layer_flops(cfg, l, workload).values()))
    return infos


def flops_per_sample(cfg: VL2Config, workload: Workload) -> dict:
    """Forward FLOPs per sample by category (``vit``, ``projector``, ``attention_linear``, ``attention_scores``,
    ``dense_mlp``, ``moe_router``, ``moe_routed``, ``moe_shared``, ``lm_head``) and their ``total``."""
    out: dict = {}
    for l in layout.build_layout(cfg):
        for k, val in _layer_flops(cfg, l, workload).items():
            out[k] = out.get(k, 0) + val
    out["total"] = sum(out.values())
    return out


# =================================================================================================================
# The run: topology and optimizer from the DeepSpeed JSON
# =================================================================================================================

@dataclass
class Topology:
    world_size: int
    pipeline_stages: int
    data_parallel: int
    expert_parallel: int
    micro_batch: int
    grad_accum_steps: int
    train_batch: int
    decoder_split: list
    parts: list
    seq_len: int
    activation_checkpointing: bool
    freeze: dict
    optimizer: str                  # BF16_Optimizer | DeepSpeedZeroOptimizer (approximate) | ...
    grad_accum_bytes: int
    comm_bytes: int                 # bytes per element of the gradient all-reduce
    optimizer_state_bytes: int      # per parameter of this rank's partition

    @property
    def expert_data_parallel(self) -> int:
        return self.data_parallel // self.expert_parallel


_DTYPE_BYTES = {"fp32": 4, "float32": 4, "float": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2}


def _dtype_bytes(name, default: int) -> int:
    if name is None:
        return default
    key = str(name).lower().replace("torch.", "")
    if key not in _DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[key]


def topology(cfg: VL2Config, ds: dict, world_size: Optional[int] = None, seq_len: Optional[int] = None,
             **recipe_overrides) -> Topology:
    """Parallel layout and optimizer accounting of ``ds`` (a DeepSpeed JSON with a ``recipe`` block).

    World size: ``world_size``, else train_batch_size / (micro-batch x GAS) x pipeline stages. ``recipe_overrides``
    replace keys of the ``recipe`` block (pipeline_stages, decoder_split, expert_parallel_size, ...).
    """
    rc = dict(ds.get("recipe", {}))
    rc.update({k: v for k, v in recipe_overrides.items() if v is not None})
    lc = cfg.language_config
    pp = int(rc.get("pipeline_stages", 1))
    ep = int(rc.get("expert_parallel_size", 1))
    mbs = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    tb = ds.get("train_batch_size")
    if mbs is None:
        raise ConfigError("train_micro_batch_size_per_gpu is required by the planner")
    if world_size is not None:
        if world_size % pp:
            raise ConfigError(f"world size {world_size} is not a multiple of pipeline_stages={pp}")
        dp = world_size // pp
        gas = gas if gas is not None else (tb // (mbs * dp) if tb else 1)
        tb = tb if tb is not None else mbs * gas * dp
    else:
        if tb is None or gas is None:
            raise ConfigError("give --world-size, or train_batch_size and gradient_accumulation_steps in the JSON")
        if tb % (mbs * gas):
            raise ConfigError(f"train_batch_size={tb} is not a multiple of micro-batch {mbs} x GAS {gas}")
        dp = tb // (mbs * gas)
        world_size = dp * pp
    if mbs * gas * dp != tb:
        raise ConfigError(f"train_batch_size={tb} != micro-batch {mbs} x GAS {gas} x data parallel {dp} "
                          f"(world {world_size} / {pp} stages)")
    if dp % ep:
        raise ConfigError(f"expert_parallel_size={ep} must divide the data-parallel size {dp}")
    if lc.is_moe and lc.n_routed_experts % ep:
        raise ConfigError(f"expert_parallel_size={ep} must divide n_routed_experts={lc.n_routed_experts}")
    split = rc.get("decoder_split")
    split = None if split == "auto" else split
    parts = layout.stage_parts(cfg, pp, split)
    if split is None:
        first = layout.first_decoder_index(cfg)
        split = [parts[1] - first] + [parts[s + 1] - parts[s] for s in range(1, pp)]
        split[-1] -= 1
    freeze = dict(rc.get("freeze", {}) or {})
    unknown = sorted(set(freeze) - set(FREEZE_GROUPS))
    if unknown:
        raise ConfigError(f"recipe.freeze has unknown parts {unknown}; expected {FREEZE_GROUPS}")

    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    zero = int(ds.get("zero_optimization", {}).get("stage", 0))
    model_bytes = 2 if (bf16 or fp16) else 4
    accum = _dtype_bytes(ds.get("data_types", {}).get("grad_accum_dtype"), model_bytes)
    if zero > 1 and pp > 1:
        raise ConfigError(f"zero_optimization.stage={zero}: DeepSpeed's pipeline engine allows only ZeRO 0 and 1")
    if bf16 and accum == 4 and zero == 1:
        opt_name = "BF16_Optimizer"
    elif bf16 and zero == 0 and pp > 1:
        opt_name = "BF16_Optimizer"
    elif zero >= 1:
        opt_name = "DeepSpeedZeroOptimizer (approximate accounting)"
    else:
        opt_name = "unwrapped (approximate accounting)"
    comm = _dtype_bytes(ds.get("communication_data_type"), model_bytes)
    opt_type = str(ds.get("optimizer", {}).get("type", "adamw")).lower().replace("_", "")
    state_bytes = 4 + OPTIMIZER_STATE_BYTES.get(opt_type, 8)   # fp32 master + optimizer state
    return Topology(world_size=world_size, pipeline_stages=pp, data_parallel=dp, expert_parallel=ep, micro_batch=mbs,
                    grad_accum_steps=gas, train_batch=tb, decoder_split=list(split), parts=parts,
                    seq_len=int(seq_len or rc.get("max_seq_len") or lc.max_position_embeddings),
                    activation_checkpointing=bool(rc.get("activation_checkpointing", False)), freeze=freeze,
                    optimizer=opt_name, grad_accum_bytes=accum, comm_bytes=comm, optimizer_state_bytes=state_bytes)


# =================================================================================================================
# Memory per stage
# =================================================================================================================

@dataclass
class StagePlan:
    stage: int
    first_layer: int
    last_layer: int
    decoder_layers: int
    moe_layers: int
    # parameters held by each rank of the stage
    dense_params: int
    dense_trainable: int
    expert_params_stage: int        # all experts of the stage's MoE layers
    expert_params_rank: int         # this rank's E/EP experts
    expert_trainable_rank: int
    buffers: int
    # bytes per rank
    weights_bytes: int              # bf16 weights (trainable ones inside padded flat buffers) + fp32 buffers
    lp_grad_bytes: int              # bf16 .grad of every trainable parameter
    grad_accum_bytes: int           # flat gradient accumulation buffers (whole groups, not partitioned)
    master_bytes: int               # fp32 master partition
    optimizer_bytes: int            # optimizer state of the partition (Adam: exp_avg + exp_avg_sq)
    state_bytes: int                # sum of the five above
    activation_per_mb_bytes: int    # one micro-batch, no checkpointing
    activation_per_mb_ckpt_bytes: int  # one micro-batch, layer inputs kept (checkpointed layers)
    in_flight: int                  # micro-batches whose activations the 1F1B schedule holds at once
    activation_bytes: int           # peak activation memory with the configured checkpointing
    activation_bytes_other: int     # the same with the checkpointing switch flipped
    step_transient_bytes: int       # grad all-reduce cast copy + optimizer temporaries (after backward)
    peak_bytes: int
    fits: bool
    forward_flops_per_sample: float
    alltoall_bytes_per_step: int    # sent by one rank, MoE dispatch + combine, forward + backward (+ recompute)
    p2p_send_bytes_per_step: int    # activations to the next stage (forward) or gradients to the previous
    allreduce_bytes_per_step: int   # gradient all-reduce payload sent by one rank (ring)


@dataclass
class Plan:
    model: str
    ds_config: str
    topology: Topology
    workload: Workload
    device_memory_gb: float
    usable_fraction: float
    peak_tflops: float
    mfu: float
    total_params: int
    dense_params: int
    expert_params: int
    buffer_params: int
    trainable_params: int
    activated_params_per_token: int
    layer_params: list              # per pipeline layer: [index, kind, block, dense, expert, buffers]
    stages: list
    bubble_fraction: float
    stage_balance: float            # mean / max stage forward FLOPs
    vision_share: float             # ViT + projector + embed FLOPs in units of one MoE decoder layer
    flops_balanced_split: Optional[list]  # decoder split minimising the largest stage's forward FLOPs
    flops_per_sample: dict          # forward, by category
    train_flops_per_sample: float   # 3 x forward
    samples_per_s: float            # at `mfu`
    tokens_per_s: float
    reference_sps: float
    reference_mfu: float            # MFU implied by the original recipe's samples/s on the same device count
    warnings: list
    suggestions: list


def _padded(n: int, group: int) -> int:
    align = BF16_ALIGNMENT_FACTOR * group
    return -(-n // align) * align if n else 0


def _expert_groups(local_expert_tensors: list) -> list[int]:
    """Element counts of the MoE optimizer groups DeepSpeed forms from this rank's expert parameters."""
    groups, cur = [], 0
    for n in local_expert_tensors:
        if cur + n <= MOE_MAX_GROUP_SIZE:
            cur += n
        else:
            groups.append(cur)
            cur = n
    if cur:
        groups.append(cur)
    return groups


def stage_plan(cfg: VL2Config, infos: Sequence[LayerInfo], topo: Topology, stage: int, lo: int, hi: int,
               usable_bytes: float, workload: Workload) -> StagePlan:
    """Memory, FLOPs and communication of pipeline stage ``stage`` holding layers ``lo`` .. ``hi - 1``."""
    layers = infos[lo:hi]
    ep, dp, edp = topo.expert_parallel, topo.data_parallel, topo.expert_data_parallel
    dense = sum(l.dense for l in layers)
    dense_tr = dense - sum(l.dense_frozen for l in layers)
    expert_stage = sum(l.expert for l in layers)
    expert_rank = expert_stage // ep
    expert_tr_rank = (expert_stage - sum(l.expert_frozen for l in layers)) // ep
    buffers = sum(l.buffers for l in layers)
    local_tensors = []
    for l in layers:
        if l.expert and l.expert_frozen < l.expert:
            local_tensors += l.expert_tensor_numels * (l.expert // sum(l.expert_tensor_numels) // ep)
    groups = [(dense_tr, dp)] if dense_tr else []
    groups += [(n, edp) for n in _expert_groups(local_tensors)]
    padded = [(_padded(n, g), g) for n, g in groups]
    trainable = dense_tr + expert_tr_rank
    flat = sum(n for n, _ in padded)
    # + the router's per-expert token counter of every MoE layer (int64, runtime only, not in checkpoints)
    load_counters = 8 * sum(cfg.language_config.n_routed_experts for l in layers if l.is_moe)
    weights = 2 * (flat + (dense - dense_tr) + (expert_rank - expert_tr_rank)) + 4 * buffers + load_counters
    lp_grads = 2 * trainable
    accum = topo.grad_accum_bytes * flat
    partition = sum(n // g for n, g in padded)
    master = 4 * partition
    optim = (topo.optimizer_state_bytes - 4) * partition
    if not topo.optimizer.startswith("BF16_Optimizer"):
        accum = 4 * sum(n // g for n, g in padded)  # ZeRO-1 optimizer: an fp32 gradient partition
    states = weights + lp_grads + accum + master + optim

    in_flight = min(topo.pipeline_stages - stage, topo.grad_accum_steps)
    full = sum(l.act_full for l in layers)
    ckpt_keep = sum(l.act_input if l.kind in CHECKPOINTED_KINDS else l.act_full for l in layers)
    recompute = max([l.act_full for l in layers if l.kind in CHECKPOINTED_KINDS], default=0)
    lc = cfg.language_config
    T = workload.micro_batch * workload.seq_len
    boundary = ACT_BYTES * T * lc.hidden_size          # hidden states between stages
    pipe_buffers = boundary * ((stage > 0) + (stage < topo.pipeline_stages - 1))
    act_ckpt = in_flight * ckpt_keep + recompute + pipe_buffers
    act_full = in_flight * full + pipe_buffers
    act, other = (act_ckpt, act_full) if topo.activation_checkpointing else (act_full, act_ckpt)
    largest_group = max((n for n, _ in padded), default=0)
    comm_copy = topo.comm_bytes * largest_group if topo.comm_bytes != topo.grad_accum_bytes else 0
    transient = comm_copy + 4 * max((n // g for n, g in padded), default=0)
    peak = states + max(act, transient)

    moe_layers = sum(1 for l in layers if l.is_moe)
    a2a = 0
    if moe_layers and ep > 1:
        # DeepSpeed's MOELayer exchanges the whole [E, capacity, D] buffer: dispatch and combine, forward and
        # backward, and once more forward when the layer is recomputed
        payload = workload.moe_padding * T * lc.num_experts_per_tok * lc.hidden_size * ACT_BYTES
        ops = 4 + (2 if topo.activation_checkpointing else 0)
        a2a = int(moe_layers * topo.grad_accum_steps * ops * payload * (ep - 1) / ep)
    # forward: hidden states, int64 positions and segment ids, the fp32 aux scalar; backward: their float gradients
    to_next = boundary + 16 * T + 4 if stage < topo.pipeline_stages - 1 else 0
    to_previous = boundary + 4 if stage > 0 else 0
    p2p = topo.grad_accum_steps * (to_next + to_previous)
    # a ring all-reduce of n bytes over g ranks sends 2 (g - 1) / g x n bytes from each rank
    allreduce = sum(2 * (g - 1) * topo.comm_bytes * n // g for n, g in padded if g > 1)
    return StagePlan(
        stage=stage, first_layer=lo, last_layer=hi - 1,
        decoder_layers=sum(1 for l in layers if l.kind == layout.DECODER), moe_layers=moe_layers,
        dense_params=dense, dense_trainable=dense_tr, expert_params_stage=expert_stage, expert_params_rank=expert_rank,
        expert_trainable_rank=expert_tr_rank, buffers=buffers, weights_bytes=weights, lp_grad_bytes=lp_grads,
        grad_accum_bytes=accum, master_bytes=master, optimizer_bytes=optim, state_bytes=states,
        activation_per_mb_bytes=full, activation_per_mb_ckpt_bytes=ckpt_keep + recompute, in_flight=in_flight,
        activation_bytes=act, activation_bytes_other=other, step_transient_bytes=transient, peak_bytes=peak,
        fits=peak <= usable_bytes, forward_flops_per_sample=sum(l.flops for l in layers),
        alltoall_bytes_per_step=a2a, p2p_send_bytes_per_step=p2p, allreduce_bytes_per_step=allreduce)


# =================================================================================================================
# The plan
# =================================================================================================================

def plan(cfg: VL2Config, ds_config: dict, *, model_name: str = "", ds_name: str = "",
         world_size: Optional[int] = None, device_memory_gb: float = DEVICE_MEMORY_GB, usable_fraction: float = 0.92,
         peak_tflops: float = ATLAS_800T_A2_BF16_TFLOPS, mfu: float = 0.3, seq_len: Optional[int] = None,
         views: Optional[int] = None, moe_padding: float = 1.5, reference_sps: float = ORIGINAL_RECIPE_SPS,
         suggest: bool = True, **recipe_overrides) -> Plan:
    """Plan the run of ``cfg`` under ``ds_config`` (a DeepSpeed JSON with a ``recipe`` block).

    Args:
        world_size: devices; default train_batch_size / (micro-batch x GAS) x pipeline stages.
        device_memory_gb: memory per device in GiB; a stage fits when its peak stays under
            ``usable_fraction`` of it (the rest: HCCL buffers, workspaces, allocator fragmentation).
        peak_tflops: dense bf16 peak per device. mfu: the model-FLOPs utilisation to quote throughput at.
        seq_len: tokens per sample (default recipe.max_seq_len). views: ViT views per sample (default 10).
        moe_padding: DeepSpeed's dropless capacity buffer over the routed tokens (largest expert load / mean).
        recipe_overrides: replace keys of the ``recipe`` block (pipeline_stages=..., decoder_split=..., ...).
    """
    topo = topology(cfg, ds_config, world_size, seq_len, **recipe_overrides)
    lc = cfg.language_config
    work = Workload(micro_batch=topo.micro_batch, seq_len=topo.seq_len, views=views or 10, moe_padding=moe_padding)
    tensors = checkpoint_tensors(cfg)
    infos = layer_infos(cfg, work, topo.freeze, tensors)
    usable = device_memory_gb * GiB * usable_fraction
    stages = [stage_plan(cfg, infos, topo, s, topo.parts[s], topo.parts[s + 1], usable, work)
              for s in range(topo.pipeline_stages)]

    flops = flops_per_sample(cfg, work)
    train = 3 * flops["total"]
    peak = peak_tflops * 1e12
    sps = mfu * peak * topo.world_size / train
    ref_mfu = reference_sps * train / (peak * topo.world_size)
    stage_flops = [s.forward_flops_per_sample for s in stages]
    moe_layer_flops = next((l.flops for l in infos if l.kind == layout.DECODER and l.is_moe),
                           next(l.flops for l in infos if l.kind == layout.DECODER))
    vision_flops = sum(l.flops for l in infos if l.kind in (layout.EMBED, layout.VIT_BLOCK, layout.PROJECTOR))
    S, m = topo.pipeline_stages, topo.grad_accum_steps
    warnings = []
    for s in stages:
        if not s.fits:
            warnings.append(f"stage {s.stage} needs {s.peak_bytes / GiB:.1f} GiB per device, over the "
                            f"{usable / GiB:.1f} GiB usable of {device_memory_gb:g} GiB")
    if topo.comm_bytes < topo.grad_accum_bytes:
        warnings.append("gradients are accumulated in fp32 but all-reduced in bf16 (DeepSpeed's default "
                        "communication_data_type under bf16); set \"communication_data_type\": \"fp32\" to reduce in "
                        "fp32 and drop the bf16 copy of the largest gradient group")
    if not topo.optimizer.startswith("BF16_Optimizer"):
        warnings.append(f"optimizer wrapper {topo.optimizer}: state accounting is approximate")
    if not _moe_on_every_stage(stages, lc):
        warnings.append(f"stages {[s.stage for s in stages if not s.moe_layers]} hold no MoE layer: DeepSpeed 0.19.8's "
                        f"optimizer step sums the expert gradient norm over the pipeline group, which those stages "
                        f"never join, so the first step hangs (reproduced with PP=2 on CPU); give every stage an MoE "
                        f"layer")
    suggestions = []
    if suggest and any(not s.fits for s in stages):
        suggestions = suggest_layouts(cfg, ds_config, infos, topo, work, usable, world_size=topo.world_size)
    dense = sum(t.numel for t in tensors if not t.buffer and not t.expert)
    expert = sum(t.numel for t in tensors if t.expert)
    buffers = sum(t.numel for t in tensors if t.buffer)
    frozen = sum(l.dense_frozen + l.expert_frozen for l in infos)
    activated = _activated_params(cfg)
    return Plan(
        model=model_name, ds_config=ds_name, topology=topo, workload=work, device_memory_gb=device_memory_gb,
        usable_fraction=usable_fraction, peak_tflops=peak_tflops, mfu=mfu, total_params=dense + expert + buffers,
        dense_params=dense, expert_params=expert, buffer_params=buffers, trainable_params=dense + expert - frozen,
        activated_params_per_token=activated,
        layer_params=[[l.index, l.kind, l.block, l.dense, l.expert, l.buffers] for l in infos], stages=stages,
        bubble_fraction=(S - 1) / (m + S - 1), stage_balance=sum(stage_flops) / (S * max(stage_flops)),
        vision_share=vision_flops / moe_layer_flops,
        flops_balanced_split=flops_balanced_split(cfg, infos, topo.pipeline_stages),
        flops_per_sample=flops, train_flops_per_sample=train,
        samples_per_s=sps, tokens_per_s=sps * topo.seq_len, reference_sps=reference_sps, reference_mfu=ref_mfu,
        warnings=warnings, suggestions=suggestions)


def _moe_on_every_stage(stages: Sequence[StagePlan], lc) -> bool:
    return not lc.is_moe or len(stages) == 1 or all(s.moe_layers for s in stages)


def flops_balanced_split(cfg: VL2Config, infos: Sequence[LayerInfo], stages: int) -> Optional[list]:
    """Decoder layers per stage that minimise the largest stage's forward FLOPs (ViT, projector and embedding on
    stage 0, head on the last), every stage keeping at least one MoE layer when the model has experts."""
    first = layout.first_decoder_index(cfg)
    L = cfg.language_config.num_hidden_layers

    def cost(s, start, n):
        lo = 0 if s == 0 else first + start
        hi = first + start + n + (1 if s == stages - 1 else 0)
        return sum(l.flops for l in infos[lo:hi])

    split = _min_max_split(cost, L, stages)
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


def _activated_params(cfg: VL2Config) -> int:
    """Parameters one text token passes through (decoder + head; routed experts: K of E)."""
    lc = cfg.language_config
    n = 0
    for t in checkpoint_tensors(cfg):
        if t.name.startswith("language.") and not t.buffer and "embed_tokens" not in t.name:
            n += t.numel if not t.expert else 0
    per_expert = 3 * lc.hidden_size * lc.moe_intermediate_size if lc.is_moe else 0
    return n + len(lc.moe_layer_ids) * (lc.num_experts_per_tok or 0) * per_expert


def _min_max_split(cost, n_layers: int, stages: int) -> Optional[list]:
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


def suggest_layouts(cfg: VL2Config, ds_config: dict, infos, topo: Topology, work: Workload, usable: float,
                    world_size: int, limit: int = 3) -> list[dict]:
    """Layouts of the same devices and global batch whose every stage fits: pipeline stages, EP size, checkpointing,
    decoder split (the split minimising the largest stage memory). Best first by estimated step time."""
    lc = cfg.language_config
    L = lc.num_hidden_layers
    first = layout.first_decoder_index(cfg)
    found = []
    for pp in [d for d in range(1, min(world_size, L) + 1) if world_size % d == 0]:
        dp = world_size // pp
        if topo.train_batch % (topo.micro_batch * dp):
            continue
        for ep in [e for e in range(1, dp + 1) if dp % e == 0 and (not lc.is_moe or lc.n_routed_experts % e == 0)]:
            for ckpt in (False, True):
                trial = dataclasses.replace(topo, pipeline_stages=pp, data_parallel=dp, expert_parallel=ep,
                                            grad_accum_steps=topo.train_batch // (topo.micro_batch * dp),
                                            activation_checkpointing=ckpt)

                def cost(s, start, n, trial=trial, pp=pp):
                    lo = 0 if s == 0 else first + start
                    hi = first + start + n + (1 if s == pp - 1 else 0)
                    return stage_plan(cfg, infos, trial, s, lo, hi, usable, work).peak_bytes

                # the fastest split if it fits, else the one with the smallest largest stage
                for split in (flops_balanced_split(cfg, infos, pp), _min_max_split(cost, L, pp)):
                    if split is None:
                        continue
                    try:
                        parts = layout.stage_parts(cfg, pp, split)
                    except ConfigError:  # e.g. a stage without MoE layers, which would hang
                        continue
                    plans = [stage_plan(cfg, infos, trial, s, parts[s], parts[s + 1], usable, work)
                             for s in range(pp)]
                    if all(p.fits for p in plans) and _moe_on_every_stage(plans, lc):
                        break
                else:
                    continue
                m = trial.grad_accum_steps
                slowest = max(p.forward_flops_per_sample * (4 if ckpt else 3) for p in plans)
                step = slowest * (m + pp - 1)
                found.append({"pipeline_stages": pp, "expert_parallel_size": ep, "decoder_split": split,
                              "activation_checkpointing": ckpt, "gradient_accumulation_steps": m,
                              "peak_gib": round(max(p.peak_bytes for p in plans) / GiB, 1),
                              "relative_step_time": step})
    if not found:
        return []
    fastest = min(f["relative_step_time"] for f in found)
    for f in found:
        f["relative_step_time"] = round(f["relative_step_time"] / fastest, 3)
    return sorted(found, key=lambda f: (f["relative_step_time"], f["peak_gib"]))[:limit]


# =================================================================================================================
# Output
# =================================================================================================================

def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".strip()


def format_plan(p: Plan) -> str:
    t, w = p.topology, p.workload
    out = [f"# Plan: {p.model} with {p.ds_config}", ""]
    out.append(f"- {t.world_size} devices = PP {t.pipeline_stages} x DP {t.data_parallel}; EP {t.expert_parallel} "
               f"(expert-DP {t.expert_data_parallel}); micro-batch {t.micro_batch} x GAS {t.grad_accum_steps} x DP "
               f"= global batch {t.train_batch}")
    out.append(f"- decoder split {t.decoder_split} (pipeline parts {t.parts}); sequence {t.seq_len} tokens, "
               f"{w.views} ViT views per sample; activation checkpointing "
               f"{'on' if t.activation_checkpointing else 'off'}; MoE capacity padding x{w.moe_padding:g}")
    out.append(f"- optimizer {t.optimizer}: gradient accumulation {8 * t.grad_accum_bytes}-bit, all-reduce "
               f"{8 * t.comm_bytes}-bit, {t.optimizer_state_bytes} bytes of fp32 master + state per partitioned "
               f"parameter")
    out.append(f"- parameters {p.total_params:,} (dense {p.dense_params:,}, routed experts {p.expert_params:,}, "
               f"buffers {p.buffer_params:,}); trainable {p.trainable_params:,}; activated per text token "
               f"{p.activated_params_per_token:,}")
    out.append("")
    out.append(f"Per rank (every rank of a stage holds the same), GiB; device {p.device_memory_gb:g} GiB, usable "
               f"{p.usable_fraction:.0%}:")
    out.append("")
    out.append("| stage | layers | decoder (MoE) | dense params | expert params (rank / stage) | bf16 weights | "
               "bf16 grads | fp32 grad accum | fp32 master | optimizer | activations/mb (no ckpt / ckpt) | "
               "in flight | activations | step transient | peak | fits |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in p.stages:
        out.append(
            f"| {s.stage} | {s.first_layer}-{s.last_layer} | {s.decoder_layers} ({s.moe_layers}) | "
            f"{s.dense_params / 1e9:.3f} B | {s.expert_params_rank / 1e9:.3f} / {s.expert_params_stage / 1e9:.3f} B | "
            f"{_gib(s.weights_bytes)} | {_gib(s.lp_grad_bytes)} | {_gib(s.grad_accum_bytes)} | "
            f"{_gib(s.master_bytes)} | {_gib(s.optimizer_bytes)} | {_gib(s.activation_per_mb_bytes)} / "
            f"{_gib(s.activation_per_mb_ckpt_bytes)} | {s.in_flight} | {_gib(s.activation_bytes)} | "
            f"{_gib(s.step_transient_bytes)} | **{_gib(s.peak_bytes)}** | {'yes' if s.fits else 'NO'} |")
    out.append("")
    out.append(f"Pipeline bubble (1F1B, {t.pipeline_stages} stages, {t.grad_accum_steps} micro-batches): "
               f"{p.bubble_fraction:.1%}; stage balance (mean / max forward FLOPs): {p.stage_balance:.1%}; "
               f"vision side = {p.vision_share:.2f} MoE decoder layers of compute; FLOPs-balanced decoder split "
               f"{p.flops_balanced_split}.")
    out.append("")
    out.append("Communication per step, bytes sent by one rank:")
    out.append("")
    out.append("| stage | MoE all-to-all | stage-to-stage | gradient all-reduce |")
    out.append("|---|---|---|---|")
    for s in p.stages:
        out.append(f"| {s.stage} | {_human(s.alltoall_bytes_per_step, 'B')} | {_human(s.p2p_send_bytes_per_step, 'B')}"
                   f" | {_human(s.allreduce_bytes_per_step, 'B')} |")
    out.append("")
    f = p.flops_per_sample
    parts = ", ".join(f"{k} {_human(v, 'FLOP')}" for k, v in f.items() if k != "total")
    out.append(f"Model FLOPs per sample (forward): {parts}; total {_human(f['total'], 'FLOP')}; training (x3) "
               f"{_human(p.train_flops_per_sample, 'FLOP')}.")
    out.append(f"At MFU {p.mfu:.0%} of {p.peak_tflops:g} TFLOPS x {t.world_size} devices: "
               f"{p.samples_per_s:.2f} samples/s, {p.tokens_per_s:,.0f} tokens/s.")
    if p.reference_sps == ORIGINAL_RECIPE_SPS:
        if p.total_params == 27_480_134_248 and t.world_size == 32:
            out.append(f"The original recipe's {p.reference_sps:g} samples/s (base on 4 x 8 Atlas 800T A2) implies "
                       f"MFU {p.reference_mfu:.1%} under the same workload.")
    else:
        out.append(f"{p.reference_sps:g} samples/s on {t.world_size} devices implies MFU {p.reference_mfu:.1%} "
                   f"under the same workload.")
    for msg in p.warnings:
        out.append(f"WARNING: {msg}")
    if p.suggestions:
        out.append("")
        out.append("Layouts of the same devices and global batch that fit (best estimated step time first):")
        for sgg in p.suggestions:
            out.append(f"- pipeline_stages {sgg['pipeline_stages']}, expert_parallel_size "
                       f"{sgg['expert_parallel_size']}, decoder_split {sgg['decoder_split']}, "
                       f"activation_checkpointing {str(sgg['activation_checkpointing']).lower()}: peak "
                       f"{sgg['peak_gib']} GiB, step time x{sgg['relative_step_time']}")
    return "\n".join(out)


def resolve_model(model: str) -> tuple[str, VL2Config]:
    """A released size name (tiny / small / base) or a checkpoint directory / config.json path."""
    if model in RELEASED_SIZES:
        path = os.path.join(RELEASED_CONFIG_DIR, f"{model}.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: the released configs ship with the source tree; pass a checkpoint directory")
        return model, VL2Config.from_json(path)
    return model, VL2Config.from_json(model)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recipe.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--deepspeed", required=True, help="DeepSpeed JSON with the recipe block (ds_configs/ep8.json)")
    ap.add_argument("--model", default=None, help="tiny | small | base, or a checkpoint dir / config.json "
                                                  "(default: recipe.model_dir of the JSON)")
    ap.add_argument("--world-size", type=int, default=None,
                    help="devices (default: train_batch_size / (micro-batch x GAS) x pipeline stages)")
    ap.add_argument("--device-memory-gb", type=float, default=DEVICE_MEMORY_GB, help="memory per device, GiB")
    ap.add_argument("--usable-fraction", type=float, default=0.92,
                    help="share of device memory the model may use (rest: collective buffers, workspaces, "
                         "fragmentation)")
    ap.add_argument("--peak-tflops", type=float, default=ATLAS_800T_A2_BF16_TFLOPS,
                    help="dense bf16 peak per device (default: Atlas 800T A2 / Ascend 910B)")
    ap.add_argument("--mfu", type=float, default=0.3, help="model FLOPs utilisation to quote throughput at")
    ap.add_argument("--pipeline-stages", type=int, default=None, help="override recipe.pipeline_stages")
    ap.add_argument("--decoder-split", default=None,
                    help="override recipe.decoder_split: comma-separated layers per stage, or 'auto' (balanced)")
    ap.add_argument("--expert-parallel-size", type=int, default=None, help="override recipe.expert_parallel_size")
    ap.add_argument("--activation-checkpointing", choices=("on", "off"), default=None,
                    help="override recipe.activation_checkpointing")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: recipe.max_seq_len)")
    ap.add_argument("--views", type=int, default=10, help="ViT views per sample (1 global + local tiles)")
    ap.add_argument("--moe-padding", type=float, default=1.5,
                    help="DeepSpeed MoE capacity buffer over routed tokens (dropless: largest expert load / mean)")
    ap.add_argument("--reference-sps", type=float, default=ORIGINAL_RECIPE_SPS,
                    help="samples/s to convert into an MFU (default: the original recipe on 4 x 8 Atlas 800T A2)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    try:
        with open(args.deepspeed, encoding="utf-8") as f:
            ds = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: --deepspeed {args.deepspeed}: {e}", file=sys.stderr)
        return 2
    model = args.model or ds.get("recipe", {}).get("model_dir")
    if not model:
        print("error: give --model (tiny | small | base or a checkpoint dir)", file=sys.stderr)
        return 2
    overrides = {"pipeline_stages": args.pipeline_stages, "expert_parallel_size": args.expert_parallel_size}
    if args.decoder_split is not None:
        overrides["decoder_split"] = "auto" if args.decoder_split == "auto" else \
            [int(n) for n in args.decoder_split.split(",")]
    elif args.pipeline_stages is not None:
        overrides["decoder_split"] = "auto"
    if args.activation_checkpointing is not None:
        overrides["activation_checkpointing"] = args.activation_checkpointing == "on"
    try:
        name, cfg = resolve_model(model)
        p = plan(cfg, ds, model_name=name, ds_name=args.deepspeed, world_size=args.world_size,
                 device_memory_gb=args.device_memory_gb, usable_fraction=args.usable_fraction,
                 peak_tflops=args.peak_tflops, mfu=args.mfu, seq_len=args.seq_len, views=args.views,
                 moe_padding=args.moe_padding, reference_sps=args.reference_sps, **overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(p), indent=1) if args.json else format_plan(p))
    return 0 if all(s.fits for s in p.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
