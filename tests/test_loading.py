"""recipe.parallel.loading: filling a rank's layers and experts from a tensor source. Strict (a missing, extra,
foreign or wrongly shaped tensor is an error naming the pipeline layer), experts renumbered from global to rank-local
ids, and the three sources (state dict, Hugging Face directory, converted directory) giving the same tensors.
Loading into real multi-process pipelines: test_train.py."""

from __future__ import annotations

import pytest
import torch

from recipe.model import DeepseekVLV2ForCausalLM
from recipe.parallel import layout
from recipe.parallel.loading import (
    converted_source,
    hf_source,
    load_layers,
    load_pretrained,
    tensor_source_from_state_dict,
)
from recipe.parallel.pipeline import layer_specs
from recipe.tools.tiny_config import tiny_config


class Rank:
    """What the loader reads of a ``VL2Pipeline``: the (layout entry, module) pairs of this rank's layers and its
    routed-expert ids. Built from the pipeline's own LayerSpecs, without a process group, so any EP rank can be
    played in one process."""

    def __init__(self, cfg, indices, ep_size: int = 1, ep_rank: int = 0):
        specs, table = layer_specs(cfg, ep_size), layout.build_layout(cfg)
        self.layers = [(table[i], specs[i].build()) for i in indices]
        n_local = cfg.language_config.n_routed_experts // ep_size
        self.expert_ids = list(range(ep_rank * n_local, (ep_rank + 1) * n_local))

    def local_layers(self):
        return self.layers

    def local_expert_ids(self):
        return self.expert_ids


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return DeepseekVLV2ForCausalLM(tiny_config("base", image_size=42))


def decoder_and_head(cfg) -> list[int]:
    """Indices of the decoder layers and the head: a last stage (layer 0 dense, 1 and 2 MoE)."""
    first = layout.first_decoder_index(cfg)
    return list(range(first, first + cfg.language_config.num_hidden_layers + 1))


def test_takes_only_this_ranks_experts_renumbered_to_local_ids(plain):
    cfg, sd = plain.config, plain.state_dict()
    rank = Rank(cfg, decoder_and_head(cfg), ep_size=2, ep_rank=1)
    assert rank.local_expert_ids() == [4, 5, 6, 7]
    n = load_layers(rank, tensor_source_from_state_dict(sd))
    assert n == sum(len(m.state_dict()) for _, m in rank.local_layers())
    moe_layers = 0
    for layer, m in rank.local_layers():
        own = m.state_dict()
        for name, t in own.items():
            e = layout.expert_id_of_local(name)
            if e is not None:
                assert 0 <= e < 4
                name = layout.renumber_expert(name, e + 4)  # local expert e holds global expert 4 + e
            assert torch.equal(t, sd[layout.local_to_hf(layer, name)]), (layer.index, name)
        moe_layers += layer.is_moe
    assert moe_layers == 2


def test_every_layer_kind_loads(plain):
    cfg, sd = plain.config, plain.state_dict()
    rank = Rank(cfg, range(len(layout.build_layout(cfg))))
    assert load_layers(rank, tensor_source_from_state_dict(sd)) == len(sd)


def dropping(sd: dict, key: str) -> dict:
    return {k: v for k, v in sd.items() if k != key}


@pytest.mark.parametrize("change, error, message", [
    (lambda sd: dropping(sd, "language.model.layers.1.self_attn.o_proj.weight"), KeyError,
     r"pipeline layer \d+ \(decoder\): missing \['language.model.layers.1.self_attn.o_proj.weight'\], "
     r"unexpected \[\]"),
    (lambda sd: dropping(sd, "language.model.layers.2.mlp.experts.5.up_proj.weight"), KeyError,
     r"pipeline layer \d+ \(decoder\): missing \['language.model.layers.2.mlp.experts.5.up_proj.weight'\]"),
    (lambda sd: {**sd, "language.model.layers.1.mlp.bogus.weight": torch.zeros(1)}, KeyError,
     r"pipeline layer \d+ \(decoder\): missing \[\], unexpected \['language.model.layers.1.mlp.bogus.weight'\]"),
    (lambda sd: {**sd, "language.model.norm.bias": torch.zeros(1)}, KeyError,
     r"pipeline layer \d+ \(head\): missing \[\], unexpected \['language.model.norm.bias'\]"),
    (lambda sd: {**sd, "language.lm_head.weight": sd["language.lm_head.weight"][:-1]}, ValueError,
     r"pipeline layer \d+ \(head\): language.lm_head.weight has shape \(511, 64\), the model expects \(512, 64\)"),
    (lambda sd: {**sd, "language.model.layers.1.mlp.experts.6.down_proj.weight": torch.zeros(2, 2)}, ValueError,
     r"pipeline layer \d+ \(decoder\): language.model.layers.1.mlp.experts.6.down_proj.weight has shape \(2, 2\)"),
])
def test_is_strict_and_names_the_layer(plain, change, error, message):
    cfg = plain.config
    rank = Rank(cfg, decoder_and_head(cfg), ep_size=2, ep_rank=1)
    with pytest.raises(error, match=message):
        load_layers(rank, tensor_source_from_state_dict(change(plain.state_dict())))


def test_refuses_other_ranks_experts_and_other_layers_tensors(plain):
    cfg, sd = plain.config, plain.state_dict()
    rank = Rank(cfg, decoder_and_head(cfg), ep_size=2, ep_rank=1)
    every_expert = tensor_source_from_state_dict(sd)
    with pytest.raises(KeyError, match=r"\(decoder\): missing \[\], unexpected \['language.model.layers.1.mlp."
                                       r"experts.0.down_proj.weight'"):
        load_layers(rank, lambda layer, expert_ids: every_expert(layer, range(8)))  # a source ignoring expert_ids
    with pytest.raises(KeyError, match="not owned by pipeline layer"):
        load_layers(rank, lambda layer, expert_ids: {"language.model.embed_tokens.weight": torch.zeros(1)})


def test_the_three_sources_give_the_same_tensors(converted):
    hf_dir, ds_dir = converted
    cfg = DeepseekVLV2ForCausalLM.from_pretrained(hf_dir).config
    from_hf, from_converted = hf_source(hf_dir), converted_source(ds_dir)
    every = list(range(cfg.language_config.n_routed_experts))
    full = {k: v for layer in layout.build_layout(cfg) for k, v in from_hf(layer, every).items()}
    from_state_dict = tensor_source_from_state_dict(full)
    for layer in layout.build_layout(cfg):
        for expert_ids in ([4, 5, 6, 7], every):
            a, b, c = from_hf(layer, expert_ids), from_converted(layer, expert_ids), from_state_dict(layer, expert_ids)
            assert a.keys() == b.keys() == c.keys() and a, layer
            assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a), layer
    ranks = [Rank(cfg, decoder_and_head(cfg), ep_size=2, ep_rank=1) for _ in range(2)]
    assert load_pretrained(ranks[0], hf_dir) == load_pretrained(ranks[1], ds_dir) > 0
    for (_, a), (_, b) in zip(ranks[0].local_layers(), ranks[1].local_layers()):
        assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())


def test_load_pretrained_needs_a_checkpoint(plain, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a converted checkpoint .* nor a Hugging Face one"):
        load_pretrained(Rank(plain.config, [0]), str(tmp_path))
