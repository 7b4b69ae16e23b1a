"""The length index (equal to what the dataset produces, cached by fingerprint), first-fit-decreasing packing, the
packed sampler (deterministic, resumable from the consumed-sample count on any number of data-parallel ranks) and
the packed collator's batch contract."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from recipe.data import ConversationDataset, DeepseekVLV2Processor
from recipe.data import lengths as L
from recipe.data.packing import PackedBatchSampler, PackedCollator, first_fit_decreasing
from recipe.prepare_ai2d import prepare
from recipe.tools.make_synthetic_ai2d import make_synthetic_ai2d

IGNORE = -100


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic set (60 records: one- and two-image, text-only, two-question) plus hand-written records: three
    images (no cropping), a system turn with a text-only follow-up, a malformed record, an image path outside the
    root, a missing image, and a record without ``image_sizes``."""
    d = tmp_path_factory.mktemp("pk")
    make_synthetic_ai2d(str(d), num=60, seed=2)
    prepare(str(d / "ai2d_train.jsonl"), str(d), str(d / "dsvl.jsonl"), progress=False)
    rows = [json.loads(line) for line in open(d / "dsvl.jsonl")]
    imgs = [(p, s) for r in rows for m in r["conversations"] for p in m.get("images", [])
            for s in [r["image_sizes"][0]]][:3]
    extra = [
        {"id": "three", "conversations": [
            {"role": "<|User|>", "content": "<image> <image> <image> Which differs?", "images": [p for p, _ in imgs]},
            {"role": "<|Assistant|>", "content": "B"}]},
        {"id": "system", "conversations": [
            {"role": "system", "content": "Be brief."},
            {"role": "<|User|>", "content": "<image>\nWhat is it?", "images": [imgs[0][0]]},
            {"role": "<|Assistant|>", "content": "Shapes."},
            {"role": "<|User|>", "content": "And now?"}, {"role": "<|Assistant|>", "content": "Still shapes."}],
         "image_sizes": [imgs[0][1]]},
        {"id": "malformed", "conversations": "not a list"},
        {"id": "escape", "conversations": [{"role": "<|User|>", "content": "<image>", "images": ["../x.png"]},
                                           {"role": "<|Assistant|>", "content": "A"}], "image_sizes": [[5, 5]]},
        {"id": "missing", "conversations": [{"role": "<|User|>", "content": "<image>", "images": ["nope.png"]},
                                            {"role": "<|Assistant|>", "content": "A"}]},
    ]
    with open(d / "dsvl.jsonl", "a") as f:
        for r in extra:
            f.write(json.dumps(r) + "\n")
    return d


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt(image_size=42)


def processor(ckpt, max_seq_len=160):
    return DeepseekVLV2Processor.from_pretrained(ckpt, mask_prompt=True, max_seq_len=max_seq_len)


def processed(ds, i):
    """(tokens, real tiles, images) of the sample the dataset returns for record i, and whether it was replaced."""
    s = ds[i]
    crops = [c for c in s["images_spatial_crop"].tolist() if c[0] > 0]
    return (len(s["input_ids"]), sum(1 + w * h for w, h in crops), len(crops)), s["source_index"] != i


@pytest.mark.parametrize("max_seq_len", [160, 4096], ids=["truncating", "roomy"])
def test_length_index_equals_what_the_dataset_produces_for_every_record(data, ckpt, tmp_path, max_seq_len):
    proc = processor(ckpt, max_seq_len)
    index = L.build_length_index(str(data / "dsvl.jsonl"), str(data), proc, cache_dir=str(tmp_path))
    ds = ConversationDataset(str(data / "dsvl.jsonl"), str(data), proc)
    assert len(index) == len(ds) == 65
    resolved = index.resolved(ds.max_substitutions)
    truncated = too_long = 0
    for i in range(len(ds)):
        got, replaced = processed(ds, i)
        j = int(resolved[i])
        assert replaced == (j != i), i
        assert got == (index.num_tokens[j], index.num_tiles[j], index.num_images[j]), (i, j)
        truncated += int(ds[i]["num_turns_dropped"] > 0)
        too_long += int(index.status[i] == L.TOO_LONG)
    ids = [json.loads(line).get("id") for line in open(data / "dsvl.jsonl")]
    status = dict(zip(ids, index.status.tolist()))
    assert status["malformed"] == status["escape"] == L.BAD_RECORD and status["missing"] == L.BAD_IMAGE
    assert status["three"] == L.OK and index.num_tiles[ids.index("three")] == 6  # 3 images, 1x1 each: no cropping
    assert index.sizes_from_header[ids.index("three")] and not index.sizes_from_header[0]
    if max_seq_len == 160:
        assert truncated > 0 and too_long > 0  # both cuts are exercised
    # without image_sizes, the headers give the same lengths
    bare = tmp_path / "bare.jsonl"
    with open(bare, "w") as f:
        for line in open(data / "dsvl.jsonl"):
            r = json.loads(line)
            r.pop("image_sizes", None)
            f.write(json.dumps(r) + "\n")
    from_headers = L.build_length_index(str(bare), str(data), proc, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(from_headers.num_tokens, index.num_tokens)
    np.testing.assert_array_equal(from_headers.num_tiles, index.num_tiles)
    assert from_headers.sizes_from_header.sum() > 50


def test_length_index_cache_follows_the_data_and_the_processor(data, ckpt, tmp_path):
    src = tmp_path / "d.jsonl"
    shutil.copy(data / "dsvl.jsonl", src)
    proc = processor(ckpt)
    first = L.build_length_index(str(src), str(data), proc)
    assert first.path.startswith(str(src) + ".lengths" + os.sep)  # beside the data
    assert L.build_length_index(str(src), str(data), proc).path == first.path  # read back, not rebuilt
    two = L.build_length_index(str(src), str(data), proc, num_proc=2, cache_dir=str(tmp_path / "mp"))
    np.testing.assert_array_equal(two.num_tokens, first.num_tokens)  # datasets.map over 2 processes
    np.testing.assert_array_equal(two.status, first.status)
    other = L.build_length_index(str(src), str(data), processor(ckpt, 4096))
    assert other.path != first.path  # another max_seq_len: another index
    with open(src, "a") as f:
        f.write(open(data / "dsvl.jsonl").readline())
    grown = L.build_length_index(str(src), str(data), proc)
    assert grown.path != first.path and len(grown) == len(first) + 1


def test_first_fit_decreasing_respects_both_limits_and_fills_rows():
    rng = np.random.default_rng(0)
    tokens = rng.integers(300, 2100, 500)
    tiles = tokens // 210  # ai2d-like: each 384-px tile brings ~200 image tokens
    tiles[:3] = 30  # over the tile limit: a row each
    rows = first_fit_decreasing(tokens, tiles, 4096, 20)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(500))
    for r in rows:
        assert tokens[r].sum() <= 4096
        assert tiles[r].sum() <= 20 or len(r) == 1
    assert sum(len(r) == 1 and tiles[r[0]] == 30 for r in rows) == 3
    assert tokens.sum() / (4096 * len(rows)) > 0.95
    assert first_fit_decreasing(tokens, tiles, 4096, 20) == rows  # deterministic
    with pytest.raises(ValueError, match="max_tokens"):
        first_fit_decreasing([5000], [0], 4096, 20)


def sampler(lengths, mbs, dp, rank, consumed=0, **kw):
    tokens, tiles = lengths
    kw = {"seed": 3, "max_tokens": 4096, "max_tiles": 20, "window": 64, **kw}
    return PackedBatchSampler(tokens, tiles, mbs, dp, rank, consumed_samples=consumed, **kw)


@pytest.fixture(scope="module")
def lengths():
    rng = np.random.default_rng(1)
    return rng.integers(200, 2200, 150), rng.integers(0, 11, 150)


def take(s, n):
    it = iter(s)
    return [next(it) for _ in range(n)]


def test_rows_cover_each_window_exactly_once(lengths):
    s = sampler(lengths, 1, 1, 0)
    for w in range(4):  # windows cross epoch boundaries (150 records, windows of 64)
        positions = sorted(p for row in s.window_rows(w) for p in row)
        assert positions == list(range(64 * w, 64 * (w + 1)))
        for row in s.window_rows(w):
            idx = [s.stream.global_index(p) for p in row]
            assert lengths[0][idx].sum() <= 4096


def test_resume_from_the_consumed_count_gives_the_same_micro_batches(lengths):
    """Steps of 2 micro-steps x 2 ranks x 2 rows; after k steps the consumed count (the sum of the steps' items, as
    the trainer adds num_consumed) restarts every rank's sampler where it was; on 4 ranks x 1 row the same rows
    arrive in the same order."""
    mbs, dp, gas, steps = 2, 2, 2, 7
    full = [take(sampler(lengths, mbs, dp, r), gas * steps) for r in range(dp)]
    for r in range(dp):
        for mb in full[r]:
            assert sorted({row for _, row in mb}) == [0, 1]
    consumed = 0
    for k in range(steps):
        for r in range(dp):
            resumed = take(sampler(lengths, mbs, dp, r, consumed), gas * (steps - k))
            assert resumed == full[r][gas * k:]
        consumed += sum(len(full[r][gas * k + m]) for r in range(dp) for m in range(gas))

    def rows_in_order(batches_per_rank, mbs, dp):
        out = []
        for m in range(len(batches_per_rank[0])):
            for r in range(dp):
                mb = batches_per_rank[r][m]
                out += [[i for i, row in mb if row == j] for j in range(mbs)]
        return out

    four = [take(sampler(lengths, 1, 4, r), gas * steps) for r in range(4)]
    assert rows_in_order(four, 1, 4) == rows_in_order(full, mbs, dp)


def test_changed_limits_continue_at_the_next_row(lengths, caplog):
    s = sampler(lengths, 1, 1, 0)
    first = s.window_rows(0)[0]
    consumed = len(first) + 1  # no longer a row boundary of this plan
    with caplog.at_level("WARNING"):
        w, j = s.locate(consumed)
    assert (w, j) == (0, 2) or (w, j) == (1, 0)
    assert "not at a row boundary" in caplog.text


def sample(n, tiles=0, sid="s", start_label=5):
    """A processed sample of n tokens with ``tiles`` real tiles (one image) or text-only."""
    ids = torch.arange(10, 10 + n)
    labels = ids.clone()
    labels[0] = start_label
    mask = torch.zeros(n, dtype=torch.bool)
    if tiles:
        mask[1:4] = True
        crop = torch.tensor([[1, tiles - 1]])
        images = torch.randn(tiles, 3, 4, 4)
    else:
        crop = torch.zeros(1, 2, dtype=torch.long)
        images = torch.zeros(1, 3, 4, 4)
    return {"input_ids": ids, "target_ids": labels, "images_seq_mask": mask, "images": images,
            "images_spatial_crop": crop, "id": sid, "events": []}


def test_packed_collator_batch_contract():
    a, b, c, d = sample(5, 3, "a"), sample(4, 0, "b"), sample(6, 2, "c"), sample(3, 0, "d")
    col = PackedCollator(pad_id=0, seq_bucket=8, max_seq_len=32, max_tiles_per_row=10)
    batch = col([{**a, "row": 0}, {**b, "row": 0}, {**c, "row": 1}, {**d, "row": 1}])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["segment_ids"][0].tolist() == [1] * 5 + [2] * 4 + [0] * 7
    assert batch["position_ids"][0, :9].tolist() == list(range(5)) + list(range(4))
    assert torch.equal(batch["input_ids"][0, 5:9], b["input_ids"])
    assert batch["labels"][0, 0] == IGNORE and batch["labels"][0, 5] == IGNORE  # each sample's first label
    assert torch.equal(batch["labels"][0, 6:9], b["target_ids"][1:])
    assert batch["images"].shape[:2] == (2, 3)  # row 0: a's 3 tiles (b is text-only); row 1: c's 2 + a pad tile
    assert torch.equal(batch["images"][0], a["images"]) and torch.equal(batch["images"][1, :2], c["images"])
    assert batch["images_spatial_crop"].tolist() == [[[1, 2]], [[1, 1]]]
    assert batch["images_seq_mask"][1, 1:4].all() and batch["images_seq_mask"][1, 10:13].sum() == 0
    counts = {k: batch[k] for k in ("num_samples", "num_rows", "num_consumed", "num_dropped", "num_real_tokens",
                                    "num_padded_tokens", "num_images", "num_tiles")}
    assert counts == {"num_samples": 4, "num_rows": 2, "num_consumed": 4, "num_dropped": 0, "num_real_tokens": 18,
                      "num_padded_tokens": 14, "num_images": 2, "num_tiles": 5}
    assert batch["num_label_tokens"] == int((batch["labels"][:, 1:] != IGNORE).sum()) == 18 - 4
    assert batch["sample_ids"] == ["a", "b", "c", "d"]
    # a (replacement) sample that no longer fits its row is left out and counted; the row's first always stays
    over = col([{**sample(30, 2, "big"), "row": 0}, {**sample(5, 0, "x"), "row": 0}])
    assert over["num_samples"] == 1 and over["num_dropped"] == 1 and over["num_consumed"] == 2
    assert "dropped from a packed row" in over["skipped"][0]
    tiles = col([{**sample(4, 8, "t"), "row": 0}, {**sample(4, 3, "u"), "row": 0}])
    assert tiles["num_dropped"] == 1 and tiles["num_tiles"] == 8


def test_packed_loader_end_to_end(data, ckpt, tmp_path):
    """Sampler -> DataLoader workers -> collator on the real data: rows within the limits, every consumed position
    accounted for, and far less padding than one sample per row."""
    from recipe.data.dataset import build_dataloader

    proc = processor(ckpt, 512)
    index = L.build_length_index(str(data / "dsvl.jsonl"), str(data), proc, cache_dir=str(tmp_path))
    ds = ConversationDataset(str(data / "dsvl.jsonl"), str(data), proc)
    src = index.resolved(ds.max_substitutions)
    s = PackedBatchSampler(index.num_tokens[src], index.num_tiles[src], 2, seed=0, max_tokens=512, max_tiles=40)
    loader = build_dataloader(ds, PackedCollator.from_processor(proc, 64, 40), s, num_workers=1)
    it = iter(loader)
    batches = [next(it) for _ in range(6)]
    rows = [r for w in range(2) for r in s.window_rows(w)][:12]
    assert [b["num_consumed"] for b in batches] == [len(rows[2 * k]) + len(rows[2 * k + 1]) for k in range(6)]
    for b in batches:
        assert b["segment_ids"].shape[1] <= 512 and b["num_dropped"] == 0
        assert b["num_samples"] / b["num_rows"] > 1.5
        assert b["num_padded_tokens"] / (b["num_real_tokens"] + b["num_padded_tokens"]) < 0.35
