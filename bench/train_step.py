"""Training-step throughput on CPU for a small VL2-shaped model, and the share of step time spent in MoE dispatch.

    python bench/train_step.py [--steps 6] [--mbs 2]

Runs two settings on the same model and batches:
  single  one process, the plain model (local dropless dispatcher), torch AdamW
  pp2ep2  4 CPU ranks under DeepSpeed: PP=2 x DP=2, EP=2, ZeRO-1 (DeepSpeed's MoE layer with our router)
and prints samples/s, tokens/s (real tokens) and, per MoE layer call summed over the step, the time in the whole
MoE block (forward + backward) split into expert FFN compute and the rest ("dispatch": routing, token permutation,
all-to-all, capacity padding, combine). Timings come from module hooks: forward from pre/post hooks, backward from
gradient hooks on a module's output (backward starts) and input (backward done); per label the union of these
intervals is taken, so interleaved expert backwards are not counted twice (the union may include small ops that
ran in between, which makes "experts" an upper bound and "dispatch" a lower bound). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import torch
from driver import bench_config, pp2_ep2_engine, run_ranks, timed_train_batch  # bench/driver.py


class PhaseTimer:
    """Wall time of module calls (forward and backward), per label, as the union of the calls' time intervals
    (experts called one after another in forward can interleave in backward; the union counts overlap once)."""

    def __init__(self):
        self.intervals = defaultdict(list)

    def attach(self, module: torch.nn.Module, label: str) -> None:
        starts = {}

        def pre(mod, args):
            starts["fwd"] = time.perf_counter()
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    a.register_hook(self._end_hook(label, starts))
                    break

        def post(mod, args, out):
            self.intervals[label].append((starts["fwd"], time.perf_counter()))
            first = out[0] if isinstance(out, tuple) else out
            if isinstance(first, torch.Tensor) and first.requires_grad:
                first.register_hook(self._start_hook(starts))

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def _start_hook(self, starts):
        def hook(grad):
            starts["bwd"] = time.perf_counter()
        return hook

    def _end_hook(self, label, starts):
        def hook(grad):
            if "bwd" in starts:
                self.intervals[label].append((starts.pop("bwd"), time.perf_counter()))
        return hook

    def seconds(self, label: str) -> float:
        total, end = 0.0, float("-inf")
        for a, b in sorted(self.intervals[label]):
            if b > end:
                total += b - max(a, end)
                end = b
        return total

    def reset(self):
        self.intervals.clear()


def batches(cfg, n_batches: int, mbs: int, seed: int):
    from recipe.tools.synthetic_batches import collate, synthetic_samples

    samples = synthetic_samples(cfg, n_batches * mbs, seed, max_text=200, text_only_every=1000)
    return [collate(samples[i * mbs:(i + 1) * mbs], pad_to_multiple=64) for i in range(n_batches)]


def run_single(steps: int, mbs: int, gas: int) -> dict:
    from recipe.model import DeepseekVLV2ForCausalLM
    from recipe.model.moe import DeepseekV2MoE

    torch.manual_seed(0)
    cfg = bench_config()
    model = DeepseekVLV2ForCausalLM(cfg).train()
    timer = PhaseTimer()
    for m in model.modules():
        if isinstance(m, DeepseekV2MoE):
            timer.attach(m, "moe")
            timer.attach(m.experts, "experts")  # all routed experts in one call (grouped GEMMs)
    params = [p for n, p in model.named_parameters() if "attn_pool" not in n]
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = batches(cfg, (steps + 1) * gas, mbs, seed=1)
    times, tokens, moe, experts = [], [], [], []
    for step in range(steps + 1):
        timer.reset()
        t = time.perf_counter()
        real = 0
        for b in data[step * gas:(step + 1) * gas]:
            (model(**b).loss / gas).backward()
            real += int(b["segment_ids"].sum())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step warms allocator and caches
            times.append(time.perf_counter() - t)
            tokens.append(real)
            moe.append(timer.seconds("moe"))
            experts.append(timer.seconds("experts"))
    return summarize("single (1 process)", times, tokens, moe, experts, mbs * gas)


def summarize(name, times, tokens, moe, experts, samples_per_step) -> dict:
    t = sum(times) / len(times)
    m = sum(moe) / len(moe)
    e = sum(experts) / len(experts)
    return {"setting": name, "step_s": t, "samples_per_s": samples_per_step / t,
            "tokens_per_s": sum(tokens) / len(tokens) / t, "moe_share": m / t, "dispatch_share": (m - e) / t,
            "experts_share": e / t}


def run_pipeline_rank(steps: int, mbs: int, gas: int, out: str, moe_dispatcher: str = "exact") -> None:
    import torch.distributed as dist

    from recipe.parallel.dist import init_distributed
    from recipe.parallel.experts import ExpertParallelMoE

    init_distributed()
    torch.manual_seed(0)
    cfg = bench_config()
    engine, module, run = pp2_ep2_engine(cfg, mbs, gas, moe_dispatcher)
    timer = PhaseTimer()
    for m in module.modules():
        if isinstance(m, ExpertParallelMoE):
            timer.attach(m.moe, "moe")
            timer.attach(m.moe.deepspeed_moe.experts, "experts")
    data = batches(cfg, (steps + 1) * gas * 2, mbs, seed=1)
    dp_rank = module.dp_rank
    times, tokens, moe, experts = [], [], [], []
    for step in range(steps + 1):
        mine = data[(step * 2 + dp_rank) * gas:(step * 2 + dp_rank + 1) * gas]
        timer.reset()
        dt, (_, real) = timed_train_batch(engine, run, mine, [sum(int(b["segment_ids"].sum()) for b in mine)])
        # per-stage MoE time; the step is as slow as the slowest stage, report the max over ranks
        phase = torch.tensor([timer.seconds("moe"), timer.seconds("experts")], dtype=torch.float64)
        dist.all_reduce(phase, op=dist.ReduceOp.MAX)
        if step:
            times.append(dt)
            tokens.append(float(real))
            moe.append(float(phase[0]))
            experts.append(float(phase[1]))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(summarize(f"pp2ep2 {moe_dispatcher} (PP=2 x DP=2, EP=2)", times, tokens, moe, experts,
                                mbs * gas * 2), f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--moe-dispatchers", default="exact,capacity",
                   help="recipe.moe_dispatcher settings to run the 4-rank setting with (comma-separated)")
    p.add_argument("--moe-dispatcher", default="exact", help=argparse.SUPPRESS)
    p.add_argument("--pipeline-rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="/tmp/bench_train_step.json", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.pipeline_rank:
        return run_pipeline_rank(a.steps, a.mbs, a.gas, a.out, a.moe_dispatcher)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = bench_config()
    print(f"model: VL2-shaped, hidden {cfg.language_config.hidden_size}, "
          f"{cfg.language_config.num_hidden_layers} decoder layers ({len(cfg.language_config.moe_layer_ids)} MoE, "
          f"{cfg.language_config.n_routed_experts} experts top-{cfg.language_config.num_experts_per_tok}), ViT "
          f"{cfg.vision_config.layers}x{cfg.vision_config.width} on 384 px tiles; micro-batch {a.mbs}, "
          f"accumulation {a.gas}; torch threads per process {torch.get_num_threads()}")
    rows = [run_single(a.steps, a.mbs, a.gas)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for dispatcher in a.moe_dispatchers.split(","):
        run_ranks(__file__, 4, ["--pipeline-rank", "--steps", str(a.steps), "--mbs", str(a.mbs), "--gas", str(a.gas),
                                "--out", a.out, "--moe-dispatcher", dispatcher], env)
        rows.append(json.load(open(a.out)))
    print(f"\n{'setting':40s} {'s/step':>8s} {'samples/s':>10s} {'tokens/s':>9s} {'MoE':>6s} {'dispatch':>9s} "
          f"{'experts':>8s}")
    for r in rows:
        print(f"{r['setting']:40s} {r['step_s']:8.2f} {r['samples_per_s']:10.2f} {r['tokens_per_s']:9.0f} "
              f"{100 * r['moe_share']:5.1f}% {100 * r['dispatch_share']:8.1f}% {100 * r['experts_share']:7.1f}%")
    print("\nMoE = the whole MoE block (router, dispatch, experts, combine, all-to-all), forward + backward, as a "
          "share of the step\n(pp2ep2: the slower stage's MoE time over the step). "
          "dispatch = MoE minus the expert FFNs.")


if __name__ == "__main__":
    main()
