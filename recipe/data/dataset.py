"""Training data: a map-style dataset over the prepared jsonl, the collator that builds the batch contract, and
a deterministic, resumable, data-parallel batch sampler.

Dataset: records are located by a byte-offset index built once (one streaming pass, 8 bytes per record); each
``__getitem__`` reads one line, decodes its images and runs the processor, so all decoding happens lazily in the
DataLoader workers. A sample that cannot be used (corrupt or missing image, no complete turn within
``max_seq_len``, malformed record) is logged with its path and reason and replaced by the next index that works
(deterministic, so every rank and every resumed run sees the same replacement); the event travels with the
batch so the trainer can count it (:attr:`Collator.COUNTERS`).

Collator: right padding to T = the longest sample rounded up to a multiple of ``seq_bucket``, capped at
``max_seq_len``. Buckets bound the number of distinct shapes (for compiled kernels and the pipeline engine's
buffers) at the cost of at most ``seq_bucket - 1`` padded tokens per row beyond the batch's longest sample; the
returned ``num_padded_tokens`` measures the waste.

Sampler: the global sample stream is the concatenation of per-epoch permutations of the dataset, each drawn from
(seed, epoch). Starting from a consumed-sample count c, the stream is cut into chunks of
``micro_batch_size * dp_size``; data-parallel rank r takes slice r of each chunk. The same seed and c give the
same samples whatever happened before, so resuming (even with another dp size) continues the stream exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from recipe.data.conversation import ConversationError
from recipe.data.image_io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, resolve_under_root
from recipe.data.processor import DeepseekVLV2Processor, SampleTooLongError, pad_samples

logger = logging.getLogger(__name__)

# Why a sample was replaced, as counted in batches (Collator.COUNTERS).
CORRUPT_IMAGE, TOO_LONG, BAD_RECORD = "corrupt_image", "too_long", "bad_record"
EVENT_COUNTERS = {CORRUPT_IMAGE: "num_corrupt_images", TOO_LONG: "num_too_long", BAD_RECORD: "num_bad_records"}


class RecordError(ValueError):
    """A prepared record is malformed; the message names the file, line and key."""

    def __init__(self, where: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.where, self.detail = where, detail


def index_jsonl(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and 1-based line numbers ([n_records] int64 each) of the non-blank lines of ``path``, in one
    streaming pass."""
    offsets, line_nos = [], []
    pos = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                offsets.append(pos)
                line_nos.append(line_no)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64), np.asarray(line_nos, dtype=np.int64)


def parse_record(line: bytes, where: str) -> dict:
    """One jsonl line -> its JSON object (RecordError if it does not parse or is not an object)."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(where, f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise RecordError(where, f"expected a JSON object, got {type(record).__name__}")
    return record


def record_messages(record: dict, where: str) -> tuple[list, list]:
    """(messages for the processor, image paths in placeholder order) of a prepared record; RecordError if
    malformed."""
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise RecordError(where, "'conversations' must be a non-empty list")
    messages, paths = [], []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or "role" not in turn or not isinstance(turn.get("content"), str):
            raise RecordError(where, f"conversations[{t}] needs 'role' and a string 'content'")
        messages.append({"role": turn["role"], "content": turn["content"]})
        images = turn.get("images") or []
        if not isinstance(images, list):
            raise RecordError(where, f"conversations[{t}].images must be a list")
        paths += images
    return messages, paths


class ConversationDataset(Dataset):
    """Prepared DeepSeek-VL2 conversations (``prepare_ai2d.py`` output) -> processed samples.

    Each item is a dict: ``input_ids`` [T] int64, ``target_ids`` [T] int64, ``images`` [N, 3, S, S] float32,
    ``images_seq_mask`` [T] bool, ``images_spatial_crop`` [n_images, 2] int64, ``num_image_tokens`` list[int],
    plus ``index`` (the requested index), ``source_index`` (the record actually used), ``id``,
    ``num_turns_dropped`` (truncation) and ``events`` (a list of dicts describing replaced samples).
    """

    def __init__(self, path: str, image_root: str, processor: DeepseekVLV2Processor, *, inference_mode: bool = False,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_PIXELS, max_substitutions: int = 32):
        """
        Args:
            path: prepared jsonl (one ``{"id", "conversations": [{"role", "content", "images"?}]}`` per line).
            image_root: directory the records' image paths are relative to.
            processor: tokenises and tiles (its ``max_seq_len`` and ``mask_prompt`` apply).
            inference_mode: passed to the processor (False for training: the final EOS is a target).
            max_image_pixels: larger images are refused (decompression-bomb guard).
            max_substitutions: how many following records to try when a sample is unusable before giving up.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such dataset file")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"{image_root}: image root is not a directory")
        self.path = path
        self.image_root = image_root
        self.real_root = os.path.realpath(image_root)
        self.processor = processor
        self.inference_mode = inference_mode
        self.max_image_pixels = max_image_pixels
        self.max_substitutions = max_substitutions
        self.offsets, self.line_numbers = index_jsonl(path)
        if len(self.offsets) == 0:
            raise ValueError(f"{path}: no records")
        self._fh = None
        self._fh_pid = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self):
        # DataLoader workers get a copy without the parent's file handle; each opens its own.
        state = self.__dict__.copy()
        state["_fh"], state["_fh_pid"] = None, None
        return state

    # --- records -------------------------------------------------------------------------------------------
    def where(self, index: int) -> str:
        """``file:line`` of record ``index``, for messages."""
        return f"{self.path}:{int(self.line_numbers[index])}"

    def read_record(self, index: int) -> dict:
        """The raw JSON record at ``index`` (RecordError if it does not parse)."""
        if self._fh is None or self._fh_pid != os.getpid():
            self._fh = open(self.path, "rb")
            self._fh_pid = os.getpid()
        self._fh.seek(int(self.offsets[index]))
        return parse_record(self._fh.readline(), self.where(index))

    def load(self, index: int) -> dict:
        """Process record ``index``; raises ImageLoadError, SampleTooLongError, RecordError or ConversationError."""
        record = self.read_record(index)
        messages, rel_paths = record_messages(record, self.where(index))
        images = [load_image(resolve_under_root(self.image_root, p, self.real_root), self.max_image_pixels)
                  for p in rel_paths]
        out = self.processor.process_one(messages, images, inference_mode=self.inference_mode)
        return {"input_ids": out.input_ids, "target_ids": out.target_ids, "images": out.images,
                "images_seq_mask": out.images_seq_mask, "images_spatial_crop": out.images_spatial_crop,
                "num_image_tokens": out.num_image_tokens, "num_turns_dropped": out.num_turns_dropped,
                "id": str(record.get("id", index))}

    def __getitem__(self, index) -> dict:
        """Sample ``index``; ``(index, row)`` (what :class:`recipe.data.packing.PackedBatchSampler` yields) also
        tags the sample with its packed row."""
        if isinstance(index, tuple):
            index, row = index
            return {**self[index], "row": row}
        events = []
        for attempt in range(self.max_substitutions + 1):
            j = (index + attempt) % len(self)
            try:
                sample = self.load(j)
            except ImageLoadError as e:
                kind = BAD_RECORD if e.reason in ("path_escape", "bad_path") else CORRUPT_IMAGE
                events.append(self._event(kind, j, e.path, f"{e.reason}: {e.detail}"))
            except SampleTooLongError as e:
                events.append(self._event(TOO_LONG, j, None, str(e)))
            except RecordError as e:
                events.append(self._event(BAD_RECORD, j, None, e.detail))
            except ConversationError as e:
                events.append(self._event(BAD_RECORD, j, None, f"ConversationError: {e}"))
            else:
                sample.update(index=index, source_index=j, events=events)
                return sample
        raise RuntimeError(f"{self.path}: {self.max_substitutions + 1} consecutive records from index {index} are "
                           f"unusable; last: {events[-1]['message']}")

    def _event(self, kind: str, index: int, path: Optional[str], message: str) -> dict:
        where = self.where(index) + (f", image {path}" if path else "")
        logger.warning("skipping sample (%s) at %s: %s; trying the next record", kind, where, message)
        return {"kind": kind, "index": index, "where": where, "path": path, "message": message}


class Collator:
    """Processed samples -> the training batch (right padding, bucketed length).

    Returns a dict of tensors:
        input_ids [B, T] int64 (pad id at padding), labels [B, T] int64 (-100 at padding, image positions and
        masked prompt), segment_ids [B, T] int64 (1 real token, 0 padding), position_ids [B, T] int64
        (arange per row), images [B, max_tiles, 3, S, S] float32 (zero tiles pad; text-only batches get one
        zero tile per row), images_seq_mask [B, T] bool, images_spatial_crop [B, max_images, 2] int64
        ((0, 0) rows pad; text-only samples have [[0, 0]]);
    and Python ints / lists for logging:
        num_samples, num_rows (B), num_consumed (stream positions the batch covers: B here; with packing also the
        samples left out, see :class:`recipe.data.packing.PackedCollator`), num_dropped (0 here),
        num_real_tokens (sum of sample lengths), num_padded_tokens (B*T - num_real_tokens),
        num_label_tokens (labels that enter the loss: labels[:, 1:] != -100, the shifted targets),
        num_images, num_tiles (real tiles), num_image_tokens, num_truncated (samples shortened at a turn
        boundary), num_corrupt_images / num_too_long / num_bad_records (samples replaced, by reason),
        sample_ids list[str], skipped list[str] (one line per replaced sample: file, record, image, reason).
    """

    TENSOR_KEYS = ("input_ids", "labels", "segment_ids", "position_ids", "images", "images_seq_mask",
                   "images_spatial_crop")
    COUNTERS = ("num_samples", "num_rows", "num_consumed", "num_dropped", "num_real_tokens", "num_padded_tokens",
                "num_label_tokens", "num_images", "num_tiles", "num_image_tokens", "num_truncated",
                *EVENT_COUNTERS.values())
    """The integer counters of every batch (summed over a step's micro-batches and ranks by the trainer)."""

    def __init__(self, pad_id: int, ignore_id: int = -100, seq_bucket: int = 64, max_seq_len: Optional[int] = None):
        if seq_bucket <= 0:
            raise ValueError(f"seq_bucket={seq_bucket}: must be a positive integer")
        if max_seq_len is not None and max_seq_len <= 0:
            raise ValueError(f"max_seq_len={max_seq_len}: must be positive")
        self.pad_id, self.ignore_id = pad_id, ignore_id
        self.seq_bucket, self.max_seq_len = seq_bucket, max_seq_len

    @classmethod
    def from_processor(cls, processor: DeepseekVLV2Processor, seq_bucket: int = 64) -> "Collator":
        return cls(processor.pad_id, processor.ignore_id, seq_bucket, processor.max_seq_len)

    def bucket_length(self, n: int) -> int:
        """n rounded up to a multiple of ``seq_bucket``, capped at ``max_seq_len``."""
        T = math.ceil(n / self.seq_bucket) * self.seq_bucket
        return min(T, self.max_seq_len) if self.max_seq_len else T

    def __call__(self, samples: list) -> dict:
        longest = max(len(s["input_ids"]) for s in samples)
        if self.max_seq_len and longest > self.max_seq_len:
            raise ValueError(f"a sample has {longest} tokens > max_seq_len={self.max_seq_len}; give the processor "
                             f"the same max_seq_len so it truncates at a turn boundary")
        T = self.bucket_length(longest)
        b = pad_samples(samples, self.pad_id, self.ignore_id, padding="right", pad_to=T)
        B = len(samples)
        seg = b.pop("attention_mask").long()
        labels = b["labels"]
        seq_lens = b.pop("seq_lens")
        b.pop("sft_format")
        events = [e for s in samples for e in s.get("events", ())]
        kinds = Counter(e["kind"] for e in events)
        out = {"input_ids": b["input_ids"], "labels": labels, "segment_ids": seg,
               "position_ids": torch.arange(T, dtype=torch.long).expand(B, T).contiguous(),
               "images": b["images"], "images_seq_mask": b["images_seq_mask"],
               "images_spatial_crop": b["images_spatial_crop"]}
        crops = b["images_spatial_crop"]
        real_images = (crops[..., 0] > 0) & (crops[..., 1] > 0)
        out.update(
            num_samples=B, num_rows=B, num_consumed=B, num_dropped=0,
            num_real_tokens=int(sum(seq_lens)),
            num_padded_tokens=int(B * T - sum(seq_lens)),
            num_label_tokens=int((labels[:, 1:] != self.ignore_id).sum()),
            num_images=int(real_images.sum()),
            num_tiles=int(((1 + crops[..., 0] * crops[..., 1]) * real_images).sum()),
            num_image_tokens=int(b["images_seq_mask"].sum()),
            num_truncated=sum(1 for s in samples if s.get("num_turns_dropped", 0) > 0),
            **{name: kinds.get(kind, 0) for kind, name in EVENT_COUNTERS.items()},
            sample_ids=[s.get("id", "") for s in samples],
            skipped=[f"{e['kind']} at {e['where']}: {e['message']}" for e in events],
        )
        return out


class ResumableBatchSampler:
    """Micro-batches of dataset indices for one data-parallel rank (see the module docstring).

    Iterating yields lists of ``micro_batch_size`` indices forever (or until ``total_samples`` global samples),
    starting at ``consumed_samples``. Iteration does not advance ``consumed_samples``: DataLoader workers
    prefetch ahead of training, so the trainer reports progress with :meth:`advance` (or sets the count) after
    each optimizer step and saves :meth:`state_dict` with its checkpoint.
    """

    def __init__(self, dataset_len: int, micro_batch_size: int, dp_size: int = 1, dp_rank: int = 0, seed: int = 0,
                 consumed_samples: int = 0, shuffle: bool = True, total_samples: Optional[int] = None):
        if dataset_len <= 0:
            raise ValueError(f"dataset_len={dataset_len}: the dataset is empty")
        if micro_batch_size <= 0 or dp_size <= 0:
            raise ValueError(f"micro_batch_size={micro_batch_size}, dp_size={dp_size}: must be positive")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}: must be in [0, dp_size={dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples}: must be >= 0")
        self.dataset_len, self.micro_batch_size = dataset_len, micro_batch_size
        self.dp_size, self.dp_rank, self.seed, self.shuffle = dp_size, dp_rank, seed, shuffle
        self.consumed_samples = consumed_samples
        self.total_samples = total_samples
        self._perm_epoch, self._perm = None, None

    @property
    def chunk_size(self) -> int:
        """Global samples per micro-step across data-parallel ranks."""
        return self.micro_batch_size * self.dp_size

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.dataset_len

    def permutation(self, epoch: int) -> np.ndarray:
        """The dataset order of ``epoch`` [dataset_len] int64, a function of (seed, epoch) only."""
        if self._perm_epoch != epoch:
            if self.shuffle:
                self._perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.dataset_len)
            else:
                self._perm = np.arange(self.dataset_len)
            self._perm_epoch = epoch
        return self._perm

    def global_index(self, position: int) -> int:
        """Dataset index at ``position`` of the global sample stream."""
        epoch, offset = divmod(position, self.dataset_len)
        return int(self.permutation(epoch)[offset])

    def __iter__(self) -> Iterator[list]:
        start = self.consumed_samples
        k = 0
        while True:
            first = start + k * self.chunk_size + self.dp_rank * self.micro_batch_size
            if self.total_samples is not None and start + (k + 1) * self.chunk_size > self.total_samples:
                return
            yield [self.global_index(first + i) for i in range(self.micro_batch_size)]
            k += 1

    def __len__(self) -> int:
        if self.total_samples is None:
            raise TypeError("an unbounded sampler has no length; pass total_samples")
        return max(0, (self.total_samples - self.consumed_samples) // self.chunk_size)

    def advance(self, num_global_samples: int) -> None:
        """Record that ``num_global_samples`` more samples (over all dp ranks) were trained on."""
        self.consumed_samples += num_global_samples

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "dataset_len": self.dataset_len,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "dataset_len", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"data sampler state has {key}={state[key]!r} but this run uses "
                                 f"{getattr(self, key)!r}: the resumed sample stream would differ")
        self.consumed_samples = int(state["consumed_samples"])


def _worker_init(_worker_id: int) -> None:
    # Image decoding and tiling are single-threaded numpy/Pillow work; torch threads would only oversubscribe.
    torch.set_num_threads(1)


def build_dataloader(dataset: ConversationDataset, collator: Collator, sampler: ResumableBatchSampler,
                     num_workers: int = 2, prefetch_factor: int = 4) -> DataLoader:
    """A DataLoader whose workers read, decode and process samples; batches arrive in sampler order."""
    kw = dict(num_workers=num_workers, worker_init_fn=_worker_init)
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch_factor, persistent_workers=True)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, **kw)
