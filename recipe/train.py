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
import dataclasses
import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from recipe.config import ConfigError, VL2Config
from recipe.train_config import TrainConfig, check_layout, check_paths, load_run_config

logger = logging.getLogger("recipe.train")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed", required=True, metavar="JSON",
                   help="DeepSpeed config with a \"recipe\" block (e.g. ds_configs/ep8.json)")
    p.add_argument("--model-dir", help="override recipe.model_dir")
    p.add_argument("--train-data", help="override recipe.train_data")
    p.add_argument("--image-root", help="override recipe.image_root")
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
                         decoder_split=tc.split, activation_checkpointing=tc.activation_checkpointing)
    frozen = freeze(module, **tc.freeze)
    if frozen:
        logger.info("frozen: %d tensors (%s)", len(frozen), ", ".join(k for k, v in tc.freeze.items() if v))
    if not resuming:
        t = time.time()
        n = load_pretrained(module, tc.model_dir)
        logger.info("loaded %d tensors of stage %d from %s in %.1f s", n, module.stage_id, tc.model_dir,
                    time.time() - t)
    return module


def build_data(tc: TrainConfig, micro_batch: int, dp_size: int, dp_rank: int, consumed_samples: int):
    """Dataset, sampler and loader for one data-parallel rank (first and last pipeline stage only)."""
    from recipe.data import Collator, ConversationDataset, DeepseekVLV2Processor
    from recipe.data.dataset import ResumableBatchSampler, build_dataloader

    processor = DeepseekVLV2Processor.from_pretrained(tc.model_dir, mask_prompt=tc.mask_prompt,
                                                      max_seq_len=tc.max_seq_len)
    dataset = ConversationDataset(tc.train_data, tc.image_root, processor)
    sampler = ResumableBatchSampler(len(dataset), micro_batch, dp_size, dp_rank, seed=tc.seed,
                                    consumed_samples=consumed_samples)
    loader = build_dataloader(dataset, Collator.from_processor(processor, tc.seq_bucket), sampler,
                              num_workers=tc.num_workers)
    return dataset, sampler, loader


def resolve_resume(tc: TrainConfig):
    """The checkpoint tag to resume from, or None for a fresh start."""
    latest = os.path.join(tc.save_dir, "latest")
    mode = tc.resume if tc.resume not in ("none", "null", "") else None  # "none" comes from the command line
    if mode is None:
        return None
    if mode == "auto":
        return open(latest).read().strip() if os.path.isfile(latest) else None
    if mode == "latest":
        if not os.path.isfile(latest):
            raise ConfigError(f"recipe.resume=latest but {latest} does not exist")
        return open(latest).read().strip()
    if not os.path.isdir(os.path.join(tc.save_dir, mode)):
        raise ConfigError(f"recipe.resume={mode!r}: no checkpoint {os.path.join(tc.save_dir, mode)}")
    return mode


# --- the loop -----------------------------------------------------------------------------------------------------

class StepData:
    """One optimizer step's micro-batches for this rank, with the step's global counters (all-reduced over the
    data-parallel group)."""

    COUNTERS = ("num_samples", "num_real_tokens", "num_padded_tokens", "num_label_tokens", "num_corrupt_images",
                "num_too_long", "num_bad_records", "num_truncated")

    def __init__(self, batches: list, dp_group, dp_size: int, gas: int):
        from recipe.parallel.pipeline import pipe_batch

        local = torch.tensor([sum(int(b[k]) for b in batches) for k in self.COUNTERS], dtype=torch.float64)
        dist.all_reduce(local, group=dp_group)
        self.totals = dict(zip(self.COUNTERS, local.tolist()))
        labels = self.totals["num_label_tokens"]
        # ce_scale makes the engine's mean over micro-batches and dp ranks equal the token mean of the global batch
        ce_scale = gas * dp_size / labels if labels else 0.0
        self.pipe_batches = [pipe_batch(b, ce_scale) for b in batches]
        for b in batches:
            for line in b.get("skipped", ()):
                logger.warning("data: replaced sample: %s", line)


def save(engine, tc: TrainConfig, step: int, consumed: int, ds_config: dict) -> None:
    from recipe.hf_checkpoint import copy_side_files

    tag = f"global_step{step}"
    state = {"consumed_samples": consumed, "step": step, "recipe": dataclasses.asdict(tc)}
    engine.save_checkpoint(tc.save_dir, tag=tag, client_state=state)
    torch.save({"torch": torch.get_rng_state()},
               os.path.join(tc.save_dir, tag, f"rng_state_rank{dist.get_rank():05d}.pt"))
    if dist.get_rank() == 0:
        # what ds_to_hf needs to export this checkpoint: the model config, tokenizer and processor files
        copy_side_files(tc.model_dir, tc.save_dir)
        with open(os.path.join(tc.save_dir, tag, "run_config.json"), "w") as f:
            json.dump({**ds_config, "recipe": dataclasses.asdict(tc)}, f, indent=2)
    dist.barrier()
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


def train(tc: TrainConfig, ds_config: dict, cfg: VL2Config, sizes: dict) -> dict:
    import deepspeed

    from recipe.accelerator import memory_stats
    from recipe.parallel.loading import check_expert_groups

    rank = dist.get_rank()
    tag = resolve_resume(tc)
    module = build_model(tc, cfg, resuming=tag is not None)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config)
    check_expert_groups(module)
    step, consumed = 0, 0
    if tag is not None:
        _, client = engine.load_checkpoint(tc.save_dir, tag=tag)
        step, consumed = int(client["step"]), int(client["consumed_samples"])
        rng = os.path.join(tc.save_dir, tag, f"rng_state_rank{rank:05d}.pt")
        if os.path.isfile(rng):
            torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
        logger.info("resumed from %s: step %d, %d samples consumed", os.path.join(tc.save_dir, tag), step, consumed)
    has_data = engine.is_first_stage() or engine.is_last_stage()
    dp_group = engine.mpu.get_data_parallel_group()
    loader_iter = None
    if has_data:
        _, _, loader = build_data(tc, sizes["micro_batch"], sizes["dp"], module.dp_rank, consumed)
        loader_iter = iter(loader)
    G, gas = sizes["global_batch"], sizes["gas"]
    history = []
    logger.info("training steps %d..%d: global batch %d = micro-batch %d x %d accumulation x %d data-parallel; "
                "%d pipeline stages %s, expert parallel %d", step + 1, tc.train_steps, G, sizes["micro_batch"], gas,
                sizes["dp"], tc.pipeline_stages, sizes["parts"], tc.expert_parallel_size)
    while step < tc.train_steps:
        t0 = time.perf_counter()
        data = StepData([next(loader_iter) for _ in range(gas)], dp_group, sizes["dp"], gas) if has_data else None
        loss = engine.train_batch(iter(data.pipe_batches) if data else None)
        if tc.correction_bias_update_rate > 0:
            update_correction_bias(module, tc.correction_bias_update_rate, dp_group)
        step, consumed = step + 1, consumed + G
        dt = time.perf_counter() - t0
        extra = {k: float(v) for k, v in (engine.agg_additional_losses or {}).items()}
        rec = {"step": step, "loss": float(loss), "ce": extra.get("ce"), "aux": extra.get("aux"),
               "lr": engine.get_lr()[0], "grad_norm": _maybe_float(engine.get_global_grad_norm()),
               "step_time": dt, "samples_per_s": G / dt}
        if data is not None:
            real, pad = data.totals["num_real_tokens"], data.totals["num_padded_tokens"]
            rec.update(tokens_per_s=real / dt, padding_ratio=pad / max(real + pad, 1),
                       replaced_samples=int(data.totals["num_corrupt_images"] + data.totals["num_too_long"]
                                            + data.totals["num_bad_records"]))
        rec.update({f"mem_{k}": v for k, v in memory_stats().items() if v is not None})
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
                    "%.3f s/step", summary["window"], summary["sps"], summary["tps"], summary["step_time"])
    return {"history": history, "summary": summary}


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
        parts.append(f"{r['tokens_per_s']:.0f} tok/s pad {100 * r['padding_ratio']:.1f}%")
    parts.append(f"{r['step_time']:.2f} s/step")
    mem = r.get("mem_peak_allocated") or r.get("mem_peak_rss")
    if mem:
        parts.append(f"mem {mem / 2 ** 30:.2f} GiB")
    if r.get("replaced_samples"):
        parts.append(f"replaced {r['replaced_samples']}")
    logger.info(" | ".join(parts))


def write_monitor(engine, r: dict, step: int) -> None:
    """The step's figures to DeepSpeed's monitors (CSV / TensorBoard / W&B, whichever the config enables)."""
    if not getattr(engine, "monitor", None) or not engine.monitor.enabled:
        return
    keys = ("loss", "ce", "aux", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "padding_ratio", "step_time")
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
    else:
        out["tps"] = float("nan")
    return out


def prepare_run(args: argparse.Namespace, world_size: int) -> tuple[dict, TrainConfig, VL2Config, dict]:
    """Everything checkable before a process group or a model exists: the JSON, the paths, the model config, the
    parallel layout and batch arithmetic. Raises ConfigError with a message that says what to change."""
    overrides = {"model_dir": args.model_dir, "train_data": args.train_data, "image_root": args.image_root,
                 "save_dir": args.save_dir, "train_steps": args.train_steps, "resume": args.resume}
    ds_config, tc = load_run_config(args.deepspeed, overrides)
    check_paths(tc)
    cfg = VL2Config.from_json(tc.model_dir)
    if tc.aux_loss_coef is not None:
        cfg.language_config.aux_loss_alpha = tc.aux_loss_coef
    sizes = check_layout(tc, ds_config, cfg, world_size)
    return ds_config, tc, cfg, sizes


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging(int(os.environ.get("RANK", 0)))
    try:
        ds_config, tc, cfg, sizes = prepare_run(args, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        logger.error("configuration error: %s", e)
        raise SystemExit(2)
    from recipe.parallel.dist import init_distributed

    init_distributed()
    torch.manual_seed(tc.seed)
    result = train(tc, ds_config, cfg, sizes)
    dist.barrier()
    dist.destroy_process_group()  # a clean exit: gloo threads still running at interpreter exit can abort it
    return result


if __name__ == "__main__":
    main()
