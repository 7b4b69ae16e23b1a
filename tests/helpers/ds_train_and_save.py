"""A short real training run that ends in DeepSpeed's ``save_checkpoint`` (run under torchrun, CPU + gloo).

    torchrun --nproc_per_node 2 tests/helpers/ds_train_and_save.py --ds-dir CONVERTED --save-dir OUT \
        --stages 2 --ep 1 --split 2,3 --steps 2

Loads ``recipe.parallel.pipeline.VL2Pipeline`` from a converted directory through ``checkpoint.read_layer`` (each
rank its layers and its experts), trains ``--steps`` steps in bf16 + ZeRO-1 on synthetic batches, saves with the
engine, and writes each rank's live weights under their HF names to ``<save-dir>/live_rank<R>.pt``, so a test can
check the exported checkpoint against what the engine actually held.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from recipe.parallel.dist import init_distributed  # noqa: E402
from recipe.tools.synthetic_batches import collate, label_count, synthetic_samples  # noqa: E402


def live_hf_state(module) -> dict:
    """This rank's parameters and buffers under HF names, experts renumbered to global ids."""
    from recipe.parallel import layout as L
    first = (module.local_expert_ids() or [0])[0]
    out = {}
    for layer, m in module.local_layers():
        for local, t in m.state_dict().items():
            e = L.expert_id_of_local(local)
            if e is not None:
                local = L.renumber_expert(local, e + first)
            out[L.local_to_hf(layer, local)] = t.detach().clone()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ds-dir", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--tag", default="global_step2")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--split", default=None)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()

    rank, world = init_distributed()
    import deepspeed

    from recipe.checkpoint.converted import load_manifest, read_layer
    from recipe.config import VL2Config
    from recipe.parallel.loading import load_layers
    from recipe.parallel.pipeline import VL2Pipeline, pipe_batch
    from recipe.train_config import RunLayout

    cfg = VL2Config.from_json(a.ds_dir)
    split = [int(x) for x in a.split.split(",")] if a.split else None
    module = VL2Pipeline(cfg, num_stages=a.stages, ep_size=a.ep, decoder_split=split)
    manifest = load_manifest(a.ds_dir)
    load_layers(module, lambda layer, ids: read_layer(a.ds_dir, layer.index, ids, manifest=manifest))
    dp = world // a.stages
    gas = 2
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas,
                 "train_batch_size": gas * dp, "steps_per_print": 1000, "bf16": {"enabled": True},
                 "zero_optimization": {"stage": 1},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    params = [q for q in module.parameters() if q.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config)
    G = gas * dp
    run = RunLayout.from_config({"pipeline_stages": a.stages, "expert_parallel_size": a.ep, "decoder_split": split},
                                ds_config, cfg, world)
    samples = synthetic_samples(cfg, G * a.steps, seed=3)
    for step in range(a.steps):
        chunk = samples[step * G:(step + 1) * G]
        scale = run.ce_scale(label_count(collate(chunk)))
        micro = [collate(chunk[m * dp + module.dp_rank:m * dp + module.dp_rank + 1]) for m in range(gas)]
        engine.train_batch(iter([pipe_batch(b, scale) for b in micro]))
    engine.save_checkpoint(a.save_dir, tag=a.tag)
    torch.save(live_hf_state(module), os.path.join(a.save_dir, f"live_rank{rank}.pt"))


if __name__ == "__main__":
    main()
