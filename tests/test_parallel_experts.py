"""The DeepSpeed gate adapter and the stage layout, on one process (the multi-process runs are in test_train.py)."""

import pytest
import torch

from recipe.config import ConfigError, VL2Config, tiny_config
from recipe.parallel import layout as L
from recipe.parallel.experts import DeepSeekGate, slot_locations

from conftest import RELEASED_CONFIGS


def test_slot_locations_number_routes_per_expert_in_slot_token_order():
    idx = torch.tensor([[0, 2, 0, 1], [2, 0, 1, 1]])  # [K=2, S=4]
    loc, load = slot_locations(idx, 3)
    assert load.tolist() == [3, 3, 2]
    # expert 0 gets (k0,s0), (k0,s2), (k1,s1) in that order; expert 1 (k0,s3), (k1,s2), (k1,s3); ...
    assert loc.tolist() == [[0, 0, 1, 0], [1, 2, 1, 2]]
    for e in range(3):
        assert sorted(loc[idx == e].tolist()) == list(range(int(load[e])))


def test_gate_adapter_matches_the_router_and_counts_load():
    lc = tiny_config("base").language_config
    gate = DeepSeekGate(lc).train()
    x = torch.randn(10, lc.hidden_size)
    l_aux, C, E, indices, locations, gates, counts = gate(x, torch.zeros(10, dtype=torch.long), True)
    routing = gate.router(x)
    assert E == lc.n_routed_experts and C == int(counts.max())
    assert torch.equal(indices.long(), routing.topk_idx.t()) and torch.equal(gates, routing.topk_weight.t())
    assert gates.dtype == torch.float32 and int(locations.max()) < C
    assert l_aux.item() > 0  # training mode with aux_loss_alpha > 0
    gate(x, None, True)
    load = gate.take_step_load()
    assert load.tolist() == (2 * counts).tolist() and gate.take_step_load().sum() == 0
    with pytest.raises(NotImplementedError):
        gate(x, None, False)


def test_correction_bias_update_moves_toward_balance():
    lc = tiny_config("base").language_config
    router = DeepSeekGate(lc).router
    before = router.e_score_correction_bias.clone()
    load = torch.tensor([10, 0, 5, 5, 5, 5, 5, 5])  # mean 5: expert 0 over-, expert 1 under-loaded
    router.update_correction_bias(load, 0.01)
    delta = router.e_score_correction_bias - before
    assert delta[0] == pytest.approx(-0.01) and delta[1] == pytest.approx(0.01)
    assert torch.all(delta[2:] == 0)


def test_stage_parts_and_the_seed_split():
    base = VL2Config.from_json(f"{RELEASED_CONFIGS}/base.json")
    assert L.stage_parts(base, 2, [13, 17]) == [0, 42, 60]
    assert L.balanced_decoder_split(base, 2) == [13, 17]  # FLOPs-balanced = the original recipe's split
    assert L.stage_parts(base, 1) == [0, 60]
    with pytest.raises(ConfigError, match="add up to"):
        L.stage_parts(base, 2, [13, 16])
    with pytest.raises(ConfigError, match="stage 0 .* holds no MoE layer"):
        L.stage_parts(base, 2, [1, 29])  # layer 0 is dense: stage 0 would hang in DeepSpeed's expert collectives
    layers = L.build_layout(base)
    assert [l.kind for l in layers[:2]] == ["embed", "vit_block"] and layers[28].kind == "projector"
    assert layers[29].kind == "decoder" and not layers[29].is_moe and layers[30].is_moe
    assert layers[-1].kind == "head" and len(layers) == 60
