"""Attention for one micro-batch: the layout of who may attend to whom (built once, passed to every layer), SDPA
for plain and masked rows, the variable-length kernels for packed rows, and the eager references they are tested
against.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# The decoder's attention layout is built once per micro-batch from the per-token segment ids
# (:func:`build_attention_layout`) and handed to every layer as the ``mask`` argument of :func:`attention`:
#   causal  one segment per row and right padding: plain causal attention (fused SDPA kernels run);
#   dense   a [B, 1, T, T] boolean "may attend" mask (causal within equal segment ids): SDPA with a mask, the
#           reference (``RECIPE_ATTENTION=dense``);
#   varlen  packed rows (the default on every device): every row is cut into its runs of equal segment id (the
#           samples, and the padding at the end as one more run) and the rows laid end to end as [B*T, H, d] ("TND"); a
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
# Packed rows take the varlen path on every device by default; ``RECIPE_ATTENTION=dense`` selects the [T, T] mask
# (the reference; the only path with attention dropout).

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
    """``dense`` or ``varlen`` for packed rows of tensors like ``t``: ``varlen`` on every device unless
    ``RECIPE_ATTENTION`` says otherwise. Where the device has a fused kernel (:func:`has_varlen_kernel`) it runs
    that; elsewhere (CPU) the per-run SDPA, which computes sum(L_i^2) scores instead of the [T, T] mask's T^2 and
    gives the same outputs (bench/packing.py: packed steps 1.5-2.3x faster than with the mask on CPU). ``dense``,
    the masked SDPA, stays as the reference the varlen paths are tested against."""
    forced = os.environ.get(ATTENTION_ENV, "").strip().lower()
    if forced in ("dense", "varlen"):
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"{ATTENTION_ENV}={forced!r}: expected auto, dense or varlen")
    return "varlen"


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
