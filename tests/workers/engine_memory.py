"""Measure what the real DeepSpeed pipeline engine holds per rank, for comparison with ``recipe.plan`` (CPU, gloo).

    torchrun --nproc_per_node 4 tests/workers/engine_memory.py --ds-config DS.json --out DIR

Builds ``VL2Pipeline`` on a tiny config as the JSON's ``recipe`` block describes (stages, split, EP, checkpointing,
freezing), runs one ``train_batch`` of synthetic data and writes ``DIR/rank{R}.json`` with the bytes of: the
bf16 weights (trainable ones in the optimizer's flat buffers, frozen ones, buffers), the largest total of bf16
``.grad`` seen when gradients are folded into the accumulation buffers, the flat gradient accumulation buffers,
the fp32 master partitions and the optimizer state (exp_avg / exp_avg_sq; Adam's scalar ``step`` excluded).
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ds-config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--like", default="base")
    args = ap.parse_args()

    import deepspeed

    from recipe.parallel.dist import init_distributed
    from recipe.parallel.pipeline import VL2Pipeline, freeze, pipe_batch
    from recipe.tools.synthetic_batches import collate, synthetic_samples
    from recipe.tools.tiny_config import tiny_config

    if os.environ.get("ENGINE_MEMORY_DUMP_AFTER"):  # debugging a hang: print every thread's stack, then exit
        import faulthandler
        faulthandler.dump_traceback_later(int(os.environ["ENGINE_MEMORY_DUMP_AFTER"]), exit=True)
    rank, _ = init_distributed()
    with open(args.ds_config) as f:
        ds = json.load(f)
    rc = ds.pop("recipe")
    cfg = tiny_config(args.like, image_size=42)
    torch.manual_seed(0)
    model = VL2Pipeline(cfg, num_stages=rc["pipeline_stages"], ep_size=rc["expert_parallel_size"],
                        decoder_split=rc.get("decoder_split"),
                        activation_checkpointing=rc.get("activation_checkpointing", False))
    freeze(model, **rc.get("freeze", {}))
    params = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
    opt = engine.optimizer

    seen_lp = [0]
    update = opt.update_hp_grads

    def recording_update(*a, **kw):
        seen_lp[0] = max(seen_lp[0], _bytes(p.grad for g in opt.bf16_groups for p in g if p.grad is not None))
        return update(*a, **kw)

    opt.update_hp_grads = recording_update
    gas = ds["gradient_accumulation_steps"]
    samples = synthetic_samples(cfg, gas * ds["train_micro_batch_size_per_gpu"], seed=1, text_only_every=100)
    mbs = ds["train_micro_batch_size_per_gpu"]
    batches = [pipe_batch(collate(samples[i * mbs:(i + 1) * mbs]), 0.01) for i in range(gas)]
    engine.train_batch(data_iter=iter(batches))

    frozen = [p for p in model.parameters() if not p.requires_grad]
    state = [v for s in opt.optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]
    out = {
        "rank": rank, "stage": engine.stage_id, "optimizer": type(opt).__name__,
        "groups": [[g.numel(), p.get("name", "")] for g, p in zip(opt.bf16_groups_flat, opt.optimizer.param_groups)],
        "weights_bytes": _bytes(opt.bf16_groups_flat) + _bytes(frozen) + _bytes(model.buffers()),
        "lp_grad_bytes": seen_lp[0],
        "grad_accum_bytes": _bytes(opt.fp32_groups_gradients_flat),
        "master_bytes": _bytes(opt.fp32_groups_flat_partition),
        "optimizer_bytes": _bytes(state),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
