"""DeepSeek-VL2 in plain single-device PyTorch, with the HF checkpoint's parameter names."""

from recipe.model.vl2 import DeepseekVLV2ForCausalLM, StateSpec, VL2Output, state_shapes, state_specs

__all__ = ["DeepseekVLV2ForCausalLM", "StateSpec", "VL2Output", "state_shapes", "state_specs"]
