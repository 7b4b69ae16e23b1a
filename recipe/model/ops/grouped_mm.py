"""Grouped GEMMs for the routed experts: each expert's matmul over its own contiguous block of rows, one call per
projection, with the plain per-expert loop as reference and fallback.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# One matmul per expert over that expert's contiguous block of rows, in one call per projection:
# ``torch._grouped_mm`` on CPU and GPUs (ATen runs it as a loop of mm on CPU and pre-Hopper GPUs, as one CUTLASS
# kernel for bf16 on Hopper/Blackwell), ``torch_npu.npu_grouped_matmul`` on Ascend, a per-expert loop as the
# reference and fallback. Every backend computes each group's plain matmul, so all of them are exact.
#
# The experts keep one nn.Linear per projection (parameter names and checkpoints stay per expert). A grouped GEMM
# wants the G weights as one [G, N, K] tensor: when they already lie equally spaced in one storage (DeepSpeed's
# ZeRO flat buffers, or :func:`pack_rows`) that tensor is a strided view and costs nothing; otherwise it is a copy
# (torch.cat), and on CPU, where the copy costs as much as a third of the GEMMs, the per-group loop runs instead
# (what ATen's CPU grouped_mm does anyway, without the copy).
#
# Shape legend: M rows (all groups), K in, N out, G groups. A group's weight may be given as several row blocks
# (gate_proj and up_proj: one GEMM over both, N = 2F), concatenated along N.

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_applies(x_MK: torch.Tensor, n: int) -> bool:
    """Whether ``torch._grouped_mm`` takes x [M, K] times [G, K, n] (forward and backward): it exists in this torch,
    the dtype is fp32/bf16/fp16 (fp64 is refused), and K and n rows are multiples of 16 bytes (its stride rule:
    K % 4 == 0 in fp32, K % 8 == 0 in bf16). Group sizes need no alignment."""
    if not hasattr(torch, "_grouped_mm") or x_MK.dtype not in _GROUPED_MM_DTYPES:
        return False
    align = 16 // x_MK.element_size()
    return x_MK.shape[-1] % align == 0 and n % align == 0


def _equally_spaced(groups: Sequence[Sequence[torch.Tensor]]) -> Optional[tuple[int, int]]:
    """(first offset, offset step) in elements when all blocks are contiguous, of one dtype, in one storage, each
    group's blocks back to back and the groups equally spaced; else None."""
    first = groups[0][0]
    storage = first.untyped_storage().data_ptr()
    starts = []
    for blocks in groups:
        offset = blocks[0].storage_offset()
        starts.append(offset)
        for b in blocks:
            if (b.dtype != first.dtype or not b.is_contiguous() or b.untyped_storage().data_ptr() != storage
                    or b.storage_offset() != offset):
                return None
            offset += b.numel()
    size = sum(b.numel() for b in groups[0])
    step = starts[1] - starts[0] if len(starts) > 1 else size
    if step < size or any(s != starts[0] + g * step for g, s in enumerate(starts)):
        return None
    return starts[0], step


def packed_view(groups: Sequence[Sequence[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The [G, N, K] stack of ``groups`` (each group's [N_j, K] row blocks concatenated) as a view, without a
    copy, when they lie that way in one storage (see :func:`pack_rows`); else None."""
    K = groups[0][0].shape[-1]
    N = sum(b.shape[0] for b in groups[0])
    if any(b.dim() != 2 or b.shape[1] != K for blocks in groups for b in blocks) or \
            any(sum(b.shape[0] for b in blocks) != N for blocks in groups):
        return None
    where = _equally_spaced(groups)
    if where is None:
        return None
    return groups[0][0].as_strided((len(groups), N, K), (where[1], K, 1), where[0])


def stack_groups(groups: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """The [G, N, K] weights of ``groups``: :func:`packed_view` when possible, else one copy."""
    view = packed_view(groups)
    if view is not None:
        return view
    return torch.cat([b for blocks in groups for b in blocks]).view(len(groups), -1, groups[0][0].shape[-1])


@torch.no_grad()
def pack_rows(groups: Sequence[Sequence[torch.Tensor]]) -> None:
    """Move the tensors of ``groups`` (parameters) into one new storage in :func:`packed_view`'s layout, keeping
    their values and identities (``.data`` is re-pointed), so grouped GEMMs read them without a copy."""
    flat = [b for blocks in groups for b in blocks]
    if not flat or flat[0].device.type == "meta" or _equally_spaced(groups) is not None:
        return
    buffer = torch.cat([b.detach().reshape(-1) for b in flat])
    offset = 0
    for b in flat:
        b.data = buffer[offset:offset + b.numel()].view_as(b)
        offset += b.numel()


def grouped_linear(x_MK: torch.Tensor, groups: Sequence[Sequence[torch.Tensor]],
                   tokens_per_group_G: torch.Tensor) -> torch.Tensor:
    """Rows ``[o_g, o_g + n_g)`` of x times ``W_g^T`` for every group g: the routed experts' projection in one call.

    x [M, K]; ``groups[g]``: group g's weight as row blocks in nn.Linear layout ([N_j, K] each, concatenated to
    W_g [N, K]); tokens_per_group [G] integer tensor on x's device (n; o is its exclusive prefix sum; sum n = M;
    a group may be empty). Returns [M, N] in x's dtype. Differentiable in x and every block.
    """
    layout = tuple(len(blocks) for blocks in groups)
    return _GroupedLinear.apply(x_MK, tokens_per_group_G, layout, *(b for blocks in groups for b in blocks))


def grouped_linear_reference(x_MK: torch.Tensor, groups: Sequence[Sequence[torch.Tensor]],
                             tokens_per_group_G: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_linear` as a per-group loop of ``F.linear`` under plain autograd (the reference)."""
    outs = [F.linear(rows, torch.cat(list(blocks))) for rows, blocks in
            zip(x_MK.split(tokens_per_group_G.tolist()), groups)]
    return torch.cat(outs) if outs else x_MK.new_zeros(0, sum(b.shape[0] for b in groups[0]))


def _regroup(layout: tuple, flat: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups, i = [], 0
    for n in layout:
        groups.append(list(flat[i:i + n]))
        i += n
    return groups


def _backend(x_MK: torch.Tensor, groups) -> str:
    if x_MK.device.type == "npu":
        return "npu"
    n = sum(b.shape[0] for b in groups[0])
    if not grouped_mm_applies(x_MK, n):
        return "loop"
    if x_MK.device.type == "cpu" and packed_view(groups) is None:
        return "loop"  # stacking would copy the weights; ATen's CPU grouped_mm is this loop anyway
    return "grouped_mm"


class _GroupedLinear(torch.autograd.Function):
    """:func:`grouped_linear`. The stacked weights are rebuilt in backward rather than saved (a copy would hold
    the local experts' weights once more per layer and micro-batch in flight)."""

    @staticmethod
    def forward(ctx, x_MK, tokens_per_group_G, layout, *blocks):
        groups = _regroup(layout, blocks)
        ctx.layout = layout
        ctx.backend = _backend(x_MK, groups)
        ctx.save_for_backward(x_MK, tokens_per_group_G, *blocks)
        if ctx.backend == "loop":
            return _loop_forward(x_MK, groups, tokens_per_group_G.tolist())
        w_GNK = stack_groups(groups)
        if ctx.backend == "npu":
            return _npu_grouped_mm(x_MK.contiguous(), w_GNK.transpose(-2, -1).contiguous(), tokens_per_group_G)
        return torch._grouped_mm(x_MK.contiguous(), w_GNK.transpose(-2, -1), offs=_offsets(tokens_per_group_G))

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, tokens_per_group_G, *blocks = ctx.saved_tensors
        groups = _regroup(ctx.layout, blocks)
        dy_MN = dy_MN.contiguous()
        if ctx.backend == "loop":
            dx, dw = _loop_backward(x_MK, groups, tokens_per_group_G.tolist(), dy_MN, ctx.needs_input_grad)
        else:
            w_GNK = stack_groups(groups)
            dx = dw = None
            if ctx.needs_input_grad[0]:
                dx = (_npu_grouped_mm(dy_MN, w_GNK.contiguous(), tokens_per_group_G) if ctx.backend == "npu" else
                      torch._grouped_mm(dy_MN, w_GNK, offs=_offsets(tokens_per_group_G)))
            if any(ctx.needs_input_grad[3:]):
                if ctx.backend == "npu":  # per group: the kernel's K-grouped mode is not verified here
                    counts = tokens_per_group_G.tolist()
                    dw = torch.stack([dy.t() @ x for dy, x in zip(dy_MN.split(counts), x_MK.split(counts))])
                else:
                    dw = torch._grouped_mm(dy_MN.t(), x_MK.contiguous(), offs=_offsets(tokens_per_group_G))
            if dw is not None:
                dw = [list(dw_g.split([b.shape[0] for b in blocks], dim=0)) for dw_g, blocks in zip(dw, groups)]
        grads = [g for per_group in dw for g in per_group] if dw is not None else [None] * len(blocks)
        return (dx, None, None, *grads)


def _offsets(tokens_per_group_G: torch.Tensor) -> torch.Tensor:
    return tokens_per_group_G.cumsum(0).to(torch.int32)


def _loop_forward(x_MK, groups, counts: list[int]) -> torch.Tensor:
    outs = []
    for rows, blocks in zip(x_MK.split(counts), groups):
        outs.append(torch.cat([rows @ b.t() for b in blocks], dim=1) if len(blocks) > 1 else rows @ blocks[0].t())
    return torch.cat(outs) if outs else x_MK.new_zeros(0, sum(b.shape[0] for b in groups[0]))


def _loop_backward(x_MK, groups, counts: list[int], dy_MN, needs):
    widths = [b.shape[0] for b in groups[0]]
    dxs, dw = [], []
    for rows, dy, blocks in zip(x_MK.split(counts), dy_MN.split(counts), groups):
        parts = dy.split(widths, dim=1)
        if needs[0]:
            dx = parts[0] @ blocks[0]
            for part, b in zip(parts[1:], blocks[1:]):
                dx = dx + part @ b
            dxs.append(dx)
        dw.append([part.t() @ rows for part in parts])
    dx = (torch.cat(dxs) if dxs else x_MK.new_zeros(x_MK.shape)) if needs[0] else None
    return dx, dw


def _npu_grouped_mm(x_MK: torch.Tensor, w_GKN: torch.Tensor, tokens_per_group_G: torch.Tensor) -> torch.Tensor:
    """``torch_npu.npu_grouped_matmul`` over row groups: one input and one output tensor (split_item=3), groups
    along M (group_type=0), group sizes as counts (group_list_type=1). Written against the documented torch_npu
    API; never run in this repository (no Ascend device here)."""
    import torch_npu  # x lives on an NPU, so torch_npu is loaded already (the model never imports DeepSpeed)

    return torch_npu.npu_grouped_matmul([x_MK], [w_GKN], group_list=tokens_per_group_G.to(torch.int64),
                                        split_item=3, group_type=0, group_list_type=1)[0]
