"""Packing vs padding: the same ai2d-like samples under three batching policies, PP=2 x DP=2 with EP=2 on CPU.

    python bench/packing.py [--steps 2] [--seq-len 4096]          # CPU, 4 ranks (gloo), ~10 min on 2 cores
    DS_ACCELERATOR=cuda python bench/packing.py --gpu              # one GPU: packed vs bucketed PP=1 step, bf16

Policies, each on micro-batch 1 x accumulation 2 x data-parallel 2 (4 rows per optimizer step):
  (a) original  every sample alone in a row padded to --seq-len (the original recipe's 4096 at micro-batch 1)
  (b) bucketed  every sample alone in a row padded to a multiple of 256 (seq_bucket before packing)
  (c) packed    recipe.data.packing: first-fit-decreasing rows of <= --seq-len tokens and <= 20 tiles (the default),
                attention within each segment (the default varlen path: on CPU the per-segment SDPA, which does the
                work a GPU/NPU varlen kernel does)
  (c') packed_masked  the same rows, attention with the [T, T] segment mask (RECIPE_ATTENTION=dense, the reference:
                it computes every score of the row)
The samples of (a) and (b) are exactly those the packed steps hold, in the same order, 4 per step; every policy
also runs one unmeasured warm-up step first. All three run in one 4-rank job on one engine, their steps
interleaved, so a shared machine's changing load affects them alike. Printed per policy: executed tokens per
sample (rows x row length / samples), real-token fraction (real / executed), samples/s and real tokens/s of the
train step (engine.train_batch, slowest rank), samples per row. Nothing is asserted.

The ai2d-like mix: image sizes and images per sample are bench/processor.py's (small diagrams to 2,500 px scans,
wide and tall strips; 86% one image, 5% text-only, 6% two, 3% three), the tile grid and image-token count of each
image come from the processor's own tiling (384-px tiles, 23 candidate resolutions, 14 tokens per side: 421 to 2,017
tokens per image), and the text is 40-140 tokens of question and options (ai2d's multiple-choice prompts) plus the
template and a one-letter answer: 500-2,200 tokens per sample, as ai2d's samples are. Samples hold random token ids
and pixel values (the cost of a step does not depend on them).

The model is bench/train_step.py's VL2-shaped one (hidden 256, 4 decoder layers with 16 experts top-4, ViT 4 x 128
on 384-px tiles), at full sequence length.

--gpu: a VL2-small-shaped model (small's widths: hidden 2048, MLA, 64 experts top-6, the full 27-layer SigLIP; a
few decoder layers, --decoder-layers) trained one step at a time in bf16 on one device, packed rows with the varlen
kernel vs bucketed rows (micro-batch 1), printing real tokens/s, MFU from the planner's FLOPs per token
(recipe.parallel.cost) and the device's peak memory. Written for CUDA; not run in this repository (no GPU here).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np
import torch
from driver import REPO, bench_config, pp2_ep2_engine, run_ranks, timed_train_batch  # bench/driver.py
from processor import COUNT_MIX, SIZE_MIX  # bench/processor.py: the ai2d-like image mix

POLICIES = ("original", "bucketed", "packed", "packed_masked")
DP, GAS, MBS = 2, 2, 1
ROWS_PER_STEP = DP * GAS * MBS
BUCKET = 256
MAX_TILES = 20


# --- the ai2d-like mix -----------------------------------------------------------------------------------------------

def tiler_384():
    from recipe.data.processor_config import ProcessorConfig
    from recipe.data.tiling import ImageTiler

    pc = ProcessorConfig()  # released defaults: 384-px tiles, the 23 candidate resolutions
    return ImageTiler(pc.candidate_resolutions, pc.image_size)


def ai2d_like(n: int, seed: int = 0, tokens_per_side: int = 14, max_tokens: int = 4096) -> list[dict]:
    """``n`` sample specs: text tokens and the (width_tiles, height_tiles) of each image, from the processor's own
    tiling of sizes drawn from bench/processor.py's mix. A draw over ``max_tokens`` (a few two-image samples of
    large scans) is drawn again, as the dataset replaces a sample whose one exchange does not fit."""
    rng = random.Random(seed)
    tiler = tiler_384()
    h = tokens_per_side
    sizes, size_w = zip(*SIZE_MIX)
    counts, count_w = zip(*COUNT_MIX)
    out = []
    i = 0
    while len(out) < n:
        i += 1
        k = rng.choices(counts, count_w)[0]
        crops = []
        for _ in range(k):
            w, hh = rng.choices(sizes, size_w)[0]
            size = (int(w * rng.uniform(0.85, 1.15)), int(hh * rng.uniform(0.85, 1.15)))
            crops.append(tiler.grid(size, cropping=k <= 2))
        text = rng.randint(40, 140) + 12  # question + options, plus BOS, role tags, answer letter, EOS
        image_tokens = sum(h * (h + 1) + 1 + (th * h) * (tw * h + 1) for tw, th in crops)
        if text + image_tokens <= max_tokens:
            out.append({"seed": seed * 1_000_003 + i, "text": text, "crops": crops, "tokens": text + image_tokens,
                        "tiles": sum(1 + tw * th for tw, th in crops)})
    return out


def materialise(spec: dict, cfg) -> dict:
    """A synthetic sample (recipe.tools.synthetic_batches' format) with the spec's lengths."""
    g = torch.Generator().manual_seed(spec["seed"])
    S, V = cfg.vision_config.image_size, cfg.language_config.vocab_size
    pieces, mask = [], []
    first = spec["text"] // 2
    pieces.append(torch.randint(3, V, (first,), generator=g))
    mask.append(torch.zeros(first, dtype=torch.bool))
    for w, h in spec["crops"]:
        k = cfg.num_image_tokens(w, h)
        pieces.append(torch.full((k,), 3))
        mask.append(torch.ones(k, dtype=torch.bool))
    rest = spec["text"] - first
    pieces.append(torch.randint(3, V, (rest,), generator=g))
    mask.append(torch.zeros(rest, dtype=torch.bool))
    ids, m = torch.cat(pieces), torch.cat(mask)
    labels = torch.full_like(ids, -100)
    labels[-2:] = ids[-2:]  # answer-only loss: the letter and EOS
    n_tiles = spec["tiles"]
    tiles = torch.rand(max(n_tiles, 1), 3, S, S, generator=g) * 2 - 1 if n_tiles else torch.zeros(1, 3, S, S)
    return dict(input_ids=ids, labels=labels, images_seq_mask=m, tiles=tiles, crop=spec["crops"] or [(0, 0)])


def plan_steps(specs: list, steps: int, seq_len: int) -> dict:
    """Per policy, ``steps`` optimizer steps (+ 1 warm-up), each ``ROWS_PER_STEP`` rows of sample indices: packed
    rows come from the recipe's packer; the original and bucketed policies take the same samples one per row."""
    from recipe.data.packing import first_fit_decreasing

    tokens = np.array([s["tokens"] for s in specs])
    tiles = np.array([s["tiles"] for s in specs])
    rows = [sorted(r) for r in first_fit_decreasing(tokens, tiles, seq_len, MAX_TILES)]
    rows.sort(key=lambda r: r[0])
    need = (steps + 1) * ROWS_PER_STEP
    if len(rows) < need:
        raise SystemExit(f"{len(specs)} samples pack into {len(rows)} rows; need {need}: raise --samples")
    rng = random.Random(1)
    rng.shuffle(rows)
    packed = [rows[k * ROWS_PER_STEP:(k + 1) * ROWS_PER_STEP] for k in range(steps + 1)]
    measured = [i for step in packed[1:] for row in step for i in row]
    warm = [i for row in packed[0] for i in row][:ROWS_PER_STEP]
    singles = [warm] + [measured[k:k + ROWS_PER_STEP] for k in range(0, len(measured), ROWS_PER_STEP)]
    singles = [[[i] for i in step] for step in singles if len(step) == ROWS_PER_STEP]
    return {"original": singles, "bucketed": singles, "packed": packed, "packed_masked": packed}


# --- one policy on 4 ranks -------------------------------------------------------------------------------------------

def run_policies(policies: list, steps: int, seq_len: int, samples: int, out: str) -> None:
    """One engine, the policies' steps interleaved round-robin (warm-up steps first), so that a machine whose load
    changes during the run slows every policy alike."""
    import torch.distributed as dist

    from recipe.parallel.dist import init_distributed
    from recipe.tools.synthetic_batches import collate, collate_packed

    init_distributed()
    torch.manual_seed(0)
    cfg = bench_config()
    specs = ai2d_like(samples)
    plans = plan_steps(specs, steps, seq_len)
    engine, module, run = pp2_ep2_engine(cfg, MBS, GAS)
    dp_rank = module.dp_rank
    order = [(policy, k) for k in range(max(len(plans[p]) for p in policies)) for policy in policies
             if k < len(plans[policy])]
    results = {policy: [] for policy in policies}
    for policy, k in order:
        step = plans[policy][k]
        pad = {"original": seq_len, "bucketed": BUCKET}.get(policy)
        if policy == "packed_masked":
            os.environ["RECIPE_ATTENTION"] = "dense"
        else:
            os.environ.pop("RECIPE_ATTENTION", None)
        micro = []
        for m in range(GAS):
            items = [materialise(specs[i], cfg) for i in step[m * DP + dp_rank]]
            micro.append(collate(items, pad_to_multiple=pad) if pad else collate_packed([items], BUCKET))
        seconds, counts = timed_train_batch(engine, run, micro, [sum(int((b["segment_ids"] > 0).sum()) for b in micro),
                                                                 sum(b["segment_ids"].numel() for b in micro)])
        dt = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if k:  # each policy's first step warms caches and allocators for its shapes
            results[policy].append({"time": float(dt), "samples": sum(len(r) for r in step), "rows": len(step),
                                    "real": float(counts[1]), "executed": float(counts[2])})
        if dist.get_rank() == 0:
            print(f"{policy} step {k}: {float(dt):.1f} s", flush=True)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def run_single(policies: list, steps: int, seq_len: int, samples: int) -> dict:
    """The same steps in one process (the plain model, torch AdamW): each policy's per-sample compute without the
    pipeline, the all-to-all or CPU oversubscription. Steps interleaved as in :func:`run_policies`."""
    from recipe.model import DeepseekVLV2ForCausalLM
    from recipe.tools.synthetic_batches import collate, collate_packed

    torch.manual_seed(0)
    cfg = bench_config()
    model = DeepseekVLV2ForCausalLM(cfg).train()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "attn_pool" not in n], lr=1e-4)
    specs = ai2d_like(samples)
    plans = plan_steps(specs, steps, seq_len)
    order = [(policy, k) for k in range(max(len(plans[p]) for p in policies)) for policy in policies
             if k < len(plans[policy])]
    results = {policy: [] for policy in policies}
    for policy, k in order:
        step = plans[policy][k]
        pad = {"original": seq_len, "bucketed": BUCKET}.get(policy)
        if policy == "packed_masked":
            os.environ["RECIPE_ATTENTION"] = "dense"
        else:
            os.environ.pop("RECIPE_ATTENTION", None)
        rows = [[materialise(specs[i], cfg) for i in row] for row in step]
        batches = [collate(r, pad_to_multiple=pad) if pad else collate_packed([r], BUCKET) for r in rows]
        t = time.perf_counter()
        for b in batches:
            (model(**b).loss / len(batches)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        if k:
            results[policy].append({"time": dt, "samples": sum(len(r) for r in step), "rows": len(step),
                                    "real": float(sum(int((b["segment_ids"] > 0).sum()) for b in batches)),
                                    "executed": float(sum(b["segment_ids"].numel() for b in batches))})
    os.environ.pop("RECIPE_ATTENTION", None)
    return results


def print_table(title: str, results: list) -> None:
    print(title)
    print(f"{'policy':14s} {'steps':>5s} {'samples':>7s} {'smp/row':>7s} {'exec tok/smp':>12s} {'real frac':>9s} "
          f"{'samples/s':>9s} {'real tok/s':>10s} {'s/step':>7s}")
    for r in results:
        print(f"{r['policy']:14s} {r['steps']:5d} {r['samples']:7d} {r['samples_per_row']:7.2f} "
              f"{r['executed_per_sample']:12.0f} {r['real_fraction']:9.3f} {r['samples_per_s']:9.3f} "
              f"{r['tokens_per_s']:10.0f} {r['step_s']:7.2f}")
    by = {r["policy"]: r for r in results}
    for mine in ("packed", "packed_masked"):
        for other in ("original", "bucketed"):
            if mine in by and other in by:
                print(f"{mine} / {other}: {by[mine]['samples_per_s'] / by[other]['samples_per_s']:.2f}x samples/s")


def summarise(policy: str, rows: list) -> dict:
    t = sum(r["time"] for r in rows)
    samples = sum(r["samples"] for r in rows)
    real, executed = sum(r["real"] for r in rows), sum(r["executed"] for r in rows)
    return {"policy": policy, "steps": len(rows), "samples": samples, "samples_per_row": samples / sum(
        r["rows"] for r in rows), "executed_per_sample": executed / samples, "real_fraction": real / executed,
        "samples_per_s": samples / t, "tokens_per_s": real / t, "step_s": t / len(rows)}


# --- GPU: packed vs bucketed PP=1 step (not run here) ----------------------------------------------------------

def small_shaped(decoder_layers: int):
    """VL2-small's shapes (recipe/released_configs/small.json) with ``decoder_layers`` decoder layers."""
    from recipe.config import VL2Config

    raw = json.load(open(os.path.join(REPO, "recipe", "released_configs", "small.json")))
    raw["language_config"]["num_hidden_layers"] = decoder_layers
    return VL2Config.from_dict(raw)


def run_gpu(decoder_layers: int, steps: int, seq_len: int, samples: int, peak_tflops: float) -> None:
    from deepspeed.accelerator import get_accelerator

    from recipe.model import DeepseekVLV2ForCausalLM
    from recipe.parallel.cost import Workload, flops_per_sample
    from recipe.tools.synthetic_batches import collate, collate_packed

    acc = get_accelerator()
    device = torch.device(acc.device_name(0))
    cfg = small_shaped(decoder_layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekVLV2ForCausalLM(cfg).to(torch.bfloat16).train()
    params = [p for n, p in model.named_parameters() if "attn_pool" not in n]
    opt = torch.optim.AdamW(params, lr=1e-5)
    specs = ai2d_like(samples)
    tokens = np.array([s["tokens"] for s in specs])
    tiles = np.array([s["tiles"] for s in specs])
    from recipe.data.packing import first_fit_decreasing

    packed_rows = first_fit_decreasing(tokens, tiles, seq_len, MAX_TILES)
    policies = {"bucketed": [[i] for i in range(len(specs))], "packed": packed_rows}
    print(f"VL2-small-shaped: {decoder_layers} decoder layers, bf16, {device}; micro-batch 1 row, "
          f"{steps} measured steps after 1 warm-up")
    for name, rows in policies.items():
        acc.reset_peak_memory_stats()
        done_tokens = done_samples = 0
        flops = 0.0
        elapsed = 0.0
        for k, row in enumerate(rows[:steps + 1]):
            items = [materialise(specs[i], cfg) for i in row]
            b = collate(items, pad_to_multiple=BUCKET) if name == "bucketed" else collate_packed([items], BUCKET)
            b = {key: v.to(device) for key, v in b.items()}
            b["images"] = b["images"].to(torch.bfloat16)
            acc.synchronize()
            t = time.perf_counter()
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            acc.synchronize()
            if k:
                elapsed += time.perf_counter() - t
                done_tokens += int((b["segment_ids"] > 0).sum())
                done_samples += len(row)
                for i in row:  # the planner's FLOPs of each sample, training = 3 x forward
                    s = specs[i]
                    flops += 3 * flops_per_sample(cfg, Workload(1, s["tokens"], s["tiles"], 1.0))["total"]
        mfu = flops / elapsed / (peak_tflops * 1e12)
        print(f"{name:9s} {done_tokens / elapsed:10.0f} real tokens/s  {done_samples / elapsed:7.2f} samples/s  "
              f"MFU {100 * mfu:5.1f}% (peak {peak_tflops:g} TFLOPS)  peak memory "
              f"{acc.max_memory_allocated() / 2 ** 30:.1f} GiB")


# --- main ------------------------------------------------------------------------------------------------------------

def mix_report(n: int = 12000, seq_len: int = 4096, window: int = 1024) -> dict:
    """Length statistics of the mix and first-fit-decreasing's fill over windows of ``window`` samples."""
    from recipe.data.packing import first_fit_decreasing

    specs = ai2d_like(n, seed=7)
    tokens = np.array([s["tokens"] for s in specs])
    tiles = np.array([s["tiles"] for s in specs])
    rows = filled = 0
    for a in range(0, n - window + 1, window):
        r = first_fit_decreasing(tokens[a:a + window], tiles[a:a + window], seq_len, MAX_TILES)
        rows += len(r)
        filled += int(tokens[a:a + window].sum())
    used = (n // window) * window
    return {"samples": n, "mean_tokens": float(tokens.mean()), "p10": float(np.percentile(tokens, 10)),
            "p90": float(np.percentile(tokens, 90)), "max_tokens": int(tokens.max()), "mean_tiles": float(tiles.mean()),
            "fill": filled / (rows * seq_len), "samples_per_row": used / rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2, help="measured steps of the packed policy")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--samples", type=int, default=200, help="samples drawn (the packed steps take the first rows)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--single", action="store_true", help="also run the same steps in one process")
    p.add_argument("--gpu", action="store_true", help="the one-device bf16 PP=1 benchmark (CUDA)")
    p.add_argument("--decoder-layers", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="--gpu: dense bf16 peak (H100 SXM: 989)")
    p.add_argument("--rank-policies", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="/tmp/bench_packing.json", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank_policies:
        return run_policies(a.rank_policies.split(","), a.steps, a.seq_len, a.samples, a.out)
    if a.gpu:
        return run_gpu(a.decoder_layers, a.steps, a.seq_len, a.samples, a.peak_tflops)
    mix = mix_report(seq_len=a.seq_len)
    print(f"ai2d-like mix ({mix['samples']} samples): {mix['mean_tokens']:.0f} tokens per sample (p10 "
          f"{mix['p10']:.0f}, p90 {mix['p90']:.0f}, max {mix['max_tokens']}), {mix['mean_tiles']:.2f} tiles; packed "
          f"to {a.seq_len} in windows of 1024: fill {100 * mix['fill']:.1f}%, {mix['samples_per_row']:.2f} samples/row")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    policies = a.policies.split(",")
    t = time.time()
    run_ranks(__file__, 4, ["--rank-policies", ",".join(policies), "--steps", str(a.steps), "--seq-len",
                            str(a.seq_len), "--samples", str(a.samples), "--out", a.out], env)
    got = json.load(open(a.out))
    results = [summarise(policy, got[policy]) for policy in policies]
    print(f"(4-rank run: {time.time() - t:.0f} s)")
    print_table(f"\nPP=2 x DP=2, EP=2 on 4 CPU processes; micro-batch 1 x accumulation 2 x DP 2 = 4 rows per step; "
                f"row length {a.seq_len}", results)
    if a.single:
        torch.set_num_threads(1)
        got = run_single(policies, a.steps, a.seq_len, a.samples)
        print_table("\nThe same steps in one process (plain model, 4 rows per step, no pipeline):",
                    [summarise(policy, got[policy]) for policy in policies])


if __name__ == "__main__":
    main()
