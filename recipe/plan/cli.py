"""Capacity planner: memory per pipeline stage and rank, communication, FLOPs and throughput of a run.

    python -m recipe.plan --deepspeed ds_configs/ep8.json --model base            # a released size, or a checkpoint dir
    python -m recipe.plan --deepspeed ds_configs/ep8.json --model base --json     # machine-readable

This module reads the arguments and prints the plan as Markdown tables or JSON; what the figures assume is in
``docs/planner.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from recipe.config import ConfigError, VL2Config
from recipe.plan.memory import GiB
from recipe.plan.planner import (
    AI2D_SAMPLE_TOKENS,
    AI2D_SAMPLE_VIEWS,
    ATLAS_800T_A2_BF16_TFLOPS,
    DEVICE_MEMORY_GB,
    ORIGINAL_RECIPE_DEVICES,
    ORIGINAL_RECIPE_MODEL,
    ORIGINAL_RECIPE_SPS,
    PACKING_FILL,
    Plan,
    plan,
)

RELEASED_SIZES = ("tiny", "small", "base")
RELEASED_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "released_configs")


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".strip()


def format_plan(p: Plan, released: Optional[str] = None) -> str:
    """The plan as Markdown; ``released`` names the released model planned (:func:`released_size`), so the
    original recipe's samples/s are quoted only for the model and devices they were measured on."""
    t, w = p.topology, p.workload
    out = [f"# Plan: {p.model} with {p.ds_config}", ""]
    out.append(f"- {t.world_size} devices = PP {t.pipeline_stages} x DP {t.data_parallel}; EP {t.expert_parallel} "
               f"(expert-DP {t.expert_data_parallel}); micro-batch {t.micro_batch} x GAS {t.grad_accum_steps} x DP "
               f"= global batch {t.train_batch}")
    if p.packing:
        out.append(f"- decoder split {t.decoder_split} (pipeline parts {t.parts}); packed rows of {t.seq_len} tokens "
                   f"and <= {w.views:g} ViT views each (memory is planned for such a full row); activation "
                   f"checkpointing {'on' if t.activation_checkpointing else 'off'}; "
                   f"MoE capacity padding x{w.moe_padding:g}")
        out.append(f"- packing: the average row holds {p.samples_per_row:.2f} samples of {p.sample_tokens:,.0f} real "
                   f"tokens (ai2d-like mix, bench/packing.py; --sample-tokens, --sample-views, --fill), so a step of "
                   f"{t.train_batch} rows trains about {p.samples_per_step:,.0f} samples")
    else:
        out.append(f"- decoder split {t.decoder_split} (pipeline parts {t.parts}); sequence {t.seq_len} tokens, "
                   f"{w.views:g} ViT views per sample; activation checkpointing "
                   f"{'on' if t.activation_checkpointing else 'off'}; MoE capacity padding x{w.moe_padding:g}")
    out.append(f"- optimizer {t.optimizer}: gradient accumulation {8 * t.grad_accum_bytes}-bit, all-reduce "
               f"{8 * t.comm_bytes}-bit, {t.optimizer_state_bytes} bytes of fp32 master + state per partitioned "
               f"parameter")
    out.append(f"- parameters {p.total_params:,} (dense {p.dense_params:,}, routed experts {p.expert_params:,}, "
               f"buffers {p.buffer_params:,}); trainable {p.trainable_params:,}; activated per text token "
               f"{p.activated_params_per_token:,}")
    if t.lora is not None:
        lora = t.lora
        out.append(f"- LoRA rank {lora.get('rank', 8)}, alpha {lora.get('alpha', 16):g}: {p.lora_params:,} adapter "
                   f"parameters train (fp32 master + optimizer state for them only); the base is frozen bf16 weights "
                   f"without gradients or optimizer state")
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
    what = "real sample" if p.packing else "sample"
    out.append(f"Model FLOPs per {what} (forward): {parts}; total {_human(f['total'], 'FLOP')}; training (x3) "
               f"{_human(p.train_flops_per_sample, 'FLOP')}.")
    out.append(f"At MFU {p.mfu:.0%} of {p.peak_tflops:g} TFLOPS x {t.world_size} devices: "
               f"{p.samples_per_s:.2f} samples/s, {p.tokens_per_s:,.0f} real tokens/s"
               + (f" ({p.samples_per_row:.2f} samples per packed row)." if p.packing else "."))
    padded = (f"every sample padded to {t.seq_len} tokens with 10 views: "
              f"{_human(3 * p.reference_flops_per_sample, 'FLOP')} of training work per sample")
    if p.reference_sps == ORIGINAL_RECIPE_SPS:
        if released == ORIGINAL_RECIPE_MODEL and t.world_size == ORIGINAL_RECIPE_DEVICES:
            out.append(f"The original recipe's {p.reference_sps:g} samples/s (base on 4 x 8 Atlas 800T A2, {padded}) "
                       f"implies MFU {p.reference_mfu:.1%}"
                       + (f"; counting only the real work of the samples planned here, {p.reference_real_mfu:.1%}."
                          if p.packing else "."))
    else:
        out.append(f"{p.reference_sps:g} samples/s on {t.world_size} devices ({padded}) implies MFU "
                   f"{p.reference_mfu:.1%}" + (f"; on the real work of the samples planned here, "
                                               f"{p.reference_real_mfu:.1%}." if p.packing else "."))
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


def _released_json(name: str) -> str:
    return os.path.join(RELEASED_CONFIG_DIR, f"{name}.json")


def resolve_model(model: str) -> tuple[str, VL2Config]:
    """A released size name (tiny / small / base) or a checkpoint directory / config.json path."""
    if model in RELEASED_SIZES:
        path = _released_json(model)
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: the released configs ship with the source tree; pass a checkpoint directory")
        return model, VL2Config.from_json(path)
    return model, VL2Config.from_json(model)


def released_size(cfg: VL2Config) -> Optional[str]:
    """The released size (tiny / small / base) whose shipped config ``cfg`` equals, else None. Keys the recipe does
    not read (``extra``: HF bookkeeping such as ``transformers_version``) do not count, so a re-saved checkpoint of a
    released model is still recognised."""
    def known(c: VL2Config) -> VL2Config:
        subs = {k: dataclasses.replace(getattr(c, k), extra={})
                for k in ("vision_config", "projector_config", "language_config")}
        return dataclasses.replace(c, extra={}, **subs)

    for name in RELEASED_SIZES:
        path = _released_json(name)
        if os.path.isfile(path) and known(VL2Config.from_json(path)) == known(cfg):
            return name
    return None


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
    ap.add_argument("--views", type=int, default=10,
                    help="without packing: ViT views per sample (1 global + local tiles)")
    ap.add_argument("--packing", choices=("on", "off"), default=None, help="override recipe.packing")
    ap.add_argument("--sample-tokens", type=float, default=AI2D_SAMPLE_TOKENS,
                    help="packing: mean real tokens per sample (default: bench/packing.py's ai2d-like mix)")
    ap.add_argument("--sample-views", type=float, default=AI2D_SAMPLE_VIEWS,
                    help="packing: mean ViT views per sample (same mix)")
    ap.add_argument("--fill", type=float, default=PACKING_FILL,
                    help="packing: share of a row's tokens the packer fills (first-fit-decreasing, same mix)")
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
    if args.packing is not None:
        overrides["packing"] = args.packing == "on"
    try:
        name, cfg = resolve_model(model)
        p = plan(cfg, ds, model_name=name, ds_name=args.deepspeed, world_size=args.world_size,
                 device_memory_gb=args.device_memory_gb, usable_fraction=args.usable_fraction,
                 peak_tflops=args.peak_tflops, mfu=args.mfu, seq_len=args.seq_len, views=args.views,
                 moe_padding=args.moe_padding, reference_sps=args.reference_sps, sample_tokens=args.sample_tokens,
                 sample_views=args.sample_views, fill=args.fill, **overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(p), indent=1) if args.json else format_plan(p, released_size(cfg)))
    return 0 if all(s.fits for s in p.stages) else 1
