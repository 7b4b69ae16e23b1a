"""Shared fixtures: tiny DeepSeek-VL2 checkpoints in the released HF layout, built once per test session."""

from __future__ import annotations

import os

import pytest

from helpers.launch import REPO

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

RELEASED_CONFIGS = os.path.join(REPO, "recipe", "released_configs")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Factory: ``tiny_ckpt(like="tiny", image_size=42, dtype="fp32", **kw)`` -> checkpoint directory (cached)."""
    import torch

    from recipe.tools.make_tiny import make_tiny

    cache = {}

    def make(like: str = "tiny", image_size: int = 42, dtype: str = "fp32", **kw) -> str:
        key = (like, image_size, dtype, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{like}-{image_size}-{dtype}") / "model"
            make_tiny(str(out), like=like, image_size=image_size,
                      dtype=torch.float32 if dtype == "fp32" else torch.bfloat16, **kw)
            cache[key] = str(out)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def converted(tiny_ckpt, tmp_path_factory):
    """(HF dir, converted dir) of a bf16 tiny checkpoint like base (MLA, sigmoid noaux_tc), 42 px tiles."""
    from recipe.checkpoint.converted import convert_hf_to_ds

    hf = tiny_ckpt(like="base", image_size=42, dtype="bf16")
    out = str(tmp_path_factory.mktemp("converted") / "ds")
    convert_hf_to_ds(hf, out, progress=False)
    return hf, out


@pytest.fixture(scope="session")
def run_inputs(converted, tmp_path_factory):
    """Prepared synthetic ai2d data and the converted tiny checkpoint, as train.py reads them."""
    from recipe.prepare_ai2d import prepare
    from recipe.tools.make_synthetic_ai2d import make_synthetic_ai2d

    root = tmp_path_factory.mktemp("run")
    raw = root / "ai2d"
    make_synthetic_ai2d(str(raw), num=60, seed=1)
    data = root / "ai2d_dsvl.jsonl"
    prepare(str(raw / "ai2d_train.jsonl"), str(raw), str(data), progress=False)
    return {"model_dir": converted[1], "train_data": str(data), "image_root": str(raw), "root": root}
