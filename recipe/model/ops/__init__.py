"""Hot operators behind one small interface, each with a plain-PyTorch reference.

The model calls these (``from recipe.model import ops``; ``ops.attention(...)``) instead of spelling the math
inline, so a faster kernel can be swapped in without touching the model, and tested against the reference where it
can run. Where a fused kernel exists it is chosen by the tensors' device, so the model code stays free of
accelerator imports:

  attention_kernels  the micro-batch's attention layout; SDPA (PyTorch picks its own kernel) for plain and masked
                     rows; for packed rows the variable-length kernel of the device (CUDA flash, Ascend
                     ``npu_fusion_attention``, per-run SDPA on CPU)
  grouped_mm         the routed experts' grouped GEMM (``torch._grouped_mm``, Ascend ``npu_grouped_matmul``, or
                     the per-expert loop)
  norm               RMSNorm (plain PyTorch on every device)
"""

from recipe.model.ops.attention_kernels import (
    ATTENTION_ENV,
    CAUSAL,
    AttentionLayout,
    attention,
    attention_impl,
    attention_reference,
    build_attention_layout,
    has_varlen_kernel,
    segment_causal_mask,
    single_segment_right_padded,
    varlen_attention,
    varlen_attention_reference,
    varlen_runs,
)
from recipe.model.ops.grouped_mm import (
    grouped_linear,
    grouped_linear_reference,
    grouped_mm_applies,
    pack_rows,
    packed_view,
    stack_groups,
)
from recipe.model.ops.norm import rms_norm

__all__ = ["ATTENTION_ENV", "CAUSAL", "AttentionLayout", "attention", "attention_impl", "attention_reference",
           "build_attention_layout", "has_varlen_kernel", "segment_causal_mask", "single_segment_right_padded",
           "varlen_attention", "varlen_attention_reference", "varlen_runs", "grouped_linear",
           "grouped_linear_reference", "grouped_mm_applies", "pack_rows", "packed_view", "stack_groups", "rms_norm"]
