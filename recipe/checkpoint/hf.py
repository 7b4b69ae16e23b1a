"""Hugging Face safetensors checkpoints on disk: index reading, integrity checks, streaming sharded writes and
atomic output directories. Shared by the model's ``from_pretrained``/``save_pretrained`` and ``converters/``.

Layout (as released): ``config.json``, ``model-00001-of-000004.safetensors`` ... (5-digit index, 6-digit total)
and ``model.safetensors.index.json`` (``metadata.total_size`` + ``weight_map`` key -> file); or a single
``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, Optional

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_NAME = "model-{index:05d}-of-{total:06d}.safetensors"
# Files that travel with the weights (tokenizer, processor, generation settings); copied by converters.
SIDE_FILES = ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "generation_config.json", "chat_template.json")

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or inconsistent; the message names the file or key."""


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


def read_header(path: str) -> dict:
    """The safetensors JSON header of ``path``, after checking that the file holds every byte it declares."""
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
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file: header declares "
                              f"{8 + n + end} bytes, file has {size}")
    return header


def load_weight_map(ckpt_dir: str, check_files: bool = True) -> "OrderedDict[str, str]":
    """Tensor name -> shard file name, from the index, or from ``model.safetensors`` when there is no index."""
    index_path = os.path.join(ckpt_dir, INDEX_NAME)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            weight_map = index["weight_map"]
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
        except (KeyError, TypeError):
            raise CheckpointError(f"{index_path}: no 'weight_map' object") from None
        if check_files:
            shards = {}
            for fname in sorted(set(weight_map.values())):
                shards[fname] = read_header(os.path.join(ckpt_dir, fname))
            for key, fname in weight_map.items():
                if key not in shards[fname]:
                    raise CheckpointError(f"{os.path.join(ckpt_dir, fname)}: index lists tensor {key!r} "
                                          f"but the shard does not hold it")
        return OrderedDict(weight_map)
    single = os.path.join(ckpt_dir, SINGLE_NAME)
    if os.path.exists(single):
        return OrderedDict((k, SINGLE_NAME) for k in read_header(single))
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


_ST_DTYPE = {v: k for k, v in DTYPES.items()}  # torch dtype -> safetensors name


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def spec_nbytes(spec: tuple) -> int:
    """Bytes of a (shape, dtype) tensor spec."""
    shape, dtype = spec
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


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
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name in names:
                got, t = next(it, (None, None))
                shape, dtype = specs[name]
                if got != name or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise CheckpointError(f"writing shards: expected tensor {name!r} {dtype_name(dtype)} {list(shape)}, the "
                                          f"source gave {got!r}" + ("" if t is None else
                                                                    f" {dtype_name(t.dtype)} {list(t.shape)}"))
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


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False):
    """Yield a temporary sibling directory that becomes ``out_dir`` only when the block finishes.

    A run killed or failing inside the block leaves ``<out_dir>.tmp-<pid>`` (removed on a clean failure), never a
    directory at ``out_dir`` that looks complete. An existing ``out_dir`` is an error unless ``overwrite``.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copy the tokenizer / processor / config files that exist in ``src_dir``; returns their names."""
    copied = []
    for name in SIDE_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied
