"""recipe.parallel.layout: every tensor of the released models belongs to exactly one pipeline layer, names map
HF <-> local and back, the one name table, the stage boundaries and their refusals, and layout importing nothing
above it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import RELEASED_CONFIGS, REPO

from recipe.config import ConfigError, VL2Config
from recipe.model import DeepseekVLV2ForCausalLM
from recipe.parallel import layout
from recipe.parallel.cost import balanced_decoder_split
from recipe.tools.tiny_config import tiny_config


def released(name: str) -> VL2Config:
    return VL2Config.from_json(os.path.join(RELEASED_CONFIGS, f"{name}.json"))


def meta_state_dict(cfg: VL2Config) -> dict:
    with torch.device("meta"):
        return DeepseekVLV2ForCausalLM(cfg).state_dict()


@pytest.fixture(scope="module", params=["tiny", "small", "base"])
def released_model(request):
    cfg = released(request.param)
    return cfg, meta_state_dict(cfg)


def test_every_tensor_belongs_to_exactly_one_layer(released_model):
    cfg, sd = released_model
    layers = layout.build_layout(cfg)
    n_layers = cfg.vision_config.layers + cfg.language_config.num_hidden_layers + 3
    assert [layer.index for layer in layers] == list(range(n_layers))
    owned = {layer.index: [] for layer in layers}
    for name in sd:
        owners = [layer.index for layer in layers if layer.owns(name)]
        assert len(owners) == 1, (name, owners)
        assert layout.layer_index_of(cfg, name) == owners[0]
        owned[owners[0]].append(name)
    assert all(owned.values()), [i for i, names in owned.items() if not names]  # no empty layer


def test_hf_and_local_names_round_trip(released_model):
    cfg, sd = released_model
    layers = layout.build_layout(cfg)
    local_names = {}
    for name in sd:
        layer = layers[layout.layer_index_of(cfg, name)]
        local = layout.hf_to_local(layer, name)
        assert layout.local_to_hf(layer, local) == name
        assert local_names.setdefault((layer.index, local), name) == name  # no two HF names share a local name
        parsed = layout.parse_expert_key(name)
        if parsed is not None:
            assert layer.is_moe and layer.block == parsed[0]
            assert layout.expert_id_of_local(local) == parsed[1]
            assert local == f"{layout.MOE_EXPERTS}{parsed[1]}.{parsed[2]}"
        else:
            assert layout.expert_id_of_local(local) is None


def test_names_map_as_the_pipeline_modules_and_converted_checkpoints_expect():
    """Spot checks of the contract with pipeline.py's modules and with checkpoints already written."""
    cfg = released("base")
    layers = layout.build_layout(cfg)
    n_vit = cfg.vision_config.layers
    embed, projector, head = layers[0], layers[n_vit + 1], layers[-1]
    moe = layers[layout.layer_index_of(cfg, "language.model.layers.1.mlp.gate.weight")]
    dense = layers[layout.first_decoder_index(cfg)]
    cases = [
        (embed, "language.model.embed_tokens.weight", "embed_tokens.weight"),
        (embed, "vision.pos_embed", "pos_embed"),
        (embed, "vision.patch_embed.proj.weight", "patch_embed.proj.weight"),
        (layers[3], "vision.blocks.2.attn.qkv.weight", "attn.qkv.weight"),
        (projector, "vision.norm.weight", "norm.weight"),
        (projector, "vision.attn_pool.latent", "attn_pool.latent"),
        (projector, "projector.layers.0.weight", "projector.layers.0.weight"),
        (projector, "image_newline", "image_newline"),
        (projector, "view_seperator", "view_seperator"),
        (dense, "language.model.layers.0.mlp.gate_proj.weight", "mlp.gate_proj.weight"),
        (moe, "language.model.layers.1.mlp.gate.weight", layout.MOE_ROUTER + "weight"),
        (moe, "language.model.layers.1.mlp.gate.e_score_correction_bias",
         layout.MOE_ROUTER + "e_score_correction_bias"),
        (moe, "language.model.layers.1.mlp.experts.71.down_proj.weight", layout.MOE_EXPERTS + "71.down_proj.weight"),
        (moe, "language.model.layers.1.mlp.shared_experts.up_proj.weight", "mlp.shared_experts.up_proj.weight"),
        (moe, "language.model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa.weight"),
        (head, "language.model.norm.weight", "norm.weight"),
        (head, "language.lm_head.weight", "lm_head.weight"),
    ]
    for layer, hf, local in cases:
        assert layout.hf_to_local(layer, hf) == local, hf
        assert layout.local_to_hf(layer, local) == hf, local
    assert embed.hf_prefixes == ("language.model.embed_tokens.", "vision.patch_embed.", "vision.pos_embed")
    assert projector.hf_prefixes == ("vision.norm.", "vision.attn_pool.", "projector.", "image_newline",
                                     "view_seperator")
    assert head.hf_prefixes == ("language.model.norm.", "language.lm_head.")
    assert moe.hf_prefixes == ("language.model.layers.1.",) and layers[5].hf_prefixes == ("vision.blocks.4.",)
    with pytest.raises(KeyError, match="not owned by pipeline layer 0"):
        layout.hf_to_local(embed, "language.lm_head.weight")
    with pytest.raises(KeyError, match="not a tensor of pipeline layer"):
        layout.local_to_hf(head, "bogus.weight")
    with pytest.raises(KeyError, match="not owned"):
        layout.hf_to_local(moe, "language.model.layers.2.mlp.experts.0.up_proj.weight")  # another layer's expert


def test_one_name_table_drives_prefixes_and_renames():
    """Every layer's ``hf_prefixes`` and rename pairs come from ``layout.PREFIXES``; within a kind the local
    prefixes are distinct, so the reverse map is well defined."""
    cfg = tiny_config("base", image_size=42)
    for layer in layout.build_layout(cfg):
        assert layer.hf_prefixes == tuple(hf.format(layer.block) for hf, _ in layout.PREFIXES[layer.kind])
        pairs = layer.name_pairs()
        assert len({local for _, local in pairs}) == len(pairs)
        assert pairs[-len(layout.PREFIXES[layer.kind]):] == tuple(
            (hf.format(layer.block), local) for hf, local in layout.PREFIXES[layer.kind])
        assert len(pairs) == len(layout.PREFIXES[layer.kind]) + (2 if layer.is_moe else 0)
    assert set(layout.PREFIXES) == {layout.EMBED, layout.VIT_BLOCK, layout.PROJECTOR, layout.DECODER, layout.HEAD}


def test_layer_index_of_refuses_unknown_names():
    cfg = released("tiny")
    with pytest.raises(KeyError, match="vision block 27 but vision_config.layers=27"):
        layout.layer_index_of(cfg, "vision.blocks.27.attn.qkv.weight")
    with pytest.raises(KeyError, match="decoder layer 12 but language_config.num_hidden_layers=12"):
        layout.layer_index_of(cfg, "language.model.layers.12.input_layernorm.weight")
    for bad in ("vision.head.weight", "image_newline_extra", "language.model.embed_tokens", "lm_head.weight"):
        with pytest.raises(KeyError, match="not a DeepSeek-VL2 tensor name"):
            layout.layer_index_of(cfg, bad)


def test_expert_keys_of_a_rank():
    keys = ["language.model.layers.1.mlp.experts.0.up_proj.weight",
            "language.model.layers.1.mlp.experts.5.up_proj.weight",
            "language.model.layers.1.mlp.gate.weight",
            "language.model.layers.2.mlp.experts.5.up_proj.weight"]
    cfg = tiny_config("base", image_size=42)
    layer = layout.build_layout(cfg)[layout.layer_index_of(cfg, keys[0])]
    assert layout.keys_for_rank(keys, layer, [4, 5, 6, 7]) == keys[1:3]
    assert layout.parse_expert_key(keys[1]) == (1, 5, "up_proj.weight")
    assert layout.parse_expert_key(keys[2]) is None
    local = layout.hf_to_local(layer, keys[1])
    assert layout.renumber_expert(local, 1) == layout.MOE_EXPERTS + "1.up_proj.weight"
    with pytest.raises(KeyError, match="not a routed-expert tensor"):
        layout.renumber_expert("mlp.shared_experts.up_proj.weight", 0)


def test_freeze_groups_and_always_frozen_cover_every_tensor(released_model):
    cfg, sd = released_model
    groups = {name: layout.freeze_group(name) for name in sd}
    assert set(groups.values()) == set(layout.FREEZE_GROUPS)
    assert {n for n, g in groups.items() if g == "vision"} == {n for n in sd if n.startswith("vision.")}
    assert {n for n, g in groups.items() if g == "projector"} == \
        {n for n in sd if n.startswith("projector.")} | {"image_newline", "view_seperator"}
    assert {n for n, g in groups.items() if g == "embeddings"} == {"language.model.embed_tokens.weight"}
    always = [n for n in sd if n.startswith(layout.ALWAYS_FROZEN)]
    assert always and all(layout.layer_index_of(cfg, n) == cfg.vision_config.layers + 1 for n in always)
    assert set(layout.CHECKPOINTED_KINDS) <= set(layout.PREFIXES)


def test_stage_parts_and_the_seed_split():
    base = released("base")
    assert layout.stage_parts(base, 2, [13, 17]) == [0, 42, 60]
    assert balanced_decoder_split(base, 2) == [13, 17]  # FLOPs-balanced = the original recipe's split
    assert layout.stage_parts(base, 1, [30]) == [0, 60]
    with pytest.raises(ConfigError, match="add up to"):
        layout.stage_parts(base, 2, [13, 16])
    with pytest.raises(ConfigError, match="stage 0 .* holds no MoE layer"):
        layout.stage_parts(base, 2, [1, 29])  # layer 0 is dense: stage 0 would hang in DeepSpeed's expert collectives
    layers = layout.build_layout(base)
    assert [layer.kind for layer in layers[:2]] == ["embed", "vit_block"] and layers[28].kind == "projector"
    assert layers[29].kind == "decoder" and not layers[29].is_moe and layers[30].is_moe
    assert layers[-1].kind == "head" and len(layers) == 60


def test_stage_parts_refusals_and_edges():
    base = released("base")
    assert layout.stage_parts(base, 4, [8, 8, 7, 7]) == [0, 37, 45, 52, 60]
    with pytest.raises(ConfigError, match="must be >= 1"):
        layout.stage_parts(base, 0, [])
    with pytest.raises(ConfigError, match="has 2 entries for 3 pipeline stages"):
        layout.stage_parts(base, 3, [13, 17])
    with pytest.raises(ConfigError, match="non-negative"):
        layout.stage_parts(base, 3, [31, 0, -1])
    with pytest.raises(ConfigError, match="the last stage holds the head"):
        layout.stage_parts(base, 2, [30, 0])
    dense = tiny_config("tiny", image_size=42, num_hidden_layers=3, n_routed_experts=None)
    n_vit = dense.vision_config.layers
    assert layout.stage_parts(dense, 2, [0, 3]) == [0, n_vit + 2, n_vit + 6]  # stage 0: ViT only, allowed when dense


def test_layout_imports_nothing_above_it():
    """``layout`` is the bottom layer: importing it loads neither the cost model nor the planner (nor torch)."""
    code = ("import sys; import recipe.parallel.layout; "
            "print(sorted(m for m in sys.modules if m.startswith(('recipe.plan', 'recipe.parallel.cost', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
