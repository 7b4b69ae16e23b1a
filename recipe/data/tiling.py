"""Dynamic tiling and normalisation of DeepSeek-VL2 images (S = tile size, 384 released).

1. ``cropping`` is on when the whole conversation has at most 2 images. Then the canvas is the candidate
   resolution picked by :func:`select_best_resolution`, else it is S x S.
2. Global view: ``ImageOps.pad(img, (S, S), color=fill)``: aspect-preserving bicubic resize (upscaling allowed)
   centred on a canvas of ``fill`` = int(mean * 255) = 127.
3. Local views: ``ImageOps.pad(img, canvas)`` cut into S x S tiles in row-major order.
4. Each view: ToTensor then Normalize(mean, std), i.e. ``(u8 / 255 - mean) / std`` in float32, operation by
   operation as torchvision does it. There are only 256 input values per channel, so a 256-entry table computed
   with exactly those float32 operations gives bit-identical values at the cost of one gather.

Pillow's own ``ImageOps.pad`` does the resize, so pixel values are bit-exact with the original for the same
Pillow version. No torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps


def select_best_resolution(image_size: tuple[int, int], candidates: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The candidate (width, height) that keeps the most of the image's pixels after an aspect-preserving fit.

    For each candidate: scale = min(cw / W, ch / H), effective = min(int(W * scale) * int(H * scale), W * H),
    wasted = cw * ch - effective. The largest effective wins; ties go to the smaller waste, then to the first
    candidate in list order (strict comparisons, as the original).
    """
    W, H = image_size
    best, best_eff, best_waste = None, 0, float("inf")
    for cw, ch in candidates:
        scale = min(cw / W, ch / H)
        eff = min(int(W * scale) * int(H * scale), W * H)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cw, ch), eff, waste
    if best is None:  # every candidate keeps zero pixels: only possible for degenerate inputs
        best = tuple(candidates[0])
    return best


def normalization_table(mean: Sequence[float], std: Sequence[float], normalize: bool = True) -> np.ndarray:
    """[3, 256] float32: channel c maps byte v to ``(float32(v) / 255 - mean[c]) / std[c]`` computed with the same
    float32 torch operations, in the same order, as ``ToTensor`` (``.float().div(255)``) + ``Normalize``
    (``sub_(mean).div_(std)``)."""
    v = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255)
    v = v.expand(3, 256).clone()
    if normalize:
        m = torch.as_tensor(list(mean), dtype=torch.float32)[:, None]
        s = torch.as_tensor(list(std), dtype=torch.float32)[:, None]
        v = v.sub_(m).div_(s)
    return v.numpy().copy()


def _rgb_array(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got mode {img.mode} with array shape {arr.shape}")
    return arr


def _normalize_into(out_CHW: np.ndarray, arr_HWC: np.ndarray, table: np.ndarray) -> None:
    """out[c, ...] = table[c][arr[..., c]]: ToTensor + Normalize as one gather per channel. ``out`` and ``arr``
    may be strided views (the tile split is fused into the gather that way)."""
    for c in range(3):
        np.take(table[c], arr_HWC[..., c], out=out_CHW[..., c, :, :])


def to_tensor(img: Image.Image, table: np.ndarray) -> torch.Tensor:
    """RGB image [H, W] -> float32 [3, H, W] through the byte table."""
    arr = _rgb_array(img)
    out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.float32)
    _normalize_into(out, arr, table)
    return torch.from_numpy(out)


@dataclass
class ImageViews:
    """One image's views: ``tiles`` [1 + tw*th, 3, S, S] float32 (global view first, then the local tiles in
    row-major order) and the grid ``(width_tiles, height_tiles)``."""

    tiles: torch.Tensor
    width_tiles: int
    height_tiles: int


class ImageTiler:
    """Turns one PIL RGB image into DeepSeek-VL2's views (see the module docstring)."""

    def __init__(self, candidate_resolutions: Sequence[Sequence[int]], image_size: int,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 normalize: bool = True):
        self.candidates = [tuple(int(v) for v in r) for r in candidate_resolutions]
        self.S = int(image_size)
        self.fill = tuple(int(x * 255) for x in mean)  # the original's pad colour: int(0.5 * 255) = 127
        self.table = normalization_table(mean, std, normalize)

    def canvas(self, image_size: Sequence[int], cropping: bool = True) -> tuple[int, int]:
        """The (width, height) canvas the local tiles are cut from, for an image of ``image_size`` = (width,
        height): the best candidate resolution with cropping, else one tile."""
        W, H = (int(v) for v in image_size)
        if min(W, H) <= 0:
            raise ValueError(f"empty image of size {(W, H)}")
        return select_best_resolution((W, H), self.candidates) if cropping else (self.S, self.S)

    def grid(self, image_size: Sequence[int], cropping: bool = True) -> tuple[int, int]:
        """(width_tiles, height_tiles) :meth:`__call__` cuts an image of ``image_size`` into, from the size alone
        (the length index measures samples this way, without decoding pixels)."""
        best_w, best_h = self.canvas(image_size, cropping)
        return best_w // self.S, best_h // self.S

    def __call__(self, img: Image.Image, cropping: bool = True) -> ImageViews:
        if img.mode != "RGB":
            raise ValueError(f"expected an RGB image (use load_image or .convert('RGB')), got mode {img.mode}")
        S = self.S
        best_w, best_h = self.canvas(img.size, cropping)
        tw, th = best_w // S, best_h // S
        out = np.empty((1 + tw * th, 3, S, S), dtype=np.float32)
        _normalize_into(out[0], _rgb_array(ImageOps.pad(img, (S, S), color=self.fill)), self.table)
        if (best_w, best_h) == (S, S):
            # The one local tile is the same padded image as the global view: reuse it instead of resizing again.
            out[1] = out[0]
        else:
            canvas = _rgb_array(ImageOps.pad(img, (best_w, best_h), color=self.fill))  # [th*S, tw*S, 3]
            # Crop (j, i, j+S, i+S) for i over rows, j over columns, row-major == this view of the canvas:
            # [th, S, tw, S, 3] -> [th, tw, S, S, 3], gathered straight into the tiles [th, tw, 3, S, S].
            tiles_in = canvas.reshape(th, S, tw, S, 3).transpose(0, 2, 1, 3, 4)
            _normalize_into(out[1:].reshape(th, tw, 3, S, S), tiles_in, self.table)
        return ImageViews(tiles=torch.from_numpy(out), width_tiles=tw, height_tiles=th)
