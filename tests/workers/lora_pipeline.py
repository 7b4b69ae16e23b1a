"""Worker for tests/test_lora.py: LoRA training under DeepSpeed's pipeline engine (PP x DP, EP, ZeRO-1, activation
checkpointing, packed rows), built, saved and resumed by train.py's own functions.

    torchrun --nproc_per_node 4 tests/workers/lora_pipeline.py --ckpt HF_DIR --save-dir DIR --out result.json

Per step rank 0 records the loss and the pre-clip global gradient norm. After step 1 and after the last step the
engine saves (``recipe.train.save``: the commit protocol, run_config.json with the lora block). Then every rank
loads the step-1 checkpoint back (``recipe.train.resume``) and runs steps 2.. again on the same batches: the
losses, gradient norms and final adapter weights must be those of the first pass, bit for bit. Also recorded: that
only LoRA tensors are trainable (and only they are in the optimizer), that the expert adapters carry DeepSpeed's
expert attributes, and that no base weight moved.
"""
import argparse
import dataclasses
import json
import os

import torch

from recipe.parallel.dist import init_distributed
from recipe.tools.synthetic_batches import collate, collate_packed, label_count, synthetic_samples

LORA = {"rank": 4, "alpha": 8.0, "target_modules": [
    "language.model.layers.*.self_attn.*", "language.model.layers.*.mlp.shared_experts.*",
    "language.model.layers.*.mlp.*", "projector.layers.*", "vision.blocks.*.attn.*", "vision.blocks.*.mlp.*",
    "language.model.layers.*.mlp.experts.*.*"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--pack", type=int, default=2, help="samples per packed row (one row per micro-batch)")
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()
    os.environ["RECIPE_ATTENTION"] = "varlen"
    rank, world = init_distributed()
    import deepspeed

    from recipe.config import VL2Config
    from recipe.parallel import checkpointing
    from recipe.parallel.loading import check_expert_groups
    from recipe.parallel.pipeline import pipe_batch
    from recipe.train import build_model, resume, save
    from recipe.train_config import RunLayout, TrainConfig

    stages, ep = 2, 2
    tc = TrainConfig.from_dict({"model_dir": a.ckpt, "save_dir": a.save_dir, "pipeline_stages": stages,
                                "expert_parallel_size": ep, "activation_checkpointing": True, "seed": 7,
                                "lora": LORA, "resume": None}, require_paths=False)
    cfg = VL2Config.from_json(a.ckpt)
    dp = world // stages
    ds_config = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": a.gas,
        "train_batch_size": a.gas * dp, "gradient_clipping": 1.0, "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": 1}, "bf16": {"enabled": a.bf16},
    }
    run = RunLayout.from_config(tc, ds_config, cfg, world)
    module = build_model(tc, cfg, resuming=False)
    base = {n: q.detach().clone() for n, q in module.named_parameters() if not q.requires_grad}
    trainable = [n for n, q in module.named_parameters() if q.requires_grad]
    expert_tags = [(getattr(q, "allreduce", None), getattr(q, "group_name", None))
                   for n, q in module.named_parameters() if "deepspeed_experts" in n and ".lora_" in n]
    params = [q for q in module.parameters() if q.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config)
    check_expert_groups(module)
    checkpointing.install_engine(engine, rank)
    # the parameters the optimizer holds (ZeRO-1: bit16_groups; bf16 optimizer: bf16_groups), before partitioning
    groups = getattr(engine.optimizer, "bit16_groups", None) or engine.optimizer.bf16_groups
    optimized = sum(q.numel() for g in groups for q in g)

    G = a.pack * a.gas * dp
    samples = synthetic_samples(cfg, G * a.steps, 7)

    def step(i):
        chunk = samples[i * G:(i + 1) * G]
        scale = run.ce_scale(label_count(collate(chunk)))
        rows = [chunk[(m * dp + module.dp_rank) * a.pack:(m * dp + module.dp_rank + 1) * a.pack]
                for m in range(a.gas)]
        loss = engine.train_batch(iter([pipe_batch(collate_packed([r]), scale) for r in rows]))
        return float(loss), float(engine.get_global_grad_norm() or 0)

    def adapters():
        return {n: q.detach().clone() for n, q in module.named_parameters() if ".lora_" in n}

    first = [step(0)]
    save(engine, tc, 1, G, ds_config)
    first += [step(i) for i in range(1, a.steps)]
    save(engine, tc, a.steps, G * a.steps, ds_config)
    trained = adapters()
    tc.resume = "global_step1"
    resumed_at, _ = resume(engine, tc, rank)
    again = [step(i) for i in range(1, a.steps)]
    same_adapters = all(torch.equal(trained[n], q) for n, q in adapters().items())
    named = dict(module.named_parameters())
    # bf16 runs: the engine cast the base to bf16 once at start; it must not move after that
    base_moved = sum(not torch.equal(named[n].detach(), v.to(named[n].dtype)) for n, v in base.items())
    flags = torch.tensor([float(same_adapters), float(base_moved), float(len(trainable)),
                          float(all(".lora_" in n for n in trainable)),
                          float(all(t[0] is False and t[1] is not None for t in expert_tags)), float(len(expert_tags)),
                          float(optimized), float(sum(q.numel() for q in params))])
    gathered = [torch.zeros_like(flags) for _ in range(world)]
    torch.distributed.all_gather(gathered, flags)
    if rank == 0:
        table = torch.stack(gathered)
        with open(a.out, "w") as f:
            json.dump({"losses": [x[0] for x in first], "grad_norms": [x[1] for x in first],
                       "resumed_losses": [x[0] for x in again], "resumed_grad_norms": [x[1] for x in again],
                       "resumed_at": resumed_at, "same_adapters": bool(table[:, 0].all()),
                       "base_moved": int(table[:, 1].sum()), "trainable": table[:, 2].int().tolist(),
                       "only_lora_trainable": bool(table[:, 3].all()), "expert_tags_ok": bool(table[:, 4].all()),
                       "expert_adapters": table[:, 5].int().tolist(), "optimized": table[:, 6].int().tolist(),
                       "lora_params": table[:, 7].int().tolist(), "recipe": dataclasses.asdict(tc)}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
