"""Layouts of the same devices and global batch that fit: a search over pipeline stages, expert parallelism,
activation checkpointing and the decoder split, ranked by estimated step time. See ``docs/planner.md``."""

from __future__ import annotations

import dataclasses

from recipe.config import ConfigError, VL2Config
from recipe.parallel import layout
from recipe.parallel.cost import Workload, flops_balanced_split, min_max_split
from recipe.plan.memory import GiB, Topology, moe_on_every_stage, stage_plan


def suggest_layouts(cfg: VL2Config, infos, topo: Topology, work: Workload, usable: float, world_size: int,
                    limit: int = 3) -> list[dict]:
    """Layouts of the same devices and global batch whose every stage fits: pipeline stages, EP size, checkpointing,
    decoder split (the split minimising the largest stage memory). Best first by estimated step time."""
    lc = cfg.language_config
    L = lc.num_hidden_layers
    first = layout.first_decoder_index(cfg)
    found = []
    for pp in [d for d in range(1, min(world_size, L) + 1) if world_size % d == 0]:
        dp = world_size // pp
        if topo.train_batch % (topo.micro_batch * dp):
            continue
        for ep in [e for e in range(1, dp + 1) if dp % e == 0 and (not lc.is_moe or lc.n_routed_experts % e == 0)]:
            for ckpt in (False, True):
                trial = dataclasses.replace(topo, pipeline_stages=pp, data_parallel=dp, expert_parallel=ep,
                                            grad_accum_steps=topo.train_batch // (topo.micro_batch * dp),
                                            activation_checkpointing=ckpt)

                def cost(s, start, n, trial=trial, pp=pp):
                    lo = 0 if s == 0 else first + start
                    hi = first + start + n + (1 if s == pp - 1 else 0)
                    return stage_plan(cfg, infos, trial, s, lo, hi, usable, work).peak_bytes

                # the fastest split if it fits, else the one with the smallest largest stage
                for split in (flops_balanced_split(cfg, infos, pp), min_max_split(cost, L, pp)):
                    if split is None:
                        continue
                    try:
                        parts = layout.stage_parts(cfg, pp, split)
                    except ConfigError:  # e.g. a stage without MoE layers, which would hang
                        continue
                    plans = [stage_plan(cfg, infos, trial, s, parts[s], parts[s + 1], usable, work)
                             for s in range(pp)]
                    if all(p.fits for p in plans) and moe_on_every_stage(plans, lc):
                        break
                else:
                    continue
                m = trial.grad_accum_steps
                slowest = max(p.forward_flops_per_sample * (4 if ckpt else 3) for p in plans)
                step = slowest * (m + pp - 1)
                found.append({"pipeline_stages": pp, "expert_parallel_size": ep, "decoder_split": split,
                              "activation_checkpointing": ckpt, "gradient_accumulation_steps": m,
                              "peak_gib": round(max(p.peak_bytes for p in plans) / GiB, 1),
                              "relative_step_time": step})
    if not found:
        return []
    fastest = min(f["relative_step_time"] for f in found)
    for f in found:
        f["relative_step_time"] = round(f["relative_step_time"] / fastest, 3)
    return sorted(found, key=lambda f: (f["relative_step_time"], f["peak_gib"]))[:limit]
