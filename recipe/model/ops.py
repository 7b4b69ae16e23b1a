"""Hot operators behind one small interface, each with a plain-PyTorch reference.

The model calls these instead of spelling the math inline, so a faster kernel (torch_npu's fused operators on
Ascend) can be swapped in by device type without touching the model, and tested against the reference where it
can run. Selection is by the tensor's device: the model code stays free of accelerator imports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-order RMSNorm: statistics in fp32, cast back to the input dtype, then scale by the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


# --- attention -------------------------------------------------------------------------------------------------------
#
# The decoder's attention layout is built once per micro-batch from the per-token segment ids
# (:func:`build_attention_layout`) and handed to every layer as the ``mask`` argument of :func:`attention`:
#   causal  one segment per row and right padding: plain causal attention (fused SDPA kernels run);
#   dense   a [B, 1, T, T] boolean "may attend" mask (causal within equal segment ids): SDPA with a mask, the
#           reference and the CPU path;
#   varlen  packed rows on an accelerator: every row is cut into its runs of equal segment id (the samples, and
#           the padding at the end as one more run) and the rows laid end to end as [B*T, H, d] ("TND"); a
#           variable-length causal kernel attends within each run: no [T, T] mask exists. cu_seqlens (the runs'
#           cumulative lengths, [n + 1] int32) sits on the device for CUDA kernels and on the host for Ascend's,
#           which take the lengths as a list; max_seqlen is host-side, so no layer syncs.
# Runs of equal id give the dense mask's attention for contiguous segments, which is what the collators build
# (padding attends to earlier padding only in both; its outputs are never used).
# The kernel is chosen by the tensors' device: CUDA -> ``torch.nn.attention.varlen.varlen_attn`` (flash, bf16/fp16;
# flash-attn's ``flash_attn_varlen_func`` when torch lacks it), Ascend -> ``torch_npu.npu_fusion_attention``
# (TND layout, per-run ``actual_seq_qlen``/``actual_seq_kvlen``, sparse_mode 3 = causal), cpu -> per-run SDPA
# (:func:`varlen_attention_reference`, the reference the others are tested against). MLA's values are narrower
# than its queries/keys (128 vs 192): the fused kernels get v zero-padded to the query/key width and the output
# is sliced back (exact: the padded columns are zero); the per-run SDPA takes the widths as they are.
# ``RECIPE_ATTENTION=dense|varlen`` overrides the choice (``varlen`` on CPU runs the per-run reference).

ATTENTION_ENV = "RECIPE_ATTENTION"
NPU = "npu"


@dataclass(frozen=True)
class AttentionLayout:
    """How one micro-batch's tokens may attend (see the comment above). ``kind``: ``causal``, ``dense`` (``mask``
    [B, 1, T, T] bool) or ``varlen`` (``cu_seqlens`` [n + 1] int32 on the device, ``cu_seqlens_host`` the same on
    the CPU as int64, ``max_seqlen`` the longest run)."""

    kind: str
    mask: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    cu_seqlens_host: Optional[torch.Tensor] = None
    max_seqlen: int = 0

    def to_tensors(self) -> tuple:
        """The layout as tensors (DeepSpeed's pipeline layers pass tensors): () | (mask,) | (cu, cu_host)."""
        if self.kind == "dense":
            return (self.mask,)
        if self.kind == "varlen":
            return (self.cu_seqlens, self.cu_seqlens_host)
        return ()

    @classmethod
    def from_tensors(cls, tensors) -> "AttentionLayout":
        """Inverse of :meth:`to_tensors` (a zero-element tensor also means causal, as pipeline stages used to pass)."""
        tensors = tuple(t for t in tensors if t.numel())
        if not tensors:
            return CAUSAL
        if len(tensors) == 1:
            return cls("dense", mask=tensors[0])
        cu, host = tensors
        return cls("varlen", cu_seqlens=cu, cu_seqlens_host=host, max_seqlen=int((host[1:] - host[:-1]).max()))


CAUSAL = AttentionLayout("causal")


def segment_causal_mask(segment_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids -> [B, 1, T, T] bool: causal and within equal ids (padding, id 0, sees earlier padding)."""
    T = segment_ids_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids_BT.device).tril()
    same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return (same & causal)[:, None]


def single_segment_right_padded(segment_ids_BT: torch.Tensor) -> bool:
    """Whether every row is one segment (ids <= 1) followed by padding: plain causal attention suffices."""
    return bool((segment_ids_BT <= 1).all()) and bool((segment_ids_BT[:, 1:] <= segment_ids_BT[:, :-1]).all())


def has_varlen_kernel(t: torch.Tensor) -> bool:
    """Whether ``t``'s device has a fused variable-length attention kernel here: CUDA and Ascend NPUs."""
    return t.is_cuda or t.device.type == NPU


def attention_impl(t: torch.Tensor) -> str:
    """``dense`` or ``varlen`` for packed rows of tensors like ``t``: varlen where the device has a fused kernel
    (:func:`has_varlen_kernel`), dense elsewhere (CPU), unless ``RECIPE_ATTENTION`` says otherwise."""
    forced = os.environ.get(ATTENTION_ENV, "").strip().lower()
    if forced in ("dense", "varlen"):
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"{ATTENTION_ENV}={forced!r}: expected auto, dense or varlen")
    return "varlen" if has_varlen_kernel(t) else "dense"


def varlen_runs(segment_ids_BT: torch.Tensor) -> torch.Tensor:
    """Cumulative lengths [n + 1] (int64, on the ids' device) of the runs of equal segment id of every row, the
    rows laid end to end (a run never spans two rows)."""
    B, T = segment_ids_BT.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=segment_ids_BT.device)
    starts[:, 1:] = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    first = starts.reshape(-1).nonzero().squeeze(1)
    return torch.cat([first, first.new_tensor([B * T])])


def build_attention_layout(segment_ids_BT: Optional[torch.Tensor], impl: Optional[str] = None) -> AttentionLayout:
    """The micro-batch's :class:`AttentionLayout` from its segment ids [B, T] (None: plain causal). ``impl``:
    ``dense`` / ``varlen`` for packed rows (default :func:`attention_impl` of the ids' device). Host syncs
    happen here, once per micro-batch, not in the layers."""
    if segment_ids_BT is None or single_segment_right_padded(segment_ids_BT):
        return CAUSAL
    if (impl or attention_impl(segment_ids_BT)) == "dense":
        return AttentionLayout("dense", mask=segment_causal_mask(segment_ids_BT))
    cu = varlen_runs(segment_ids_BT)
    host = cu.cpu()
    return AttentionLayout("varlen", cu_seqlens=cu.to(torch.int32), cu_seqlens_host=host,
                           max_seqlen=int((host[1:] - host[:-1]).max()))


def attention(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, v_BHTe: torch.Tensor,
              mask_B1TT, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention. ``mask_B1TT``: an :class:`AttentionLayout`, a boolean "may attend" mask [B, 1, T, S], or
    None for plain causal attention.

    q, k: [B, H, T, d]; v: [B, H, T, e] (e may differ from d, as in MLA); returns [B, H, T, e].
    """
    if isinstance(mask_B1TT, AttentionLayout):
        if mask_B1TT.kind == "varlen":
            if dropout_p:
                raise ValueError("attention dropout is not supported by the varlen path; set RECIPE_ATTENTION=dense")
            return varlen_attention(q_BHTd, k_BHTd, v_BHTe, mask_B1TT, scale)
        mask_B1TT = mask_B1TT.mask
    if mask_B1TT is None:
        return F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTe, is_causal=True, scale=scale,
                                              dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTe, attn_mask=mask_B1TT, scale=scale,
                                          dropout_p=dropout_p)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask_B1TT, scale: float) -> torch.Tensor:
    """Eager attention as the original computes it: fp32 softmax of additive-masked scores, cast back. ``mask``:
    as :func:`attention` (a varlen layout is not accepted: pass the dense mask of the same segment ids)."""
    if isinstance(mask_B1TT, AttentionLayout):
        if mask_B1TT.kind == "varlen":
            raise ValueError("attention_reference takes a dense mask; build it with impl='dense'")
        mask_B1TT = mask_B1TT.mask
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    T = q.shape[-2]
    if mask_B1TT is None:
        mask_B1TT = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]
    scores = scores.masked_fill(~mask_B1TT, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def varlen_attention(q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, v_BHTe: torch.Tensor, layout: AttentionLayout,
                     scale: float, kernel: Optional[str] = None) -> torch.Tensor:
    """Causal attention within the runs of ``layout`` (kind ``varlen``), rows laid end to end as [B*T, H, d].

    ``kernel``: ``flash`` (CUDA), ``npu`` or ``reference`` (per-run SDPA); default by q's device (CPU and anything
    without a kernel: reference; CUDA in fp32: reference too, flash kernels take bf16/fp16). Returns [B, H, T, e]
    like :func:`attention`.
    """
    B, H, T, d = q_BHTd.shape
    e = v_BHTe.shape[-1]
    q, k, v = (x.transpose(1, 2).reshape(B * T, H, x.shape[-1]) for x in (q_BHTd, k_BHTd, v_BHTe))  # TND
    kernel = kernel or _varlen_kernel(q)
    if kernel == "reference":
        out = varlen_attention_reference(q, k, v, layout.cu_seqlens_host.tolist(), scale)
    else:
        v_pad = F.pad(v, (0, d - e)) if e < d else v  # fused kernels want one head width; the zeros add nothing
        if kernel == "flash":
            out = _varlen_flash(q, k, v_pad, layout, scale)
        elif kernel == "npu":
            out = _varlen_npu(q, k, v_pad, layout, scale)
        else:
            raise ValueError(f"unknown varlen kernel {kernel!r}")
        out = out[..., :e]
    return out.reshape(B, T, H, e).transpose(1, 2)


def varlen_attention_reference(q_NHd: torch.Tensor, k_NHd: torch.Tensor, v_NHe: torch.Tensor,
                               cu_seqlens: Sequence[int], scale: float) -> torch.Tensor:
    """Causal SDPA on each run [cu[i], cu[i+1]) of the TND tensors separately: the varlen reference (and the CPU
    path). Returns [N, H, e]."""
    out = []
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        q, k, v = (x[a:b].transpose(0, 1)[None] for x in (q_NHd, k_NHd, v_NHe))  # [1, H, L, .]
        out.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[0].transpose(0, 1))
    return torch.cat(out)


def _varlen_kernel(q: torch.Tensor) -> str:
    if q.device.type == NPU:
        return "npu"
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return "flash"
    return "reference"


def _varlen_flash(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """torch's ``varlen_attn`` (torch >= 2.10: causal is ``window_size=(-1, 0)``), else flash-attn's
    ``flash_attn_varlen_func``. Flash kernels: bf16/fp16, head width <= 256 and a multiple of 8. Written against
    the documented APIs; not run in this repository (no GPU here)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    cu, L = layout.cu_seqlens, layout.max_seqlen
    if varlen_attn is not None:
        return varlen_attn(q, k, v, cu, cu, L, L, scale=scale, window_size=(-1, 0))
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu, cu, L, L, dropout_p=0.0, softmax_scale=scale, causal=True)


_NPU_CAUSAL_MASKS: dict = {}


def _varlen_npu(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """``torch_npu.npu_fusion_attention`` in TND layout: ``actual_seq_qlen``/``actual_seq_kvlen`` are the runs'
    cumulative end offsets (host ints, no leading 0); sparse_mode 3 (right-down causal) with the 2048 x 2048
    upper-triangular compressed mask the operator documents. Written against the documented torch_npu API; never
    run in this repository (no Ascend device here)."""
    import torch_npu  # q lives on an NPU, so torch_npu is loaded already

    mask = _NPU_CAUSAL_MASKS.get(q.device)
    if mask is None:
        mask = torch.ones(2048, 2048, dtype=torch.bool, device=q.device).triu(diagonal=1)
        _NPU_CAUSAL_MASKS[q.device] = mask
    ends = layout.cu_seqlens_host[1:].tolist()
    return torch_npu.npu_fusion_attention(q, k, v, q.shape[1], "TND", atten_mask=mask, scale=scale, keep_prob=1.0,
                                          sparse_mode=3, actual_seq_qlen=ends, actual_seq_kvlen=ends)[0]


# --- grouped GEMM (routed experts) ----------------------------------------------------------------------------------
#
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
