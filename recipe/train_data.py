"""The training stream of one rank: the processor, the dataset / sampler / loader (packed or one sample per row),
one optimizer step's micro-batches with their global counters (:class:`StepData`), and the guard that stops a run
whose data is broken."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from recipe.train_config import RunLayout, TrainConfig

logger = logging.getLogger(__name__)


def build_processor(tc: TrainConfig):
    from recipe.data import DeepseekVLV2Processor

    return DeepseekVLV2Processor.from_pretrained(tc.model_dir, mask_prompt=tc.mask_prompt, max_seq_len=tc.max_seq_len)


def build_length_index(tc: TrainConfig, processor=None):
    """The length index of ``recipe.train_data`` (built once, then read from its cache beside the data)."""
    from recipe.data.lengths import build_length_index as build

    return build(tc.train_data, tc.image_root, processor or build_processor(tc))


def build_data(tc: TrainConfig, micro_batch: int, dp_size: int, dp_rank: int, consumed_samples: int):
    """Dataset, sampler and loader for one data-parallel rank (first and last pipeline stage only). With
    ``recipe.packing`` the sampler yields packed rows (``micro_batch`` rows per micro-batch) planned from the
    length index; otherwise ``micro_batch`` samples, one per row."""
    from recipe.data import Collator, ConversationDataset
    from recipe.data.dataset import ResumableBatchSampler, build_dataloader
    from recipe.data.packing import PackedBatchSampler, PackedCollator

    processor = build_processor(tc)
    dataset = ConversationDataset(tc.train_data, tc.image_root, processor)
    if tc.packing:
        index = build_length_index(tc, processor)
        if len(index) != len(dataset):
            raise RuntimeError(f"{tc.train_data}: the length index has {len(index)} records, the file "
                               f"{len(dataset)}; delete {index.path} and restart")
        src = index.resolved(dataset.max_substitutions)  # the record the dataset loads in each one's place
        sampler = PackedBatchSampler(index.num_tokens[src], index.num_tiles[src], micro_batch, dp_size, dp_rank,
                                     seed=tc.seed, consumed_samples=consumed_samples, max_tokens=tc.max_seq_len,
                                     max_tiles=tc.max_tiles_per_row, window=tc.packing_window)
        collator = PackedCollator.from_processor(processor, tc.seq_bucket, tc.max_tiles_per_row)
    else:
        sampler = ResumableBatchSampler(len(dataset), micro_batch, dp_size, dp_rank, seed=tc.seed,
                                        consumed_samples=consumed_samples)
        collator = Collator.from_processor(processor, tc.seq_bucket)
    loader = build_dataloader(dataset, collator, sampler, num_workers=tc.num_workers)
    return dataset, sampler, loader


class StepData:
    """One optimizer step's micro-batches for this rank, with the step's global counters (the collator's
    ``Collator.COUNTERS``, all-reduced over the data-parallel group)."""

    def __init__(self, batches: list, dp_group, run: RunLayout):
        from recipe.data.dataset import Collator
        from recipe.parallel.pipeline import pipe_batch

        local = torch.tensor([sum(int(b[k]) for b in batches) for k in Collator.COUNTERS], dtype=torch.float64)
        dist.all_reduce(local, group=dp_group)
        self.totals = dict(zip(Collator.COUNTERS, local.tolist()))
        ce_scale = run.ce_scale(self.totals["num_label_tokens"])
        self.pipe_batches = [pipe_batch(b, ce_scale) for b in batches]
        self.skipped = [line for b in batches for line in b.get("skipped", ())]
        for line in self.skipped:
            logger.warning("data: replaced sample: %s", line)


def consumed_in_step(data, run: RunLayout, engine) -> int:
    """Stream positions the step's rows held over all data-parallel ranks (the sampler's resume count; one per
    sample, or per row without packing). Ranks without data (middle stages, PP >= 3) receive it from the pipeline
    group, so every stage saves the same count."""
    n = int(data.totals["num_consumed"]) if data is not None else 0
    if run.pipeline_stages > 2:
        t = torch.tensor([float(n)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=engine.mpu.get_pipe_parallel_group())
        n = int(t.item())
    return n


class DataError(RuntimeError):
    """The training data is unusable at a rate no run should train through."""


class ReplacementGuard:
    """Counts replaced samples (corrupt or missing images, too long, malformed) over the run and stops it once they
    exceed ``max_fraction`` of the samples trained so far (checked after every step, from the first on)."""

    KINDS = {"num_corrupt_images": "corrupt or missing images", "num_too_long": "too long",
             "num_bad_records": "malformed records"}

    def __init__(self, max_fraction: float):
        self.max_fraction = max_fraction
        self.samples = 0
        self.replaced = dict.fromkeys(self.KINDS, 0)
        self.examples: list = []

    def update(self, data: "StepData", step: int) -> None:
        self.samples += int(data.totals["num_samples"])
        for k in self.KINDS:
            self.replaced[k] += int(data.totals[k])
        self.examples = (self.examples + data.skipped)[:5]
        total = sum(self.replaced.values())
        if total > self.max_fraction * self.samples:
            kinds = ", ".join(f"{why}: {self.replaced[k]}" for k, why in self.KINDS.items() if self.replaced[k])
            shown = "".join(f"\n  {line}" for line in self.examples)
            raise DataError(f"data: {total} of the {self.samples} samples of steps 1..{step} of this run had to be "
                            f"replaced ({kinds}), over recipe.max_replaced_fraction={self.max_fraction}; check "
                            f"recipe.train_data and recipe.image_root (run recipe/prepare_ai2d.py on this host to "
                            f"validate them). First replaced samples on this rank:{shown}")
