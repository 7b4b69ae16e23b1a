"""prepare_ai2d.py: conversion, every validation reason, the report, the failure threshold, idempotence, workers,
and the synthetic ai2d generator it is demonstrated on."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from recipe.prepare_ai2d import main, prepare
from recipe.tools.make_synthetic_ai2d import make_synthetic_ai2d

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def huge_png_header(path, w=30000, h=30000):
    """A few bytes claiming a 900-Mpx image (the shape of a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _h(v):
    return {"from": "human", "value": v}


def _g(v):
    return {"from": "gpt", "value": v}


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a.png": (64, 48), "b.png": (30, 90), "c.jpg": (50, 50)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(r / "img" / name)
    (r / "img" / "empty.png").write_bytes(b"")
    huge_png_header(r / "img" / "bomb.png")
    Image.new("RGB", (1, 1)).save(r / "img" / "dot.png")
    Image.new("L", (10000, 100)).save(r / "img" / "strip.png")
    data = (r / "img" / "a.png").read_bytes()
    (r / "img" / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "outside.png").write_bytes(data)
    return r


def _run(tmp_path, root, records, **kw):
    inp = _write_jsonl(tmp_path / "in.jsonl", records)
    out = str(tmp_path / "out.jsonl")
    kw.setdefault("progress", False)
    report = prepare(inp, str(root), out, **kw)
    rows = [json.loads(line) for line in open(out)] if os.path.exists(out) else None
    return report, rows, out


def test_conversion_places_images_on_their_turn_and_keeps_system(tmp_path, root):
    records = [
        {"id": "single", "image": "img/a.png", "conversations": [_h("<image>\nQ?"), _g("A")]},
        {"id": 2, "images": ["img/a.png", "img/b.png"],
         "conversations": [{"from": "system", "value": "Sys."}, _h("First: <image>"), _g("x"),
                           _h("Now <image> too"), _g("y")]},
        {"id": "text", "conversations": [_h("2 + 2?"), _g("4")], "width": 10},
        {"id": "extremes", "images": ["img/dot.png", "img/strip.png"],
         "conversations": [_h("<image><image>"), _g("a")]},
    ]
    report, rows, _ = _run(tmp_path, root, records)
    assert report["status"] == "ok" and report["valid"] == 4 and report["invalid"] == 0
    assert rows[3]["image_sizes"] == [[1, 1], [10000, 100]]
    assert rows[0] == {"id": "single", "image_sizes": [[64, 48]], "conversations": [
        {"role": "<|User|>", "content": "<image>\nQ?", "images": ["img/a.png"]},
        {"role": "<|Assistant|>", "content": "A"}]}
    conv = rows[1]["conversations"]
    assert [m["role"] for m in conv] == ["system", "<|User|>", "<|Assistant|>", "<|User|>", "<|Assistant|>"]
    assert conv[1]["images"] == ["img/a.png"] and conv[3]["images"] == ["img/b.png"]
    assert all("images" not in m for m in (conv[0], conv[2], conv[4]))
    assert rows[1]["id"] == 2 and rows[2] == {"id": "text", "conversations": [
        {"role": "<|User|>", "content": "2 + 2?"}, {"role": "<|Assistant|>", "content": "4"}]}


BAD = [
    ('{"id": 1, "conversations": [', "invalid_json"),
    ("[1, 2]", "not_an_object"),
    ({"conversations": [_h("q"), _g("a")]}, "missing_key"),
    ({"id": "x"}, "missing_key"),
    ({"id": "x", "conversations": [{"from": "human"}, _g("a")]}, "missing_key"),
    ({"id": "x", "conversations": "hi"}, "bad_type"),
    ({"id": "x", "image": "img/a.png", "images": ["img/a.png"], "conversations": [_h("<image>"), _g("a")]},
     "bad_type"),
    ({"id": "x", "image": 5, "conversations": [_h("<image>"), _g("a")]}, "bad_type"),
    ({"id": "x", "conversations": [{"from": "bot", "value": "q"}, _g("a")]}, "unknown_role"),
    ({"id": "x", "conversations": [_g("a"), _h("q")]}, "bad_turn_order"),
    ({"id": "x", "conversations": [_h("q"), _h("q2"), _g("a")]}, "bad_turn_order"),
    ({"id": "x", "conversations": [_h("q")]}, "bad_turn_order"),
    ({"id": "x", "conversations": [_h("q"), {"from": "system", "value": "s"}, _g("a")]}, "bad_turn_order"),
    ({"id": "x", "conversations": [_h("q"), _g("  ")]}, "empty_turn"),
    ({"id": "x", "image": "img/a.png", "conversations": [_h("q"), _g("<image> a")]}, "placeholder_in_answer"),
    ({"id": "x", "image": "img/a.png", "conversations": [_h("q"), _g("a")]}, "placeholder_mismatch"),
    ({"id": "x", "conversations": [_h("<image> q"), _g("a")]}, "placeholder_mismatch"),
    ({"id": "x", "images": ["img/a.png"], "conversations": [_h("<image><image>"), _g("a")]}, "placeholder_mismatch"),
    ({"id": "x", "image": "../outside.png", "conversations": [_h("<image>"), _g("a")]}, "path_escape"),
    ({"id": "x", "image": "/etc/hostname", "conversations": [_h("<image>"), _g("a")]}, "path_escape"),
    ({"id": "x", "image": "", "conversations": [_h("<image>"), _g("a")]}, "bad_path"),
    ({"id": "x", "image": "img/nope.png", "conversations": [_h("<image>"), _g("a")]}, "missing_file"),
    ({"id": "x", "image": "img/empty.png", "conversations": [_h("<image>"), _g("a")]}, "undecodable_image"),
    ({"id": "x", "image": "img/trunc.png", "conversations": [_h("<image>"), _g("a")]}, "undecodable_image"),
    ({"id": "x", "image": "img/bomb.png", "conversations": [_h("<image>"), _g("a")]}, "image_too_large"),
]


@pytest.mark.parametrize("record, reason", BAD, ids=[f"{r}-{i}" for i, (_, r) in enumerate(BAD)])
def test_each_invalid_record_is_reported(tmp_path, root, record, reason):
    good = {"id": "ok", "image": "img/c.jpg", "conversations": [_h("<image>"), _g("a")]}
    report, rows, _ = _run(tmp_path, root, [good, record], max_invalid_fraction=0.5)
    assert report["valid"] == 1 and report["invalid"] == 1, report["skipped"]
    assert report["invalid_by_reason"] == {reason: 1}
    item = report["skipped"][0]
    assert item["line"] == 2 and item["reason"] == reason and item["message"]
    assert [r["id"] for r in rows] == ["ok"]


def test_decode_check_can_be_skipped_and_bombs_refused(tmp_path, root):
    rec = {"id": "x", "image": "img/trunc.png", "conversations": [_h("<image>"), _g("a")]}
    report, rows, _ = _run(tmp_path, root, [rec], decode_check=False)
    assert report["valid"] == 1 and "image_sizes" not in rows[0]
    rec = {"id": "x", "image": "img/a.png", "conversations": [_h("<image>"), _g("a")]}
    report, _, _ = _run(tmp_path, root, [rec], max_image_pixels=100, max_invalid_fraction=1.0)
    assert report["invalid_by_reason"] == {"image_too_large": 1}


def test_too_many_invalid_fails_without_output(tmp_path, root):
    good = {"id": "ok", "conversations": [_h("q"), _g("a")]}
    records = [good] * 8 + ["{bad json"] * 2
    report, rows, out = _run(tmp_path, root, records, max_invalid_fraction=0.1)
    assert report["status"].startswith("failed") and rows is None and not os.path.exists(out)
    assert json.load(open(out + ".report.json"))["invalid_by_reason"] == {"invalid_json": 2}
    assert [s["line"] for s in report["skipped"]] == [9, 10]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temp file left behind
    report, rows, _ = _run(tmp_path, root, records, max_invalid_fraction=0.2)
    assert report["status"] == "ok" and len(rows) == 8 and report["duplicate_ids"] == 7


def test_prepend_missing_image_is_opt_in(tmp_path, root):
    rec = {"id": "x", "image": "img/a.png", "conversations": [_h("What is this?"), _g("a")]}
    report, _, _ = _run(tmp_path, root, [rec], max_invalid_fraction=1.0)
    assert report["invalid_by_reason"] == {"placeholder_mismatch": 1}
    report, rows, _ = _run(tmp_path, root, [rec], prepend_missing_image=True)
    assert report["fixed_missing_placeholder"] == 1
    assert rows[0]["conversations"][0]["content"] == "<image>\nWhat is this?"


def test_blank_lines_are_counted_not_records(tmp_path, root):
    report, rows, _ = _run(tmp_path, root, [{"id": 1, "conversations": [_h("q"), _g("a")]}, "", "  "])
    assert report["records"] == 1 and report["blank_lines"] == 2 and len(rows) == 1


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    make_synthetic_ai2d(str(d), num=60, seed=3)
    return d


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_synthetic_generator_is_deterministic(tmp_path, synthetic):
    make_synthetic_ai2d(str(tmp_path / "again"), num=60, seed=3)
    assert _sha(synthetic / "ai2d_train.jsonl") == _sha(tmp_path / "again" / "ai2d_train.jsonl")
    names = sorted(os.listdir(synthetic / "images"))
    assert names == sorted(os.listdir(tmp_path / "again" / "images"))
    assert all(_sha(synthetic / "images" / n) == _sha(tmp_path / "again" / "images" / n) for n in names[:10])
    rows = [json.loads(line) for line in open(synthetic / "ai2d_train.jsonl")]
    kinds = {("images" in r) * 2 + ("image" in r) for r in rows}
    assert kinds == {0, 1, 2}  # text-only, one image, two images
    assert any(len(r["conversations"]) == 4 for r in rows)  # multi-turn
    sizes = [Image.open(synthetic / r["image"]).size for r in rows if "image" in r]
    assert any(w >= 2 * h for w, h in sizes) and any(h >= 2 * w for w, h in sizes)  # wide and tall


def test_workers_chunks_and_idempotence(tmp_path, synthetic):
    inp = str(synthetic / "ai2d_train.jsonl")
    out1, out2 = str(tmp_path / "o1.jsonl"), str(tmp_path / "o2.jsonl")
    r1 = prepare(inp, str(synthetic), out1, num_workers=1, progress=False)
    r2 = prepare(inp, str(synthetic), out2, num_workers=2, chunk_lines=7, progress=False)
    assert r1["valid"] == r2["valid"] == 60
    assert _sha(out1) == _sha(out2)
    prepare(inp, str(synthetic), out1, num_workers=2, progress=False)  # re-run over the existing output
    assert _sha(out1) == _sha(out2)


def test_cli_runs_as_a_script(tmp_path, synthetic):
    script = os.path.join(REPO, "recipe", "prepare_ai2d.py")
    help_ = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True)
    assert "--image-root" in help_.stdout and "--num-workers" in help_.stdout
    out = str(tmp_path / "out.jsonl")
    r = subprocess.run([sys.executable, script, "--input", str(synthetic / "ai2d_train.jsonl"), "--image-root",
                        str(synthetic), "--output", out, "--num-workers", "2", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sum(1 for _ in open(out)) == 60 and os.path.exists(out + ".report.json")
    bad = _write_jsonl(tmp_path / "bad.jsonl", ["nope"])
    r = subprocess.run([sys.executable, script, "--input", bad, "--image-root", str(synthetic), "--output",
                        str(tmp_path / "b.jsonl"), "--num-workers", "1", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 1 and "invalid_json" in r.stderr and not os.path.exists(tmp_path / "b.jsonl")


def test_main_rejects_bad_paths(tmp_path, synthetic):
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--image-root", str(synthetic), "--output",
                 str(tmp_path / "o.jsonl"), "--quiet"]) == 2
