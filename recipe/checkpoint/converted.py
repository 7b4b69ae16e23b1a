"""The converted layout: one file per pipeline layer, written by ``converters/hf_to_ds.py`` from an HF checkpoint.

``layer_XX-model_00-model_states.pt`` per pipeline layer (``layout.build_layout`` numbering) holds that layer's
tensors under their FULL HF names (routed experts by global id), beside the HF side files and ``manifest.json``
(written last: its presence marks a complete conversion; it records shapes, dtypes and a sha256 per tensor). The
layout does not depend on the PP split or the EP size: each rank reads its layers and its experts with
:func:`read_layer`, which checks every tensor it returns against the manifest. ``docs/checkpoints.md`` has the
schema.

Conversion streams: the source shards are mapped copy-on-write layer by layer and written out without an
intermediate copy, so memory stays at about one pipeline layer; the output directory appears only when complete.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional

import torch

from recipe.checkpoint import CheckpointError
from recipe.checkpoint.dtypes import DtypeArg, dtype_name, parse_dtype, spec_nbytes
from recipe.checkpoint.files import atomic_output_dir, byte_progress, check_output_dir, load_torch, resolve_inside
from recipe.checkpoint.hf import INDEX_NAME, SINGLE_NAME, TensorSource, copy_side_files, map_hf_tensors, scan_hf
from recipe.checkpoint.validate import check_against_config
from recipe.config import VL2Config
from recipe.model import state_shapes
from recipe.parallel import layout

logger = logging.getLogger(__name__)

FORMAT_NAME = "dsvl2-pipeline-layers"
# Bump when the layer files or the manifest change incompatibly; readers refuse newer versions.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (C order, native little-endian), the checksum the manifest stores."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(memoryview(flat.view(torch.uint8).numpy())).hexdigest()


def cast_floating(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Cast floating tensors to ``dtype`` (None keeps them); integer tensors are never cast."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is contiguous and alone in its storage, else a compact copy (torch.save writes whole
    storages, so a view would drag its neighbours into the file)."""
    if t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.contiguous().clone()


def _source_summary(hf_dir: str, weight_map: dict) -> dict:
    """What the manifest records about the source checkpoint."""
    files = {f: os.path.getsize(os.path.join(hf_dir, f)) for f in sorted(set(weight_map.values()))}
    cfg_path = os.path.join(hf_dir, "config.json")
    with open(cfg_path, "rb") as f:
        cfg_sha = hashlib.sha256(f.read()).hexdigest()
    return {"path": hf_dir, "index": INDEX_NAME if os.path.exists(os.path.join(hf_dir, INDEX_NAME)) else SINGLE_NAME,
            "files": files, "config_sha256": cfg_sha}


def _layer_entry(layer: layout.PipeLayer, cfg: VL2Config) -> dict:
    entry = {"index": layer.index, "kind": layer.kind, "block": layer.block, "is_moe": layer.is_moe,
             "file": layout.ckpt_layer_file(layer.index), "hf_prefixes": list(layer.hf_prefixes)}
    if layer.is_moe:
        entry["num_experts"] = cfg.language_config.n_routed_experts
    return entry


def convert_hf_to_ds(hf_dir: str, out_dir: str, dtype: DtypeArg = None, overwrite: bool = False,
                     progress: bool = True) -> dict:
    """Convert a DeepSeek-VL2 HF checkpoint into the split-independent pipeline layer layout.

    Args:
        hf_dir: released-layout checkpoint (config.json + sharded or single-file safetensors), any size.
        out_dir: output directory; must not exist unless ``overwrite``. Appears only when complete.
        dtype: None keeps each tensor's stored dtype; otherwise floating tensors are cast (bf16 / fp32 / fp16).
        overwrite: replace an existing ``out_dir`` (only after the new one is complete).
        progress: show a tqdm bar (bytes, tensors).

    Returns the manifest (also written to ``out_dir/manifest.json``).

    Raises :class:`CheckpointError` (a message naming the file or key) when config.json and the tensors disagree,
    a key is missing or extra, or a shard is truncated or corrupt; ``FileExistsError`` for an existing ``out_dir``.
    Nothing is written before the source checks pass.
    """
    t0 = time.perf_counter()
    hf_dir, out_dir = check_output_dir(hf_dir, out_dir, overwrite)
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such directory")
    dtype = parse_dtype(dtype)
    cfg = VL2Config.from_json(hf_dir)
    weight_map, sources = scan_hf(hf_dir)
    expected = check_against_config(cfg, {k: s.shape for k, s in sources.items()},
                                    lambda k: os.path.join(hf_dir, weight_map[k]), hf_dir, state_shapes(cfg))
    layers = layout.build_layout(cfg)
    groups = layout.keys_by_layer(cfg, expected)
    out_nbytes = {k: _out_nbytes(sources[k], dtype) for k in expected}
    total = sum(out_nbytes.values())
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "created_by": "recipe.checkpoint.converted.convert_hf_to_ds",
                "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "source": _source_summary(hf_dir, weight_map),
                "dtype": None, "cast_to": dtype_name(dtype) if dtype is not None else None,
                "num_layers": len(layers), "num_tensors": len(expected), "total_bytes": total,
                "side_files": [], "layers": []}
    logger.info("converting %s (%d tensors, %.2f GB) into %d pipeline layer files at %s",
                hf_dir, len(expected), total / 1e9, len(layers), out_dir)
    bar = byte_progress(total, len(expected), "hf->ds", progress)
    done = 0
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp, ThreadPoolExecutor(1, "sha256") as hasher:
        for layer in layers:
            names = groups.get(layer.index, [])
            entry = _layer_entry(layer, cfg)
            entry.update(_write_layer(hf_dir, tmp, entry["file"], [sources[n] for n in names], dtype,
                                      lambda n, nb: bar.update(nb), hasher))
            done += entry["num_tensors"]
            bar.set_postfix_str(f"{done}/{len(expected)} tensors, layer {layer.index}/{len(layers) - 1}",
                                refresh=False)
            manifest["layers"].append(entry)
        manifest["side_files"] = copy_side_files(hf_dir, tmp)
        dtypes = {t["dtype"] for e in manifest["layers"] for t in e["tensors"].values()}
        manifest["dtype"] = dtypes.pop() if len(dtypes) == 1 else "mixed"
        _write_json(os.path.join(tmp, MANIFEST_NAME), manifest)  # last: its presence marks a complete layout
    bar.close()
    dt = time.perf_counter() - t0
    logger.info("wrote %s: %d layers, %d tensors, %.2f GB in %.1f s (%.2f GB/s)", out_dir, len(layers),
                len(expected), total / 1e9, dt, total / 1e9 / max(dt, 1e-9))
    return manifest


def _out_nbytes(s: TensorSource, dtype: Optional[torch.dtype]) -> int:
    if dtype is None or not s.dtype.is_floating_point:
        return s.nbytes
    return spec_nbytes((s.shape, dtype))


def _write_layer(hf_dir: str, out_dir: str, fname: str, sources: list, dtype: Optional[torch.dtype],
                 on_tensor: Callable[[str, int], None], hasher: Executor) -> dict:
    """Read one layer's tensors, cast, checksum and save them as ``fname``; returns the manifest fields.

    Checksums run on ``hasher`` (a worker thread; hashlib and file reads release the GIL), overlapping the reads
    of the next tensors and the ``torch.save``; all of them finish before this returns, so memory stays at one
    layer."""
    tensors, digests = {}, {}
    for name, t in map_hf_tensors(hf_dir, sources):
        t = _own_storage(cast_floating(t, dtype))
        tensors[name] = t
        digests[name] = hasher.submit(tensor_sha256, t)
        on_tensor(name, t.numel() * t.element_size())
    order = [s.name for s in sources]  # model order, not file order
    tensors = {n: tensors[n] for n in order}
    path = os.path.join(out_dir, fname)
    _save_without_zip_crc(tensors, path)
    info = {n: {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "sha256": digests[n].result()}
            for n, t in tensors.items()}
    return {"num_tensors": len(order), "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "file_bytes": os.path.getsize(path), "tensors": info}


def _save_without_zip_crc(obj, path: str) -> None:
    """``torch.save`` without the zip container's CRC-32 per record: computing it halves the write speed, torch.load
    never checks it, and the manifest's sha256 per tensor is the integrity check of these files."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None:  # torch < 2.6
        torch.save(obj, path)
        return
    previous = get()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(obj, path)
    finally:
        torch.serialization.set_crc32_options(previous)


def _write_json(path: str, obj: dict) -> None:
    text = json.dumps(obj, indent=1)
    # Keep number lists (shapes) on one line: a base-model manifest lists ~7,000 tensors.
    text = re.sub(r"\[[\d,\s]*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def load_manifest(ds_dir: str) -> dict:
    """The manifest of a converted directory, after checking its format, version and that every layer file
    exists. Raises :class:`CheckpointError` naming the file otherwise."""
    path = os.path.join(ds_dir, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no manifest; {ds_dir} is not a finished conversion "
                              f"(interrupted, or not written by hf_to_ds.py)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is newer than this reader ({FORMAT_VERSION}); "
                              f"update the recipe")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise CheckpointError(f"{path}: 'layers' must be a list")
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict) or entry.get("index") != i:
            raise CheckpointError(f"{path}: layer entries out of order at position {i}")
        if not isinstance(entry.get("tensors"), dict):
            raise CheckpointError(f"{path}: layer {i} has no 'tensors' object")
        file = resolve_inside(ds_dir, entry.get("file"), f"{path}: layer {i} 'file'")
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: layer file missing")
    return manifest


def read_layer(ds_dir: str, layer_index: int, expert_ids: Optional[Iterable[int]] = None, *,
               manifest: Optional[dict] = None, verify: bool = True,
               mmap: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """One pipeline layer's tensors from a converted directory, FULL HF name -> tensor (manifest order).

    Args:
        layer_index: pipeline layer index (``layout.build_layout`` numbering).
        expert_ids: GLOBAL ids of the routed experts to return (all non-expert tensors are always returned);
            None returns every expert. Ids outside ``0..n_routed_experts-1`` are an error.
        manifest: a :func:`load_manifest` result, to avoid re-reading it per layer.
        verify: compare each returned tensor's sha256 with the manifest (one pass over the bytes returned; only the
            requested experts are hashed). On by default: a file that changed after conversion is refused.
        mmap: map the file instead of reading it, so unrequested experts are never read. The returned tensors may
            then be copy-on-write views of the file: copy them into parameters (``param.copy_``).

    Shapes and dtypes are always checked against the manifest; a mismatch or a missing/extra tensor raises
    :class:`CheckpointError` naming the file and key.
    """
    manifest = manifest if manifest is not None else load_manifest(ds_dir)
    layers = manifest["layers"]
    if not 0 <= layer_index < len(layers):
        raise CheckpointError(f"{ds_dir}: pipeline layer {layer_index} out of range 0..{len(layers) - 1}")
    entry = layers[layer_index]
    path = resolve_inside(ds_dir, entry["file"], f"{MANIFEST_NAME} layer {layer_index}")
    wanted = _select_experts(entry, expert_ids, path)
    state = load_torch(path, mmap=mmap)
    info = entry["tensors"]
    missing = [k for k in info if k not in state]
    extra = [k for k in state if k not in info]
    if missing or extra:
        raise CheckpointError(f"{path}: holds different tensors than {MANIFEST_NAME} lists: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    out = OrderedDict()
    for name, meta in info.items():
        if wanted is not None:
            parsed = layout.parse_expert_key(name)
            if parsed is not None and parsed[1] not in wanted:
                continue
        t = state[name]
        if list(t.shape) != meta["shape"] or dtype_name(t.dtype) != meta["dtype"]:
            raise CheckpointError(f"{path}: tensor {name!r} is {dtype_name(t.dtype)} {list(t.shape)}, "
                                  f"{MANIFEST_NAME} says {meta['dtype']} {meta['shape']}")
        if verify and tensor_sha256(t) != meta["sha256"]:
            raise CheckpointError(f"{path}: tensor {name!r} fails its sha256 check (file corrupt)")
        out[name] = t
    return out


def _select_experts(entry: dict, expert_ids, path: str) -> Optional[set]:
    if expert_ids is None or not entry.get("is_moe"):
        return None
    wanted = {int(e) for e in expert_ids}
    E = entry["num_experts"]
    bad = sorted(e for e in wanted if not 0 <= e < E)
    if bad:
        raise CheckpointError(f"{path}: expert ids {bad} requested, the layer has experts 0..{E - 1}")
    return wanted


def iter_converted(ds_dir: str, manifest: Optional[dict] = None,
                   verify: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a converted directory, layer by layer (one layer file mapped at a time)."""
    manifest = manifest if manifest is not None else load_manifest(ds_dir)
    for entry in manifest["layers"]:
        yield from read_layer(ds_dir, entry["index"], manifest=manifest, verify=verify).items()
