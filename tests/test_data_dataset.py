"""Dataset over prepared jsonl, the collator's batch contract, the resumable data-parallel sampler, and the
corrupt-image path through real DataLoader workers into the model."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from recipe.data import Collator, ConversationDataset, DeepseekVLV2Processor, ResumableBatchSampler, build_dataloader
from recipe.prepare_ai2d import prepare
from recipe.tools.make_synthetic_ai2d import make_synthetic_ai2d

IGNORE = -100


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A prepared synthetic dataset (40 records) whose image root may be damaged by tests (copy first)."""
    d = tmp_path_factory.mktemp("ds")
    make_synthetic_ai2d(str(d), num=40, seed=1)
    prepare(str(d / "ai2d_train.jsonl"), str(d), str(d / "dsvl.jsonl"), progress=False)
    return d


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt(image_size=42)


@pytest.fixture(scope="module")
def proc(ckpt):
    return DeepseekVLV2Processor.from_pretrained(ckpt, mask_prompt=True, max_seq_len=512)


@pytest.fixture
def damaged(data, tmp_path):
    """A copy of the dataset whose first record's first image is truncated and second record's image deleted."""
    d = tmp_path / "ds"
    shutil.copytree(data, d)
    rows = [json.loads(line) for line in open(d / "dsvl.jsonl")]
    with_image = [k for k, r in enumerate(rows) if any("images" in m for m in r["conversations"])]
    paths = [next(m["images"][0] for m in rows[k]["conversations"] if "images" in m) for k in with_image[:2]]
    raw = (d / paths[0]).read_bytes()
    (d / paths[0]).write_bytes(raw[: len(raw) // 3])
    os.unlink(d / paths[1])
    return d, with_image[:2], paths


def test_items_are_processed_lazily(data, proc):
    ds = ConversationDataset(str(data / "dsvl.jsonl"), str(data), proc)
    assert len(ds) == 40 and ds.offsets.dtype == np.int64
    item = ds[3]
    assert item["index"] == item["source_index"] == 3 and item["events"] == []
    assert item["id"] == json.loads(open(data / "dsvl.jsonl").readlines()[3])["id"]
    assert item["input_ids"].dtype == torch.long and item["images"].dtype == torch.float32
    # answer-only labels: the targets are the answer tokens + EOS (and BOS, never predicted after the shift)
    labelled = item["target_ids"][1:][item["target_ids"][1:] != IGNORE]
    assert labelled[-1] == proc.eos_id and len(labelled) >= 2


def test_collator_batch_contract(data, proc):
    ds = ConversationDataset(str(data / "dsvl.jsonl"), str(data), proc)
    samples = [ds[i] for i in range(4)]
    col = Collator.from_processor(proc, seq_bucket=64)
    b = col(samples)
    lens = [len(s["input_ids"]) for s in samples]
    B, T = 4, b["input_ids"].shape[1]
    assert T % 64 == 0 and max(lens) <= T < max(lens) + 64
    for k in ("input_ids", "labels", "segment_ids", "position_ids", "images_spatial_crop"):
        assert b[k].dtype == torch.long, k
    assert b["images_seq_mask"].dtype == torch.bool and b["images"].dtype == torch.float32
    assert b["images"].shape[:2] == (B, max(s["images"].shape[0] for s in samples))
    assert b["segment_ids"].sum(1).tolist() == lens
    assert torch.equal(b["position_ids"][2], torch.arange(T))
    for i, n in enumerate(lens):
        assert b["input_ids"][i, n:].eq(proc.pad_id).all() and b["labels"][i, n:].eq(IGNORE).all()
        assert torch.equal(b["input_ids"][i, :n], samples[i]["input_ids"])
    assert b["num_real_tokens"] == sum(lens) and b["num_padded_tokens"] == B * T - sum(lens)
    assert b["num_label_tokens"] == int((b["labels"][:, 1:] != IGNORE).sum())
    assert b["num_image_tokens"] == int(b["images_seq_mask"].sum())
    assert b["num_images"] == sum(int((s["images_spatial_crop"][:, 0] > 0).sum()) for s in samples)
    assert b["sample_ids"] == [s["id"] for s in samples] and b["skipped"] == []


def test_bucket_is_capped_at_max_seq_len():
    col = Collator(pad_id=2, seq_bucket=64, max_seq_len=100)
    assert [col.bucket_length(n) for n in (1, 64, 65, 99, 100)] == [64, 64, 100, 100, 100]
    too_long = {"input_ids": torch.zeros(101, dtype=torch.long)}
    with pytest.raises(ValueError, match="max_seq_len=100"):
        col([too_long])


def test_text_only_batch_still_has_a_zero_tile(data, proc):
    ds = ConversationDataset(str(data / "dsvl.jsonl"), str(data), proc)
    rows = [json.loads(line) for line in open(data / "dsvl.jsonl")]
    text_only = [k for k, r in enumerate(rows) if not any("images" in m for m in r["conversations"])]
    assert text_only, "the synthetic set should contain text-only records"
    b = Collator.from_processor(proc)([ds[text_only[0]]])
    assert b["images"].shape == (1, 1, 3, 42, 42) and not b["images"].any()
    assert b["images_spatial_crop"].tolist() == [[[0, 0]]] and b["num_images"] == 0


class TestSampler:
    def test_each_epoch_is_a_permutation_from_the_seed(self):
        s = ResumableBatchSampler(10, micro_batch_size=2, seed=5)
        p0, p1 = s.permutation(0).copy(), s.permutation(1).copy()
        assert sorted(p0) == sorted(p1) == list(range(10)) and not np.array_equal(p0, p1)
        assert np.array_equal(ResumableBatchSampler(10, 2, seed=5).permutation(0), p0)
        assert not np.array_equal(ResumableBatchSampler(10, 2, seed=6).permutation(0), p0)
        assert list(ResumableBatchSampler(10, 2, shuffle=False).permutation(3)) == list(range(10))

    def test_ranks_take_slices_of_each_chunk(self):
        mb, dp = 2, 3
        ranks = [ResumableBatchSampler(7, mb, dp, r, seed=1, total_samples=30) for r in range(dp)]
        per_rank = [list(s) for s in ranks]
        ref = ResumableBatchSampler(7, 1, seed=1)
        stream = [ref.global_index(p) for p in range(30)]
        for k in range(len(per_rank[0])):  # chunk k = stream[6k : 6k + 6], rank r holds slice r
            assert sum((per_rank[r][k] for r in range(dp)), []) == stream[6 * k: 6 * k + 6]
        assert len(ranks[0]) == 5 == len(per_rank[0])

    def test_resume_continues_the_stream(self):
        full = ResumableBatchSampler(9, 2, 2, 1, seed=3, total_samples=40)
        batches = list(full)
        resumed = ResumableBatchSampler(9, 2, 2, 1, seed=3, total_samples=40)
        resumed.advance(3 * 4)  # three optimizer steps of 4 global samples
        state = resumed.state_dict()
        again = ResumableBatchSampler(9, 2, 2, 1, seed=3, total_samples=40)
        again.load_state_dict(state)
        assert again.consumed_samples == 12 and list(again) == batches[3:]
        with pytest.raises(ValueError, match="seed"):
            ResumableBatchSampler(9, 2, 2, 1, seed=4).load_state_dict(state)

    def test_resume_with_another_dp_size(self):
        """The global stream does not depend on the dp size: 4 ranks x 1 equals 2 ranks x 2 per chunk."""
        a = [list(ResumableBatchSampler(11, 1, 4, r, seed=0, consumed_samples=8, total_samples=24))
             for r in range(4)]
        b = [list(ResumableBatchSampler(11, 2, 2, r, seed=0, consumed_samples=8, total_samples=24))
             for r in range(2)]
        for k in range(4):
            assert sum((a[r][k] for r in range(4)), []) == sum((b[r][k] for r in range(2)), [])

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="dp_rank"):
            ResumableBatchSampler(10, 1, dp_size=2, dp_rank=2)
        with pytest.raises(ValueError, match="empty"):
            ResumableBatchSampler(0, 1)


def test_corrupt_images_are_replaced_and_counted(damaged, proc, caplog):
    d, bad_idx, bad_paths = damaged
    ds = ConversationDataset(str(d / "dsvl.jsonl"), str(d), proc)
    with caplog.at_level("WARNING"):
        item = ds[bad_idx[0]]
    assert item["index"] == bad_idx[0] and item["source_index"] != bad_idx[0]
    assert item["events"][0]["kind"] == "corrupt_image" and bad_paths[0] in item["events"][0]["path"]
    assert "undecodable_image" in item["events"][0]["message"] and bad_paths[0] in caplog.text
    # the replacement is deterministic: the next record that works
    assert item["source_index"] == next(j for j in range(bad_idx[0] + 1, len(ds)) if j not in bad_idx)
    missing = ds[bad_idx[1]]
    assert "missing_file" in missing["events"][0]["message"]
    b = Collator.from_processor(proc)([item, missing, ds[bad_idx[1] + 1]])
    assert b["num_corrupt_images"] == 2 + (bad_idx[1] == bad_idx[0] + 1)
    assert any(bad_paths[0] in line for line in b["skipped"])


def test_dataloader_workers_to_model_forward(damaged, proc, ckpt):
    """Two worker processes decode and process; the corrupt-image counters reach the main process; a batch runs
    through the model with a finite loss."""
    from recipe.model import DeepseekVLV2ForCausalLM

    d, bad_idx, _ = damaged
    ds = ConversationDataset(str(d / "dsvl.jsonl"), str(d), proc)
    sampler = ResumableBatchSampler(len(ds), micro_batch_size=4, seed=0, shuffle=False, total_samples=len(ds))
    batches = list(build_dataloader(ds, Collator.from_processor(proc, seq_bucket=32), sampler, num_workers=2))
    # the collator's counters are exactly its integer outputs; the trainer sums them over a step (StepData)
    assert all({k for k, v in b.items() if type(v) is int} == set(Collator.COUNTERS) for b in batches)
    totals = {k: sum(b[k] for b in batches) for k in Collator.COUNTERS}
    padding_ratio = totals["num_padded_tokens"] / (totals["num_real_tokens"] + totals["num_padded_tokens"])
    assert len(batches) == 10 and totals["num_samples"] == 40
    assert totals["num_corrupt_images"] >= 2 and 0 < padding_ratio < 1
    model = DeepseekVLV2ForCausalLM.from_pretrained(ckpt).eval()
    b = batches[0]
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], images=b["images"], images_seq_mask=b["images_seq_mask"],
                    images_spatial_crop=b["images_spatial_crop"], labels=b["labels"], segment_ids=b["segment_ids"],
                    position_ids=b["position_ids"])
    assert torch.isfinite(out.loss)


def test_missing_dataset_paths_are_clear(data, proc, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such dataset file"):
        ConversationDataset(str(tmp_path / "nope.jsonl"), str(data), proc)
    with pytest.raises(FileNotFoundError, match="image root"):
        ConversationDataset(str(data / "dsvl.jsonl"), str(tmp_path / "nope"), proc)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "conversations": [{"role": "<|User|>", "content": "hi"}]}\n{broken\n')
    ds = ConversationDataset(str(bad), str(data), proc, max_substitutions=1)
    assert ds[1]["events"][0]["kind"] == "bad_record" and ds[1]["source_index"] == 0
