"""Reading images safely: path checks against an image root, full decoding with reason codes, and conversion
to RGB. Used by ``prepare_ai2d.py`` (validation) and the dataset (training); imports no torch so preparation
workers start fast.

Modes: everything goes through ``Image.convert("RGB")`` as the original's ``load_pil_images`` does (L and P are
expanded, CMYK converted, the alpha of RGBA / LA / PA dropped without compositing), except 16-bit greyscale
(``I;16*``), which Pillow would clip to 255 (an all-white image): it is scaled to 8 bits first (v >> 8).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
from PIL import Image

# PIL's own default limit (89.5 Mpx); larger images are refused as likely decompression bombs.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageLoadError(ValueError):
    """An image cannot be used; ``reason`` is a short code (missing_file, undecodable_image, image_too_large,
    empty_image, path_escape, bad_path), the message names the path."""

    def __init__(self, path: str, reason: str, detail: str):
        super().__init__(f"{path}: {reason}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB as the original's ``load_pil_images`` does (``.convert("RGB")``: alpha dropped, not
    composited; palette expanded; CMYK converted), except 16-bit greyscale, which Pillow would clip to 255 (a
    white image): it is scaled to 8 bits first (v >> 8)."""
    if img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16)
        img = Image.fromarray((arr >> 8).astype(np.uint8))  # 2-D uint8 -> mode L
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def load_image(path: str, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, fully decode and convert an image to RGB; raise :class:`ImageLoadError` with a reason code.

    ``max_pixels``: images with more pixels are refused before decoding (decompression-bomb guard); None
    disables the check (Pillow's own hard limit of twice its default still applies).
    """
    if not os.path.exists(path):
        raise ImageLoadError(path, "missing_file", "no such file")
    if not os.path.isfile(path):
        raise ImageLoadError(path, "missing_file", "not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise ImageLoadError(path, "image_too_large",
                                         f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                                         f"(possible decompression bomb)")
                im.load()
                rgb = to_rgb(im)
                if rgb is im:
                    rgb = im.copy()  # detach from the file handle that the with-block closes
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, "image_too_large", f"{e} (possible decompression bomb)") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), ValueError, SyntaxError...
        raise ImageLoadError(path, "undecodable_image", f"{type(e).__name__}: {e}") from None
    if rgb.width == 0 or rgb.height == 0:
        raise ImageLoadError(path, "empty_image", f"size {rgb.size}")
    return rgb


def image_size(path: str, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of ``path`` from its header only (Pillow's ``open`` reads no pixel data), with the checks
    and reason codes of :func:`load_image` that need no decoding (missing_file, undecodable_image for an
    unidentifiable header, image_too_large, empty_image). A file whose pixel data is damaged passes here and
    fails later in :func:`load_image`."""
    if not os.path.isfile(path):
        raise ImageLoadError(path, "missing_file", "no such file" if not os.path.exists(path) else "not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, "image_too_large", f"{e} (possible decompression bomb)") from None
    except Exception as e:  # UnidentifiedImageError, OSError, ...
        raise ImageLoadError(path, "undecodable_image", f"{type(e).__name__}: {e}") from None
    if max_pixels is not None and w * h > max_pixels:
        raise ImageLoadError(path, "image_too_large", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                                                      f"(possible decompression bomb)")
    if w == 0 or h == 0:
        raise ImageLoadError(path, "empty_image", f"size {(w, h)}")
    return w, h


def resolve_under_root(root: str, rel_path, real_root: Optional[str] = None) -> str:
    """``root / rel_path`` after checking that it stays inside ``root``: the path must be a non-empty relative
    string without ``..`` components, and after resolving symbolic links it must still lie under the root.
    Raises :class:`ImageLoadError` with reason ``path_escape`` (or ``bad_path``). ``real_root``: a precomputed
    ``os.path.realpath(root)``."""
    if not isinstance(rel_path, str) or not rel_path.strip():
        raise ImageLoadError(str(rel_path), "bad_path", "an image path must be a non-empty string")
    if "\0" in rel_path:
        raise ImageLoadError(repr(rel_path), "bad_path", "NUL byte in the image path")
    if os.path.isabs(rel_path) or rel_path.startswith("~"):
        raise ImageLoadError(rel_path, "path_escape", "absolute paths are not allowed; give a path relative to "
                                                      "the image root")
    parts = rel_path.replace("\\", "/").split("/")
    if ".." in parts:
        raise ImageLoadError(rel_path, "path_escape", "'..' is not allowed in image paths")
    full = os.path.join(root, rel_path)
    real_root = real_root or os.path.realpath(root)
    real = os.path.realpath(full)
    if os.path.commonpath([real, real_root]) != real_root:
        raise ImageLoadError(rel_path, "path_escape", f"resolves to {real}, outside the image root {real_root}")
    return full


def check_image(path: str, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Fully decode ``path`` (raising :class:`ImageLoadError`); returns (width, height)."""
    return load_image(path, max_pixels).size
