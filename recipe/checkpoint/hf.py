"""Hugging Face checkpoints on disk: the one safetensors header reader, the weight map, tensor reads (whole or
memory-mapped byte ranges), the streaming shard writer, and the side files that travel with the weights.

Layout (as released): ``config.json``, ``model-00001-of-000004.safetensors`` ... (5-digit index, 6-digit total)
and ``model.safetensors.index.json`` (``metadata.total_size`` + ``weight_map`` key -> file); or a single
``model.safetensors``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
from safetensors import safe_open

from recipe.checkpoint import CheckpointError
from recipe.checkpoint.dtypes import SAFETENSORS_CODE, SAFETENSORS_DTYPES, dtype_name, spec_nbytes

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_NAME = "model-{index:05d}-of-{total:06d}.safetensors"
# Files that travel with the weights (tokenizer, processor, generation settings); copied by converters.
SIDE_FILES = ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "generation_config.json", "chat_template.json")


def parse_size(size) -> int:
    """'5GB', '500MB', '2GiB' or an int -> bytes."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GIB", 2 ** 30), ("MIB", 2 ** 20), ("KIB", 2 ** 10), ("GB", 10 ** 9), ("MB", 10 ** 6),
                       ("KB", 10 ** 3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


@dataclass(frozen=True)
class Header:
    """A safetensors file's header: tensor name -> its JSON entry, and where the data section starts."""
    tensors: dict
    data_start: int


def read_header(path: str) -> Header:
    """The safetensors header of ``path``, after checking that the file holds every byte it declares."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes "
                                      f"in a {size}-byte file)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard file missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path}: corrupt safetensors header (an entry without data_offsets)") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file: header declares "
                              f"{8 + n + end} bytes, file has {size}")
    return Header(header, 8 + n)


def _read_index(ckpt_dir: str) -> Optional["OrderedDict[str, str]"]:
    """The index's weight map, or None when the checkpoint is a single ``model.safetensors``."""
    index_path = os.path.join(ckpt_dir, INDEX_NAME)
    if not os.path.exists(index_path):
        return None
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{index_path}: no 'weight_map' object") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    for fname in set(weight_map.values()):
        if os.path.isabs(fname) or ".." in fname.replace("\\", "/").split("/"):
            raise CheckpointError(f"{index_path}: shard {fname!r} is not a file name inside {ckpt_dir}")
    return OrderedDict(weight_map)


def read_headers(ckpt_dir: str) -> tuple["OrderedDict[str, str]", dict]:
    """(weight map name -> shard, shard -> :class:`Header`), every shard's header read once and checked against
    the index (each listed tensor present in its shard)."""
    weight_map = _read_index(ckpt_dir)
    if weight_map is None:
        single = os.path.join(ckpt_dir, SINGLE_NAME)
        if not os.path.exists(single):
            raise CheckpointError(f"{ckpt_dir}: no {INDEX_NAME} and no {SINGLE_NAME}: not a safetensors checkpoint")
        header = read_header(single)
        return OrderedDict((k, SINGLE_NAME) for k in header.tensors), {SINGLE_NAME: header}
    headers = {fname: read_header(os.path.join(ckpt_dir, fname)) for fname in sorted(set(weight_map.values()))}
    for key, fname in weight_map.items():
        if key not in headers[fname].tensors:
            raise CheckpointError(f"{os.path.join(ckpt_dir, fname)}: index lists tensor {key!r} but the shard does "
                                  f"not hold it")
    return weight_map, headers


def load_weight_map(ckpt_dir: str, check_files: bool = True) -> "OrderedDict[str, str]":
    """Tensor name -> shard file name, from the index, or from ``model.safetensors`` when there is no index.
    ``check_files`` reads every shard header (present, complete, holding what the index lists)."""
    if check_files:
        return read_headers(ckpt_dir)[0]
    weight_map = _read_index(ckpt_dir)
    if weight_map is not None:
        return weight_map
    single = os.path.join(ckpt_dir, SINGLE_NAME)
    if os.path.exists(single):
        return OrderedDict((k, SINGLE_NAME) for k in read_header(single).tensors)
    raise CheckpointError(f"{ckpt_dir}: no {INDEX_NAME} and no {SINGLE_NAME}: not a safetensors checkpoint")


def iter_tensors(ckpt_dir: str, keys: Optional[Iterable[str]] = None,
                 weight_map: Optional[dict] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) shard by shard (one shard open at a time), for ``keys`` or every tensor."""
    weight_map = weight_map or load_weight_map(ckpt_dir)
    wanted = list(weight_map) if keys is None else list(keys)
    by_file: "OrderedDict[str, list[str]]" = OrderedDict()
    for key in wanted:
        if key not in weight_map:
            raise CheckpointError(f"{ckpt_dir}: tensor {key!r} is not in the checkpoint")
        by_file.setdefault(weight_map[key], []).append(key)
    for fname, names in by_file.items():
        path = os.path.join(ckpt_dir, fname)
        try:
            with safe_open(path, framework="pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise CheckpointError(f"{path}: cannot read ({e})") from None


@dataclass(frozen=True)
class TensorSource:
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


def scan_hf(hf_dir: str) -> tuple["OrderedDict[str, str]", dict]:
    """Weight map (name -> shard) and name -> :class:`TensorSource` of an HF checkpoint, from the shard headers
    (each read once).

    Checks every shard the index names: present, not truncated, a readable header, each tensor's byte range
    matching its shape and dtype, and the index agreeing with the shards."""
    weight_map, headers = read_headers(hf_dir)
    sources = {}
    for fname, header in headers.items():
        path = os.path.join(hf_dir, fname)
        for name, meta in header.tensors.items():
            if weight_map.get(name) != fname:
                continue  # a tensor the index places elsewhere (or nowhere) is not part of the checkpoint
            try:
                dtype = SAFETENSORS_DTYPES[meta["dtype"]]
                shape = tuple(int(s) for s in meta["shape"])
                begin, end = (int(x) for x in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {meta!r}") from None
            need = spec_nbytes((shape, dtype))
            if end - begin != need or begin < 0:
                raise CheckpointError(f"{path}: corrupt header: tensor {name!r} spans {end - begin} bytes, "
                                      f"its shape {list(shape)} in {meta['dtype']} needs {need}")
            sources[name] = TensorSource(name, fname, shape, dtype, header.data_start + begin,
                                         header.data_start + end)
    return weight_map, sources


def map_hf_tensors(hf_dir: str, sources: Iterable[TensorSource]) -> Iterator[tuple[str, torch.Tensor]]:
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


def plan_shards(specs: dict, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order: a shard closes when the next tensor would push it past the limit (a tensor
    larger than the limit gets a shard of its own)."""
    shards, cur, cur_bytes = [], [], 0
    for name, spec in specs.items():
        n = spec_nbytes(spec)
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


def write_hf_shards(specs: dict, tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str, max_shard_bytes: int,
                    on_tensor: Optional[Callable[[str, int], None]] = None) -> "OrderedDict[str, str]":
    """Stream tensors into released-style safetensors shards + ``model.safetensors.index.json``.

    ``specs`` (name -> (shape, dtype), in the order ``tensors`` yields them) fixes every shard's header up front, so
    each header is written first and each tensor goes to disk as it arrives: memory stays at one tensor (plus
    whatever the source maps), never a shard or the model. Returns the weight map.
    """
    shards = plan_shards(specs, max_shard_bytes)
    weight_map: "OrderedDict[str, str]" = OrderedDict()
    it = iter(tensors)
    for i, names in enumerate(shards):
        fname = SHARD_NAME.format(index=i + 1, total=len(shards))
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            shape, dtype = specs[name]
            n = spec_nbytes(specs[name])
            header[name] = {"dtype": SAFETENSORS_CODE[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name in names:
                got, t = next(it, (None, None))
                shape, dtype = specs[name]
                if got != name or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    gave = "" if t is None else f" {dtype_name(t.dtype)} {list(t.shape)}"
                    raise CheckpointError(f"writing shards: expected tensor {name!r} {dtype_name(dtype)} "
                                          f"{list(shape)}, the source gave {got!r}{gave}")
                flat = t.detach().contiguous().reshape(-1)
                if flat.numel():
                    f.write(memoryview(flat.view(torch.uint8).numpy()))
                if on_tensor is not None:
                    on_tensor(name, flat.numel() * flat.element_size())
                weight_map[name] = fname
    if next(it, None) is not None:
        raise CheckpointError("writing shards: the source gave more tensors than planned")
    total = sum(spec_nbytes(spec) for spec in specs.values())
    with open(os.path.join(out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
    return weight_map


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy the tokenizer / processor / config files that exist in ``src_dir``; returns their names."""
    copied = []
    for name in SIDE_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied
