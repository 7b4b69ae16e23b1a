"""Tiny presets of the model config (tests, the demo, ``make_tiny``): a few-MB model with the features of a
released size."""

from __future__ import annotations

from recipe.config import ConfigError, VL2Config, _tile_candidates

TINY_LIKE = ("tiny", "small", "base")


def tiny_config(like: str = "tiny", *, image_size: int = 384, vocab_size: int = 512, hidden_size: int = 64,
                num_hidden_layers: int = 3, n_routed_experts: int = 8, num_experts_per_tok: int = 3,
                vision_width: int = 32, vision_layers: int = 2, **language_overrides) -> VL2Config:
    """A few-MB model with the features of a released size.

    like="tiny": MHA, softmax, greedy. like="small": MLA (no q LoRA), softmax, greedy. like="base": MLA, sigmoid,
    noaux_tc with normalised top-k weights x 2.0. All: first layer dense, 2 shared experts, SigLIP geometry with
    patch 14 on ``image_size`` tiles (384 = the real processor; 42 gives a 3x3 grid, padded to 2x2 tokens, for
    fast tests).
    """
    if like not in TINY_LIKE:
        raise ConfigError(f"like={like!r}: expected one of {TINY_LIKE}")
    heads = 4
    lang = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                moe_intermediate_size=hidden_size // 2, num_hidden_layers=num_hidden_layers,
                num_attention_heads=heads, num_key_value_heads=heads, n_routed_experts=n_routed_experts,
                n_shared_experts=2, num_experts_per_tok=num_experts_per_tok, first_k_dense_replace=1,
                n_group=1, topk_group=1, topk_method="greedy", bos_token_id=0, eos_token_id=1,
                max_position_embeddings=4096, q_lora_rank=None)
    if like == "tiny":
        lang.update(use_mla=False, kv_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0)
    else:
        lang.update(use_mla=True, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    if like == "base":
        lang.update(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.0)
    lang.update(language_overrides)
    raw = {
        "tile_tag": "2D", "global_view_pos": "head", "candidate_resolutions": _tile_candidates(image_size),
        "vision_config": {"model_name": "siglip_so400m_patch14_384", "image_size": image_size, "patch_size": 14,
                          "width": vision_width, "layers": vision_layers, "heads": 2, "mlp_ratio": 3.7362,
                          "global_pool": "map", "ignore_head": True, "class_token": False, "num_classes": 0},
        "projector_config": {"projector_type": "downsample_mlp_gelu", "input_dim": vision_width,
                             "n_embed": hidden_size, "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2},
        "language_config": lang,
    }
    return VL2Config.from_dict(raw)
