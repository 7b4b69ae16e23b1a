"""Benchmark hf_to_ds (and ds_to_hf) on a synthetic multi-GB checkpoint: throughput beside a plain file copy of the
same bytes on the same disk, and peak resident memory beside the largest pipeline layer.

    python bench/convert.py                       # ~4.3 GB: base-sized vision + embeddings + 2 decoder layers
    python bench/convert.py --layers 3 --workdir /data/tmp

The synthetic checkpoint has the base model's real tensor shapes (SigLIP-SO400M, hidden 2560, 72 routed experts of
width 1536, vocabulary 129280) with fewer decoder layers, random bf16 values, written shard by shard straight from
the meta model's key list (nothing larger than a 512 MB random pool is held). Each measurement starts with the
source evicted from the page cache (posix_fadvise DONTNEED after fsync) and ends after ``os.sync()``, so copy and
conversion both pay for reading and writing the disk. The conversion runs in a child process; its peak RSS is the
child's VmHWM. Everything is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GB = 1e9


def bench_config(layers: int) -> dict:
    """The released base config (sparse, as on HF) with ``layers`` decoder layers (the first one dense)."""
    lang = {"hidden_size": 2560, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": layers,
            "n_routed_experts": 72, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.0,
            "n_group": 1, "topk_group": 1, "q_lora_rank": None, "vocab_size": 129280, "bos_token_id": 0,
            "eos_token_id": 1, "max_position_embeddings": 4096, "use_mla": True}
    return {"tile_tag": "2D", "global_view_pos": "head", "candidate_resolutions": [[384, 384]],
            "vision_config": {"model_name": "siglip_so400m_patch14_384", "image_size": 384, "patch_size": 14,
                              "width": 1152, "layers": 27, "heads": 16, "mlp_ratio": 3.7362, "global_pool": "map",
                              "ignore_head": True, "class_token": False, "num_classes": 0},
            "projector_config": {"projector_type": "downsample_mlp_gelu", "input_dim": 1152, "n_embed": 2560,
                                 "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2},
            "language_config": lang}


def write_synthetic(out: str, raw_config: dict, max_shard_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Write config.json, released-style bf16 shards and the index; returns (bytes, tensors)."""
    import torch

    from recipe.checkpoint.hf import SHARD_NAME
    from recipe.config import VL2Config
    from recipe.model import state_shapes as expected_shapes

    os.makedirs(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(raw_config, f, indent=2)
    shapes = expected_shapes(VL2Config.from_dict(raw_config))
    shards, cur, cur_bytes = [], [], 0
    for name, shape in shapes.items():
        n = 2 * _numel(shape)
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += n
    shards.append(cur)
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(256 * 2 ** 20, dtype=torch.bfloat16, generator=g).view(torch.uint8).numpy()
    weight_map, total = {}, 0
    for i, items in enumerate(shards):
        fname = SHARD_NAME.format(index=i + 1, total=len(shards))
        header, offset = {}, 0
        for name, shape in items:
            n = 2 * _numel(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(os.path.join(out, fname), "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for name, shape in items:
                _write_random(f, 2 * _numel(shape), pool, g)
                weight_map[name] = fname
        total += offset
        print(f"  wrote {fname} ({offset / GB:.2f} GB)", flush=True)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total, len(shapes)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_random(f, nbytes: int, pool, g) -> None:
    """``nbytes`` of random bf16 values: slices of the pool at random (even) offsets."""
    import torch
    while nbytes:
        start = int(torch.randint(0, len(pool) // 4, (1,), generator=g)) * 2
        n = min(nbytes, len(pool) - start)
        f.write(memoryview(pool[start:start + n]))
        nbytes -= n


def evict(paths) -> None:
    """Flush and drop ``paths`` from the page cache so the next read comes from the disk."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_in(d: str) -> list[str]:
    return sorted(os.path.join(d, f) for f in os.listdir(d))


def time_copy(src: str, dst: str) -> float:
    evict(files_in(src))
    os.makedirs(dst)
    t0 = time.perf_counter()
    for p in files_in(src):
        shutil.copyfile(p, os.path.join(dst, os.path.basename(p)))
    os.sync()
    return time.perf_counter() - t0


# Peak RSS is read from /proc/self/status (VmHWM): ru_maxrss would also count the parent's resident set, which a
# vfork()ed child inherits until exec.
_PEAK_RSS = """
def peak_rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
"""

_CHILD = _PEAK_RSS + """
import json, sys, time
t0 = time.perf_counter()
from recipe.checkpoint.{module} import {func}
start = time.perf_counter()
{call}
import os
os.sync()
print("RESULT", json.dumps({{"seconds": time.perf_counter() - t0, "work_seconds": time.perf_counter() - start,
                            "maxrss_kb": peak_rss_kb()}}))
"""


def run_child(func: str, call: str, evict_dir: str) -> dict:
    """Run ``call`` in a fresh interpreter; returns wall seconds (incl. start-up), seconds inside the call and
    the child's peak RSS."""
    evict(files_in(evict_dir))
    module = "converted" if func == "convert_hf_to_ds" else "export"
    code = _CHILD.format(module=module, func=func, call=call)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"child failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    out["wall"] = wall
    return out


def baseline_rss(config_dir: str) -> int:
    """Peak RSS (kB) of a child that only imports the converter and builds the meta model: the fixed overhead."""
    code = (_PEAK_RSS + "from recipe.config import VL2Config\nfrom recipe.model import "
            f"state_shapes\nstate_shapes(VL2Config.from_json({config_dir!r}))\nprint(peak_rss_kb())")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return int(r.stdout.split()[-1])


def spot_check(hf_dir: str, ds_dir: str) -> None:
    """A few tensors of the largest layer, read back from the layer file, equal the source bit for bit."""
    import torch

    from recipe.checkpoint.converted import load_manifest, read_layer
    from recipe.checkpoint.hf import iter_tensors
    m = load_manifest(ds_dir)
    big = max(m["layers"], key=lambda e: e["bytes"])
    got = read_layer(ds_dir, big["index"], expert_ids=[0, 71], manifest=m, verify=True)
    names = list(got)[:2] + list(got)[-2:]
    for name, t in iter_tensors(hf_dir, names):
        assert torch.equal(t, got[name]), name


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where to write (same disk for every step)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (2: ~4.3 GB, each more +1.8 GB)")
    p.add_argument("--shard-size", default="2GB", help="source shard size (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3,
                   help="alternate copy and conversion this many times and report the median and best of each "
                        "(other load on the machine makes single runs noisy; default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    a = p.parse_args(argv)

    from recipe.checkpoint.hf import parse_size
    from recipe.config import VL2Config
    from recipe.model import state_shapes as expected_shapes
    work = tempfile.mkdtemp(prefix="bench-convert-", dir=a.workdir)
    hf, copy, ds, back = (os.path.join(work, d) for d in ("hf", "copy", "ds", "hf_back"))
    try:
        raw = bench_config(a.layers)
        need = 3 * sum(2 * _numel(s) for s in expected_shapes(VL2Config.from_dict(raw)).values()) + 1e9
        free = shutil.disk_usage(work).free
        if free < need:  # source, converted and exported copies exist at the same time
            raise SystemExit(f"{work}: {free / GB:.1f} GB free, the benchmark needs about {need / GB:.0f} GB")
        print(f"writing the synthetic checkpoint into {hf} ...", flush=True)
        total, count = write_synthetic(hf, raw, parse_size(a.shard_size))
        print(f"  {total / GB:.2f} GB, {count} tensors; load average {os.getloadavg()[0]:.1f}", flush=True)

        copies, convs, exports = [], [], []
        for r in range(a.repeat):
            copies.append(time_copy(hf, copy))
            shutil.rmtree(copy)
            if os.path.exists(ds):
                shutil.rmtree(ds)
            convs.append(run_child("convert_hf_to_ds", f"convert_hf_to_ds({hf!r}, {ds!r}, progress=False)", hf))
            if os.path.exists(back):
                shutil.rmtree(back)
            exports.append(run_child("export_to_hf", f"export_to_hf({ds!r}, {back!r}, dtype=None, progress=False)",
                                     ds))
            print(f"  run {r + 1}: copy {total / GB / copies[-1]:.3f} GB/s, "
                  f"hf_to_ds {total / GB / convs[-1]['wall']:.3f} GB/s, "
                  f"ds_to_hf {total / GB / exports[-1]['wall']:.3f} GB/s "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        spot_check(hf, ds)
        with open(os.path.join(ds, "manifest.json")) as f:
            manifest = json.load(f)
        largest = max(manifest["layers"], key=lambda e: e["bytes"])
        base_kb = baseline_rss(hf)
        report(total, count, manifest, largest, copies, convs, exports, base_kb, work)
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(total, count, manifest, largest, copies, convs, exports, base_kb, work) -> None:
    import statistics

    def rate(seconds) -> tuple[float, float]:
        return statistics.median(total / GB / s for s in seconds), max(total / GB / s for s in seconds)

    copy_med, copy_best = rate(copies)
    rows = [("plain copy (shutil.copyfile + sync)", rate(copies), None),
            ("hf_to_ds end to end (child process, incl. start-up)", rate([c["wall"] for c in convs]),
             max(c["maxrss_kb"] for c in convs)),
            ("  of which convert_hf_to_ds() + sync", rate([c["work_seconds"] for c in convs]), None),
            ("ds_to_hf --dtype keep end to end", rate([e["wall"] for e in exports]),
             max(e["maxrss_kb"] for e in exports)),
            ("  of which export_to_hf() + sync", rate([e["work_seconds"] for e in exports]), None)]
    print()
    print(f"checkpoint: {total / GB:.2f} GB in {count} tensors, {len(manifest['layers'])} pipeline layers; largest "
          f"layer {largest['index']} ({largest['kind']}) = {largest['bytes'] / GB:.2f} GB; disk: {work}; "
          f"{len(copies)} alternating runs")
    print(f"{'step':<54} {'GB/s median':>11} {'best':>6} {'median vs copy':>15} {'peak RSS GB':>12}")
    for name, (med, best), rss in rows:
        rss_s = f"{rss * 1024 / GB:.2f}" if rss else ""
        print(f"{name:<54} {med:11.3f} {best:6.3f} {med / copy_med:15.2f} {rss_s:>12}")
    conv_rss = max(c["maxrss_kb"] for c in convs) * 1024
    limit = 2 * largest["bytes"] + 500e6
    print(f"\nhf_to_ds peak RSS {conv_rss / GB:.2f} GB = {conv_rss / largest['bytes']:.2f} x the largest layer "
          f"(import + meta model alone: {base_kb * 1024 / GB:.2f} GB); target < 2 x layer + 0.5 GB = "
          f"{limit / GB:.2f} GB: {'met' if conv_rss < limit else 'NOT met'}")
    conv_med = rate([c["wall"] for c in convs])[0]
    print(f"hf_to_ds throughput (median, end to end) {conv_med:.3f} GB/s = {conv_med / copy_med:.2f} x the copy's "
          f"{copy_med:.3f} GB/s; target >= 0.5: {'met' if conv_med / copy_med >= 0.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
