"""Fine-tune DeepSeek-VL2 with DeepSpeed: pipeline parallelism, expert parallelism, ZeRO-1 data parallelism.

    deepspeed --hostfile hostfiles/4x8 recipe/train.py --deepspeed ds_configs/ep8.json

The JSON holds DeepSpeed's keys and a "recipe" block (see recipe/train_config.py and ds_configs/README.md).
Starts from a converted checkpoint (or resumes from a training checkpoint), trains for ``train_steps`` optimizer
steps, logs loss / aux loss / lr / grad norm / throughput / padding every ``log_interval`` steps, saves with
DeepSpeed's ``save_checkpoint`` (export with ``converters/ds_to_hf.py``); every step's figures also go to
``<save_dir>/train_log.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from recipe.checkpoint import CheckpointError
from recipe.config import ConfigError, VL2Config
from recipe.train_config import RunLayout, TrainConfig, check_paths, load_run_config

logger = logging.getLogger("recipe.train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed", required=True, metavar="JSON",
                   help="DeepSpeed config with a \"recipe\" block (e.g. ds_configs/ep8.json)")
    p.add_argument("--model-dir", help="override recipe.model_dir")
    p.add_argument("--train-data", help="override recipe.train_data")
    p.add_argument("--image-root", help="override recipe.image_root")
    p.add_argument("--eval-data", help="override recipe.eval_data (held-out jsonl for validation)")
    p.add_argument("--save-dir", help="override recipe.save_dir")
    p.add_argument("--train-steps", type=int, help="override recipe.train_steps")
    p.add_argument("--resume", help="override recipe.resume: auto, latest, a tag, or none")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # launcher
    return p.parse_args(argv)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


# --- building blocks ----------------------------------------------------------------------------------------------

def build_model(tc: TrainConfig, cfg: VL2Config, resuming: bool):
    """The pipeline module with this rank's layers, frozen parts set, weights loaded (unless resuming, when
    DeepSpeed's checkpoint provides them)."""
    from recipe.parallel.loading import load_pretrained
    from recipe.parallel.pipeline import VL2Pipeline, freeze

    module = VL2Pipeline(cfg, num_stages=tc.pipeline_stages, ep_size=tc.expert_parallel_size,
                         decoder_split=tc.split, activation_checkpointing=tc.activation_checkpointing,
                         moe_dispatcher=tc.moe_dispatcher)
    frozen = freeze(module, **tc.freeze)
    if frozen:
        logger.info("frozen: %d tensors (%s)", len(frozen), ", ".join(k for k, v in tc.freeze.items() if v))
    if not resuming:
        t = time.time()
        n = load_pretrained(module, tc.model_dir)
        logger.info("loaded %d tensors of stage %d from %s in %.1f s", n, module.stage_id, tc.model_dir,
                    time.time() - t)
    return module


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


# --- the loop -----------------------------------------------------------------------------------------------------

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


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank:05d}.pt"


def save(engine, tc: TrainConfig, step: int, consumed: int, ds_config: dict) -> None:
    """A training checkpoint with the commit protocol (``recipe.parallel.checkpointing.save``): ``latest`` moves only
    once every rank's files, this rank's RNG state and the run config are written and recorded."""
    from recipe.checkpoint.hf import copy_side_files
    from recipe.parallel import checkpointing

    tag = f"global_step{step}"
    state = {"consumed_samples": consumed, "step": step, "recipe": dataclasses.asdict(tc)}
    rank = dist.get_rank()
    if rank == 0:
        # what ds_to_hf needs to export this checkpoint: the model config, tokenizer and processor files
        os.makedirs(tc.save_dir, exist_ok=True)
        copy_side_files(tc.model_dir, tc.save_dir)
    run_config = json.dumps({**ds_config, "recipe": dataclasses.asdict(tc)}, indent=2)
    checkpointing.save(engine, tc.save_dir, tag, state, {rng_file(rank): {"torch": torch.get_rng_state()}},
                       {"run_config.json": run_config})
    logger.info("saved checkpoint %s", os.path.join(tc.save_dir, tag))


def update_correction_bias(module, rate: float, dp_group) -> None:
    """noaux_tc aux-loss-free balancing: one sign step per optimizer step from the step's expert loads, summed
    over the data-parallel group so every replica applies the same update."""
    from recipe.parallel.experts import ExpertParallelMoE

    for _, layer in module.local_layers():
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, ExpertParallelMoE) and mlp.router.e_score_correction_bias is not None:
            gate = mlp.moe.deepspeed_moe.gate
            load = gate.take_step_load()
            dist.all_reduce(load, group=dp_group)
            mlp.router.update_correction_bias(load, rate)


# --- validation ---------------------------------------------------------------------------------------------------

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


def train(tc: TrainConfig, ds_config: dict, cfg: VL2Config, run: RunLayout) -> dict:
    import deepspeed

    from recipe.accelerator import memory_stats
    from recipe.checkpoint.training import failpoint, resolve_tag, trim_log
    from recipe.parallel import checkpointing
    from recipe.parallel.loading import check_expert_groups

    rank = dist.get_rank()
    resuming = resolve_tag(tc.save_dir, tc.resume) is not None  # checked again, with the files, by resume()
    module = build_model(tc, cfg, resuming=resuming)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config)
    check_expert_groups(module)
    checkpointing.install_engine(engine, rank)
    step, consumed = 0, 0
    if resuming:
        tag, client, rng = checkpointing.resume(engine, tc.save_dir, tc.resume, rng_file(rank))
        step, consumed = int(client["step"]), int(client["consumed_samples"])
        if rng is not None:
            torch.set_rng_state(rng["torch"])
        if rank == 0:
            dropped = trim_log(os.path.join(tc.save_dir, "train_log.jsonl"), step)
            if dropped:
                logger.info("train_log.jsonl: dropped %d records of steps after %d (the interrupted run's)",
                            dropped, step)
        logger.info("resumed from %s: step %d, %d samples consumed", os.path.join(tc.save_dir, tag), step, consumed)
    has_data = engine.is_first_stage() or engine.is_last_stage()
    dp_group = engine.mpu.get_data_parallel_group()
    loader_iter = None
    if tc.packing:  # one build per host (cached beside the data), before any rank reads it
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            build_length_index(tc)
        dist.barrier()
    if has_data:
        _, _, loader = build_data(tc, run.micro_batch, run.data_parallel, module.dp_rank, consumed)
        loader_iter = iter(loader)
    evals = EvalPolicy.from_config(tc)
    with rng_preserved():
        eval_loader, eval_size = build_eval_data(tc, run, module.dp_rank, has_data) if evals.enabled else (None, 0)
    G, gas = run.global_batch, run.grad_accum_steps
    guard = ReplacementGuard(tc.max_replaced_fraction)
    history = []
    logger.info("training steps %d..%d: global batch %d %s = micro-batch %d x %d accumulation x %d data-parallel; "
                "%d pipeline stages %s, expert parallel %d", step + 1, tc.train_steps, G,
                f"rows (packed, up to {tc.max_seq_len} tokens and {tc.max_tiles_per_row} tiles each)" if tc.packing
                else "samples", run.micro_batch, gas, run.data_parallel, run.pipeline_stages, run.parts,
                run.expert_parallel)
    while step < tc.train_steps:
        failpoint("train_step", rank, str(step + 1))
        t0 = time.perf_counter()
        data = StepData([next(loader_iter) for _ in range(gas)], dp_group, run) if has_data else None
        if data is not None:
            guard.update(data, step + 1)  # raises on a broken data set; the launcher then stops every rank
        loss = engine.train_batch(iter(data.pipe_batches) if data else None)
        if tc.correction_bias_update_rate > 0:
            update_correction_bias(module, tc.correction_bias_update_rate, dp_group)
        step, consumed = step + 1, consumed + consumed_in_step(data, run, engine)
        dt = time.perf_counter() - t0
        extra = {k: float(v) for k, v in (engine.agg_additional_losses or {}).items()}
        rec = {"step": step, "loss": float(loss), "ce": extra.get("ce"), "aux": extra.get("aux"),
               "lr": engine.get_lr()[0], "grad_norm": _maybe_float(engine.get_global_grad_norm()),
               "step_time": dt, "samples_per_s": G / dt}
        if data is not None:
            rec.update(step_metrics(data.totals, dt))
        rec.update({f"mem_{k}": v for k, v in memory_stats().items() if v is not None})
        if evals.should_eval(step):
            rec.update(run_validation(engine, module, eval_loader, eval_size, dp_group, run, step))
        history.append(rec)
        if rank == 0:
            append_jsonl(os.path.join(tc.save_dir, "train_log.jsonl"), rec)
            if step % tc.log_interval == 0 or step == tc.train_steps:
                log_step(rec, tc.train_steps)
                write_monitor(engine, rec, step)
        if (tc.save_interval and step % tc.save_interval == 0) or step == tc.train_steps:
            save(engine, tc, step, consumed, ds_config)
    summary = summarize(history, tc.throughput_window)
    if rank == 0 and summary:
        logger.info("throughput over the last %d steps: SPS %.3f samples/s, TPS %.1f tokens/s (real tokens), "
                    "%.3f s/step, %.2f samples/row, padding %.1f%%", summary["window"], summary["sps"],
                    summary["tps"], summary["step_time"], summary.get("samples_per_row", float("nan")),
                    100 * summary.get("padding_ratio", float("nan")))
    return {"history": history, "summary": summary}


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


def step_metrics(totals: dict, dt: float) -> dict:
    """What a step's data counters (summed over micro-batches and data-parallel ranks) say per second: real samples
    (SPS, as the original recipe counts them), real tokens (padding excluded), samples per row, padding."""
    real, pad = totals["num_real_tokens"], totals["num_padded_tokens"]
    return {"samples_per_s": totals["num_samples"] / dt, "tokens_per_s": real / dt,
            "padding_ratio": pad / max(real + pad, 1),
            "samples_per_row": totals["num_samples"] / max(totals["num_rows"], 1),
            "replaced_samples": int(totals["num_corrupt_images"] + totals["num_too_long"] + totals["num_bad_records"]),
            "dropped_samples": int(totals["num_dropped"])}


def append_jsonl(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _maybe_float(x):
    return None if x is None else float(x)


def log_step(r: dict, total: int) -> None:
    parts = [f"step {r['step']}/{total}", f"loss {r['loss']:.4f}"]
    if r.get("ce") is not None:
        parts.append(f"ce {r['ce']:.4f} aux {r['aux']:.5f}")
    parts.append(f"lr {r['lr']:.3g}")
    if r.get("grad_norm") is not None:
        parts.append(f"grad {r['grad_norm']:.3f}")
    parts.append(f"{r['samples_per_s']:.2f} samples/s")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:.0f} tok/s {r['samples_per_row']:.2f} samples/row "
                     f"pad {100 * r['padding_ratio']:.1f}%")
    parts.append(f"{r['step_time']:.2f} s/step")
    mem = r.get("mem_peak_allocated") or r.get("mem_peak_rss")
    if mem:
        parts.append(f"mem {mem / 2 ** 30:.2f} GiB")
    if r.get("replaced_samples"):
        parts.append(f"replaced {r['replaced_samples']}")
    if r.get("dropped_samples"):
        parts.append(f"dropped {r['dropped_samples']}")
    logger.info(" | ".join(parts))


def write_monitor(engine, r: dict, step: int) -> None:
    """The step's figures to DeepSpeed's monitors (CSV / TensorBoard / W&B, whichever the config enables)."""
    if not getattr(engine, "monitor", None) or not engine.monitor.enabled:
        return
    keys = ("loss", "ce", "aux", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "samples_per_row",
            "padding_ratio", "step_time")
    engine.monitor.write_events([(f"Train/{k}", float(r[k]), step) for k in keys if r.get(k) is not None])


def summarize(history: list, window: int) -> dict:
    """Mean throughput over the last ``window`` steps, leaving out the first (warm-up) step."""
    steady = history[1:][-window:]
    if not steady:
        return {}
    t = sum(r["step_time"] for r in steady) / len(steady)
    out = {"window": len(steady), "step_time": t, "sps": sum(r["samples_per_s"] for r in steady) / len(steady)}
    if all("tokens_per_s" in r for r in steady):
        out["tps"] = sum(r["tokens_per_s"] for r in steady) / len(steady)
        out["samples_per_row"] = sum(r["samples_per_row"] for r in steady) / len(steady)
        out["padding_ratio"] = sum(r["padding_ratio"] for r in steady) / len(steady)
    else:
        out["tps"] = float("nan")
    return out


def prepare_run(args: argparse.Namespace, world_size: int) -> tuple[dict, TrainConfig, VL2Config, RunLayout]:
    """Everything checkable before a process group or a model exists: the JSON, the paths, the model config, the
    parallel layout and batch arithmetic. Raises ConfigError with a message that says what to change."""
    overrides = {"model_dir": args.model_dir, "train_data": args.train_data, "image_root": args.image_root,
                 "save_dir": args.save_dir, "train_steps": args.train_steps, "resume": args.resume,
                 "eval_data": args.eval_data}
    ds_config, tc = load_run_config(args.deepspeed, overrides)
    check_paths(tc)
    cfg = VL2Config.from_json(tc.model_dir)
    if tc.aux_loss_coef is not None:
        cfg.language_config.aux_loss_alpha = tc.aux_loss_coef
    return ds_config, tc, cfg, RunLayout.from_config(tc, ds_config, cfg, world_size)


def main(argv=None) -> dict:
    from recipe.parallel import dist as rdist  # issue 9: launcher watchdog, save_dir lock, bounded start
    from recipe.parallel import supervise

    supervise.start_watchdog()  # first: this rank stops when its launcher dies
    args = parse_args(argv)
    setup_logging(int(os.environ.get("RANK", 0)))
    try:
        ds_config, tc, cfg, sizes = prepare_run(args, int(os.environ.get("WORLD_SIZE", "1")))
        if int(os.environ.get("RANK", 0)) == 0:
            supervise.lock_save_dir(tc.save_dir)  # one job per save_dir; held until this process exits
    except ConfigError as e:
        logger.error("configuration error: %s", e)
        rdist.report_startup_failure(f"configuration error: {e}")  # the other ranks stop now, not at a timeout
        raise SystemExit(2) from None
    try:
        rdist.init_distributed()
    except rdist.StartupError as e:
        logger.error("start-up failed: %s", e)
        raise SystemExit(e.exit_code) from None
    torch.manual_seed(tc.seed)
    try:
        result = train(tc, ds_config, cfg, sizes)
    except (CheckpointError, DataError) as e:  # a damaged checkpoint or a broken data set: say so, no traceback
        logger.error("%s", e)
        raise SystemExit(1) from None
    dist.barrier()
    dist.destroy_process_group()  # a clean exit: gloo threads still running at interpreter exit can abort it
    return result


if __name__ == "__main__":
    main()
