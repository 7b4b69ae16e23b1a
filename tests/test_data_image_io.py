"""Image decoding and path checks on bad input: each case gets its reason code and a message naming the path."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from recipe.data.image_io import ImageLoadError, check_image, load_image, resolve_under_root, to_rgb


def _png(path, w=40, h=30, mode="RGB"):
    Image.new(mode, (w, h)).save(path)
    return str(path)


def _noise_png_bytes() -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def huge_png_header(path, w=30000, h=30000):
    """A tiny file claiming a huge image: signature + IHDR + a short IDAT (a decompression-bomb shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                + chunk(b"IEND", b""))
    return str(path)


def test_good_image(tmp_path):
    img = load_image(_png(tmp_path / "a.png"))
    assert img.mode == "RGB" and img.size == (40, 30)
    assert check_image(str(tmp_path / "a.png")) == (40, 30)


@pytest.mark.parametrize("make, reason", [
    (lambda p: None, "missing_file"),
    (lambda p: os.makedirs(p), "missing_file"),
    (lambda p: open(p, "wb").close(), "undecodable_image"),                                  # zero bytes
    (lambda p: open(p, "wb").write(b"this is not an image"), "undecodable_image"),
    (lambda p: open(p, "wb").write(_noise_png_bytes()[:2000]), "undecodable_image"),         # truncated
    (lambda p: huge_png_header(p), "image_too_large"),                                       # bomb
])
def test_bad_images(tmp_path, make, reason):
    p = tmp_path / "x.png"
    make(p)
    with pytest.raises(ImageLoadError) as e:
        load_image(str(p))
    assert e.value.reason == reason and str(p) in str(e.value)


def test_truncated_jpeg(tmp_path):
    src = tmp_path / "a.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(src)
    data = src.read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="undecodable_image"):
        load_image(str(tmp_path / "t.jpg"))


def test_pixel_limit_is_a_setting(tmp_path):
    p = _png(tmp_path / "a.png", 20, 20)
    with pytest.raises(ImageLoadError, match="image_too_large.*400 pixels exceeds the limit of 100"):
        load_image(p, max_pixels=100)
    assert load_image(p, max_pixels=None).size == (20, 20)


@pytest.mark.parametrize("size", [(1, 1), (10000, 100)])
def test_extreme_sizes_decode(tmp_path, size):
    assert load_image(_png(tmp_path / "a.png", *size)).size == size


def test_modes_are_converted_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8))
    for mode, ext in (("L", "png"), ("P", "png"), ("RGBA", "png"), ("LA", "png"), ("CMYK", "jpg"), ("1", "png")):
        p = str(tmp_path / f"m_{mode}.{ext}")
        rgb.convert(mode).save(p)
        out = load_image(p)
        assert out.mode == "RGB" and out.size == (6, 8)
        with Image.open(p) as im:  # the original's rule: convert("RGB") (alpha dropped, not composited)
            assert np.array_equal(np.asarray(out), np.asarray(im.convert("RGB")))


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    arr = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    p = str(tmp_path / "g16.png")
    Image.fromarray(arr).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    out = np.asarray(load_image(p))
    assert np.array_equal(out[..., 0], (arr >> 8).astype(np.uint8)) and np.array_equal(out[..., 0], out[..., 2])
    assert to_rgb(Image.fromarray(arr)).mode == "RGB"


@pytest.mark.parametrize("rel, reason", [
    ("/etc/passwd", "path_escape"), ("../outside.png", "path_escape"), ("a/../../outside.png", "path_escape"),
    ("", "bad_path"), (None, "bad_path"), (7, "bad_path"),
])
def test_paths_may_not_leave_the_root(tmp_path, rel, reason):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ImageLoadError) as e:
        resolve_under_root(str(root), rel)
    assert e.value.reason == reason


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = _png(tmp_path / "secret.png")
    os.symlink(outside, root / "link.png")
    with pytest.raises(ImageLoadError, match="path_escape.*outside the image root"):
        resolve_under_root(str(root), "link.png")
    assert resolve_under_root(str(root), "sub/ok.png") == os.path.join(str(root), "sub/ok.png")
