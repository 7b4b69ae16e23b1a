"""Distributed driver for the pipeline tests: PP x DP with EP on synthetic batches, loaded with the recipe's own
code (``recipe.parallel.loading``) from a plain model (--ckpt) or a converted directory (--converted).

    torchrun --nproc_per_node 4 tests/workers/train_pipeline.py --ckpt HF_DIR --stages 2 --ep 2 --out losses.json
    torchrun --nproc_per_node 2 tests/workers/train_pipeline.py --converted DS_DIR --bf16 --steps 0 \
        --save-dir OUT --tag global_step3

Rank 0 writes the per-step losses, loss parts and pre-clip global grad norms to --out as JSON. With --save-dir the
engine then saves with DeepSpeed's ``save_checkpoint`` (--steps 0: the loaded weights as they are) and every rank
writes its live weights under their HF names to ``<save-dir>/live_rank<R>.pt``, so a test can check an exported
checkpoint against what the engine actually held.
"""
import argparse
import json
import os

import torch

from recipe.parallel.dist import init_distributed
from recipe.tools.synthetic_batches import collate, collate_packed, label_count, synthetic_samples


def live_hf_state(module) -> dict:
    """This rank's parameters and buffers under HF names, experts renumbered to global ids."""
    from recipe.parallel import layout

    first = (module.local_expert_ids() or [0])[0]
    out = {}
    for layer, m in module.local_layers():
        for local, t in m.state_dict().items():
            e = layout.expert_id_of_local(local)
            if e is not None:
                local = layout.renumber_expert(local, e + first)
            out[layout.local_to_hf(layer, local)] = t.detach().clone()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default=None, help="plain (HF) model directory; or --converted")
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
    p.add_argument("--out", default=None)
    p.add_argument("--save-dir", default=None, help="save a training checkpoint here after the steps")
    p.add_argument("--tag", default=None, help="the checkpoint's tag (default global_step<steps>)")
    a = p.parse_args()
    if a.attention:
        os.environ["RECIPE_ATTENTION"] = a.attention
    per_micro = a.pack or a.mbs  # samples per micro-batch
    if a.pack:
        a.mbs = 1

    rank, world = init_distributed()
    import deepspeed

    from recipe.config import VL2Config
    from recipe.model import DeepseekVLV2ForCausalLM
    from recipe.parallel.loading import load_layers, load_pretrained, tensor_source_from_state_dict
    from recipe.parallel.pipeline import VL2Pipeline, freeze, pipe_batch
    from recipe.train_config import RunLayout

    plain = None if a.converted else DeepseekVLV2ForCausalLM.from_pretrained(a.ckpt, torch_dtype=torch.float32)
    cfg = VL2Config.from_json(a.converted) if a.converted else plain.config
    split = [int(x) for x in a.split.split(",")] if a.split else None
    module = VL2Pipeline(cfg, num_stages=a.stages, ep_size=a.ep, decoder_split=split,
                         activation_checkpointing=a.act_ckpt, moe_dispatcher=a.moe_dispatcher)
    if a.converted:
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
    moved = sum(not torch.equal(named[n].detach().float(), v.float()) for n, v in frozen.items())
    changed = torch.tensor([float(moved), float(len(frozen))])
    torch.distributed.all_reduce(changed)
    if a.save_dir:
        engine.save_checkpoint(a.save_dir, tag=a.tag or f"global_step{a.steps}")
        torch.save(live_hf_state(module), os.path.join(a.save_dir, f"live_rank{rank}.pt"))
    if rank == 0 and a.out:
        with open(a.out, "w") as f:
            json.dump({"losses": losses, "extras": extras, "frozen_changed": int(changed[0]),
                       "frozen_tensors": int(changed[1])}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # gloo threads alive at interpreter exit can abort the process


if __name__ == "__main__":
    main()
