"""Data-pipeline throughput on one CPU core: the processor, the dataset path (decode + process), collator padding
waste, and prepare_ai2d.py.

    python bench/processor.py [--samples 300] [--seconds 20] [--out results.json]

The processor is the real one (384-px tiles, 23 candidate resolutions, the "deepseek" template) with the tiny
checkpoint's tokenizer (text tokenisation is a few percent of the cost; the image resize and normalisation
dominate). Images follow an ai2d-like mix of sizes (small diagrams to 2500 px scans, wide and tall strips),
mostly one image per sample, some text-only, 2- and 3-image samples. The figures are compared with what the
seed cluster consumes: 4.924 samples/s over 32 devices (PP=2 x DP=16), where the first and the last pipeline
stage of each replica both read every sample of their replica. prepare_ai2d.py is timed on the same records
(InternVL format), with the full decode check on 1 and 2 processes, and without it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from recipe.data import Collator, DeepseekVLV2Processor, load_image
from recipe.prepare_ai2d import prepare
from recipe.tools.make_tiny import make_tiny

SEED_CLUSTER_SPS = 4.924
SEED_DEVICES, SEED_DP = 32, 16
# ai2d-like image sizes (width, height) and weights.
SIZE_MIX = [((150, 120), 8), ((400, 300), 18), ((640, 480), 20), ((800, 600), 16), ((1024, 768), 14),
            ((1200, 400), 6), ((400, 1200), 6), ((1600, 1200), 8), ((2500, 2000), 4)]
# images per sample and weights
COUNT_MIX = [(0, 5), (1, 86), (2, 6), (3, 3)]


def diagram(rng: random.Random, w: int, h: int) -> Image.Image:
    """A diagram-like picture: white background, shapes, lines, some noise (so PNG decoding does real work)."""
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = min(w - 1, x0 + rng.randrange(1, w // 3 + 2)), min(h - 1, y0 + rng.randrange(1, h // 3 + 2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=colour)
        d.line((rng.randrange(w), rng.randrange(h), rng.randrange(w), rng.randrange(h)), fill=(0, 0, 0), width=2)
    arr = np.asarray(img).copy()
    arr[:: 7, :: 5] = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, arr[:: 7, :: 5].shape)
    return Image.fromarray(arr)


def make_samples(n: int, root: str, seed: int = 0) -> list:
    """n conversations with images written as PNG under root: [(messages, [paths])]."""
    rng = random.Random(seed)
    sizes, size_w = zip(*SIZE_MIX)
    counts, count_w = zip(*COUNT_MIX)
    samples = []
    for i in range(n):
        k = rng.choices(counts, count_w)[0]
        paths = []
        for j in range(k):
            w, h = rng.choices(sizes, size_w)[0]
            w, h = int(w * rng.uniform(0.85, 1.15)), int(h * rng.uniform(0.85, 1.15))
            p = os.path.join(root, f"{i:05d}_{j}.png")
            diagram(rng, w, h).save(p, compress_level=6)
            paths.append(p)
        q = "".join("<image>\n" for _ in paths) + "Which label marks the stem of the plant?\nA. A\nB. B\nC. C\n" \
            "D. D\nAnswer with the option's letter from the given choices directly."
        samples.append(([{"role": "<|User|>", "content": q}, {"role": "<|Assistant|>", "content": "C"}], paths))
    return samples


def timed_loop(fn, items, seconds: float):
    """Run fn over items (cycling) for about ``seconds``; returns (calls, wall seconds, CPU seconds of this
    process). On a shared machine the CPU time is the fairer one-core figure (everything here is single-threaded)."""
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    while True:
        fn(items[n % len(items)])
        n += 1
        el = time.perf_counter() - t0
        if el >= seconds and n >= len(items) // 4:
            return n, el, time.process_time() - c0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=300, help="distinct samples in the mix (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=20, help="time per measurement (default: %(default)s)")
    p.add_argument("--out", default=None, help="also write the figures as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # one core
    res = {"torch_threads": torch.get_num_threads(), "pillow": Image.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny(os.path.join(tmp, "ckpt"), image_size=384, dtype=torch.float32)
        proc = DeepseekVLV2Processor.from_pretrained(ckpt, mask_prompt=True)
        print(f"generating {a.samples} samples ...", flush=True)
        os.makedirs(os.path.join(tmp, "img"))
        samples = make_samples(a.samples, os.path.join(tmp, "img"))
        n_img = sum(len(s[1]) for s in samples)
        decoded = [(m, [load_image(x) for x in paths]) for m, paths in samples]
        res["mix"] = {"samples": len(samples), "images": n_img,
                      "mean_pixels": float(np.mean([w * h for _, ims in decoded for w, h in (i.size for i in ims)]))}

        outs = [proc(conversations=m, images=ims, inference_mode=False) for m, ims in decoded]
        res["mean_tiles_per_sample"] = float(np.mean([o.images.shape[0] for o in outs]))
        res["mean_tokens_per_sample"] = float(np.mean([len(o) for o in outs]))

        calls, el, cpu = timed_loop(lambda s: proc(conversations=s[0], images=s[1], inference_mode=False), decoded,
                                    a.seconds)
        res["processor_samples_per_s"] = calls / el
        res["processor_images_per_s"] = calls / el * n_img / len(samples)
        res["processor_samples_per_cpu_s"] = calls / cpu
        res["processor_images_per_cpu_s"] = calls / cpu * n_img / len(samples)

        def load_and_process(s):
            proc(conversations=s[0], images=[load_image(x) for x in s[1]], inference_mode=False)
        calls, el, cpu = timed_loop(load_and_process, samples, a.seconds)
        res["decode_and_process_samples_per_s"] = calls / el
        res["decode_and_process_images_per_s"] = calls / el * n_img / len(samples)
        res["decode_and_process_samples_per_cpu_s"] = calls / cpu
        res["decode_and_process_images_per_cpu_s"] = calls / cpu * n_img / len(samples)

        # Collator padding waste, micro-batch 1 (the seed cluster) and 4, bucket 64.
        for mb in (1, 4):
            col = Collator(proc.pad_id, seq_bucket=64)
            rng = random.Random(0)
            order = list(range(len(outs)))
            rng.shuffle(order)
            real = padded = 0
            for k in range(0, len(order) - mb + 1, mb):
                b = col([{"input_ids": outs[i].input_ids, "target_ids": outs[i].target_ids,
                          "images": outs[i].images, "images_seq_mask": outs[i].images_seq_mask,
                          "images_spatial_crop": outs[i].images_spatial_crop} for i in order[k:k + mb]])
                real += b["num_real_tokens"]
                padded += b["num_padded_tokens"]
            res[f"padding_ratio_mb{mb}_bucket64"] = padded / (real + padded)

        # prepare_ai2d.py throughput on the same ai2d-like records (InternVL format, paths relative to the root).
        inp = os.path.join(tmp, "internvl.jsonl")
        with open(inp, "w") as f:
            for i, (msgs, paths) in enumerate(samples):
                rec = {"id": i, "conversations": [{"from": "human", "value": msgs[0]["content"]},
                                                  {"from": "gpt", "value": msgs[1]["content"]}]}
                if paths:
                    rec["images"] = [os.path.relpath(x, tmp) for x in paths]
                f.write(json.dumps(rec) + "\n")
        for workers, decode in ((1, True), (2, True), (1, False)):
            t0 = time.perf_counter()
            rep = prepare(inp, tmp, os.path.join(tmp, f"out{workers}{decode}.jsonl"), num_workers=workers,
                          decode_check=decode, chunk_lines=16, progress=False)
            el = time.perf_counter() - t0
            assert rep["valid"] == len(samples), rep["invalid_by_reason"]
            res[f"prepare_records_per_s_workers{workers}_{'decode' if decode else 'nodecode'}"] = rep["valid"] / el

    per_replica = SEED_CLUSTER_SPS / SEED_DP
    res["seed_cluster_samples_per_s"] = SEED_CLUSTER_SPS
    res["seed_cluster_samples_per_s_per_loading_process"] = per_replica
    res["margin_one_core_vs_one_loading_process"] = res["decode_and_process_samples_per_s"] / per_replica
    res["margin_one_core_vs_whole_cluster"] = res["decode_and_process_samples_per_s"] / SEED_CLUSTER_SPS
    res["load_average_1min"] = os.getloadavg()[0]  # > 1 on a shared machine: wall-clock figures are pessimistic

    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
