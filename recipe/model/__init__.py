"""DeepSeek-VL2 in plain single-device PyTorch, with the HF checkpoint's parameter names."""

from recipe.model.vl2 import DeepseekVLV2ForCausalLM, VL2Output

__all__ = ["DeepseekVLV2ForCausalLM", "VL2Output"]
