"""Dynamic tiling and normalisation: reference-sheet resolutions, token counts, hand-computed pixel values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from recipe.config import _tile_candidates
from recipe.data.tiling import ImageTiler, normalization_table, select_best_resolution, to_tensor

CANDIDATES_384 = _tile_candidates(384)


@pytest.mark.parametrize("size, best", [
    ((384, 384), (384, 384)), ((385, 384), (768, 384)), ((800, 600), (1152, 768)), ((640, 480), (768, 768)),
    ((1000, 300), (1152, 384)), ((300, 1500), (384, 1536)), ((2000, 2000), (1152, 1152)),
])
def test_select_best_resolution_reference_cases(size, best):
    assert select_best_resolution(size, CANDIDATES_384) == best


def test_select_best_resolution_tie_rules():
    # Both keep every pixel of a 10x10 image; the smaller canvas wastes less and wins, whatever the order.
    assert select_best_resolution((10, 10), [(40, 40), (20, 20)]) == (20, 20)
    # Exact tie in effective and waste: the first candidate wins (strict comparisons).
    assert select_best_resolution((10, 10), [(20, 40), (40, 20)]) == (20, 40)


def test_released_candidates_are_the_23_pairs():
    assert len(CANDIDATES_384) == 23
    assert CANDIDATES_384[:3] == [[384, 384], [384, 768], [768, 384]]
    assert all(w * h <= 9 * 384 * 384 for w, h in CANDIDATES_384)


def test_normalization_table_is_torchvision_float32_op_order():
    table = normalization_table((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    v = np.arange(256, dtype=np.float32)
    # ToTensor: float32(v) / 255; Normalize: (x - 0.5) / 0.5, each step rounded to float32.
    expected = (v / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    assert table.dtype == np.float32 and table.shape == (3, 256)
    assert np.array_equal(table[0], expected) and np.array_equal(table[2], expected)
    # The pad colour 127 maps to about -1/255, not 0; and op-by-op float32 rounding differs from rounding the
    # exact value once (which is why the table is built with the same operations, not a closed form).
    assert abs(float(table[0, 127]) + 1 / 255) < 1e-9
    assert table[0, 127] != np.float32(-1 / 255)
    assert table[0, 0] == -1.0 and table[0, 255] == 1.0
    plain = normalization_table((0.5,) * 3, (0.5,) * 3, normalize=False)
    assert np.array_equal(plain[1], v / np.float32(255))


def _value(v: int) -> float:
    return float((np.float32(v) / np.float32(255) - np.float32(0.5)) / np.float32(0.5))


def test_to_tensor_layout():
    arr = np.zeros((2, 3, 3), dtype=np.uint8)
    arr[0, 1] = (255, 0, 127)
    t = to_tensor(Image.fromarray(arr), normalization_table((0.5,) * 3, (0.5,) * 3))
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[:, 0, 1].tolist() == [1.0, -1.0, _value(127)]


def test_tiles_of_a_two_colour_wide_image_hand_computed():
    """84x42 image, left half colour A, right half colour B, tiles of 42: the canvas is exactly (84, 42), so the
    two local tiles are the two halves, unresized; the global view is the image shrunk to 42x21 and pasted at
    y = round(21 / 2) = 10 on a 127-grey canvas."""
    S = 42
    A, B = (10, 128, 250), (200, 30, 0)
    arr = np.zeros((S, 2 * S, 3), dtype=np.uint8)
    arr[:, :S], arr[:, S:] = A, B
    tiler = ImageTiler(_tile_candidates(S), S)
    views = tiler(Image.fromarray(arr))
    assert (views.width_tiles, views.height_tiles) == (2, 1)
    assert views.tiles.shape == (3, 3, S, S)
    for c in range(3):
        assert torch.all(views.tiles[1, c] == _value(A[c]))
        assert torch.all(views.tiles[2, c] == _value(B[c]))
    glob = views.tiles[0]
    assert torch.all(glob[:, :10] == _value(127)) and torch.all(glob[:, 31:] == _value(127))
    # A constant region stays constant under bicubic resampling (weights sum to 1); away from the A|B seam:
    for c in range(3):
        assert torch.all(glob[c, 10:31, :19] == _value(A[c]))
        assert torch.all(glob[c, 10:31, 23:] == _value(B[c]))


def test_no_cropping_gives_global_plus_one_identical_tile():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 130, 3), dtype=np.uint8))
    views = ImageTiler(_tile_candidates(42), 42)(img, cropping=False)
    assert (views.width_tiles, views.height_tiles) == (1, 1)
    assert views.tiles.shape == (2, 3, 42, 42)
    assert torch.equal(views.tiles[0], views.tiles[1])


def test_tile_order_is_row_major():
    """A 2x2 grid of solid quadrants at exactly the canvas size: tiles come top-left, top-right, bottom-left,
    bottom-right."""
    S = 42
    colours = [(0, 0, 0), (60, 60, 60), (120, 120, 120), (240, 240, 240)]
    arr = np.zeros((2 * S, 2 * S, 3), dtype=np.uint8)
    arr[:S, :S], arr[:S, S:], arr[S:, :S], arr[S:, S:] = colours
    views = ImageTiler(_tile_candidates(S), S)(Image.fromarray(arr))
    assert (views.width_tiles, views.height_tiles) == (2, 2)
    assert [float(views.tiles[1 + k, 0, 5, 5]) for k in range(4)] == [_value(c[0]) for c in colours]


def test_tiler_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        ImageTiler(_tile_candidates(42), 42)(Image.new("L", (10, 10)))
