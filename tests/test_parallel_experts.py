"""The DeepSpeed gate adapter, on one process (the multi-process runs are in test_train.py; the stage layout:
test_layout.py)."""

import pytest
import torch

from recipe.parallel.experts import DeepSeekGate, slot_locations
from recipe.tools.tiny_config import tiny_config


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


def test_both_dispatchers_keep_deepspeeds_moe_names_and_expert_attributes():
    """The exact path stays a ``deepspeed.moe.layer.MoE`` holding a ``MOELayer``, with the same state-dict names
    (so DeepSpeed files experts by global id, and resume, ds_to_hf and the converted layout are unchanged) and
    DeepSpeed's ``allreduce=False`` / ``group_name`` on every expert parameter (expert-data-parallel reduction)."""
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import MOELayer

    from recipe.parallel import layout
    from recipe.parallel.experts import ExactSplitMOELayer, ExpertParallelMoE

    lc = tiny_config("base").language_config
    exact, capacity = ExpertParallelMoE(lc, 2, "exact"), ExpertParallelMoE(lc, 2, "capacity")
    assert isinstance(exact.moe, MoE) and isinstance(exact.moe.deepspeed_moe, ExactSplitMOELayer)
    assert isinstance(exact.moe.deepspeed_moe, MOELayer) and type(capacity.moe.deepspeed_moe) is MOELayer
    assert list(exact.state_dict()) == list(capacity.state_dict())
    experts = [n for n in exact.state_dict() if n.startswith("moe.deepspeed_moe.experts.deepspeed_experts.")]
    assert len(experts) == 3 * lc.n_routed_experts // 2  # this rank's half, local ids 0..E/2-1
    assert all(("mlp." + n).startswith(layout.MOE_EXPERTS) for n in experts)
    for n, p in exact.named_parameters():
        is_expert = n.startswith("moe.deepspeed_moe.experts.")
        assert getattr(p, "allreduce", True) is (not is_expert), n
        assert getattr(p, "group_name", None) == ("ep_size_2" if is_expert else None), n
    # inside the MoE module nothing but the routed experts has "expert" in its name (DeepSpeed's checkpointing
    # files every such tensor as an expert weight); shared_experts sit outside it
    assert all("expert" not in n for n in exact.moe.state_dict() if not n.startswith("deepspeed_moe.experts."))
    with pytest.raises(ValueError, match="moe_dispatcher='padded'"):
        ExpertParallelMoE(lc, 1, "padded")


def test_gate_route_is_what_both_paths_share():
    lc = tiny_config("base").language_config
    gate = DeepSeekGate(lc).train()
    x = torch.randn(10, lc.hidden_size)
    routing, l_aux, load = gate.route(x, torch.zeros(10, dtype=torch.long))
    assert torch.equal(load, torch.bincount(routing.topk_idx.reshape(-1), minlength=lc.n_routed_experts))
    out = gate(x, torch.zeros(10, dtype=torch.long), True)
    assert torch.equal(out[0], l_aux) and torch.equal(out[6], load)
