"""The exact-split all-to-all token dispatcher for expert parallelism.

Each rank of an expert-parallel (EP) group of size P holds E / P experts (global ids ``r * E_l .. (r+1) * E_l - 1``
on EP rank r). :class:`AllToAllDispatcher` sends every route's token row to the rank of its expert and the expert
outputs back, with ``all_to_all_single`` over the exact per-rank row counts: no capacity, no padding, nothing
dropped, so the bytes on the wire and the expert GEMM rows are the routes' count whatever the routing balance.

    dispatch:  sort routes by global expert (= by destination rank, then local expert)  [N, D]
               exchange the per-expert counts (one small all_to_all_single)
               all_to_all_single of the rows with the exact split sizes                 [M, D], by (source, expert)
               regroup the received rows by local expert for the grouped GEMM            [M, D], by (expert, source)
    combine:   the inverse regrouping, the reverse all_to_all_single, unpermute and the fp32 gate-weighted sum

The counts are read on the host once per call (split sizes must be Python ints); everything else stays on the
device. Autograd: the backward of an exchange is the reverse exchange (:class:`AllToAllSingle`), of a regrouping
the inverse permutation. Single-device runs use :class:`recipe.model.moe.LocalDispatcher`, the same interface.

Shape legend: S tokens, K routes per token, N = S*K routes sent, M rows received, D hidden, E experts, P EP ranks,
E_l = E / P local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from recipe.model.moe import ExpertOrder, PermuteRows, TokenDispatcher, permute_routes, sort_routes, unpermute_combine


class AllToAllSingle(torch.autograd.Function):
    """``all_to_all_single`` with variable splits, differentiable: the gradient goes back by the reverse exchange
    (send and receive splits swapped). Rows are the first dimension."""

    @staticmethod
    def forward(ctx, x, recv_splits: list, send_splits: list, group):
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        recv_splits, send_splits = ctx.splits
        return AllToAllSingle.apply(grad.contiguous(), send_splits, recv_splits, ctx.group), None, None, None


def group_by_local_expert(counts_PE: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation that regroups received rows, laid out in (source rank, local expert) blocks of
    ``counts_PE[p, e]`` rows (``total`` rows in all), into (local expert, source rank) order, and its inverse.
    [M] int64 each."""
    P, E_l = counts_PE.shape
    sizes = counts_PE.reshape(-1)
    starts = sizes.cumsum(0) - sizes                                   # block starts in received order
    sizes_t, starts_t = sizes.view(P, E_l).t().reshape(-1), starts.view(P, E_l).t().reshape(-1)
    out_starts = sizes_t.cumsum(0) - sizes_t                           # block starts in grouped order
    M = total
    perm = torch.arange(M, device=counts_PE.device) + torch.repeat_interleave(starts_t - out_starts, sizes_t,
                                                                               output_size=M)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(M, device=perm.device)
    return perm, inverse


@dataclass
class AllToAllHandle:
    order: ExpertOrder           # this rank's routes sorted by global expert
    send_splits: list            # rows sent to each EP rank [P]
    recv_splits: list            # rows received from each EP rank [P]
    regroup: tuple               # (perm, inverse) received <-> grouped by local expert, or None when identity


class AllToAllDispatcher(TokenDispatcher):
    """Exact-split dispatch over an expert-parallel process group (see the module docstring)."""

    def __init__(self, num_experts: int, group, ep_size: int):
        self.num_experts = num_experts
        self.group = group
        self.ep_size = ep_size
        self.num_local = num_experts // ep_size

    # The phases are separate methods so that bench/moe_block.py can time them one by one.
    def permute(self, x_SD: torch.Tensor, topk_idx_SK: torch.Tensor):
        order = sort_routes(topk_idx_SK, self.num_experts)
        return permute_routes(x_SD, order), order

    def exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Routes per local expert from every source rank, [P, E_l] (row p: what rank p sends here)."""
        recv = torch.empty_like(counts_E)
        dist.all_to_all_single(recv, counts_E, group=self.group)
        return recv.view(self.ep_size, self.num_local)

    def exchange(self, x_ND: torch.Tensor, order: ExpertOrder):
        recv_PE = self.exchange_counts(order.counts_E)
        sizes = torch.stack([order.counts_E.view(self.ep_size, self.num_local).sum(1), recv_PE.sum(1)]).tolist()
        send_splits, recv_splits = sizes
        x_MD = AllToAllSingle.apply(x_ND, recv_splits, send_splits, self.group)
        regroup = group_by_local_expert(recv_PE, sum(recv_splits)) if self.num_local > 1 else None
        return x_MD, recv_PE.sum(0), AllToAllHandle(order, send_splits, recv_splits, regroup)

    def regroup(self, x_MD: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        return x_MD if handle.regroup is None else PermuteRows.apply(x_MD, *handle.regroup)

    def ungroup(self, y_MD: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        return y_MD if handle.regroup is None else PermuteRows.apply(y_MD, handle.regroup[1], handle.regroup[0])

    def exchange_back(self, y_MD: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        return AllToAllSingle.apply(y_MD, handle.send_splits, handle.recv_splits, self.group)

    def dispatch(self, x_SD: torch.Tensor, topk_idx_SK: torch.Tensor):
        x_ND, order = self.permute(x_SD, topk_idx_SK)
        x_MD, tokens_per_expert, handle = self.exchange(x_ND, order)
        return self.regroup(x_MD, handle), tokens_per_expert, handle

    def combine(self, y_MD: torch.Tensor, topk_weight_SK: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        y_ND = self.exchange_back(self.ungroup(y_MD, handle), handle)
        return unpermute_combine(y_ND, topk_weight_SK, handle.order)
