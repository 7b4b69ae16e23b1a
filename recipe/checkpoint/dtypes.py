"""The one reader of dtype names: command-line and JSON spellings, safetensors header codes, byte sizes."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

# safetensors header code <-> torch dtype
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_CODE = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# what users write (--dtype, torch_dtype in config.json, DeepSpeed's data_types) -> dtype; None = keep as stored
_ALIASES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
            "float": torch.float32, "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
            "keep": None, "auto": None}

DtypeArg = Union[torch.dtype, str, None]


def parse_dtype(dtype: DtypeArg) -> Optional[torch.dtype]:
    """``torch.bfloat16`` / "bf16" / "torch.float32" / "fp16" / ... -> dtype; None, "keep" or "auto" -> None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _ALIASES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(_ALIASES)}")
    return _ALIASES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the manifest's and the logs' spelling)."""
    return str(dtype).removeprefix("torch.")


def dtype_bytes(dtype: DtypeArg, default: int) -> int:
    """Bytes per element of a dtype name ("fp32" -> 4), or ``default`` when ``dtype`` is None."""
    parsed = parse_dtype(dtype)
    return default if parsed is None else torch.empty((), dtype=parsed).element_size()


def spec_nbytes(spec: tuple) -> int:
    """Bytes of a (shape, dtype) tensor spec."""
    shape, dtype = spec
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
