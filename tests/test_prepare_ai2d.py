"""prepare_ai2d.py: conversion, every validation reason, the report, the failure threshold, idempotence, workers,
and the synthetic ai2d generator it is demonstrated on."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from recipe.data.internvl import REASONS
from recipe.prepare_ai2d import main, prepare
from recipe.tools.make_synthetic_ai2d import make_synthetic_ai2d

from helpers.launch import REPO


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


# --- hostile input: every bad line is one counted, reported record; the run never crashes -------------------------
GOOD = {"id": "ok", "image": "img/c.jpg", "conversations": [_h("<image>"), _g("a")]}
GOOD_LINE = json.dumps(GOOD).encode()


def _run_bytes(tmp_path, root, lines, **kw):
    """prepare() over raw byte lines (joined with b"\\n"); returns the report, the output rows, the output path."""
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    out = str(tmp_path / "out.jsonl")
    kw.setdefault("progress", False)
    kw.setdefault("max_invalid_fraction", 1.0)
    report = prepare(str(inp), str(root), out, **kw)
    with open(out, "rb") as f:
        rows = [json.loads(line.decode("utf-8")) for line in f]  # strict UTF-8: the output is always valid
    with open(out + ".report.json", "rb") as f:
        assert json.loads(f.read().decode("utf-8")) == report
    return report, rows, out


def _assert_one_bad(report, rows, line, reason, n_good=2, rec_id=None):
    assert report["valid"] == n_good and report["invalid"] == 1, report["skipped"]
    assert report["invalid_by_reason"] == {reason: 1}
    (item,) = report["skipped"]
    assert item["line"] == line and item["reason"] == reason and item["message"], item
    assert item["id"] == rec_id
    assert [r["id"] for r in rows] == ["ok"] * n_good


def _with_extra(depth):
    return (b'{"id": "deep", "extra": ' + b"[" * depth + b"]" * depth + b', "conversations": '
            + json.dumps([_h("q"), _g("a")]).encode() + b"}")


@pytest.mark.parametrize("num_workers", [1, 2])
@pytest.mark.parametrize("line", [b"[" * 5000 + b"]" * 5000, b'{"a": ' * 100_000, _with_extra(5000), _with_extra(100)],
                         ids=["array-5000", "object-100000-unclosed", "extra-key-5000", "extra-key-100"])
def test_deeply_nested_json_is_reported_too_deep(tmp_path, root, line, num_workers):
    report, rows, _ = _run_bytes(tmp_path, root, [GOOD_LINE, line, GOOD_LINE], num_workers=num_workers,
                                 chunk_lines=1)
    _assert_one_bad(report, rows, 2, "too_deep")
    assert "64 levels" in report["skipped"][0]["message"]


def test_nesting_within_the_limit_and_brackets_in_text_convert(tmp_path, root):
    rec = {"id": "ok", "extra": json.loads("[" * 60 + "]" * 60),
           "conversations": [_h("<image> " + "[[[[" * 40), _g("{{{{ " * 40)], "image": "img/c.jpg"}
    report, rows, _ = _run_bytes(tmp_path, root, [json.dumps(rec).encode()])
    assert report["valid"] == 1 and rows[0]["conversations"][0]["content"] == "<image> " + "[[[[" * 40


@pytest.mark.parametrize("role", [["human"], {"human": 1}, 1, None, True])
def test_non_string_role_is_reported_bad_type(tmp_path, root, role):
    bad = {"id": "x", "conversations": [{"from": role, "value": "q"}, _g("a")]}
    report, rows, _ = _run_bytes(tmp_path, root, [GOOD_LINE, json.dumps(bad).encode(), GOOD_LINE])
    _assert_one_bad(report, rows, 2, "bad_type", rec_id="x")
    assert "conversations[0].from must be a string" in report["skipped"][0]["message"]


LONE_SURROGATES = [
    ({"id": "x", "conversations": [_h("q \ud800"), _g("a")]}, "bad_text", "x"),
    ({"id": "x", "conversations": [_h("q"), _g("\udfff")]}, "bad_text", "x"),
    ({"id": "x\udc80", "conversations": [_h("q"), _g("a")]}, "bad_text", "x\\udc80"),  # escaped in the report
    ({"id": "x", "image": "img/\udcff.png", "conversations": [_h("<image>"), _g("a")]}, "bad_text", "x"),
    ({"id": "x", "images": ["img/a.png", "\ud800"], "conversations": [_h("<image><image>"), _g("a")]}, "bad_text",
     "x"),
    ({"id": "x", "conversations": [{"from": "hu\ud800man", "value": "q"}, _g("a")]}, "unknown_role", "x"),
]


@pytest.mark.parametrize("ensure_ascii", [True, False], ids=["escaped", "raw-bytes"])
@pytest.mark.parametrize("record, reason, rec_id", LONE_SURROGATES, ids=[str(i) for i in range(len(LONE_SURROGATES))])
def test_lone_surrogates_are_reported_bad_text(tmp_path, root, record, reason, rec_id, ensure_ascii):
    # json accepts "\ud800" escapes; written raw (ensure_ascii=False), a surrogate is 3 bytes that are not UTF-8.
    line = json.dumps(record, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    report, rows, _ = _run_bytes(tmp_path, root, [GOOD_LINE, line, GOOD_LINE])
    if not ensure_ascii:  # the line itself is not UTF-8: refused before it is parsed
        reason, rec_id = "bad_text", None
    _assert_one_bad(report, rows, 2, reason, rec_id=rec_id)


def test_lone_surrogate_in_an_unused_key_is_dropped_with_it(tmp_path, root):
    rec = {**GOOD, "note": "\ud800", "\udc00": 1}
    report, rows, _ = _run_bytes(tmp_path, root, [json.dumps(rec).encode()])
    assert report["valid"] == 1 and rows[0]["id"] == "ok" and "note" not in rows[0]


ODD_FIELDS = [
    ({"id": {"a": {"b": [1]}}, "conversations": [_h("q"), _g("a")]}, "bad_type"),
    ('{"id": NaN, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}', "bad_type"),
    ('{"id": -Infinity, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}',
     "bad_type"),
    ({"id": 1.5, "conversations": [_h("q"), _g("a")]}, "bad_type"),
    ({"id": True, "conversations": [_h("q"), _g("a")]}, "bad_type"),
    ({"id": None, "conversations": [_h("q"), _g("a")]}, "bad_type"),
    ('{"id": ' + "9" * 5000 + ', "conversations": []}', "invalid_json"),  # over Python's int conversion limit
    ({"id": "x", "image": 3.5, "conversations": [_h("<image>"), _g("a")]}, "bad_type"),
    ({"id": "x", "image": ["img/a.png"], "conversations": [_h("<image>"), _g("a")]}, "bad_type"),
    ({"id": "x", "images": [1, None], "conversations": [_h("<image><image>"), _g("a")]}, "bad_type"),
    ({"id": "x", "images": {"0": "img/a.png"}, "conversations": [_h("<image>"), _g("a")]}, "bad_type"),
    ({"id": "x", "images": "img/a.png", "conversations": [_h("<image>"), _g("a")]}, "bad_type"),
    ({"id": "x", "image": "img/a.png\x00.txt", "conversations": [_h("<image>"), _g("a")]}, "bad_path"),
    ({"id": "x", "image": "img/" + "n" * 5000 + ".png", "conversations": [_h("<image>"), _g("a")]},
     "missing_file"),
    ({"id": "x", "conversations": [_h(["q"]), _g("a")]}, "bad_type"),
    ({"id": "x", "conversations": [_h({"q": 1}), _g("a")]}, "bad_type"),
    ({"id": "x", "conversations": [_h(None), _g("a")]}, "bad_type"),
    ({"id": "x", "conversations": [[], _g("a")]}, "bad_type"),
    ({"id": "x", "conversations": {"0": _h("q")}}, "bad_type"),
    ('"just a string"', "not_an_object"),
    ("null", "not_an_object"),
    ("\x00\x01\x02", "invalid_json"),
]


@pytest.mark.parametrize("record, reason", ODD_FIELDS, ids=[f"{r}-{i}" for i, (_, r) in enumerate(ODD_FIELDS)])
def test_odd_field_types_are_reported(tmp_path, root, record, reason):
    line = (record if isinstance(record, str) else json.dumps(record)).encode()
    report, rows, _ = _run_bytes(tmp_path, root, [GOOD_LINE, line, GOOD_LINE])
    _assert_one_bad(report, rows, 2, reason, rec_id=record.get("id") if isinstance(record, dict)
                    and isinstance(record.get("id"), str) else None)
    assert len(report["skipped"][0]["message"]) < 1100  # clipped, even for a 5000-character path


def test_huge_integer_id_converts(tmp_path, root):
    big = 10 ** 300
    report, rows, _ = _run_bytes(tmp_path, root, [json.dumps({**GOOD, "id": big}).encode()])
    assert report["valid"] == 1 and rows[0]["id"] == big


def test_encoding_bom_crlf_blank_lines_and_invalid_utf8(tmp_path, root):
    lines = [b"\xef\xbb\xbf" + GOOD_LINE,  # a BOM at the start of the file
             GOOD_LINE + b"\r",  # CRLF line end
             b"", b"   \t\r",  # blank lines
             GOOD_LINE[:-2] + b' "x\xff\xfe"}',  # invalid UTF-8 bytes
             b"\xef\xbb\xbf",  # a BOM alone: blank
             GOOD_LINE]
    report, rows, _ = _run_bytes(tmp_path, root, lines, num_workers=2, chunk_lines=2)
    assert report["blank_lines"] == 3 and report["records"] == 4
    _assert_one_bad(report, rows, 5, "bad_text", n_good=3)
    assert "not valid UTF-8" in report["skipped"][0]["message"]


def test_overlong_lines_are_reported_without_being_read(tmp_path, root):
    long_ok = json.dumps({"id": "ok", "conversations": [_h("q" * 900), _g("a")]}).encode()
    lines = [GOOD_LINE, b"x" * 5000, long_ok, b'{"id": "y", "v": "' + b"z" * 3000]
    report, rows, _ = _run_bytes(tmp_path, root, lines, max_line_bytes=len(long_ok))
    assert report["invalid_by_reason"] == {"line_too_long": 2} and report["valid"] == 2
    assert [(s["line"], s["reason"]) for s in report["skipped"]] == [(2, "line_too_long"), (4, "line_too_long")]
    assert "5,000 bytes" in report["skipped"][0]["message"]
    assert [r["id"] for r in rows] == ["ok", "ok"]


def test_an_unexpected_error_converting_one_record_is_reported(tmp_path, root, monkeypatch):
    import recipe.data.internvl as mod

    def boom(path, max_pixels=None):
        if path.endswith("a.png"):
            raise RuntimeError("unexpected failure")
        return (50, 50)

    monkeypatch.setattr(mod, "check_image", boom)
    bad = json.dumps({"id": "x", "image": "img/a.png", "conversations": [_h("<image>"), _g("a")]}).encode()
    report, rows, _ = _run_bytes(tmp_path, root, [GOOD_LINE, bad, GOOD_LINE])
    _assert_one_bad(report, rows, 2, "conversion_error", rec_id="x")
    assert report["skipped"][0]["message"] == "RuntimeError: unexpected failure"


@pytest.mark.parametrize("flag", ["--output", "--report"])
def test_output_under_a_regular_file_is_a_one_line_error(tmp_path, synthetic, caplog, flag):
    (tmp_path / "some_file.txt").write_text("x")
    target = str(tmp_path / "some_file.txt" / "out.jsonl")
    args = ["--input", str(synthetic / "ai2d_train.jsonl"), "--image-root", str(synthetic), "--num-workers", "1",
            "--quiet", "--output", str(tmp_path / "o.jsonl")]
    with caplog.at_level("ERROR", logger="prepare_ai2d"):
        assert main(args + [flag, target]) == 2
    (rec,) = [r for r in caplog.records if r.levelname == "ERROR"]
    msg = rec.getMessage()
    assert "\n" not in msg and target in msg and "is not a directory" in msg and rec.exc_info is None
    assert sorted(os.listdir(tmp_path)) == ["some_file.txt"]  # nothing created
    assert main(args + [flag, str(tmp_path)]) == 2  # a directory as the output (or report) file
    assert sorted(os.listdir(tmp_path)) == ["some_file.txt"]


# --- property-based fuzzing --------------------------------------------------------------------------------------
_CHARS = st.one_of(st.characters(), st.sampled_from(["\ud800", "\udbff", "\udc80", "\udfff", "\x00", "\n", "\r",
                                                     '"', "\\", "[", "{", "\ufeff"]))
_TEXT = st.one_of(st.text(_CHARS, max_size=12), st.sampled_from(["<image>", "<image>\nQ?", "human", "gpt", "system",
                                                                 "img/a.png", "../a.png", "/etc/passwd", "", " "]))
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2 ** 80, max_value=2 ** 80),
                     st.floats(allow_nan=True, allow_infinity=True), _TEXT)
_DEEP = st.integers(50, 3000).map(lambda n: f"@@DEEP{n}@@")  # replaced by n nested arrays after json.dumps
_JSON = st.recursive(st.one_of(_SCALARS, _DEEP), lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(_TEXT, kids, max_size=4)), max_leaves=12)
_ROLES = st.one_of(st.sampled_from(["human", "gpt", "system", "bot", "Human", "", "human "]), _JSON)


def _deepen(text):
    return re.sub(r'"@@DEEP(\d+)@@"', lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), text)


def _base_record(i, with_image):
    rec = {"id": f"m-{i}", "conversations": [_h("<image>\nQ?" if with_image else "Q?"), _g("A")]}
    if with_image:
        rec["image"] = "img/a.png"
    return rec


@st.composite
def _mutated_record(draw, i):
    rec = _base_record(i, draw(st.booleans()))
    for _ in range(draw(st.integers(1, 2))):
        turns = rec.get("conversations")
        kind = draw(st.sampled_from(["drop", "replace", "role", "turn_value", "turn_drop", "add_turn", "extra",
                                     "surrogate"]))
        turn = turns[draw(st.integers(0, len(turns) - 1))] if isinstance(turns, list) and turns else None
        if kind == "drop" and rec:
            rec.pop(draw(st.sampled_from(sorted(rec))))
        elif kind == "replace":
            rec[draw(st.sampled_from(["id", "image", "images", "conversations"]))] = draw(_JSON)
        elif kind == "role" and isinstance(turn, dict):
            turn["from"] = draw(_ROLES)
        elif kind == "turn_value" and isinstance(turn, dict):
            turn["value"] = draw(st.one_of(_TEXT, _JSON))
        elif kind == "turn_drop" and isinstance(turn, dict) and turn:
            turn.pop(draw(st.sampled_from(sorted(turn))))
        elif kind == "add_turn" and isinstance(turns, list):
            turns.insert(draw(st.integers(0, len(turns))), {"from": draw(_ROLES), "value": draw(_TEXT)})
        elif kind == "surrogate" and isinstance(turn, dict) and isinstance(turn.get("value"), str):
            turn["value"] += draw(st.sampled_from(["\ud800", "\udfff", "\udc80x"]))
        elif kind == "surrogate" and isinstance(rec.get("id"), str):
            rec["id"] += "\udbff"
        else:
            rec[draw(_TEXT)] = draw(_JSON)
    return rec


@st.composite
def _hostile_line(draw, i):
    kind = draw(st.sampled_from(["json", "mutated", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40)).replace(b"\n", b"")
    value = draw(_JSON) if kind == "json" else draw(_mutated_record(i))
    text = _deepen(json.dumps(value, ensure_ascii=draw(st.booleans())))
    return text.encode("utf-8", "surrogatepass").replace(b"\n", b"")  # raw surrogates: not UTF-8


@st.composite
def _fuzz_file(draw, max_lines):
    n = draw(st.integers(1, max_lines))
    lines, valid_ids = [], []
    for i in range(n):
        if draw(st.booleans()):
            rec = _base_record(i, draw(st.booleans()))
            rec["id"] = f"valid-{i}"
            lines.append(json.dumps(rec).encode())
            valid_ids.append(rec["id"])
        else:
            lines.append(draw(_hostile_line(i)))
    return lines, valid_ids


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory):
    r = tmp_path_factory.mktemp("fuzz_root")
    (r / "img").mkdir()
    Image.new("RGB", (4, 3), (1, 2, 3)).save(r / "img" / "a.png")
    return r


def _check_fuzz_run(tmp_dir, root, lines, valid_ids, **kw):
    inp = os.path.join(tmp_dir, "in.jsonl")
    with open(inp, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    out = os.path.join(tmp_dir, "out.jsonl")
    report = prepare(inp, str(root), out, max_invalid_fraction=1.0, progress=False, **kw)
    blank = sum(1 for line in lines if not line.removeprefix(b"\xef\xbb\xbf").strip())
    assert report["blank_lines"] == blank and report["records"] == len(lines) - blank
    assert report["valid"] + report["invalid"] == report["records"]
    assert len(report["skipped"]) == report["invalid"] == sum(report["invalid_by_reason"].values())
    assert set(report["invalid_by_reason"]) <= set(REASONS)
    skipped_lines = [s["line"] for s in report["skipped"]]
    assert skipped_lines == sorted(set(skipped_lines)) and all(1 <= n <= len(lines) for n in skipped_lines)
    assert all(s["message"] for s in report["skipped"])
    if report["records"] == 0:
        assert report["status"].startswith("failed") and not os.path.exists(out)
        return
    assert report["status"] == "ok"
    with open(out, "rb") as f:
        rows = [json.loads(line.decode("utf-8")) for line in f]  # strict UTF-8 JSON lines
    assert len(rows) == report["valid"]
    assert all(isinstance(r, dict) and isinstance(r["conversations"], list) for r in rows)
    assert [r["id"] for r in rows if str(r["id"]).startswith("valid-")] == valid_ids
    with open(out + ".report.json", "rb") as f:
        assert json.loads(f.read().decode("utf-8"))["skipped"] == report["skipped"]


_FUZZ = dict(deadline=None, derandomize=True, database=None,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=80, **_FUZZ)
@given(data=_fuzz_file(max_lines=12))
def test_fuzz_prepare_never_crashes(tmp_path_factory, fuzz_root, data):
    _check_fuzz_run(tmp_path_factory.mktemp("fuzz"), fuzz_root, *data, num_workers=1, chunk_lines=4)


@settings(max_examples=20, **_FUZZ)
@given(data=_fuzz_file(max_lines=16))
def test_fuzz_prepare_never_crashes_with_workers(tmp_path_factory, fuzz_root, data):
    _check_fuzz_run(tmp_path_factory.mktemp("fuzz"), fuzz_root, *data, num_workers=2, chunk_lines=3)


# --- validation split (--val-fraction / --val-output) -------------------------------------------------------------
def _ids(path):
    return [json.loads(line)["id"] for line in open(path)]


def test_val_split_is_by_id_and_stable_under_reordering(tmp_path, synthetic):
    from recipe.prepare_ai2d import in_validation_split

    inp = synthetic / "ai2d_train.jsonl"
    out, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    report = prepare(str(inp), str(synthetic), str(out), progress=False, val_fraction=0.25, val_output_path=str(val))
    train_ids, val_ids = _ids(out), _ids(val)
    assert report["status"] == "ok" and report["valid"] == 60
    assert report["train_records"] == len(train_ids) and report["val_records"] == len(val_ids)
    assert 5 <= len(val_ids) <= 25 and not set(train_ids) & set(val_ids)
    assert sorted(train_ids + val_ids) == sorted(_ids(inp))
    assert all(in_validation_split(i, 0.25) for i in val_ids) and not any(in_validation_split(i, 0.25)
                                                                          for i in train_ids)
    # reversed input, several workers, small chunks: the same records are held out (in input order)
    rev = tmp_path / "rev.jsonl"
    rev.write_text("".join(reversed(open(inp).readlines())))
    prepare(str(rev), str(synthetic), str(tmp_path / "t2.jsonl"), progress=False, num_workers=2, chunk_lines=7,
            val_fraction=0.25, val_output_path=str(tmp_path / "v2.jsonl"))
    assert _ids(tmp_path / "v2.jsonl") == val_ids[::-1] and _ids(tmp_path / "t2.jsonl") == train_ids[::-1]
    # a larger fraction only adds records; ids are hashed as JSON (7 and "7" are different ids)
    prepare(str(inp), str(synthetic), str(tmp_path / "t3.jsonl"), progress=False, val_fraction=0.5,
            val_output_path=str(tmp_path / "v3.jsonl"))
    assert set(val_ids) < set(_ids(tmp_path / "v3.jsonl"))
    assert [in_validation_split(k, 0.5) for k in range(40)] != [in_validation_split(str(k), 0.5) for k in range(40)]
    assert not in_validation_split("anything", 0.0)
    # without a split nothing changes
    r = prepare(str(inp), str(synthetic), str(tmp_path / "all.jsonl"), progress=False)
    assert r["train_records"] == 60 and r["val_records"] == 0 and r["val_output"] is None


def test_val_split_flag_errors_and_failed_runs_write_neither_file(tmp_path, synthetic, root):
    tmp_path = tmp_path / "work"  # the root fixture has its own files in tmp_path
    tmp_path.mkdir()
    inp, out = str(synthetic / "ai2d_train.jsonl"), str(tmp_path / "o.jsonl")
    for kw, msg in [({"val_fraction": 0.1}, "needs --val-output"), ({"val_output_path": str(tmp_path / "v")},
                                                                   "needs --val-fraction"),
                    ({"val_fraction": 1.0, "val_output_path": str(tmp_path / "v")}, r"\[0, 1\)"),
                    ({"val_fraction": -0.1, "val_output_path": str(tmp_path / "v")}, r"\[0, 1\)"),
                    ({"val_fraction": 0.1, "val_output_path": out}, "must differ")]:
        with pytest.raises(ValueError, match=msg):
            prepare(inp, str(synthetic), out, progress=False, **kw)
    args = ["--input", inp, "--image-root", str(synthetic), "--output", out, "--num-workers", "1", "--quiet"]
    assert main(args + ["--val-fraction", "0.2"]) == 2
    (tmp_path / "f.txt").write_text("x")
    assert main(args + ["--val-fraction", "0.2", "--val-output", str(tmp_path / "f.txt" / "v.jsonl")]) == 2
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]  # nothing created by the refused runs
    # too many invalid records: the run fails and writes neither output nor validation file
    bad = _write_jsonl(tmp_path / "bad.jsonl", ["nope", json.dumps(GOOD)])
    report = prepare(bad, str(root), str(tmp_path / "t.jsonl"), progress=False, val_fraction=0.5,
                     val_output_path=str(tmp_path / "v.jsonl"))
    assert report["status"].startswith("failed")
    assert not os.path.exists(tmp_path / "t.jsonl") and not os.path.exists(tmp_path / "v.jsonl")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_val_split_cli(tmp_path, synthetic, caplog):
    args = ["--input", str(synthetic / "ai2d_train.jsonl"), "--image-root", str(synthetic), "--output",
            str(tmp_path / "train.jsonl"), "--val-fraction", "0.3", "--val-output", str(tmp_path / "val.jsonl"),
            "--num-workers", "1", "--quiet"]
    with caplog.at_level("INFO", logger="prepare_ai2d"):
        assert main(args) == 0
    n_train, n_val = len(_ids(tmp_path / "train.jsonl")), len(_ids(tmp_path / "val.jsonl"))
    assert n_train + n_val == 60 and n_val > 0
    assert f"({n_train} records)" in caplog.text and f"({n_val} held-out records)" in caplog.text
    report = json.load(open(tmp_path / "train.jsonl.report.json"))
    assert report["val_fraction"] == 0.3 and report["val_output"] == str(tmp_path / "val.jsonl")
