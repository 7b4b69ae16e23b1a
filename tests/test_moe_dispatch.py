"""The exact-split MoE path: grouped GEMMs, the local and all-to-all dispatchers, and DeepSpeed runs where the
exact path, the plain model and DeepSpeed's capacity path give the same losses and gradient norms.

- grouped GEMM backends (torch._grouped_mm on packed weights, the per-expert loop) against the loop reference;
  packed views are views of DeepSpeed-style flat buffers, and the plain model keeps its experts packed;
- the local dispatcher against the per-token sum with forced, heavily imbalanced routings (one expert takes every
  route, empty experts), forward and gradients; the exact layer equals DeepSpeed's capacity layer on one process;
- the all-to-all dispatcher on 2 and 4 gloo ranks (tests/workers/moe_dispatch.py): random routes, everything to
  one expert, ranks that receive nothing, a rank with no tokens, one and several local experts, fp32 and bf16;
- DeepSpeed's pipeline engine (tests/workers/train_pipeline.py) at PP=2 x DP=2 with EP=1/2 and PP=1 x DP=4 with
  EP=1/2/4: exact = plain model = capacity, losses and pre-clip gradient norms, fp32 within 1e-5 relative.
"""

import json
import os

import pytest
import torch

from recipe.model import ops
from recipe.model.moe import (
    MLP,
    DeepseekV2MoE,
    LocalDispatcher,
    RoutedExperts,
    Routing,
    pack_experts,
    permute_routes,
    routed_experts,
    sort_routes,
    unpermute_combine,
)
from recipe.model.ops import grouped_mm
from recipe.parallel.dispatch import group_by_local_expert
from recipe.tools.tiny_config import tiny_config

from helpers.launch import REPO, torchrun

DRIVER = os.path.join(REPO, "tests", "workers", "train_pipeline.py")
WORKER = os.path.join(REPO, "tests", "workers", "moe_dispatch.py")
RTOL = 1e-5


def per_token_moe(x, idx, w, experts):
    """sum_k w[t, k] * expert_{idx[t, k]}(x[t]), token by token: the definition."""
    return torch.stack([sum(w[t, j] * experts[int(idx[t, j])](x[t:t + 1])[0] for j in range(idx.shape[1]))
                        for t in range(x.shape[0])])


def assert_close_to_scale(got, want, rel=1e-5, msg=""):
    """max |got - want| <= rel * max |want|: sums taken in another order (routes sorted by token vs by slot)
    differ by rounding relative to the tensor's scale, not to each element."""
    err, scale = float((got - want).detach().abs().max()), float(want.detach().abs().max())
    assert err <= rel * scale + 1e-12, f"{msg}: max error {err:.3g} vs scale {scale:.3g}"


def make_experts(n, d=16, f=8, dtype=torch.float32, packed=True):
    torch.manual_seed(0)
    experts = RoutedExperts(MLP(d, f) for _ in range(n)).to(dtype)
    if packed:
        pack_experts(experts)
    return experts


# --- grouped GEMMs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("counts", [[3, 0, 5, 7], [0, 0, 0, 0], [0, 0, 9, 0]])
def test_grouped_linear_matches_the_loop_reference(dtype, packed, counts):
    experts = make_experts(len(counts), dtype=dtype, packed=packed)
    groups = [[e.gate_proj.weight, e.up_proj.weight] for e in experts]
    # packed CPU weights run torch._grouped_mm; unpacked ones the per-group loop (no weight copy)
    assert grouped_mm._backend(torch.zeros(1, 16, dtype=dtype), groups) == ("grouped_mm" if packed else "loop")
    x = torch.randn(sum(counts), 16, dtype=dtype, requires_grad=True)
    tokens = torch.tensor(counts)
    got = ops.grouped_linear(x, groups, tokens)
    dy = torch.randn_like(got)
    got.backward(dy)
    got_grads = [x.grad] + [w.grad for blocks in groups for w in blocks]
    x.grad = None
    experts.zero_grad(set_to_none=True)
    want = ops.grouped_linear_reference(x, groups, tokens)
    want.backward(dy)
    want_grads = [x.grad] + [w.grad for blocks in groups for w in blocks]
    # packed: torch._grouped_mm, on CPU bit for bit the per-group matmuls; the loop splits gate and up
    tol = dict(rtol=0, atol=0) if packed else (dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else
                                               dict(rtol=2e-2, atol=2e-2))
    torch.testing.assert_close(got, want, **tol)
    for g, r in zip(got_grads, want_grads):
        torch.testing.assert_close(g, r, **tol)
    # an empty group's weights get a zero gradient (not None): every expert is updated the same way everywhere
    assert all(experts[e].gate_proj.weight.grad is not None for e in range(len(counts)))


def test_grouped_linear_falls_back_where_grouped_mm_refuses():
    for dtype, d in [(torch.float64, 16), (torch.float32, 18), (torch.bfloat16, 12)]:  # fp64; rows not 16 bytes
        torch.manual_seed(0)
        groups = [[torch.randn(8, d, dtype=dtype)] for _ in range(3)]
        ops.pack_rows(groups)
        x = torch.randn(7, d, dtype=dtype)
        assert grouped_mm._backend(x, groups) == "loop"
        torch.testing.assert_close(ops.grouped_linear(x, groups, torch.tensor([2, 0, 5])),
                                   ops.grouped_linear_reference(x, groups, torch.tensor([2, 0, 5])))


def test_packed_views_of_a_zero_style_flat_buffer():
    """DeepSpeed's ZeRO-1/2 flatten a parameter group in module order and point every parameter at its slice:
    then each projection's [G, N, K] stack is a view of that buffer (no copy per call)."""
    experts = make_experts(4, packed=False)
    params = list(experts.parameters())
    assert ops.packed_view([[e.gate_proj.weight, e.up_proj.weight] for e in experts]) is None
    flat = torch.cat([p.detach().reshape(-1) for p in params] + [torch.zeros(5)])  # + ZeRO's alignment padding
    offset = 0
    for p in params:
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    gate_up = ops.packed_view([[e.gate_proj.weight, e.up_proj.weight] for e in experts])
    down = ops.packed_view([[e.down_proj.weight] for e in experts])
    assert gate_up.shape == (4, 16, 16) and down.shape == (4, 16, 8)
    assert gate_up.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert torch.equal(gate_up[2], torch.cat([experts[2].gate_proj.weight, experts[2].up_proj.weight]))
    assert torch.equal(down[3], experts[3].down_proj.weight)
    # not equally spaced (experts 1 and 2 swapped) -> no view
    assert ops.packed_view([[e.down_proj.weight] for e in (experts[0], experts[2], experts[1], experts[3])]) is None


def test_plain_moe_keeps_its_experts_packed():
    lc = tiny_config("tiny").language_config

    def packed(moe):
        return ops.packed_view([[e.gate_proj.weight, e.up_proj.weight] for e in moe.experts]) is not None

    moe = DeepseekV2MoE(lc)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    ids = [id(p) for p in moe.parameters()]
    assert packed(moe)
    assert packed(moe.to(torch.bfloat16)) and packed(moe.float())
    fresh = DeepseekV2MoE(lc)
    fresh.load_state_dict(before, assign=True)  # what from_pretrained does
    assert packed(fresh) and all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    assert [id(p) for p in moe.parameters()] == ids  # the same Parameter objects (optimizers keep them)


# --- the local dispatcher and the exact layer ------------------------------------------------------------------

ROUTINGS = {
    "random": lambda S, E, K, g: torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(S)]),
    "one_expert_takes_all": lambda S, E, K, g: torch.full((S, K), E - 1),
    "half_the_experts_empty": lambda S, E, K, g: torch.randint(0, E // 2, (S, K), generator=g),
}


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
def test_local_dispatch_is_the_per_token_sum(routing):
    S, E, K = 13, 8, 3
    experts = make_experts(E)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(S, 16, generator=g)
    idx = ROUTINGS[routing](S, E, K, g).long()
    w = torch.rand(S, K, generator=g)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = routed_experts(xa, Routing(idx, wa, None), experts, LocalDispatcher(E))
    assert_close_to_scale(y, per_token_moe(x, idx, w, experts), msg="y")
    dy = torch.randn_like(y)
    y.backward(dy)
    got = [xa.grad, wa.grad] + [p.grad for p in experts.parameters()]
    experts.zero_grad(set_to_none=True)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    per_token_moe(xr, idx, wr, experts).backward(dy)
    want = [xr.grad, wr.grad] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in experts.parameters()]
    for a, b in zip(got, want):
        assert_close_to_scale(a, b)


def test_permutation_helpers():
    idx = torch.tensor([[2, 0], [1, 2], [2, 1]])  # S=3, K=2
    order = sort_routes(idx, 4)
    assert order.counts_E.tolist() == [1, 2, 3, 0]
    assert order.order_N.tolist() == [1, 2, 5, 0, 3, 4]  # route ids s*K+k by expert, stable
    assert torch.equal(order.position_N[order.order_N], torch.arange(6))
    x = torch.arange(3.0)[:, None].repeat(1, 4)
    assert permute_routes(x, order)[:, 0].tolist() == [0, 1, 2, 0, 1, 2]
    y = unpermute_combine(permute_routes(x, order), torch.ones(3, 2), order)
    assert torch.equal(y, 2 * x)
    # received rows in (source rank, local expert) blocks -> grouped by local expert
    counts = torch.tensor([[2, 1], [0, 3]])  # rank 0 sent 2 rows for expert 0, 1 for expert 1; rank 1: 0 and 3
    perm, inverse = group_by_local_expert(counts, 6)
    assert perm.tolist() == [0, 1, 2, 3, 4, 5]  # already grouped: expert 0 gets rows 0-1, expert 1 rows 2-5
    counts = torch.tensor([[1, 2], [3, 0], [1, 1]])  # 3 sources, 2 local experts; received blocks in source order
    perm, inverse = group_by_local_expert(counts, 8)
    # received: [s0e0: 0] [s0e1: 1 2] [s1e0: 3 4 5] [s1e1: -] [s2e0: 6] [s2e1: 7]
    assert perm.tolist() == [0, 3, 4, 5, 6, 1, 2, 7]
    assert torch.equal(perm[inverse], torch.arange(8))


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
def test_exact_layer_equals_deepspeeds_capacity_layer_on_one_process(routing):
    """EP=1, no process group: the same router, experts and inputs through ExactSplitMOELayer and DeepSpeed's
    MOELayer give the same output, balance loss and gradients, whatever the imbalance (the capacity path pads
    every expert to the busiest one's load)."""
    from recipe.parallel.experts import ExactSplitMOELayer, ExpertParallelMoE

    lc = tiny_config("base").language_config
    exact, capacity = ExpertParallelMoE(lc, 1, "exact").train(), ExpertParallelMoE(lc, 1, "capacity").train()
    assert isinstance(exact.moe.deepspeed_moe, ExactSplitMOELayer)
    capacity.load_state_dict(exact.state_dict())
    assert list(exact.state_dict()) == list(capacity.state_dict())
    forced = ROUTINGS[routing]
    for m in (exact, capacity):  # force the routing: the router's choice, then its own weights for it
        router = m.router
        g = torch.Generator().manual_seed(3)

        def route(x_SD, router=router, g=g):
            scores = router.scores(x_SD)
            idx = forced(x_SD.shape[0], lc.n_routed_experts, lc.num_experts_per_tok, g).long()
            return Routing(idx, scores.gather(1, idx) * 2.0, scores)

        router.forward = route
    x = torch.randn(2, 7, lc.hidden_size)
    seg = torch.tensor([[1, 1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])
    outs = []
    for m in (exact, capacity):
        xm = x.clone().requires_grad_()
        y, aux = m(xm, seg)
        (y.square().sum() + aux).backward()
        outs.append((y, aux, xm.grad, {n: p.grad for n, p in m.named_parameters()}))
    (y1, a1, dx1, g1), (y2, a2, dx2, g2) = outs
    assert_close_to_scale(y1, y2, msg="y")
    torch.testing.assert_close(a1, a2)
    assert_close_to_scale(dx1, dx2, msg="dx")
    for n in g1:
        assert_close_to_scale(g1[n], g2[n], msg=n)


def test_moe_dispatcher_setting():
    from recipe.config import ConfigError
    from recipe.train_config import TrainConfig

    paths = {"model_dir": "m", "train_data": "d", "image_root": "i"}
    assert TrainConfig.from_dict(paths).moe_dispatcher == "exact"
    assert TrainConfig.from_dict({**paths, "moe_dispatcher": "capacity"}).moe_dispatcher == "capacity"
    with pytest.raises(ConfigError, match='recipe.moe_dispatcher="padded": expected "exact" or "capacity"'):
        TrainConfig.from_dict({**paths, "moe_dispatcher": "padded"})


# --- several processes ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("nprocs", [2, 4])
def test_all_to_all_dispatcher_is_exact_on_gloo_ranks(tmp_path, nprocs):
    out = tmp_path / f"dispatch-{nprocs}.json"
    torchrun(WORKER, nprocs, ["--out", str(out)], str(out) + ".log")
    results = json.loads(out.read_text())
    assert len(results) == 20
    for name, r in results.items():
        fp32 = name.endswith("float32")
        assert r["y_vs_per_token"] < (2e-6 if fp32 else 1e-2), name
        # bf16: one rounding of the fp32 sum, whose order differs (per rank, then over ranks)
        assert r["y_vs_reference"] < (2e-6 if fp32 else 1e-2), name
        for key in ("dx", "dweight", "dexperts"):
            assert r[key] < (2e-6 if fp32 else 2e-2), (name, key, r[key])
    # the forced routings really were imbalanced: one rank received everything, the others nothing
    assert results["all_to_expert_0/S7/E8/float32"]["rows_received"] == [7 * 3 * nprocs] + [0] * (nprocs - 1)
    assert results["all_to_last_rank/S7/E8/float32"]["rows_received"] == [0] * (nprocs - 1) + [7 * 3 * nprocs]
    # a token travels once per destination rank, not once per route: 7 tokens x 3 routes, one rank -> 7 rows sent
    assert results["all_to_expert_0/S7/E8/float32"]["rows_sent"] == [7] * nprocs
    assert results["own_rank_only/S7/E8/float32"]["rows_sent"] == [7] * nprocs
    random = results["random/S5/E8/float32"]
    assert all(r <= min(5 * 3, 5 * nprocs) for r in random["rows_sent"]) and sum(random["rows_sent"]) >= 5 * nprocs


def run_driver(tmp_path, ckpt, nprocs, stages, ep, dispatcher, steps=3, gas=2):
    out = tmp_path / f"pp{stages}-ep{ep}-{dispatcher}.json"
    torchrun(DRIVER, nprocs, ["--ckpt", ckpt, "--stages", str(stages), "--ep", str(ep), "--steps", str(steps),
                              "--gas", str(gas), "--moe-dispatcher", dispatcher, "--out", str(out)],
             str(out) + ".log")
    got = json.loads(out.read_text())
    return got["losses"], [e["grad_norm"] for e in got["extras"]]


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    from helpers.reference import reference_run

    ckpt = tiny_ckpt(like="base", image_size=42)
    return ckpt, reference_run(ckpt, global_batch=4, steps=3)


@pytest.mark.slow
@pytest.mark.parametrize("stages, ep, dispatchers", [
    (2, 1, ["exact"]), (2, 2, ["exact", "capacity"]),
    (1, 1, ["exact"]), (1, 2, ["exact"]), (1, 4, ["exact", "capacity"]),
])
def test_exact_path_equals_plain_model_and_capacity_path(reference, tmp_path, stages, ep, dispatchers):
    """4 ranks, fp32: losses and pre-clip gradient norms of 3 steps (clipping at 1.0 active) equal the plain
    model's on one process, for the exact path and DeepSpeed's capacity path."""
    ckpt, want = reference
    for dispatcher in dispatchers:
        losses, norms = run_driver(tmp_path, ckpt, 4, stages, ep, dispatcher, gas=2 if stages == 2 else 1)
        assert losses == pytest.approx(want["losses"], rel=RTOL), dispatcher
        assert norms == pytest.approx(want["grad_norms"], rel=RTOL), dispatcher
    assert max(want["grad_norms"]) > 1.0  # clipping changed the updates, so the norms had to be right
