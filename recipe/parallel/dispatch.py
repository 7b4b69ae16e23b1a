"""The exact-split all-to-all token dispatcher for expert parallelism.

Each rank of an expert-parallel (EP) group of size P holds E / P experts (global ids ``r * E_l .. (r+1) * E_l - 1``
on EP rank r). :class:`AllToAllDispatcher` sends every token to each rank that holds one of its experts, once per
rank however many of its K routes go there, and brings back one partial sum per token and rank, with
``all_to_all_single`` over the exact per-rank row counts: no capacity, no padding, nothing dropped. The bytes on
the wire are the (token, rank) pairs' count, at most the routes' count (with 64 experts top-6 over 2 ranks a
token reaches ~2 ranks with its 6 routes: a third of the bytes of sending one row per route; at EP=8 with 72
experts ~4.5 ranks: 0.75 of them); the expert GEMM rows are the routes' count whatever the routing balance.

    dispatch:  sort routes by global expert; pick the rows to send (token, destination), by rank then token [U, D]
               exchange the per-expert and per-rank counts (one small all_to_all_single)
               all_to_all_single of the rows, and of each route's row index, with the exact split sizes   [R, D]
               expand the received rows to one per route, grouped by local expert for the grouped GEMM    [M, D]
    combine:   the gate weights follow their routes (all_to_all_single); each received row's routes, weighted,
               summed in fp32 [R, D]; the reverse all_to_all_single in the experts' dtype [U, D]; each token's
               partial sums added in fp32 [S, D]

The counts are read on the host once per call (split sizes must be Python ints); everything else stays on the
device. Autograd: the backward of an exchange is the reverse exchange (:class:`AllToAllSingle`), of an expansion
the sum over its copies. Sums over a token's routes run in another order than the single-device combine's (per
rank, then over ranks), so results equal it to fp32 rounding, not bit for bit. Single-device runs use
:class:`recipe.model.moe.LocalDispatcher`, the same interface.

Shape legend: S tokens, K routes per token, N = S*K routes, U rows sent (distinct (token, rank) pairs), R rows
received, M routes received, D hidden, E experts, P EP ranks, E_l = E / P local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from recipe.model.moe import ExpertOrder, PermuteRows, TokenDispatcher, sort_routes


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
    """What :meth:`AllToAllDispatcher.combine` needs from the dispatch (shapes in the module docstring)."""
    order: ExpertOrder           # this rank's routes sorted by global expert (= by destination rank)
    token_U: torch.Tensor        # [U] the token of each row sent (one per token and destination rank)
    row_splits: tuple            # (send [P], receive [P]) rows per EP rank
    route_splits: tuple          # (send [P], receive [P]) routes per EP rank
    row_of_route_M: torch.Tensor  # [M] the received row of each local route, in grouped (expert, source) order
    regroup: tuple               # (perm, inverse): received routes <-> grouped by local expert, or None (identity)


class AllToAllDispatcher(TokenDispatcher):
    """Exact-split dispatch over an expert-parallel process group (see the module docstring)."""

    def __init__(self, num_experts: int, group, ep_size: int):
        self.num_experts = num_experts
        self.group = group
        self.ep_size = ep_size
        self.num_local = num_experts // ep_size

    # The phases are separate methods so that bench/moe_block.py can time them one by one.
    def permute(self, topk_idx_SK: torch.Tensor):
        """Sort the routes by expert and mark the rows to send: every token once per EP rank that holds one of
        its experts. Returns (order, needed_PS [P*S] bool: (rank p, token s) at p*S + s, pair_N [N]: each sorted
        route's (rank, token) pair)."""
        S, K = topk_idx_SK.shape
        order = sort_routes(topk_idx_SK, self.num_experts)
        pair_N = (topk_idx_SK.reshape(-1) // self.num_local) * S + torch.arange(
            S * K, device=topk_idx_SK.device) // K                                    # by route id
        needed_PS = torch.zeros(self.ep_size * S, dtype=torch.bool, device=topk_idx_SK.device)
        needed_PS[pair_N] = True
        return order, needed_PS, pair_N.index_select(0, order.order_N)

    def exchange(self, x_SD: torch.Tensor, order: ExpertOrder, needed_PS: torch.Tensor, pair_N: torch.Tensor):
        """Counts, then the marked rows (by destination rank, then token) and each route's row index, with exact
        splits; the received rows expanded to one per route, grouped by local expert. Returns (x_MD, tokens per
        local expert [E_l], handle)."""
        P, E_l, S = self.ep_size, self.num_local, x_SD.shape[0]
        rows_P = needed_PS.view(P, S).sum(1)
        send = torch.cat([order.counts_E.view(P, E_l), rows_P.view(P, 1)], dim=1)   # [P, E_l + 1]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        recv_PE = recv[:, :E_l]
        # the only host synchronisation: split sizes are Python ints
        send_routes, recv_routes, send_rows, recv_rows = torch.stack(
            [send[:, :E_l].sum(1), recv_PE.sum(1), send[:, E_l], recv[:, E_l]]).tolist()
        U = sum(send_rows)
        slot_PS = needed_PS.cumsum(0) - 1                                             # row in the send buffer
        # the token of each row sent, by a scatter (nonzero would synchronise with the host once more); unmarked
        # pairs land in a spare slot U
        token_U = torch.zeros(U + 1, dtype=torch.long, device=x_SD.device).scatter_(
            0, torch.where(needed_PS, slot_PS, U), torch.arange(P * S, device=x_SD.device) % S)[:U]
        first_row_P = rows_P.cumsum(0) - rows_P
        route_row_N = slot_PS[pair_N] - first_row_P[pair_N // S]                      # row within its rank's chunk
        x_RD = AllToAllSingle.apply(x_SD.index_select(0, token_U), recv_rows, send_rows, self.group)
        row_M = route_row_N.new_empty(sum(recv_routes))
        dist.all_to_all_single(row_M, route_row_N, recv_routes, send_routes, group=self.group)
        recv_rows_P = torch.tensor(recv_rows, device=row_M.device)
        row_M = row_M + torch.repeat_interleave(recv_rows_P.cumsum(0) - recv_rows_P,
                                                torch.tensor(recv_routes, device=row_M.device),
                                                output_size=row_M.numel())          # by (source, expert)
        regroup = group_by_local_expert(recv_PE, row_M.numel()) if E_l > 1 else None
        if regroup is not None:
            row_M = row_M.index_select(0, regroup[0])                                 # by (expert, source)
        handle = AllToAllHandle(order, token_U, (send_rows, recv_rows), (send_routes, recv_routes), row_M, regroup)
        return x_RD.index_select(0, row_M), recv_PE.sum(0), handle

    def weigh(self, y_MD: torch.Tensor, topk_weight_SK: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        """Each route's output times its gate weight, summed per received row in fp32: [R, D] float32."""
        w_N = topk_weight_SK.reshape(-1).index_select(0, handle.order.order_N)
        send_routes, recv_routes = handle.route_splits
        w_M = AllToAllSingle.apply(w_N, recv_routes, send_routes, self.group)
        if handle.regroup is not None:
            w_M = PermuteRows.apply(w_M, *handle.regroup)
        weighted_MD = y_MD.float() * w_M.float().unsqueeze(1)
        R = sum(handle.row_splits[1])
        return weighted_MD.new_zeros(R, y_MD.shape[1]).index_add(0, handle.row_of_route_M, weighted_MD)

    def exchange_back(self, partial_RD: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        """The per-row partial sums back to the ranks that sent the rows: [U, D]."""
        send_rows, recv_rows = handle.row_splits
        return AllToAllSingle.apply(partial_RD, send_rows, recv_rows, self.group)

    @staticmethod
    def unpermute(partial_UD: torch.Tensor, num_tokens: int, handle: AllToAllHandle) -> torch.Tensor:
        """Each token's partial sums from its ranks added in fp32: [S, D] in the partials' dtype."""
        return partial_UD.new_zeros(num_tokens, partial_UD.shape[1], dtype=torch.float32).index_add(
            0, handle.token_U, partial_UD.float()).to(partial_UD.dtype)

    def dispatch(self, x_SD: torch.Tensor, topk_idx_SK: torch.Tensor):
        return self.exchange(x_SD, *self.permute(topk_idx_SK))

    def combine(self, y_MD: torch.Tensor, topk_weight_SK: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        # the partial sums travel in the experts' dtype (bf16 in training: as many bytes per row as one route's
        # output, not twice); the sum over ranks is fp32 again
        partial_UD = self.exchange_back(self.weigh(y_MD, topk_weight_SK, handle).to(y_MD.dtype), handle)
        return self.unpermute(partial_UD, topk_weight_SK.shape[0], handle)
