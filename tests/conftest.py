"""Shared fixtures: tiny DeepSeek-VL2 checkpoints in the released HF layout, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED_CONFIGS = os.path.join(REPO, "tests", "data", "released_configs")


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
