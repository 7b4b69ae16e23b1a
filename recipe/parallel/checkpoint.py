"""Checkpoint formats of the pipeline: HF safetensors <-> split-independent layer files, and export of the
checkpoints DeepSpeed writes during training. ``converters/`` are thin CLIs over this module; the names and the
layer list come from :mod:`recipe.parallel.layout` (no second copy of the name map).

Three on-disk forms (``docs/checkpoints.md`` has the full description):

* **HF** (as released): ``config.json``, ``model-0000N-of-00000M.safetensors`` + ``model.safetensors.index.json``
  or one ``model.safetensors``, tokenizer and processor files.
* **converted** (written by :func:`convert_hf_to_ds`): one ``layer_XX-model_00-model_states.pt`` per pipeline
  layer holding that layer's tensors under their FULL HF names (routed experts by global id), the side files, and
  ``manifest.json`` (written last). Independent of the PP split and the EP size; each rank reads its layers and
  its experts with :func:`read_layer`.
* **training** (DeepSpeed 0.19 pipeline + MoE ``save_checkpoint``): ``<dir>/<tag>/mp_rank_SS_model_states.pt``
  (``['module']``: ``'{layer}.{local name}'`` -> tensor, the non-expert tensors of stage SS) and
  ``<dir>/<tag>/layer_J_expert_E_mp_rank_SS_model_states.pt`` (routed expert E of the J-th MoE layer of stage SS),
  ``<dir>/latest`` naming the tag. Read by :func:`read_training_checkpoint`.

:func:`export_to_hf` turns either of the last two back into the first.

Everything streams: conversion holds about one pipeline layer (the source shards are mapped copy-on-write layer by
layer and written out without an intermediate copy), and every output directory appears only when complete
(``hf_checkpoint.atomic_output_dir``). Loading never unpickles code: ``torch.load`` runs with
``weights_only=True``.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Union

import torch

from recipe.config import VL2Config
from recipe.hf_checkpoint import (INDEX_NAME, SINGLE_NAME, CheckpointError, DTYPES, atomic_output_dir, copy_side_files,
                                  dtype_name, load_weight_map, parse_size, read_header, spec_nbytes,
                                  write_hf_shards)
from recipe.parallel import layout as L

logger = logging.getLogger(__name__)

FORMAT_NAME = "dsvl2-pipeline-layers"
# Bump when the layer files or the manifest change incompatibly; readers refuse newer versions.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

DtypeArg = Union[torch.dtype, str, None]
_DTYPE_ALIASES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                  "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16, "keep": None}


def parse_dtype(dtype: DtypeArg) -> Optional[torch.dtype]:
    """``torch.bfloat16`` / "bf16" / "fp32" / "fp16" -> dtype; None or "keep" -> None (keep each tensor's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(_DTYPE_ALIASES)}")
    return _DTYPE_ALIASES[key]


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (C order, native little-endian), the checksum the manifest stores."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(memoryview(flat.view(torch.uint8).numpy())).hexdigest()


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Cast floating tensors to ``dtype`` (None keeps them); integer tensors are never cast."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is contiguous and alone in its storage, else a compact copy (torch.save writes whole
    storages, so a view would drag its neighbours into the file)."""
    if t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.contiguous().clone()


def _progress(total_bytes: int, total_tensors: int, desc: str, enabled: bool):
    """A tqdm bar over bytes (scaled units) with a tensor count in the postfix; a no-op bar when disabled."""
    from tqdm.auto import tqdm
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled,
               dynamic_ncols=True, smoothing=0.1)
    bar.set_postfix_str(f"0/{total_tensors} tensors", refresh=False)
    return bar


# ---------------------------------------------------------------------------------------------------------------
# What config.json implies
# ---------------------------------------------------------------------------------------------------------------

def expected_shapes(cfg: VL2Config) -> "OrderedDict[str, tuple]":
    """Every tensor name (parameters and persistent buffers) the model built from ``cfg`` holds -> its shape,
    in the model's state_dict order. Built on the meta device: no memory, ~2 s for the base model."""
    from recipe.model import DeepseekVLV2ForCausalLM
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(cfg)
    return OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())


def keys_by_layer(cfg: VL2Config, names: Iterable[str]) -> "OrderedDict[int, list[str]]":
    """Group tensor names by owning pipeline layer (layer order; names keep their given order within a layer)."""
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(L.layer_index_of(cfg, name), []).append(name)
    return OrderedDict(sorted(groups.items()))


def _ids(names: Iterable[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for n in names for m in [rx.match(n)] if m})


def _count_hints(cfg: VL2Config, names: Iterable[str]) -> list[str]:
    """Plain-language diagnoses of the usual config/checkpoint mismatches: layer and expert counts."""
    names = list(names)
    hints = []
    vc, lc = cfg.vision_config, cfg.language_config
    blocks = _ids(names, r"^vision\.blocks\.(\d+)\.")
    if blocks and len(blocks) != vc.layers:
        hints.append(f"the checkpoint has {len(blocks)} vision blocks (ids {blocks[0]}..{blocks[-1]}), "
                     f"config.json vision_config.layers={vc.layers}")
    layers = _ids(names, r"^language\.model\.layers\.(\d+)\.")
    if layers and len(layers) != lc.num_hidden_layers:
        hints.append(f"the checkpoint has {len(layers)} decoder layers (ids {layers[0]}..{layers[-1]}), "
                     f"config.json language_config.num_hidden_layers={lc.num_hidden_layers}")
    experts = _ids(names, r"^language\.model\.layers\.\d+\.mlp\.experts\.(\d+)\.")
    if experts and len(experts) != (lc.n_routed_experts or 0):
        hints.append(f"the checkpoint has {len(experts)} routed experts per layer (ids {experts[0]}..{experts[-1]}),"
                     f" config.json language_config.n_routed_experts={lc.n_routed_experts}")
    moe_layers = _ids(names, r"^language\.model\.layers\.(\d+)\.mlp\.gate\.weight$")
    if moe_layers != [j for j in lc.moe_layer_ids if j in layers]:
        hints.append(f"the checkpoint has MoE layers {moe_layers}, config.json implies {lc.moe_layer_ids} "
                     f"(first_k_dense_replace={lc.first_k_dense_replace}, moe_layer_freq={lc.moe_layer_freq})")
    return hints


def check_against_config(cfg: VL2Config, found: dict, where: Callable[[str], str], source: str,
                         expected: Optional[dict] = None) -> "OrderedDict[str, tuple]":
    """Compare ``found`` (name -> shape) with what ``cfg`` implies; raise :class:`CheckpointError` listing
    missing keys, unexpected keys (with the file holding them, from ``where``) and shape mismatches.

    Returns the expected name -> shape map (model order)."""
    expected = expected if expected is not None else expected_shapes(cfg)
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and tuple(found[k]) != expected[k]]
    if not (missing or extra or wrong):
        return expected
    lines = [f"{source}: tensors do not match config.json "
             f"({len(missing)} missing, {len(extra)} unexpected, {len(wrong)} with the wrong shape)"]
    lines += [f"  hint: {h}" for h in _count_hints(cfg, found)]
    show = 10
    lines += [f"  missing tensor {k!r} (shape {list(expected[k])})" for k in missing[:show]]
    lines += [f"  unexpected tensor {k!r} in {where(k)}" for k in extra[:show]]
    lines += [f"  tensor {k!r} in {where(k)} has shape {list(found[k])}, config.json implies {list(expected[k])}"
              for k in wrong[:show]]
    if max(len(missing), len(extra), len(wrong)) > show:
        lines.append(f"  (only the first {show} of each kind are listed)")
    raise CheckpointError("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# HF safetensors source: headers and positioned reads
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Source:
    """Where one HF tensor's bytes sit."""
    name: str
    shard: str          # file name inside the checkpoint directory
    shape: tuple
    dtype: torch.dtype
    begin: int          # absolute byte offsets in the shard file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _data_start(path: str) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def scan_hf(hf_dir: str) -> tuple["OrderedDict[str, str]", dict]:
    """Weight map (name -> shard) and name -> :class:`_Source` of an HF checkpoint, from the shard headers only.

    Checks every shard the index names: present, not truncated, a readable header, each tensor's byte range
    matching its shape and dtype, and the index agreeing with the shards."""
    weight_map = load_weight_map(hf_dir, check_files=True)
    sources = {}
    for fname in sorted(set(weight_map.values())):
        path = os.path.join(hf_dir, fname)
        header, start = read_header(path), _data_start(path)
        for name, meta in header.items():
            if weight_map.get(name) != fname:
                continue  # a tensor the index places elsewhere (or nowhere) is not part of the checkpoint
            try:
                dtype = DTYPES[meta["dtype"]]
                shape = tuple(int(s) for s in meta["shape"])
                begin, end = (int(x) for x in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {meta!r}") from None
            need = spec_nbytes((shape, dtype))
            if end - begin != need or begin < 0:
                raise CheckpointError(f"{path}: corrupt header: tensor {name!r} spans {end - begin} bytes, "
                                      f"its shape {list(shape)} in {meta['dtype']} needs {need}")
            sources[name] = _Source(name, fname, shape, dtype, start + begin, start + end)
    return weight_map, sources


def map_hf_tensors(hf_dir: str, sources: Iterable[_Source]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for ``sources`` as views of the shard files mapped copy-on-write, in file order.

    Nothing is copied: ``torch.save`` and the checksum read the source pages directly, the fastest path measured
    (about 2x reading into fresh buffers, which pays a page fault per 4 KiB inside each read and an extra copy).
    The kernel is asked to read the byte ranges ahead (``POSIX_FADV_WILLNEED``), so disk reads overlap the work.
    The mappings live as long as the yielded tensors: drop them and the pages leave this process's resident set
    (the caller holds one pipeline layer at a time)."""
    sources = sorted(sources, key=lambda s: (s.shard, s.begin))
    maps: dict[str, torch.UntypedStorage] = {}
    for s in sources:
        if s.shard not in maps:
            path = os.path.join(hf_dir, s.shard)
            _prefetch(path, [(x.begin, x.nbytes) for x in sources if x.shard == s.shard])
            try:
                maps[s.shard] = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
            except (OSError, RuntimeError) as e:
                raise CheckpointError(f"{path}: cannot map ({e})") from None
        raw = torch.empty(0, dtype=torch.uint8).set_(maps[s.shard][s.begin:s.end], 0, (s.nbytes,))
        yield s.name, raw.view(s.dtype).reshape(s.shape)


def _prefetch(path: str, ranges: list[tuple[int, int]]) -> None:
    """Start asynchronous reads of ``ranges`` into the page cache (a hint; failures are ignored)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        for begin, n in ranges:
            os.posix_fadvise(fd, begin, n, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# HF -> converted layout
# ---------------------------------------------------------------------------------------------------------------

def _check_output(src_dir: str, out_dir: str, overwrite: bool) -> tuple[str, str]:
    src_dir, out_dir = os.path.abspath(src_dir), os.path.abspath(out_dir)
    if out_dir == src_dir or src_dir.startswith(out_dir + os.sep) or out_dir.startswith(src_dir + os.sep):
        raise ValueError(f"output directory {out_dir} overlaps the input directory {src_dir}; choose another")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite (overwrite=True) to replace it")
    stale = sorted(glob.glob(glob.escape(out_dir) + ".tmp-*"))
    if stale:
        logger.warning("found %s: left by an interrupted run (never a finished output); safe to delete",
                       ", ".join(stale))
    return src_dir, out_dir


def _source_summary(hf_dir: str, weight_map: dict) -> dict:
    """What the manifest records about the source checkpoint."""
    files = {f: os.path.getsize(os.path.join(hf_dir, f)) for f in sorted(set(weight_map.values()))}
    cfg_path = os.path.join(hf_dir, "config.json")
    with open(cfg_path, "rb") as f:
        cfg_sha = hashlib.sha256(f.read()).hexdigest()
    return {"path": hf_dir, "index": INDEX_NAME if os.path.exists(os.path.join(hf_dir, INDEX_NAME)) else SINGLE_NAME,
            "files": files, "config_sha256": cfg_sha}


def _layer_entry(layer: L.PipeLayer, cfg: VL2Config) -> dict:
    entry = {"index": layer.index, "kind": layer.kind, "block": layer.block, "is_moe": layer.is_moe,
             "file": L.ckpt_layer_file(layer.index), "hf_prefixes": list(layer.hf_prefixes)}
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
    hf_dir, out_dir = _check_output(hf_dir, out_dir, overwrite)
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such directory")
    dtype = parse_dtype(dtype)
    cfg = VL2Config.from_json(hf_dir)
    weight_map, sources = scan_hf(hf_dir)
    expected = check_against_config(cfg, {k: s.shape for k, s in sources.items()},
                                    lambda k: os.path.join(hf_dir, weight_map[k]), hf_dir)
    layers = L.build_layout(cfg)
    groups = keys_by_layer(cfg, expected)
    out_nbytes = {k: _out_nbytes(sources[k], dtype) for k in expected}
    total = sum(out_nbytes.values())
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "created_by": "recipe.parallel.checkpoint.convert_hf_to_ds",
                "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "source": _source_summary(hf_dir, weight_map),
                "dtype": None, "cast_to": dtype_name(dtype) if dtype is not None else None,
                "num_layers": len(layers), "num_tensors": len(expected), "total_bytes": total,
                "side_files": [], "layers": []}
    logger.info("converting %s (%d tensors, %.2f GB) into %d pipeline layer files at %s",
                hf_dir, len(expected), total / 1e9, len(layers), out_dir)
    bar = _progress(total, len(expected), "hf->ds", progress)
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


def _out_nbytes(s: _Source, dtype: Optional[torch.dtype]) -> int:
    if dtype is None or not s.dtype.is_floating_point:
        return s.nbytes
    return spec_nbytes((s.shape, dtype))


def _write_layer(hf_dir: str, out_dir: str, fname: str, sources: list, dtype: Optional[torch.dtype],
                 on_tensor: Callable[[str, int], None], hasher: Optional[Executor] = None) -> dict:
    """Read one layer's tensors, cast, checksum and save them as ``fname``; returns the manifest fields.

    Checksums run on ``hasher`` (a worker thread; hashlib and file reads release the GIL), overlapping the reads
    of the next tensors and the ``torch.save``; all of them finish before this returns, so memory stays at one
    layer."""
    tensors, digests = {}, {}
    for name, t in map_hf_tensors(hf_dir, sources):
        t = _own_storage(_cast(t, dtype))
        tensors[name] = t
        digests[name] = hasher.submit(tensor_sha256, t) if hasher is not None else _Done(tensor_sha256(t))
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


class _Done:
    """An already computed result with the ``Future.result`` interface."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _write_json(path: str, obj: dict) -> None:
    text = json.dumps(obj, indent=1)
    # Keep number lists (shapes) on one line: a base-model manifest lists ~7,000 tensors.
    text = re.sub(r"\[[\d,\s]*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Reading the converted layout
# ---------------------------------------------------------------------------------------------------------------

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
    for i, entry in enumerate(manifest.get("layers", [])):
        if entry.get("index") != i:
            raise CheckpointError(f"{path}: layer entries out of order at position {i}")
        if not os.path.isfile(os.path.join(ds_dir, entry["file"])):
            raise CheckpointError(f"{os.path.join(ds_dir, entry['file'])}: layer file missing")
    return manifest


def read_layer(ds_dir: str, layer_index: int, expert_ids: Optional[Iterable[int]] = None, *,
               manifest: Optional[dict] = None, verify: bool = False,
               mmap: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """One pipeline layer's tensors from a converted directory, FULL HF name -> tensor (manifest order).

    Args:
        layer_index: pipeline layer index (``layout.build_layout`` numbering).
        expert_ids: GLOBAL ids of the routed experts to return (all non-expert tensors are always returned);
            None returns every expert. Ids outside ``0..n_routed_experts-1`` are an error.
        manifest: a :func:`load_manifest` result, to avoid re-reading it per layer.
        verify: also compare each returned tensor's sha256 with the manifest (costs one pass over the bytes).
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
    path = os.path.join(ds_dir, entry["file"])
    wanted = _select_experts(entry, expert_ids, path)
    state = _torch_load(path, mmap=mmap)
    info = entry["tensors"]
    missing = [k for k in info if k not in state]
    extra = [k for k in state if k not in info]
    if missing or extra:
        raise CheckpointError(f"{path}: holds different tensors than {MANIFEST_NAME} lists: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    out = OrderedDict()
    for name, meta in info.items():
        if wanted is not None:
            parsed = L.parse_expert_key(name)
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
                   verify: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a converted directory, layer by layer (one layer file mapped at a time)."""
    manifest = manifest if manifest is not None else load_manifest(ds_dir)
    for entry in manifest["layers"]:
        yield from read_layer(ds_dir, entry["index"], manifest=manifest, verify=verify).items()


# ---------------------------------------------------------------------------------------------------------------
# Reading DeepSpeed training checkpoints (pipeline + MoE, 0.19)
# ---------------------------------------------------------------------------------------------------------------

_STAGE_FILE_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_LEGACY_EXPERT_FILE_RE = re.compile(r"^expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")


def _torch_load(path: str, mmap: bool = True):
    """``torch.load(weights_only=True)``; on objects the safe unpickler does not know (say, a custom class in a
    training client_state) retry with inert stand-ins for exactly those classes, so nothing from the file runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing") from None
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError (bad zip), EOFError ...
        first = e
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read ({type(first).__name__}: {first}; {e})") from None
    if not unsafe:
        raise CheckpointError(f"{path}: cannot read ({type(first).__name__}: {first})") from None
    logger.warning("%s: stubbing non-tensor objects %s (their contents are not needed and are not executed)",
                   path, ", ".join(unsafe))
    stubs = [(type(q.rsplit(".", 1)[-1], (_Inert,), {}), q) for q in unsafe]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


class _Inert:
    """Stand-in for an unknown pickled object: swallows constructor arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def resolve_tag(ckpt_dir: str, tag: Optional[str] = None) -> str:
    """``tag``, or the one ``<ckpt_dir>/latest`` names. Errors list the tags present."""
    if tag is not None:
        tag = str(tag)
    else:
        latest = os.path.join(ckpt_dir, "latest")
        try:
            with open(latest, encoding="utf-8") as f:
                tag = f.read().strip()
        except FileNotFoundError:
            raise CheckpointError(f"{latest}: no 'latest' file; pass --tag (tags here: "
                                  f"{_list_tags(ckpt_dir) or 'none'})") from None
        if not tag:
            raise CheckpointError(f"{latest}: empty; pass --tag")
    if not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise CheckpointError(f"{os.path.join(ckpt_dir, tag)}: tag {tag!r} not found (tags here: "
                              f"{_list_tags(ckpt_dir) or 'none'})")
    return tag


def _list_tags(ckpt_dir: str) -> str:
    """Comma-separated tag directories (those holding a stage-0 file), "" when none."""
    if not os.path.isdir(ckpt_dir):
        return ""
    return ", ".join(sorted(d for d in os.listdir(ckpt_dir)
                         if os.path.isfile(os.path.join(ckpt_dir, d, "mp_rank_00_model_states.pt"))))


@dataclass(frozen=True)
class _Ref:
    """Where one HF tensor sits in a training checkpoint."""
    path: str
    key: str
    shape: tuple
    dtype: torch.dtype

    @property
    def is_expert(self) -> bool:
        return _EXPERT_FILE_RE.match(os.path.basename(self.path)) is not None


def _split_layer_key(key: str, path: str) -> tuple[int, str]:
    idx, _, local = key.partition(".")
    if not idx.isdigit() or not local:
        raise CheckpointError(f"{path}: key {key!r} is not '<pipeline layer>.<name>' (tied modules or a "
                              f"non-pipeline model are not supported)")
    return int(idx), local


def _hf_name(layers: list, idx: int, local: str, path: str, key: str) -> str:
    if idx >= len(layers):
        raise CheckpointError(f"{path}: key {key!r} names pipeline layer {idx}, config.json gives "
                              f"{len(layers)} layers (0..{len(layers) - 1})")
    try:
        return L.local_to_hf(layers[idx], local)
    except KeyError:
        raise CheckpointError(f"{path}: key {key!r} is no tensor of pipeline layer {idx} "
                              f"({layers[idx].kind})") from None


def _index_training(tag_dir: str, cfg: VL2Config) -> dict:
    """HF name -> :class:`_Ref` for every tensor of a training checkpoint (file headers only, via mmap)."""
    layers = L.build_layout(cfg)
    names = os.listdir(tag_dir)
    stages = sorted((int(m.group(1)), n) for n in names for m in [_STAGE_FILE_RE.match(n)] if m)
    if not stages:
        zero3 = [n for n in names if n.startswith("zero_pp_rank_")]
        raise CheckpointError(f"{tag_dir}: no mp_rank_XX_model_states.pt files"
                              + (" (ZeRO-3 layout, which the pipeline engine never writes)" if zero3 else ""))
    if [s for s, _ in stages] != list(range(len(stages))):
        raise CheckpointError(f"{tag_dir}: stage files {[n for _, n in stages]} are not numbered "
                              f"00..{len(stages) - 1:02d}")
    if any(_LEGACY_EXPERT_FILE_RE.match(n) for n in names):
        raise CheckpointError(f"{tag_dir}: old-style expert_E_mp_rank_XX files (pre-0.5 DeepSpeed) are not supported")
    refs: dict[str, _Ref] = {}

    def add(hf: str, ref: _Ref):
        if hf in refs:
            raise CheckpointError(f"{ref.path}: tensor {hf!r} ({ref.key}) also in {refs[hf].path}")
        refs[hf] = ref

    for s, fname in stages:
        path = os.path.join(tag_dir, fname)
        state = _torch_load(path)
        module = state.get("module") if isinstance(state, dict) else None
        if not isinstance(module, dict):
            raise CheckpointError(f"{path}: no 'module' state dict (a pipeline without MoE layers saves "
                                  f"layer_XX-model_states.pt files instead, which this reader does not handle)")
        for key, t in module.items():
            idx, local = _split_layer_key(key, path)
            if L.expert_id_of_local(local) is not None:
                raise CheckpointError(f"{path}: routed expert tensor {key!r} in a stage file")
            add(_hf_name(layers, idx, local, path, key), _Ref(path, key, tuple(t.shape), t.dtype))
        del state, module
    stage_count = len(stages)
    for fname in sorted(names):
        m = _EXPERT_FILE_RE.match(fname)
        if not m:
            continue
        j, e, s = (int(g) for g in m.groups())
        path = os.path.join(tag_dir, fname)
        if s >= stage_count:
            raise CheckpointError(f"{path}: stage {s} but only {stage_count} mp_rank files")
        state = _torch_load(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: not a dict of tensors")
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            idx, local = _split_layer_key(key, path)
            if L.expert_id_of_local(local) != e:
                raise CheckpointError(f"{path}: key {key!r} is not routed expert {e} (the file name's id)")
            add(_hf_name(layers, idx, local, path, key), _Ref(path, key, tuple(t.shape), t.dtype))
        del state
    return refs


def _config_for(ckpt_dir: str, tag_dir: str, config) -> tuple[VL2Config, str]:
    """The model config of a training checkpoint and the directory its side files come from."""
    if isinstance(config, VL2Config):
        return config, None
    candidates = [config] if config is not None else [tag_dir, ckpt_dir]
    for c in candidates:
        path = os.path.join(c, "config.json") if os.path.isdir(c) else c
        if os.path.isfile(path):
            return VL2Config.from_json(path), os.path.dirname(os.path.abspath(path))
    raise CheckpointError(f"{ckpt_dir}: no config.json in {' or '.join(candidates)}; pass --config-dir (the "
                          f"converted or HF directory the run started from)")


class TrainingCheckpoint:
    """An indexed, validated DeepSpeed training checkpoint; iterate it for (HF name, tensor) in layer order."""

    def __init__(self, ckpt_dir: str, tag: Optional[str] = None, config=None):
        self.ckpt_dir = os.path.abspath(ckpt_dir)
        if not os.path.isdir(self.ckpt_dir):
            raise CheckpointError(f"{self.ckpt_dir}: no such directory")
        if os.path.isfile(os.path.join(self.ckpt_dir, "mp_rank_00_model_states.pt")) and tag is None:
            # Pointed at a tag directory itself.
            self.ckpt_dir, tag = os.path.split(self.ckpt_dir)
        self.tag = resolve_tag(self.ckpt_dir, tag)
        self.tag_dir = os.path.join(self.ckpt_dir, self.tag)
        self.config, self.side_dir = _config_for(self.ckpt_dir, self.tag_dir, config)
        self.refs = _index_training(self.tag_dir, self.config)
        expected = check_against_config(self.config, {k: r.shape for k, r in self.refs.items()},
                                        lambda k: self.refs[k].path, self.tag_dir)
        self.order = [k for _, names in keys_by_layer(self.config, expected).items() for k in names]

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Layer by layer. One stage file and one expert file are mapped at a time (a MoE layer alternates between
        its stage file and its expert files); tensors may be copy-on-write views of the files."""
        open_files = {False: (None, None), True: (None, None)}  # is_expert -> (path, state)
        for name in self.order:
            ref = self.refs[name]
            path, state = open_files[ref.is_expert]
            if path != ref.path:
                state = _torch_load(ref.path)
                state = state if ref.is_expert else state["module"]
                open_files[ref.is_expert] = (ref.path, state)
            t = state[ref.key]
            if tuple(t.shape) != ref.shape or t.dtype != ref.dtype:
                raise CheckpointError(f"{ref.path}: tensor {ref.key!r} changed while reading")
            yield name, t


def read_training_checkpoint(ckpt_dir: str, tag: Optional[str] = None, config=None) -> TrainingCheckpoint:
    """A DeepSpeed pipeline + MoE training checkpoint as an iterable of (FULL HF name, tensor), layer by layer.

    Args:
        ckpt_dir: the ``save_checkpoint`` directory (holding ``latest`` and the tag directories), or a tag
            directory itself.
        tag: the tag to read; None reads the one ``latest`` names.
        config: config.json path or directory, or a :class:`VL2Config`; None looks in the tag directory, then in
            ``ckpt_dir``.

    Any PP split and EP size: the stage files are self-describing (keys carry the global layer index, expert
    files the global expert id). Every file is indexed and checked against config.json (missing, extra, duplicate
    keys, shapes) before this returns, so errors surface before any output is written.
    """
    return TrainingCheckpoint(ckpt_dir, tag, config)


# ---------------------------------------------------------------------------------------------------------------
# Export to HF
# ---------------------------------------------------------------------------------------------------------------

CONVERTED, TRAINING = "converted", "training"


def detect_kind(src_dir: str) -> str:
    """"converted" (a manifest.json), "training" (``latest`` or mp_rank files) or a :class:`CheckpointError`."""
    if os.path.isfile(os.path.join(src_dir, MANIFEST_NAME)):
        return CONVERTED
    if os.path.isfile(os.path.join(src_dir, "latest")) or \
            os.path.isfile(os.path.join(src_dir, "mp_rank_00_model_states.pt")) or _list_tags(src_dir):
        return TRAINING
    if os.path.isfile(os.path.join(src_dir, INDEX_NAME)) or os.path.isfile(os.path.join(src_dir, SINGLE_NAME)):
        raise CheckpointError(f"{src_dir}: already an HF safetensors checkpoint")
    if not os.path.isdir(src_dir):
        raise CheckpointError(f"{src_dir}: no such directory")
    raise CheckpointError(f"{src_dir}: neither a converted layout ({MANIFEST_NAME}) nor a DeepSpeed training "
                          f"checkpoint ('latest' or <tag>/mp_rank_00_model_states.pt)")


def export_to_hf(src_dir: str, out_dir: str, dtype: DtypeArg = torch.bfloat16,
                 max_shard_size: Union[int, str] = "5GB", overwrite: bool = False, *, tag: Optional[str] = None,
                 config_dir: Optional[str] = None, progress: bool = True) -> dict:
    """Write an HF checkpoint (released-style shards, index, config, tokenizer and processor files) from a
    converted directory or a DeepSpeed training checkpoint (detected from the contents of ``src_dir``).

    Args:
        dtype: floating tensors are cast to it (default bf16, as released); None / "keep" keeps stored dtypes.
        max_shard_size: shard size limit ("5GB", "500MB", bytes).
        tag: training checkpoints only; None = the ``latest`` tag.
        config_dir: training checkpoints only: where config.json and the tokenizer / processor files are, when
            not in the checkpoint directory.

    Returns the written weight map (name -> shard file).
    """
    src_dir = os.path.abspath(src_dir)
    kind = detect_kind(src_dir)
    _, out_dir = _check_output(src_dir, out_dir, overwrite)
    dtype = parse_dtype(dtype)
    if kind == CONVERTED:
        if tag is not None:
            raise ValueError(f"{src_dir} is a converted layout; --tag applies to training checkpoints only")
        manifest = load_manifest(src_dir)
        cfg = VL2Config.from_json(src_dir)
        _check_manifest_layers(manifest, cfg, src_dir)
        stored = {k: (tuple(v["shape"]), getattr(torch, v["dtype"])) for e in manifest["layers"]
                  for k, v in e["tensors"].items()}
        files = {k: os.path.join(src_dir, e["file"]) for e in manifest["layers"] for k in e["tensors"]}
        check_against_config(cfg, {k: shape for k, (shape, _) in stored.items()}, files.get, src_dir)
        stream, side_dir = iter_converted(src_dir, manifest), src_dir
    else:
        ckpt = read_training_checkpoint(src_dir, tag, config_dir)
        if ckpt.side_dir is None:
            raise CheckpointError(f"{src_dir}: pass config_dir (where config.json and the tokenizer files are)")
        stored = {k: (ckpt.refs[k].shape, ckpt.refs[k].dtype) for k in ckpt.order}
        stream, side_dir = iter(ckpt), ckpt.side_dir
    specs = OrderedDict((k, (shape, _out_dtype(d, dtype))) for k, (shape, d) in stored.items())
    total = sum(spec_nbytes(spec) for spec in specs.values())
    logger.info("exporting %s checkpoint %s -> %s (%d tensors, %.2f GB, dtype %s)", kind, src_dir, out_dir,
                len(specs), total / 1e9, dtype_name(dtype) if dtype else "kept")
    bar = _progress(total, len(specs), "ds->hf", progress)
    done = [0]

    def on_tensor(name: str, nbytes: int) -> None:
        done[0] += 1
        bar.update(nbytes)
        bar.set_postfix_str(f"{done[0]}/{len(specs)} tensors", refresh=False)

    t0 = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        weight_map = write_hf_shards(specs, ((k, _cast(t, dtype)) for k, t in stream), tmp,
                                     parse_size(max_shard_size), on_tensor=on_tensor)
        copy_side_files(side_dir, tmp)
        load_weight_map(tmp, check_files=True)  # re-read every header: the export is complete and consistent
    bar.close()
    dt = time.perf_counter() - t0
    logger.info("exported %d tensors into %d shards at %s: %.2f GB in %.1f s (%.2f GB/s)", len(weight_map),
                len(set(weight_map.values())), out_dir, total / 1e9, dt, total / 1e9 / max(dt, 1e-9))
    return weight_map


def _check_manifest_layers(manifest: dict, cfg: VL2Config, ds_dir: str) -> None:
    """The manifest's layers are config.json's pipeline layers, and each holds only tensors that layer owns."""
    layers = L.build_layout(cfg)
    if len(manifest["layers"]) != len(layers):
        raise CheckpointError(f"{os.path.join(ds_dir, MANIFEST_NAME)}: {len(manifest['layers'])} pipeline layers, "
                              f"config.json gives {len(layers)}")
    for entry, layer in zip(manifest["layers"], layers):
        for name in entry["tensors"]:
            if not layer.owns(name):
                raise CheckpointError(f"{os.path.join(ds_dir, entry['file'])}: tensor {name!r} does not belong to "
                                      f"pipeline layer {layer.index} ({layer.kind})")


def _out_dtype(stored: torch.dtype, dtype: Optional[torch.dtype]) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored
