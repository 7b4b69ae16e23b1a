"""Time of one MoE block (routed part: router, dispatch, experts, combine), forward and backward, split by phase:
the exact-split path against DeepSpeed's capacity path on the same batches, at EP=1 and EP=2.

    python bench/moe_block.py [--tokens 2048] [--hidden 512] [--experts 64] [--topk 6] [--ep 1,2] [--repeats 3]
    DS_ACCELERATOR=cuda python bench/moe_block.py --dtype bf16      # GPUs: grouped GEMMs on Hopper

Paths (same router, experts, tokens and routes; the shared experts are left out, they are the same dense MLP):
  exact     ExactSplitMOELayer: sort routes by expert, each token sent once per destination rank with
            all_to_all_single over exact splits and expanded to its routes there, grouped GEMMs, fp32 weighted sums
            per token and rank sent back (recipe/parallel/experts.py, dispatch.py, recipe/model/moe.py)
  capacity  DeepSpeed 0.19's MOELayer with our gate: an [E, C, D] buffer with C = the largest expert load of the
            EP group, even all-to-alls, DeepSpeed's per-expert loop, fp32 combine
  previous  EP=1 only: the single-device dispatcher before the exact path (sort, per-expert nn.Linear calls,
            torch.cat, index_add), kept here as a timing baseline
Routings: "router" is the randomly initialised router (its natural imbalance); "skewed" adds a rising
e_score_correction_bias over the experts, so a few experts take most routes (the capacity path pays for it).

Each path runs as its phases one after another, every phase on detached copies of its inputs, so forward and
backward of each phase are timed on their own: route (router, balance loss, counts; capacity: slot locations and
the capacity all-reduce), permute (routes into expert order, the rows to send marked; capacity: tokens into the
[E, C, D] buffer), exchange (the rows gathered, both all-to-alls, the counts exchange, the expansion to routes
grouped by local expert, and on the way back the weighted sum per received row), experts (the expert FFNs: grouped
GEMMs, or DeepSpeed's loop), combine (back to tokens, weighted sum). "block" is the whole layer run end to end
(forward + backward) for comparison with the sum of the phases. dispatch = everything but experts, as a share of
the phases' sum. pad = rows the experts compute / routes (capacity: E * C * P / routes of the EP group). TFLOP/s =
useful expert FLOPs (6 * routes * D * F forward, twice that backward) / expert time. Times are the median of
--repeats runs after one warm-up; at EP=2 each phase starts after a barrier and the slowest rank's time is
reported. Nothing is asserted. Device and dtype come from DeepSpeed's accelerator (fp32 on CPU, bf16 elsewhere by
default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from driver import run_ranks  # bench/driver.py

PHASES = ("route", "permute", "exchange", "experts", "combine")


def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def bench_config(a):
    from recipe.tools.tiny_config import tiny_config

    # noaux_tc (the base model's router) so that the correction bias can skew the routing; one group
    return tiny_config("base", hidden_size=a.hidden, n_routed_experts=a.experts, num_experts_per_tok=a.topk,
                       moe_intermediate_size=a.ffn).language_config


def previous_dispatch_local(x_SD, topk_idx_SK, topk_weight_SK, experts):
    """The single-device dispatcher before the exact path (timing baseline only)."""
    S, D = x_SD.shape
    K = topk_idx_SK.shape[1]
    flat_idx = topk_idx_SK.reshape(-1)
    order = flat_idx.argsort(stable=True)
    token_of_slot = order // K
    counts = torch.bincount(flat_idx, minlength=len(experts)).tolist()
    blocks = x_SD[token_of_slot].split(counts)
    outs = [expert(block) for expert, block, n in zip(experts, blocks, counts) if n]
    out_sorted = torch.cat(outs) if outs else x_SD.new_zeros(0, D)
    weighted = out_sorted.float() * topk_weight_SK.reshape(-1)[order, None]
    return torch.zeros(S, D, dtype=torch.float32, device=x_SD.device).index_add_(
        0, token_of_slot, weighted).to(x_SD.dtype)


# --- phases --------------------------------------------------------------------------------------------------------
# A phase is (name, fn, input keys, output keys); fn takes and returns tensors by key. Python state a later phase
# needs (orders, split sizes) travels in the closure's dict.

def exact_phases(layer, used, ep_size, group):
    from recipe.model.moe import grouped_experts, permute_routes, sort_routes, unpermute_combine
    from recipe.parallel.dispatch import AllToAllDispatcher

    gate, experts, E = layer.gate, layer.experts.deepspeed_experts, layer.gate.num_experts
    disp = AllToAllDispatcher(E, group, ep_size)
    st = {}

    def route(x):
        routing, l_aux, _ = gate.route(x, used)
        st["idx"] = routing.topk_idx
        return routing.topk_weight, l_aux

    def permute(x):
        if ep_size == 1:  # the single-device dispatcher: a permutation by expert
            st["order"] = sort_routes(st["idx"], E)
            st["tokens"] = st["order"].counts_E
            return (permute_routes(x, st["order"]),)
        st["marked"] = disp.permute(st["idx"])  # routes sorted, rows to send marked; the rows move in exchange
        return (x,)

    def exchange(x_SD):
        x_MD, st["tokens"], st["handle"] = disp.exchange(x_SD, *st["marked"])
        return (x_MD,)

    def run_experts(x_grouped):
        return (grouped_experts(x_grouped, st["tokens"], experts),)

    def exchange_back(y_grouped, w):
        return (disp.exchange_back(disp.weigh(y_grouped, w, st["handle"]).to(y_grouped.dtype), st["handle"]),)

    def combine(y, w=None):
        if ep_size == 1:
            return (unpermute_combine(y, w, st["order"]),)
        return (disp.unpermute(y, st["idx"].shape[0], st["handle"]),)

    phases = [("route", route, ["x"], ["w", "aux"]), ("permute", permute, ["x"], ["x_ND"])]
    if ep_size > 1:
        phases.append(("exchange", exchange, ["x_ND"], ["x_grouped"]))
    phases.append(("experts", run_experts, ["x_grouped" if ep_size > 1 else "x_ND"], ["y_grouped"]))
    if ep_size > 1:
        phases.append(("exchange", exchange_back, ["y_grouped", "w"], ["y_ND"]))
        phases.append(("combine", combine, ["y_ND"], ["y"]))
    else:
        phases.append(("combine", combine, ["y_grouped", "w"], ["y"]))
    return phases, st


def capacity_phases(layer, used, ep_size, group):
    """DeepSpeed 0.19.8 MOELayer.forward, step by step with its own functions (no tensor parallelism)."""
    from deepspeed.moe.sharded_moe import _AllToAll, _route_slots, _sparse_decode, _sparse_encode

    st = {}

    def route(x):
        l_aux, C, E, indices, locations, gates, _ = layer.gate(x, used, True, False)
        st.update(C=int(C), E=E, indices=indices, locations=locations, S=x.shape[0])
        return gates, l_aux

    def permute(x):
        st["slots"] = _route_slots(st["indices"], st["locations"], st["E"], st["C"])
        return (_sparse_encode(x, st["slots"], st["E"], st["C"]),)

    def exchange(buf):
        return (_AllToAll.apply(group, buf),)

    def run_experts(buf):
        out = layer.experts(buf.reshape(ep_size, layer.num_local_experts, -1, buf.shape[-1]))
        return (out.reshape(ep_size * layer.num_local_experts, -1, buf.shape[-1]),)

    def combine(out, gates):
        return (_sparse_decode(out.reshape(-1, out.shape[-1]), st["slots"], gates, st["S"]),)

    phases = [("route", route, ["x"], ["w", "aux"]), ("permute", permute, ["x"], ["buf"])]
    if ep_size > 1:
        phases.append(("exchange", exchange, ["buf"], ["buf_x"]))
    phases.append(("experts", run_experts, ["buf_x" if ep_size > 1 else "buf"], ["out"]))
    if ep_size > 1:
        phases.append(("exchange", exchange, ["out"], ["out_x"]))
    phases.append(("combine", combine, ["out_x" if ep_size > 1 else "out", "w"], ["y"]))
    return phases, st


def run_phases(phases, x, dy, sync, clock):
    """One forward and backward through the phases, each on leaf copies of its inputs; {phase: (fwd s, bwd s)}."""
    env, records, times = {"x": x}, [], {}
    for name, fn, ins, outs in phases:
        leaves = {k: env[k].detach().requires_grad_(env[k].is_floating_point()) for k in ins}
        sync()
        t = clock()
        result = fn(*leaves.values())
        sync()
        times.setdefault(name, [0.0, 0.0])[0] += clock() - t
        env.update(zip(outs, result))
        records.append((name, leaves, dict(zip(outs, result))))
    grads = {"y": dy, "aux": torch.ones_like(env["aux"])}
    for name, leaves, produced in reversed(records):
        pairs = [(v, grads[k]) for k, v in produced.items() if k in grads and v.requires_grad]
        sync()
        t = clock()
        if pairs:
            torch.autograd.backward([v for v, _ in pairs], [g for _, g in pairs])
        sync()
        times[name][1] += clock() - t
        for k, leaf in leaves.items():
            if leaf.grad is not None:
                grads[k] = grads[k] + leaf.grad if k in grads else leaf.grad
    return times, env["y"]


def block_time(fn, x, dy, sync, clock):
    xx = x.detach().requires_grad_()
    sync()
    t = clock()
    y, aux = fn(xx)
    torch.autograd.backward([y, aux], [dy, torch.ones_like(aux)])
    sync()
    return clock() - t


# --- one EP size ---------------------------------------------------------------------------------------------------

def measure(a, ep_size: int, rank: int, group) -> list[dict]:
    from recipe.parallel.experts import ExpertParallelMoE

    acc = accelerator()
    device = torch.device(acc.current_device_name())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    lc = bench_config(a)
    distributed = ep_size > 1

    def sync():
        acc.synchronize()

    # CPU: the process's CPU time (all its threads, gloo's included), which a machine shared with other jobs does
    # not inflate the way it inflates wall time; accelerators: wall time after a synchronize
    clock = time.process_time if a.clock == "cpu" else time.perf_counter

    def barrier():
        if distributed:
            torch.distributed.barrier(group=group)

    rows = []
    for routing in ("router", "skewed"):
        torch.manual_seed(0)  # the same weights for both paths (and, at EP=2, per rank its own experts)
        exact = ExpertParallelMoE(lc, ep_size, "exact").to(device, dtype).train()
        capacity = ExpertParallelMoE(lc, ep_size, "capacity").to(device, dtype).train()
        capacity.load_state_dict(exact.state_dict())
        for m in (exact, capacity):
            if distributed:
                m.moe.deepspeed_moe._set_ep_group(group)
            if routing == "skewed":
                with torch.no_grad():
                    m.router.e_score_correction_bias.copy_(torch.linspace(0, a.skew, lc.n_routed_experts))
        gen = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(a.tokens, lc.hidden_size, generator=gen).to(device, dtype)
        dy = torch.randn(a.tokens, lc.hidden_size, generator=gen).to(device, dtype)
        used = torch.zeros(a.tokens, dtype=torch.long, device=device)
        paths = [("exact", exact), ("capacity", capacity)] + ([("previous", exact)] if not distributed else [])
        for name, m in paths:
            layer = m.moe.deepspeed_moe
            if name == "previous":
                phases = None
            else:
                phases, st = (exact_phases if name == "exact" else capacity_phases)(layer, used, ep_size, group)
            samples, blocks = [], []
            for rep in range(a.repeats + 1):
                if phases is not None:
                    barrier()
                    times, _ = run_phases(phases, x, dy, lambda: (sync(), barrier()), clock)
                    if rep:
                        samples.append(times)
                barrier()
                if name == "previous":
                    def fn(xx, m=m, used=used):
                        routing_, l_aux, _ = m.moe.deepspeed_moe.gate.route(xx, used)
                        return previous_dispatch_local(xx, routing_.topk_idx, routing_.topk_weight,
                                                       m.moe.deepspeed_moe.experts.deepspeed_experts), l_aux
                else:
                    def fn(xx, layer=layer, used=used):
                        return layer(xx, used), layer.l_aux
                t = block_time(fn, x, dy, sync, clock)
                if rep:
                    blocks.append(t)
            row = {"ep": ep_size, "routing": routing, "path": name,
                   "block": statistics.median(blocks)}
            for ph in PHASES:
                f = [s.get(ph, [0.0, 0.0])[0] for s in samples]
                b = [s.get(ph, [0.0, 0.0])[1] for s in samples]
                row[ph] = (statistics.median(f), statistics.median(b)) if samples else None
            # routes of the EP group and the capacity the capacity path would use for them
            load = exact.moe.deepspeed_moe.gate.route(x, used)[2].to(torch.float64)
            if distributed:
                torch.distributed.all_reduce(load, group=group)
            routes = float(load.sum())
            rows_computed = routes if name != "capacity" else float(load.max()) * lc.n_routed_experts
            if name == "capacity" and distributed:
                # capacity = max over the EP group of each rank's largest load; every rank computes E x C rows
                local = capacity.moe.deepspeed_moe.gate.route(x, used)[2].max().to(torch.float64)
                torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX, group=group)
                rows_computed = float(local) * lc.n_routed_experts * ep_size
            row.update(routes=routes, rows=rows_computed, pad=rows_computed / routes,
                       flops=6.0 * routes * lc.hidden_size * lc.moe_intermediate_size / ep_size)
            if distributed:  # the slowest rank's times
                flat = torch.tensor([row["block"]] + [v for ph in PHASES if row[ph] for v in row[ph]],
                                    dtype=torch.float64)
                torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MAX, group=group)
                row["block"] = float(flat[0])
                i = 1
                for ph in PHASES:
                    if row[ph]:
                        row[ph] = (float(flat[i]), float(flat[i + 1]))
                        i += 2
            rows.append(row)
    return rows


def print_table(rows, a) -> None:
    print(f"\n{'EP':>2s} {'routing':8s} {'path':9s} {'fwd':>7s} {'bwd':>7s} "
          + " ".join(f"{p:>9s}" for p in PHASES)
          + f" {'dispatch':>8s} {'block':>7s} {'pad':>5s} {'expert TFLOP/s':>14s}")
    for r in rows:
        if r["route"] is None:  # previous: end to end only
            print(f"{r['ep']:2d} {r['routing']:8s} {r['path']:9s} {'':>7s} {'':>7s} "
                  + " ".join(f"{'':>9s}" for _ in PHASES) + f" {'':>8s} {r['block']:7.3f} {r['pad']:5.2f}")
            continue
        fwd = sum(r[p][0] for p in PHASES)
        bwd = sum(r[p][1] for p in PHASES)
        total = fwd + bwd
        experts = sum(r["experts"])
        tflops = 3 * r["flops"] / experts / 1e12  # forward + backward (2x) useful FLOPs
        print(f"{r['ep']:2d} {r['routing']:8s} {r['path']:9s} {fwd:7.3f} {bwd:7.3f} "
              + " ".join(f"{sum(r[p]):9.3f}" for p in PHASES)
              + f" {100 * (total - experts) / total:7.1f}% {r['block']:7.3f} {r['pad']:5.2f} {tflops:14.4f}")
    print("\nseconds per block call (forward + backward unless the column says fwd/bwd); phase columns are "
          "forward + backward;\ndispatch = (phases - experts) / phases; block = the layer end to end; pad = "
          "expert rows / routes.")
    by = {(r["ep"], r["routing"], r["path"]): r for r in rows}
    for (ep, routing, path), r in by.items():
        if path == "exact" and (ep, routing, "capacity") in by:
            c = by[(ep, routing, "capacity")]
            line = (f"EP={ep} {routing}: exact block {r['block']:.3f} s vs capacity {c['block']:.3f} s "
                    f"({c['block'] / r['block']:.2f}x); capacity padding x{c['pad']:.2f}")
            if (ep, routing, "previous") in by:
                p = by[(ep, routing, "previous")]
                fwd = sum(r[ph][0] for ph in PHASES)
                line += (f"; previous single-device dispatcher {p['block']:.3f} s ({p['block'] / r['block']:.2f}x "
                         f"the exact path's); exact forward alone {fwd:.3f} s")
            print(line)


def rank_main(a) -> None:
    """One rank of an EP>1 measurement (started by torchrun)."""
    import torch.distributed as dist

    acc = accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
    import deepspeed

    deepspeed.init_distributed(dist_backend=acc.communication_backend_name())  # DeepSpeed's all-to-all needs it
    torch.set_num_threads(a.threads)
    group = dist.new_group(list(range(dist.get_world_size())))
    rows = measure(a, dist.get_world_size(), dist.get_rank(), group)
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=256, help="moe_intermediate_size (the tiny presets use hidden / 2)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--skew", type=float, default=0.3, help="correction-bias ramp of the skewed routing")
    p.add_argument("--ep", default="1,2", help="EP sizes to run (EP>1 starts that many ranks with torchrun)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="cpu: process CPU time (default on CPU); wall: wall time (default on accelerators)")
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="/tmp/bench_moe_block.json", help=argparse.SUPPRESS)
    a = p.parse_args()
    on_cpu = accelerator().device_name() == "cpu"
    if a.dtype == "auto":
        a.dtype = "fp32" if on_cpu else "bf16"
    if a.clock == "auto":
        a.clock = "cpu" if on_cpu else "wall"
    if a.rank_worker:
        return rank_main(a)
    torch.set_num_threads(a.threads)
    acc = accelerator()
    print(f"MoE block: hidden {a.hidden}, {a.experts} routed experts top-{a.topk}, expert width {a.ffn}, "
          f"{a.tokens} tokens per rank, {a.dtype} on {acc.device_name()}, {torch.get_num_threads()} torch "
          f"thread(s) per process, {a.clock} clock; grouped GEMM: torch._grouped_mm "
          f"{'available' if hasattr(torch, '_grouped_mm') else 'missing'}")
    rows = []
    for ep in [int(v) for v in a.ep.split(",")]:
        if ep == 1:
            rows += measure(a, 1, 0, None)
            continue
        run_ranks(__file__, ep, ["--rank-worker", "--out", a.out] + [arg for arg in sys.argv[1:]
                                                                     if arg != "--rank-worker"],
                  dict(os.environ, OMP_NUM_THREADS=str(a.threads)), port_base=29500)
        rows += json.load(open(a.out))
    print_table(rows, a)


if __name__ == "__main__":
    main()
