"""Validation during training: when it runs (:class:`EvalPolicy`), the eval set every rank agrees on, and the loss
over it through the pipeline engine's ``eval_batch``, without moving anything training depends on (random
generators, the training sampler, the routers' expert loads, DeepSpeed's monitors)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from recipe.train_config import RunLayout, TrainConfig
from recipe.train_data import DataError, StepData, build_processor

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalPolicy:
    """When validation runs: after every ``interval``-th optimizer step (0: none in between) and after the last
    step, if the run has an eval set. A function of the step alone, so every rank validates at the same steps and
    joins the same ``eval_batch`` collectives (a rank that skipped one would hang the others)."""

    enabled: bool
    interval: int
    last_step: int

    @classmethod
    def from_config(cls, tc: TrainConfig) -> "EvalPolicy":
        return cls(tc.eval_data is not None, tc.eval_interval, tc.train_steps)

    def should_eval(self, step: int) -> bool:
        return self.enabled and (step == self.last_step or (self.interval > 0 and step % self.interval == 0))


def eval_set_size(tc: TrainConfig, run: RunLayout) -> int:
    """Samples per validation: the first ``recipe.eval_samples`` records of ``recipe.eval_data`` (all of them when
    null, at most all of them), rounded up to whole global batches; a file shorter than that wraps around to its
    first records. Every rank computes it (middle pipeline stages too: they must run as many eval steps)."""
    from recipe.data.dataset import index_jsonl

    records = len(index_jsonl(tc.eval_data)[0])
    if records == 0:
        raise DataError(f"recipe.eval_data={tc.eval_data!r}: no records to validate on")
    wanted = records if tc.eval_samples is None else min(tc.eval_samples, records)
    return -(-wanted // run.global_batch) * run.global_batch


def build_eval_data(tc: TrainConfig, run: RunLayout, dp_rank: int, has_data: bool):
    """(loader, samples per validation) of the eval set for one rank; the loader is None on middle pipeline
    stages. The set is the first :func:`eval_set_size` records of ``recipe.eval_data`` in file order, dealt to the
    data-parallel ranks as training deals its stream, by its own sampler (never the training sampler's state)
    whose count stays 0: every validation replays the same micro-batches from the start."""
    from recipe.data import Collator, ConversationDataset
    from recipe.data.dataset import ResumableBatchSampler, build_dataloader

    size = eval_set_size(tc, run)
    if not has_data:
        return None, size
    processor = build_processor(tc)  # the training labels (mask_prompt) and truncation (max_seq_len)
    dataset = ConversationDataset(tc.eval_data, tc.eval_image_root or tc.image_root, processor)
    if size > len(dataset):
        logger.info("validation: %d records in %s, rounded up to %d (whole global batches of %d): the last "
                    "batch repeats the first %d records", len(dataset), tc.eval_data, size, run.global_batch,
                    size - len(dataset))
    logger.info("validation set: the first %d samples of %s, %d eval steps of %d", size, tc.eval_data,
                size // run.global_batch, run.global_batch)
    sampler = ResumableBatchSampler(len(dataset), run.micro_batch, run.data_parallel, dp_rank, shuffle=False,
                                    total_samples=size)
    loader = build_dataloader(dataset, Collator.from_processor(processor, tc.seq_bucket), sampler,
                              num_workers=tc.num_workers)
    return loader, size


@contextlib.contextmanager
def rng_preserved():
    """Run a block without changing what the random generators draw afterwards (torch's host generator, the
    accelerator's, Python's and numpy's global ones). Validation runs in one: a DataLoader iterator draws its
    workers' base seed from torch's default generator when it starts, so a validation would otherwise shift every
    later random draw of training, and a run with validation would no longer train like one without."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    device = None if acc.device_name() == "cpu" else acc.get_rng_state()
    host, py, npy = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(host)
        if device is not None:
            acc.set_rng_state(device)
        random.setstate(py)
        np.random.set_state(npy)


@contextlib.contextmanager
def expert_load_preserved(module):
    """Keep the routers' per-step expert-load counts (read by :func:`update_correction_bias` after each training
    step) as they were: every forward counts the tokens it routes, eval forwards too."""
    from recipe.parallel.experts import DeepSeekGate

    gates = [m for m in module.modules() if isinstance(m, DeepSeekGate)]
    saved = [g.step_load.clone() for g in gates]
    try:
        yield
    finally:
        for gate, load in zip(gates, saved):
            gate.step_load.copy_(load)


@contextlib.contextmanager
def own_eval_events_off(engine):
    """``eval_batch`` writes each call's loss to the monitors itself (``Train/Samples/eval_loss``, one event per
    eval step, all at the same sample count); the run's figure is the mean over all steps, written as
    ``Eval/loss`` by :func:`run_validation`, so DeepSpeed's own events are left out."""
    monitor = getattr(engine, "monitor", None)
    enabled = bool(monitor and monitor.enabled)
    if enabled:
        monitor.enabled = False
    try:
        yield
    finally:
        if enabled:
            monitor.enabled = True


def run_validation(engine, module, loader, num_samples: int, dp_group, run: RunLayout, step: int) -> dict:
    """Validation loss of the model as it is after ``step``: the pipeline engine's ``eval_batch`` over the eval
    set, on every rank at the same steps (``loader`` is None on middle pipeline stages, which only relay).

    Each eval step is one global batch (``grad_accum_steps`` micro-batches per rank) loss-scaled by its own global
    label count, as a training step is (:class:`StepData`), so ``eval_batch``'s average over the micro-batches and
    the data-parallel ranks is that step's token-mean cross-entropy; the eval loss is their mean weighted by the
    steps' label counts: the token mean of the whole set, whatever the layout. ``eval_batch`` runs the module in
    eval mode (no MoE balance loss; the next ``train_batch`` switches back) without gradients and restores the
    engine's training iterator. Nothing else of training moves: the random generators (:func:`rng_preserved`),
    the training sampler (the eval loader has its own), the expert loads (:func:`expert_load_preserved`).

    Returns ``{"eval_loss", "eval_tokens", "eval_samples", "eval_time"}`` (loss and tokens None on middle stages,
    which never see the label counts); rank 0 logs them and writes ``Eval/loss`` to DeepSpeed's monitors.
    """
    t0 = time.perf_counter()
    gas = run.grad_accum_steps
    loss_sum, tokens = 0.0, 0
    with rng_preserved(), expert_load_preserved(module), own_eval_events_off(engine):
        batches = iter(loader) if loader is not None else None
        for _ in range(num_samples // run.global_batch):
            data = StepData([next(batches) for _ in range(gas)], dp_group, run) if batches is not None else None
            loss = engine.eval_batch(iter(data.pipe_batches) if data else None, reduce_output="avg",
                                     bcast_loss=True, num_micro_batches=gas)
            if data is not None:
                n = int(data.totals["num_label_tokens"])
                loss_sum += float(loss) * n
                tokens += n
    out = {"eval_loss": loss_sum / tokens if tokens else None, "eval_tokens": tokens if loader is not None else None,
           "eval_samples": num_samples, "eval_time": time.perf_counter() - t0}
    if dist.get_rank() == 0:
        loss_text = "n/a (no labelled tokens)" if out["eval_loss"] is None else f"{out['eval_loss']:.4f}"
        logger.info("validation after step %d: loss %s over %d samples (%d labelled tokens), %.1f s", step,
                    loss_text, num_samples, tokens, out["eval_time"])
        monitor = getattr(engine, "monitor", None)
        if monitor is not None and monitor.enabled and out["eval_loss"] is not None:
            monitor.write_events([("Eval/loss", out["eval_loss"], step)])
    return out
