"""What the multi-rank CPU benches share: the VL2-shaped bench model, its PP=2 x DP=2 EP=2 engine, one timed
``train_batch`` loss-scaled as training scales it, and starting a bench's own ranks under torchrun.

Imported by the bench scripts as a sibling (``python bench/x.py`` puts bench/ on the path; the recipe itself is
pip-installed, see scripts/install.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PP2_EP2 = {"pipeline_stages": 2, "expert_parallel_size": 2, "decoder_split": [2, 2]}


def bench_config():
    """A small model with DeepSeek-VL2's shapes where they set the cost mix (384 px tiles, 16 experts top-4)."""
    from recipe.tools.tiny_config import tiny_config

    return tiny_config("base", image_size=384, vocab_size=1024, hidden_size=256, num_hidden_layers=4,
                       n_routed_experts=16, num_experts_per_tok=4, vision_width=128, vision_layers=4,
                       moe_intermediate_size=128, intermediate_size=512)


def pp2_ep2_engine(cfg, mbs: int, gas: int, moe_dispatcher: str = "exact"):
    """``VL2Pipeline`` at PP=2 x DP=2, EP=2 (4 ranks, process group up) under DeepSpeed with fp32 AdamW and ZeRO-1.
    Returns (engine, module, run layout)."""
    import deepspeed
    import torch.distributed as dist

    from recipe.parallel.pipeline import VL2Pipeline
    from recipe.train_config import RunLayout

    module = VL2Pipeline(cfg, num_stages=2, ep_size=2, decoder_split=[2, 2], moe_dispatcher=moe_dispatcher)
    ds = {"train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": gas, "steps_per_print": 10 ** 6,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
          "zero_optimization": {"stage": 1}}
    engine, *_ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters()
                                                                      if p.requires_grad], config=ds)
    return engine, module, RunLayout.from_config(PP2_EP2, ds, cfg, dist.get_world_size())


def timed_train_batch(engine, run, micro: list, counters=()) -> tuple[float, list]:
    """One ``train_batch`` over this rank's micro-batches, loss-scaled by the step's global label count as training
    does. ``counters``: further per-rank figures summed over the data-parallel group with the label count. Returns
    (this rank's seconds for the step, started after a barrier; [labels, *counters] summed)."""
    import torch.distributed as dist

    from recipe.parallel.pipeline import pipe_batch
    from recipe.tools.synthetic_batches import label_count

    labels = sum(label_count(b) for b in micro)
    totals = torch.tensor([float(labels), *map(float, counters)], dtype=torch.float64)
    dist.all_reduce(totals, group=engine.mpu.get_data_parallel_group())
    dist.barrier()
    t = time.perf_counter()
    engine.train_batch(iter([pipe_batch(b, run.ce_scale(float(totals[0]))) for b in micro]))
    return time.perf_counter() - t, totals.tolist()


def run_ranks(script: str, nprocs: int, args: list, env: dict, port_base: int = 29000) -> None:
    """``torchrun --nproc_per_node nprocs script args``; on failure print the output's tail and exit with its code."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", str(nprocs), "--master_port", str(port_base + os.getpid() % 1000), script,
           *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(proc.returncode)
