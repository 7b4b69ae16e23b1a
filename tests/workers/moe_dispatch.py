"""Worker for tests/test_moe_dispatch.py: the exact-split all-to-all dispatcher on P gloo ranks against a
per-token reference, with forced routings (balanced, everything to one expert, empty experts and empty ranks).

Launched by torchrun; every rank builds all E experts from one seed (so the reference has them all) and keeps
E / P as its local experts. Per case, rank r routes its own tokens, runs dispatch -> grouped experts -> combine,
and backpropagates sum(y * g_r). The reference is sum_k w[t, k] * expert_{idx[t, k]}(x[t]) per token, with the
expert gradients summed over ranks (every rank's tokens reach every expert). Rank 0 writes the largest errors per
case to --out as JSON.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist

from recipe.model.moe import (
    MLP,
    experts_reference,
    grouped_experts,
    pack_experts,
    permute_routes,
    sort_routes,
    unpermute_combine,
)
from recipe.parallel.dispatch import AllToAllDispatcher

D, F = 16, 8


def forced_routes(case: str, rank: int, world: int, S: int, E: int, K: int, gen: torch.Generator):
    """Expert ids [S, K] (distinct per token) for a named routing pattern."""
    if case == "random":
        return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(S)]) if S else torch.zeros(0, K)
    if case == "all_to_expert_0":             # every route of every rank to expert 0: one expert takes all
        return torch.zeros(S, K)
    if case == "all_to_last_rank":            # everything to the last expert; the other ranks receive nothing
        return torch.full((S, K), E - 1)
    if case == "own_rank_only":               # each rank routes only to its own experts: no cross-rank traffic
        n_local = E // world
        return (rank * n_local + torch.arange(K) % n_local).repeat(S, 1)
    raise ValueError(case)


def run_case(case: str, S: int, E: int, K: int, rank: int, world: int, group, dtype) -> dict:
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(MLP(D, F) for _ in range(E)).to(dtype)
    n_local = E // world
    local = torch.nn.ModuleList(experts[rank * n_local:(rank + 1) * n_local])
    local_copy = torch.nn.ModuleList(MLP(D, F) for _ in range(n_local)).to(dtype)
    local_copy.load_state_dict(local.state_dict())
    pack_experts(local_copy)  # the layout DeepSpeed's flat buffers give: grouped_mm reads views
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(S, D, generator=gen).to(dtype)
    idx = forced_routes(case, rank, world, S, E, K, gen).long()
    w = torch.rand(S, K, generator=gen)
    g = torch.randn(S, D, generator=gen).to(dtype)

    # exact all-to-all path
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    disp = AllToAllDispatcher(E, group, world)
    x_MD, counts, handle = disp.dispatch(xa, idx)
    y = disp.combine(grouped_experts(x_MD, counts, local_copy), wa, handle)
    (y.float() * g.float()).sum().backward()

    # reference: all experts here, per token
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    order = sort_routes(idx, E)
    y_ref = unpermute_combine(experts_reference(permute_routes(xr, order), order.counts_E, experts), wr, order)
    per_token = torch.stack([sum(w[t, j] * experts[int(idx[t, j])](x[t:t + 1])[0].float() for j in range(K))
                             for t in range(S)]) if S else torch.zeros(0, D)
    (y_ref.float() * g.float()).sum().backward()
    grads = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype)
                       for p in experts.parameters()]).float()
    dist.all_reduce(grads, group=group)  # the global loss is the sum of every rank's
    sizes = [p.numel() for p in experts.parameters()]
    per_param = list(grads.split(sizes))
    n_per_expert = len(list(experts[0].parameters()))
    want = per_param[rank * n_local * n_per_expert:(rank + 1) * n_local * n_per_expert]
    got = [p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
           for p in local_copy.parameters()]

    def rel(a, b):
        a, b = a.detach().float(), b.detach().float()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0

    recv, sent = int(counts.sum()), sum(handle.row_splits[0])
    errs = torch.tensor([rel(y, per_token), rel(y, y_ref), rel(xa.grad, xr.grad), rel(wa.grad, wr.grad),
                         max(rel(a, b.view_as(a)) for a, b in zip(got, want)), float(recv), float(sent)],
                        dtype=torch.float64)
    gathered = [torch.zeros_like(errs) for _ in range(world)]
    dist.all_gather(gathered, errs, group=group)
    table = torch.stack(gathered)
    return {"y_vs_per_token": float(table[:, 0].max()), "y_vs_reference": float(table[:, 1].max()),
            "dx": float(table[:, 2].max()), "dweight": float(table[:, 3].max()),
            "dexperts": float(table[:, 4].max()), "rows_received": table[:, 5].int().tolist(),
            "rows_sent": table[:, 6].int().tolist()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--experts", type=int, default=8)
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    torch.set_num_threads(1)
    results = {}
    for case in ("random", "all_to_expert_0", "all_to_last_rank", "own_rank_only"):
        for S in (5, 0) if case == "random" else (7,):
            S_rank = 0 if (S == 0 and rank == world - 1) else (S or 6)  # S=0: the last rank has no tokens
            for E in (a.experts, world):        # E_l > 1 (regrouping by local expert) and E_l = 1
                for dtype in (torch.float32, torch.bfloat16):
                    K = min(3, E)
                    name = f"{case}/S{'0-last' if S == 0 else S}/E{E}/{str(dtype)[6:]}"
                    results[name] = run_case(case, S_rank, E, K, rank, world, group, dtype)
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
