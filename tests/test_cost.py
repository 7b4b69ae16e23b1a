"""recipe.parallel.cost: parameters taken from the built model (exact for the released sizes, cached per config),
FLOPs tied to the model's own tensor shapes, and the FLOPs-balanced split (layout staying below it: test_layout.py)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import RELEASED_CONFIGS

from recipe.config import VL2Config
from recipe.model import DeepseekVLV2ForCausalLM
from recipe.parallel.cost import Workload, balanced_decoder_split, flops_per_sample, layer_infos, model_tensors

RELEASED_TOTALS = {"tiny": 3_370_501_440, "small": 16_148_349_504, "base": 27_480_134_248}


def released(name: str) -> VL2Config:
    return VL2Config.from_json(os.path.join(RELEASED_CONFIGS, f"{name}.json"))


@pytest.mark.parametrize("name", list(RELEASED_TOTALS))
def test_released_totals_are_exact(name):
    tensors = model_tensors(released(name))
    assert sum(t.numel for t in tensors) == RELEASED_TOTALS[name]
    infos = layer_infos(released(name), Workload(1, 64, 1, 1.0))
    assert sum(info.params for info in infos) == RELEASED_TOTALS[name]
    lc = released(name).language_config
    buffers = [t.name for t in tensors if t.kind == "buffer"]
    assert buffers == [f"language.model.layers.{j}.mlp.gate.e_score_correction_bias" for j in lc.moe_layer_ids
                       if lc.topk_method == "noaux_tc"]
    experts = sum(t.numel for t in tensors if t.kind == "expert")
    assert experts == len(lc.moe_layer_ids) * lc.n_routed_experts * 3 * lc.hidden_size * lc.moe_intermediate_size


def test_the_meta_build_is_cached_per_config():
    from recipe.model.vl2 import _state_specs

    a = model_tensors(released("base"))
    builds = _state_specs.cache_info().misses
    assert model_tensors(released("base")) == a  # an equal config loaded again: no second build
    assert _state_specs.cache_info().misses == builds
    assert model_tensors(released("small")) != a
    assert _state_specs.cache_info().misses <= builds + 1


@pytest.mark.parametrize("name", ["tiny", "base"])
def test_flops_follow_the_parameter_list(name):
    """Matmul FLOPs = 2 x tokens x the weights each token meets, with weights taken from a meta-device build."""
    cfg = released(name)
    lc, v = cfg.language_config, cfg.vision_config
    w = Workload(micro_batch=1, seq_len=1000, views=3, moe_padding=1.0)
    f = flops_per_sample(cfg, w)
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(cfg)
    sizes = {k: t.numel() for k, t in model.state_dict().items()}
    attn = sum(n for k, n in sizes.items() if ".self_attn." in k and k.endswith(".weight") and "layernorm" not in k)
    assert f["attention_linear"] == 2 * 1000 * attn
    one_expert = sum(n for k, n in sizes.items() if ".mlp.experts.0." in k) // len(lc.moe_layer_ids)
    assert f["moe_routed"] == 2 * 1000 * lc.num_experts_per_tok * one_expert * len(lc.moe_layer_ids)
    assert f["lm_head"] == 2 * 1000 * sizes["language.lm_head.weight"]
    blocks = sum(n for k, n in sizes.items() if k.startswith("vision.blocks.") and k.endswith(".weight")
                 and ".norm" not in k)
    P = v.num_patches
    patch = sizes["vision.patch_embed.proj.weight"]
    assert f["vit"] == 3 * (2 * P * blocks + v.layers * 4 * P * P * v.width + 2 * P * patch)
    dq, dv = lc.q_head_dim, lc.attn_v_head_dim
    assert f["attention_scores"] == lc.num_hidden_layers * 1000 * 1001 * lc.num_attention_heads * (dq + dv)
    assert f["total"] == sum(val for k, val in f.items() if k != "total")


def test_balanced_split_is_the_seed_clusters():
    assert balanced_decoder_split(released("base"), 2) == [13, 17]  # the original recipe's split, from FLOPs alone
    assert balanced_decoder_split(released("base"), 1) == [30]
