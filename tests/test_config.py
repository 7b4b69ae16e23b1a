import json
import os

import pytest
import torch
from conftest import RELEASED_CONFIGS

from recipe.config import ConfigError, VL2Config, _tile_candidates
from recipe.data.processor_config import ProcessorConfig
from recipe.model import DeepseekVLV2ForCausalLM
from recipe.tools.tiny_config import tiny_config

RELEASED = {  # size -> (total parameters, state_dict tensors, hidden, layers, experts)
    "tiny": (3_370_501_440, 2582, 1280, 12, 64),
    "small": (16_148_349_504, 5639, 2048, 27, 64),
    "base": (27_480_134_248, 6973, 2560, 30, 72),
}

# processor_config.json's candidate_resolutions, as released (reference sheet 1.5)
RELEASED_CANDIDATES = [[384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384],
                       [768, 768], [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768],
                       [384, 2688], [2688, 384], [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456],
                       [3456, 384], [1152, 1152]]


def released(name):
    return os.path.join(RELEASED_CONFIGS, f"{name}.json")


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_sizes_and_parameter_count(name):
    total, n_tensors, hidden, layers, experts = RELEASED[name]
    cfg = VL2Config.from_json(released(name))
    lc = cfg.language_config
    assert (lc.hidden_size, lc.num_hidden_layers, lc.n_routed_experts) == (hidden, layers, experts)
    assert lc.moe_layer_ids == list(range(1, layers))
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(cfg)
    state = model.state_dict()
    assert len(state) == n_tensors
    assert sum(t.numel() for t in state.values()) == total


def test_sparse_base_config_takes_original_defaults():
    with open(released("base")) as f:
        raw = json.load(f)
    lang = raw["language_config"]
    for key in ("num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "use_mla"):
        assert key not in lang  # really sparse
    lc = VL2Config.from_json(released("base")).language_config
    assert (lc.num_hidden_layers, lc.num_attention_heads, lc.kv_lora_rank) == (30, 32, 512)
    assert (lc.qk_nope_head_dim, lc.qk_rope_head_dim, lc.v_head_dim, lc.use_mla) == (128, 64, 128, True)
    assert (lc.topk_method, lc.scoring_func, lc.norm_topk_prob, lc.routed_scaling_factor) == \
        ("noaux_tc", "sigmoid", True, 2.0)
    assert lc.aux_loss_alpha == 0.001 and lc.seq_aux is True
    small = VL2Config.from_json(released("small")).language_config
    assert (small.bos_token_id, small.eos_token_id, small.vocab_size) == (100000, 100001, 102400)


def test_tiny_uses_mha_and_image_token_counts():
    cfg = VL2Config.from_json(released("tiny"))
    assert not cfg.language_config.use_mla and cfg.language_config.head_dim == 128
    # reference sheet section 4: token counts per tile grid (width x height)
    assert cfg.tokens_per_side == 14
    for (w, h), n in {(1, 1): 421, (2, 1): 617, (1, 2): 631, (2, 2): 1023, (3, 2): 1415, (3, 3): 2017,
                      (1, 9): 2101}.items():
        assert cfg.num_image_tokens(w, h) == n


def test_candidate_resolutions_order_matches_release():
    assert _tile_candidates(384) == RELEASED_CANDIDATES
    assert ProcessorConfig().candidate_resolutions == RELEASED_CANDIDATES
    assert VL2Config.from_json(released("base")).candidate_resolutions == RELEASED_CANDIDATES


def _broken(mutate):
    with open(released("base")) as f:
        raw = json.load(f)
    mutate(raw)
    return raw


@pytest.mark.parametrize("mutate, key", [
    (lambda r: r["language_config"].update(topk_method="gready"), "language_config.topk_method"),
    (lambda r: r["language_config"].pop("topk_method"), "language_config.topk_method"),
    (lambda r: r.update(tile_tag="1D"), "config.tile_tag"),
    (lambda r: r.pop("tile_tag"), "config.tile_tag"),
    (lambda r: r["language_config"].update(n_group=5), "language_config.n_group"),
    (lambda r: r["language_config"].update(topk_group=2), "language_config.topk_group"),
    (lambda r: r["language_config"].update(num_experts_per_tok=73), "language_config.num_experts_per_tok"),
    (lambda r: r["language_config"].update(scoring_func="relu"), "language_config.scoring_func"),
    (lambda r: r["projector_config"].update(n_embed=1280), "projector_config.n_embed"),
    (lambda r: r["projector_config"].update(projector_type="mlp_gelu"), "projector_config.projector_type"),
    (lambda r: r["vision_config"].update(class_token=True), "vision_config.class_token"),
    (lambda r: r["language_config"].update(rope_scaling={"type": "yarn", "factor": 4}), "language_config.rope_scaling"),
    (lambda r: r["language_config"].update(hidden_size=-1), "language_config.hidden_size"),
])
def test_invalid_values_name_the_key(mutate, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        VL2Config.from_dict(_broken(mutate))


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config"):
        VL2Config.from_json(str(tmp_path))
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        VL2Config.from_json(str(tmp_path))
    bad.write_text(json.dumps(_broken(lambda r: r["language_config"].update(topk_method="gready"))))
    with pytest.raises(ConfigError, match=r"config\.json: language_config\.topk_method"):
        VL2Config.from_json(str(bad))


def test_round_trip_keeps_unknown_keys(caplog):
    raw = _broken(lambda r: r["language_config"].update(some_future_key=7))
    with caplog.at_level("WARNING"):
        cfg = VL2Config.from_dict(raw)
    assert "some_future_key" in caplog.text
    assert "lm_head" not in caplog.text  # known HF bookkeeping keys stay quiet
    again = VL2Config.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.language_config.extra["some_future_key"] == 7
    assert again.to_dict()["language_config"]["lm_head"] is False


def test_processor_config_validation(tmp_path):
    cfg = ProcessorConfig()
    assert cfg.image_size == 384 and cfg.mask_prompt is False and cfg.pad_token == "<｜▁pad▁｜>"
    with pytest.raises(ConfigError, match="candidate_resolutions"):
        ProcessorConfig.from_dict({"candidate_resolutions": [[384, 384], [500, 384]]})
    with pytest.raises(ConfigError, match="sft_format"):
        ProcessorConfig.from_dict({"sft_format": "llava"})
    path = tmp_path / "processor_config.json"
    cfg.save_json(str(path))
    assert ProcessorConfig.from_json(str(tmp_path)).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("like", ["tiny", "small", "base"])
def test_tiny_presets_keep_the_released_features(like):
    cfg = tiny_config(like, image_size=42)
    lc = cfg.language_config
    assert lc.use_mla == (like != "tiny")
    assert lc.topk_method == ("noaux_tc" if like == "base" else "greedy")
    assert lc.scoring_func == ("sigmoid" if like == "base" else "softmax")
    assert lc.moe_layer_ids == list(range(1, lc.num_hidden_layers))
    assert cfg.tokens_per_side == 2  # 42 px / 14 = 3x3 patches, padded to 4x4, merged 2x2
