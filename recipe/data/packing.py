"""Sequence packing: several samples per row, planned from the length index, deterministic and resumable.

The sample stream is the one of :class:`~recipe.data.dataset.ResumableBatchSampler` (per-epoch permutations from
(seed, epoch)). Packing cuts it into fixed windows of W consecutive positions (window w = positions [wW, (w+1)W))
and packs each window on its own: first-fit-decreasing on the records' token counts (ties: more tiles first, then
stream order), where an item fits a row when the row stays within ``max_tokens`` tokens AND ``max_tiles`` image
tiles; a sample with more tiles than ``max_tiles`` gets a row of its own. The window's rows are then shuffled
with a generator seeded by (seed, w), so the rows FFD fills first (the longest samples) do not all land in the same
optimizer step. The rows of consecutive windows form one row stream; micro-step k gives data-parallel rank r the
``micro_batch_size`` rows starting at (k x dp_size + r) x micro_batch_size, so an optimizer step takes
``micro_batch_size x grad_accum x dp_size`` consecutive rows, however many samples they hold.

State: ``consumed_samples`` counts stream positions inside the rows trained so far. A window's rows hold exactly
its W positions, and their sample counts are positive, so the count c determines the place in the row stream: the
window is c // W and the row is the one where the window's running sample count reaches c mod W. The plan of a
window is a pure function of (seed, w, the lengths, W, max_tokens, max_tiles), so a resumed run (on any number of
data-parallel ranks) produces exactly the rows the interrupted run would have. The trainer adds the step's
``num_consumed`` (every position in its rows, summed over ranks) after each optimizer step.

Lengths are those of the record the dataset actually loads for a position (the length index, with the dataset's
replacement of unusable records applied: :meth:`recipe.data.lengths.LengthIndex.resolved`). A sample whose images
turn out not to decode is replaced at load time by the next record, whose length the plan did not know: the
:class:`PackedCollator` keeps every row within its limits by leaving out what no longer fits (``num_dropped``,
with the reason in ``skipped``); such samples still count as consumed.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from typing import Iterator, Optional

import numpy as np
import torch

from recipe.data.dataset import EVENT_COUNTERS, Collator, ResumableBatchSampler

logger = logging.getLogger(__name__)


def first_fit_decreasing(tokens: np.ndarray, tiles: np.ndarray, max_tokens: int, max_tiles: int) -> list:
    """Rows of item positions (lists of indices into ``tokens``/``tiles``, each in increasing order).

    Items in decreasing token order (ties: more tiles, then position) go to the first row with room for both
    their tokens and their tiles, else open a new row. Every item must have at most ``max_tokens`` tokens; an item
    with more than ``max_tiles`` tiles is given a row of its own (it cannot be split).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    tiles = np.asarray(tiles, dtype=np.int64)
    n = len(tokens)
    if n and int(tokens.max()) > max_tokens:
        raise ValueError(f"an item has {int(tokens.max())} tokens > max_tokens={max_tokens}")
    order = np.lexsort((np.arange(n), -tiles, -tokens))
    free_tok = np.empty(n, dtype=np.int64)
    free_tiles = np.empty(n, dtype=np.int64)
    rows: list = []
    for i in order:
        t, k = tokens[i], tiles[i]
        m = len(rows)
        j = m
        if m:
            fits = (free_tok[:m] >= t) & (free_tiles[:m] >= k)
            first = int(fits.argmax())
            if fits[first]:
                j = first
        if j == m:
            rows.append([])
            free_tok[j], free_tiles[j] = max_tokens, max_tiles
        rows[j].append(int(i))
        free_tok[j] -= t
        free_tiles[j] -= k
    return [sorted(r) for r in rows]


class PackedBatchSampler:
    """Micro-batches of packed rows for one data-parallel rank (see the module docstring).

    Yields, per micro-step, a list of ``(dataset index, row)`` pairs (``row`` in ``0..micro_batch_size-1``), which
    :class:`~recipe.data.dataset.ConversationDataset` loads and :class:`PackedCollator` assembles. Iteration does
    not advance ``consumed_samples``: the trainer adds each step's ``num_consumed``.
    """

    def __init__(self, num_tokens: np.ndarray, num_tiles: np.ndarray, micro_batch_size: int, dp_size: int = 1,
                 dp_rank: int = 0, seed: int = 0, consumed_samples: int = 0, *, max_tokens: int, max_tiles: int,
                 window: int = 1024, shuffle: bool = True):
        """
        Args:
            num_tokens, num_tiles: [dataset_len] what the dataset's item i will hold (the length index, resolved).
            micro_batch_size: rows per micro-batch.
            max_tokens, max_tiles: the row limits (``max_seq_len``, ``max_tiles_per_row``).
            window: stream positions packed together (capped at the dataset size).
        """
        if max_tokens <= 0 or max_tiles <= 0 or window <= 0:
            raise ValueError(f"max_tokens={max_tokens}, max_tiles={max_tiles}, window={window}: must be positive")
        self.num_tokens = np.asarray(num_tokens, dtype=np.int64)
        self.num_tiles = np.asarray(num_tiles, dtype=np.int64)
        if self.num_tokens.shape != self.num_tiles.shape:
            raise ValueError("num_tokens and num_tiles must have the same length")
        self.stream = ResumableBatchSampler(len(self.num_tokens), 1, seed=seed, shuffle=shuffle)
        self.micro_batch_size, self.dp_size, self.dp_rank = micro_batch_size, dp_size, dp_rank
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"micro_batch_size={micro_batch_size}, dp_size={dp_size}, dp_rank={dp_rank}")
        self.seed = seed
        self.max_tokens, self.max_tiles = max_tokens, max_tiles
        self.window = min(window, len(self.num_tokens))
        self.consumed_samples = consumed_samples
        self._plans: OrderedDict = OrderedDict()

    @property
    def dataset_len(self) -> int:
        return len(self.num_tokens)

    def window_rows(self, w: int) -> list:
        """The rows of window ``w`` in training order: lists of stream positions (a pure function of w)."""
        if w not in self._plans:
            positions = np.arange(w * self.window, (w + 1) * self.window)
            idx = np.array([self.stream.global_index(int(p)) for p in positions])
            rows = first_fit_decreasing(self.num_tokens[idx], self.num_tiles[idx], self.max_tokens, self.max_tiles)
            order = np.random.Generator(np.random.PCG64([self.seed, w, 0x9ACC])).permutation(len(rows))
            self._plans[w] = [[int(positions[i]) for i in rows[o]] for o in order]
            while len(self._plans) > 2:
                self._plans.popitem(last=False)
        return self._plans[w]

    def locate(self, consumed: int) -> tuple[int, int]:
        """(window, row) at which a run that has consumed ``consumed`` stream positions continues."""
        w, s = divmod(consumed, self.window)
        counts = np.cumsum([0] + [len(r) for r in self.window_rows(w)])
        j = int(np.searchsorted(counts, s))
        if counts[j] != s:
            logger.warning("packing: %d consumed samples is not at a row boundary of window %d (were max_seq_len, "
                           "max_tiles_per_row or packing_window changed since the checkpoint?); continuing at the "
                           "next row boundary, %d samples later", consumed, w, int(counts[j]) - s)
        return (w + 1, 0) if j >= len(counts) - 1 else (w, j)

    def rows(self, consumed: int) -> Iterator[list]:
        """The row stream from ``consumed`` on, one row (stream positions) at a time, forever."""
        w, j = self.locate(consumed)
        while True:
            rows = self.window_rows(w)
            yield from rows[j:]
            w, j = w + 1, 0

    def __iter__(self) -> Iterator[list]:
        chunk = self.micro_batch_size * self.dp_size
        mine = range(self.dp_rank * self.micro_batch_size, (self.dp_rank + 1) * self.micro_batch_size)
        batch: list = []
        for k, row in enumerate(self.rows(self.consumed_samples)):
            slot = k % chunk
            if slot in mine:
                batch += [(self.stream.global_index(p), slot - mine.start) for p in row]
            if slot == chunk - 1:
                yield batch
                batch = []

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "dataset_len": self.dataset_len,
                "shuffle": self.stream.shuffle}


class PackedCollator(Collator):
    """Samples tagged with their row (``sample["row"]``, from :class:`PackedBatchSampler`) -> the training batch
    with several samples per row.

    Same keys as :class:`~recipe.data.dataset.Collator`, with per row: segment ids 1..n in sample order (0 =
    padding), positions restarting at 0 for every sample, each sample's tiles and ``images_spatial_crop`` rows one
    after another (text-only samples add none; a row without images gets one zero tile), and the first label of
    every sample set to ``ignore_id`` (the shifted loss would otherwise train a sample's last token to predict the
    next sample's BOS; in an unpacked row that label is never a target, so losses are unchanged). Rows are padded
    to the longest row rounded up to ``seq_bucket``. A sample that would push its row past ``max_seq_len`` tokens
    or ``max_tiles_per_row`` tiles (only a replaced sample can: the plan used the index's lengths) is left out and
    counted in ``num_dropped``; the first sample of a row always stays.
    """

    def __init__(self, pad_id: int, ignore_id: int = -100, seq_bucket: int = 64, max_seq_len: Optional[int] = None,
                 max_tiles_per_row: Optional[int] = None):
        super().__init__(pad_id, ignore_id, seq_bucket, max_seq_len)
        self.max_tiles_per_row = max_tiles_per_row

    @classmethod
    def from_processor(cls, processor, seq_bucket: int = 64, max_tiles_per_row: Optional[int] = None):
        return cls(processor.pad_id, processor.ignore_id, seq_bucket, processor.max_seq_len, max_tiles_per_row)

    @staticmethod
    def real_tiles(sample: dict) -> int:
        crops = sample["images_spatial_crop"]
        return int(sum(1 + w * h for w, h in crops.tolist() if w > 0 and h > 0))

    def __call__(self, samples: list) -> dict:
        n_rows = 1 + max(int(s.get("row", 0)) for s in samples)
        rows: list = [[] for _ in range(n_rows)]
        dropped = []
        for s in samples:
            row = rows[int(s.get("row", 0))]
            n, k = len(s["input_ids"]), self.real_tiles(s)
            used_tok = sum(len(x["input_ids"]) for x in row)
            used_tiles = sum(self.real_tiles(x) for x in row)
            over_tok = self.max_seq_len is not None and used_tok + n > self.max_seq_len
            over_tiles = self.max_tiles_per_row is not None and used_tiles + k > self.max_tiles_per_row
            if row and (over_tok or over_tiles):
                dropped.append(s)
            else:
                row.append(s)
        if any(not r for r in rows):
            raise ValueError("a packed micro-batch has an empty row; rows must be numbered 0..micro_batch_size-1")
        lens = [sum(len(s["input_ids"]) for s in r) for r in rows]
        if self.max_seq_len and lens and max(lens) > self.max_seq_len:
            raise ValueError(f"a sample has {max(lens)} tokens > max_seq_len={self.max_seq_len}; give the processor "
                             f"the same max_seq_len so it truncates at a turn boundary")
        B, T = n_rows, self.bucket_length(max(lens))
        S = samples[0]["images"].shape[-1]
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), self.ignore_id, dtype=torch.long)
        segment_ids = torch.zeros(B, T, dtype=torch.long)
        position_ids = torch.zeros(B, T, dtype=torch.long)
        seq_mask = torch.zeros(B, T, dtype=torch.bool)
        tiles_per_row, crops_per_row = [], []
        for b, row in enumerate(rows):
            o = 0
            tiles, crops = [], []
            for j, s in enumerate(row):
                n = len(s["input_ids"])
                input_ids[b, o:o + n] = s["input_ids"]
                labels[b, o:o + n] = s["target_ids"]
                labels[b, o] = self.ignore_id  # never a target across a sample boundary
                segment_ids[b, o:o + n] = j + 1
                position_ids[b, o:o + n] = torch.arange(n)
                seq_mask[b, o:o + n] = s["images_seq_mask"]
                k = self.real_tiles(s)
                if k:
                    tiles.append(s["images"][:k])
                    crops += [c for c in s["images_spatial_crop"].tolist() if c[0] > 0 and c[1] > 0]
                o += n
            position_ids[b, o:] = torch.arange(T - o)
            tiles_per_row.append(torch.cat(tiles) if tiles else torch.zeros(1, 3, S, S))
            crops_per_row.append(crops or [[0, 0]])
        images = torch.zeros(B, max(t.shape[0] for t in tiles_per_row), 3, S, S)
        spatial = torch.zeros(B, max(len(c) for c in crops_per_row), 2, dtype=torch.long)
        for b in range(B):
            images[b, :tiles_per_row[b].shape[0]] = tiles_per_row[b]
            spatial[b, :len(crops_per_row[b])] = torch.tensor(crops_per_row[b], dtype=torch.long)
        kept = [s for r in rows for s in r]
        events = [e for s in samples for e in s.get("events", ())]
        kinds = Counter(e["kind"] for e in events)
        real = sum(lens)
        out = {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids, "position_ids": position_ids,
               "images": images, "images_seq_mask": seq_mask, "images_spatial_crop": spatial}
        real_images = (spatial[..., 0] > 0) & (spatial[..., 1] > 0)
        out.update(
            num_samples=len(kept), num_rows=B, num_consumed=len(samples), num_dropped=len(dropped),
            num_real_tokens=real, num_padded_tokens=B * T - real,
            num_label_tokens=int((labels[:, 1:] != self.ignore_id).sum()),
            num_images=int(real_images.sum()),
            num_tiles=int(((1 + spatial[..., 0] * spatial[..., 1]) * real_images).sum()),
            num_image_tokens=int(seq_mask.sum()),
            num_truncated=sum(1 for s in kept if s.get("num_turns_dropped", 0) > 0),
            **{name: kinds.get(kind, 0) for kind, name in EVENT_COUNTERS.items()},
            sample_ids=[s.get("id", "") for s in kept],
            skipped=[f"{e['kind']} at {e['where']}: {e['message']}" for e in events]
            + [f"dropped from a packed row: sample {s.get('id', '')} ({len(s['input_ids'])} tokens, "
               f"{self.real_tiles(s)} tiles) no longer fits; it replaced a record the plan measured"
               for s in dropped],
        )
        return out
