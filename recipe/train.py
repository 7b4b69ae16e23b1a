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

from recipe.checkpoint import CheckpointError
from recipe.config import ConfigError, VL2Config
from recipe.train_config import RunLayout, TrainConfig, check_paths, load_run_config
from recipe.train_data import (
    DataError,
    ReplacementGuard,
    StepData,
    build_data,
    build_length_index,
    consumed_in_step,
)
from recipe.train_log import log_summary, report_step, step_record, summarize
from recipe.validation import EvalPolicy, build_eval_data, rng_preserved, run_validation

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


# --- building blocks (the data: recipe/train_data.py; validation: recipe/validation.py; step records:
# recipe/train_log.py) ----------------------------------------------------------------------------------------------

def build_model(tc: TrainConfig, cfg: VL2Config, resuming: bool):
    """The pipeline module with this rank's layers, frozen parts set, weights loaded (unless resuming, when
    DeepSpeed's checkpoint provides them), LoRA adapters added when ``recipe.lora`` is set."""
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
    if tc.lora is not None:  # after loading (the adapters are no checkpoint tensors), before deepspeed.initialize
        from recipe.parallel.lora import apply_lora

        lora = tc.lora_config
        adapted = apply_lora(module, lora, tc.seed)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        logger.info("LoRA rank %d alpha %g on %d modules of this rank (%d trainable parameters); base frozen",
                    lora.rank, lora.alpha, len(adapted), trainable)
    return module


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


def resume(engine, tc: TrainConfig, rank: int) -> tuple[int, int]:
    """Load the training checkpoint ``recipe.resume`` names into ``engine`` with this rank's RNG state; rank 0 drops
    the interrupted run's records after it from ``train_log.jsonl``. Returns (step, consumed samples)."""
    from recipe.checkpoint.training import trim_log
    from recipe.parallel import checkpointing

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
    return step, consumed


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


# --- the loop -----------------------------------------------------------------------------------------------------

def train(tc: TrainConfig, ds_config: dict, cfg: VL2Config, run: RunLayout) -> dict:
    import deepspeed

    from recipe.checkpoint.training import failpoint, resolve_tag
    from recipe.parallel import checkpointing
    from recipe.parallel.loading import check_expert_groups

    rank = dist.get_rank()
    resuming = resolve_tag(tc.save_dir, tc.resume) is not None  # checked again, with the files, by resume()
    module = build_model(tc, cfg, resuming=resuming)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config)
    check_expert_groups(module)
    checkpointing.install_engine(engine, rank)
    step, consumed = resume(engine, tc, rank) if resuming else (0, 0)
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
        rec = step_record(engine, step, loss, data.totals if data else None, time.perf_counter() - t0, G)
        if evals.should_eval(step):
            rec.update(run_validation(engine, module, eval_loader, eval_size, dp_group, run, step))
        history.append(rec)
        if rank == 0:
            report_step(engine, tc, rec)
        if (tc.save_interval and step % tc.save_interval == 0) or step == tc.train_steps:
            save(engine, tc, step, consumed, ds_config)
    summary = summarize(history, tc.throughput_window)
    if rank == 0 and summary:
        log_summary(summary)
    return {"history": history, "summary": summary}


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
