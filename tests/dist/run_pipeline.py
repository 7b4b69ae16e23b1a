"""Distributed driver for the pipeline tests: PP x DP with EP on synthetic batches, loaded from a plain model.

Launched by tests through torchrun; writes per-step losses (rank 0) to --out as JSON.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipe.tools.synthetic_batches import collate, collate_packed, label_count, synthetic_samples  # noqa: E402

from recipe.parallel.dist import init_distributed  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--split", type=str, default=None)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--act-ckpt", action="store_true")
    p.add_argument("--freeze", default="", help="comma-separated parts: vision,projector,language,embeddings")
    p.add_argument("--converted", default=None, help="load from this converted directory instead of --ckpt")
    p.add_argument("--moe-dispatcher", default="exact", choices=["exact", "capacity"])
    p.add_argument("--pack", type=int, default=0,
                   help="pack this many samples into each micro-batch's one row (micro-batch size 1) instead of "
                        "padding --mbs rows")
    p.add_argument("--attention", default=None, choices=["dense", "varlen"], help="RECIPE_ATTENTION for packed rows")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.attention:
        os.environ["RECIPE_ATTENTION"] = a.attention
    per_micro = a.pack or a.mbs  # samples per micro-batch
    if a.pack:
        a.mbs = 1

    rank, world = init_distributed()
    import deepspeed

    from recipe.model import DeepseekVLV2ForCausalLM
    from recipe.parallel.loading import load_layers, tensor_source_from_state_dict
    from recipe.parallel.pipeline import VL2Pipeline, freeze, pipe_batch
    from recipe.train_config import RunLayout

    plain = DeepseekVLV2ForCausalLM.from_pretrained(a.ckpt, torch_dtype=torch.float32)
    cfg = plain.config
    split = [int(x) for x in a.split.split(",")] if a.split else None
    module = VL2Pipeline(cfg, num_stages=a.stages, ep_size=a.ep, decoder_split=split,
                         activation_checkpointing=a.act_ckpt, moe_dispatcher=a.moe_dispatcher)
    if a.converted:
        from recipe.parallel.loading import load_pretrained
        load_pretrained(module, a.converted)
    else:
        load_layers(module, tensor_source_from_state_dict(plain.state_dict()))
    del plain
    frozen_parts = [x for x in a.freeze.split(",") if x]
    freeze(module, **{part: True for part in frozen_parts})
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    dp = world // a.stages
    ds_config = {
        "train_micro_batch_size_per_gpu": a.mbs, "gradient_accumulation_steps": a.gas,
        "train_batch_size": a.mbs * a.gas * dp, "gradient_clipping": 1.0, "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": a.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": a.zero}, "bf16": {"enabled": a.bf16},
    }
    params = [q for q in module.parameters() if q.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config)
    dp_rank = module.dp_rank
    G = per_micro * a.gas * dp
    run = RunLayout.from_config({"pipeline_stages": a.stages, "expert_parallel_size": a.ep, "decoder_split": split,
                                 "freeze": dict.fromkeys(frozen_parts, True)}, ds_config, cfg, world)
    samples = synthetic_samples(module.cfg, G * a.steps, a.seed)
    losses, extras = [], []
    for step in range(a.steps):
        chunk = samples[step * G:(step + 1) * G]
        scale = run.ce_scale(label_count(collate(chunk)))
        mine = [chunk[(m * dp + dp_rank) * per_micro:(m * dp + dp_rank + 1) * per_micro] for m in range(a.gas)]
        micro = [collate_packed([part]) if a.pack else collate(part) for part in mine]
        loss = engine.train_batch(iter([pipe_batch(b, scale) for b in micro]))
        losses.append(float(loss))
        extras.append({k: float(v) for k, v in (engine.agg_additional_losses or {}).items()})
        extras[-1]["grad_norm"] = float(engine.get_global_grad_norm() or 0)
    named = dict(module.named_parameters())
    changed = torch.tensor([float(sum(not torch.equal(named[n].detach().float(), v.float()) for n, v in frozen.items())),
                            float(len(frozen))])
    torch.distributed.all_reduce(changed)
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump({"losses": losses, "extras": extras, "frozen_changed": int(changed[0]),
                       "frozen_tensors": int(changed[1])}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # gloo threads alive at interpreter exit can abort the process


if __name__ == "__main__":
    main()
