"""The MoE block on DeepSpeed's ``MoE`` layer with expert parallelism, routed by our DeepSeek router.

DeepSpeed builds the expert-parallel groups across pipeline stages, reduces expert gradients over the
expert-data-parallel ranks only and saves experts by global id; it recognises MoE layers only as
``deepspeed.moe.layer.MoE`` instances, so we keep that wrapper (and its ``deepspeed_moe.gate`` /
``deepspeed_moe.experts.deepspeed_experts.{e}`` names) and choose what runs inside it (``recipe.moe_dispatcher``):

- ``"exact"`` (default): :class:`ExactSplitMOELayer`, a subclass of DeepSpeed's ``MOELayer`` whose forward reads
  route -> dispatch -> experts -> combine: our router, :class:`recipe.parallel.dispatch.AllToAllDispatcher`
  (``all_to_all_single`` with the exact split sizes; :class:`recipe.model.moe.LocalDispatcher` at EP=1), the
  local experts as grouped GEMMs (:func:`recipe.model.moe.grouped_experts`), the reverse exchange and the fp32
  gate-weighted combine. Same code as the single-device model; no capacity, no padding, nothing dropped.
- ``"capacity"``: DeepSpeed 0.19's own ``MOELayer`` with :class:`DeepSeekGate`. It calls
  ``gate(tokens[S, D], used_token, True, use_tutel)`` and unpacks 7 values: ``l_aux, capacity C, num experts E,
  indices [K, S], locations [K, S] (< C), gates [K, S] fp32, exp_counts [E]``; then scatters tokens into an
  [E, C, D] buffer, all-to-alls it over the EP group (split evenly, so C must be equal on every EP rank), runs the
  local experts and combines with the gates in fp32. Dropless: C is the largest expert load of the step,
  all-reduced (MAX) over the EP group, so expert GEMM rows and all-to-all bytes grow with routing imbalance
  (``E * C * P / routes`` times the exact path's; ``bench/moe_block.py`` prints it).

Both give the same losses and gradients (tests/test_moe_dispatch.py). Shape legend: S tokens, D hidden,
E routed experts, K experts per token, P EP ranks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer
from torch import nn

from recipe.config import LanguageConfig
from recipe.model.moe import (
    MLP,
    LocalDispatcher,
    MoEGate,
    RoutedExperts,
    Routing,
    TokenDispatcher,
    balance_groups,
    expert_load,
    load_balance_loss,
    pack_experts,
    routed_experts,
)
from recipe.parallel.dispatch import AllToAllDispatcher

MOE_DISPATCHERS = ("exact", "capacity")


def slot_locations(indices_KS: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of every (slot, token) route inside its expert's buffer, [K, S], and the load per expert [E].

    Routes are numbered per expert in (slot, token) order, as DeepSpeed's own gates do.
    """
    flat = indices_KS.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)
    order = flat.argsort(stable=True)
    starts = counts.cumsum(0) - counts
    pos = torch.empty_like(flat)
    pos[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return pos.view_as(indices_KS), counts


class DeepSeekGate(nn.Module):
    """Adapter from our :class:`MoEGate` (as ``router``) to the 7-value gate interface of DeepSpeed's MOELayer.

    ``used_token`` carries the balance-group id of every token ([S] int64, -1 = padding), so the aux loss keeps
    the plain model's per-sample statistics. The aux loss is computed in training mode when its coefficient is
    positive; it is returned as ``l_aux`` and added to the loss by the pipeline, never injected into gradients.
    """

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.router = MoEGate(cfg)
        self.num_experts = cfg.n_routed_experts
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.seq_aux = cfg.seq_aux
        self.ep_group = None
        self.last_capacity = 0                           # C of the last call (EP-group max), for logs
        self.register_buffer("step_load", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def take_step_load(self) -> torch.Tensor:
        """Tokens routed to each expert since the last call ([E] int64), and reset the count."""
        load = self.step_load.clone()
        self.step_load.zero_()
        return load

    def route(self, tokens_SD: torch.Tensor, used_token: Optional[torch.Tensor] = None
              ) -> tuple[Routing, torch.Tensor, torch.Tensor]:
        """Routing of ``tokens_SD`` [S, D], the balance loss (fp32 scalar, 0 outside training or with alpha 0)
        and the load per expert [E] int64 (this rank's tokens). Shared by both dispatchers."""
        routing = self.router(tokens_SD)
        load = expert_load(routing.topk_idx, self.num_experts)
        # Routed tokens per expert since the last take_step_load(), for the optional bias-balancing update.
        # Activation checkpointing replays forwards and so counts every token twice; the update only uses the
        # sign of (mean load - load), which a uniform factor does not change.
        self.step_load += load.detach()
        if self.training and self.aux_loss_alpha > 0:
            if used_token is None:
                used_token = torch.zeros(tokens_SD.shape[0], dtype=torch.long, device=tokens_SD.device)
            groups = used_token.long()
            n_groups = int(groups.max()) + 1 if groups.numel() else 0
            l_aux = load_balance_loss(routing.scores, routing.topk_idx, groups, n_groups, self.aux_loss_alpha,
                                      self.seq_aux)
        else:
            l_aux = routing.scores.new_zeros(())
        return routing, l_aux, load

    def forward(self, tokens_SD: torch.Tensor, used_token: Optional[torch.Tensor] = None, sparse_routes: bool = True,
                use_tutel: bool = False):
        """DeepSpeed 0.19's 7-value gate interface (the capacity path)."""
        if not sparse_routes or use_tutel:
            raise NotImplementedError("DeepSeekGate implements DeepSpeed's sparse-route gate interface only")
        routing, l_aux, load = self.route(tokens_SD, used_token)
        indices = routing.topk_idx.t().contiguous()            # [K, S]
        locations, _ = slot_locations(indices, self.num_experts)
        capacity = load.max().reshape(1) if load.numel() else load.new_zeros(1)
        if self.ep_group is not None and dist.get_world_size(group=self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        self.last_capacity = int(capacity)
        gates = routing.topk_weight.t().contiguous()           # [K, S] fp32
        return (l_aux, max(self.last_capacity, 1), self.num_experts, indices.int(), locations.int(), gates,
                load)


class GroupedExperts(nn.Module):
    """Takes the place of DeepSpeed's ``Experts`` in :class:`ExactSplitMOELayer`, holding the same modules under
    the same names (``deepspeed_experts.{e}``, with the ``allreduce=False`` / ``group_name`` attributes DeepSpeed
    set on their parameters) as :class:`recipe.model.moe.RoutedExperts`: ``forward(x_ND, tokens_per_expert)``
    runs the local experts as grouped GEMMs on rows grouped by local expert."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.deepspeed_experts = RoutedExperts(experts.deepspeed_experts)
        self.num_local_experts = len(self.deepspeed_experts)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_G: torch.Tensor) -> torch.Tensor:
        return self.deepspeed_experts(x_ND, tokens_per_expert_G)


class ExactSplitMOELayer(MOELayer):
    """DeepSpeed's ``MOELayer`` with the exact-split forward: route -> dispatch -> experts -> combine.

    Built from the ``MOELayer`` that ``MoE`` made, taking over its gate (a :class:`DeepSeekGate`), experts (as
    :class:`GroupedExperts`) and group settings, so parameter names, the expert-parallel group DeepSpeed sets
    through ``_set_ep_group``, the experts' ``allreduce=False`` / ``group_name`` attributes (set by DeepSpeed's
    ``Experts``) and the engine's ``isinstance(..., MOELayer)`` bookkeeping stay as they are. Sets ``l_aux`` and
    ``exp_counts`` as its parent does; DeepSpeed's wall-clock breakdown timers are not filled.
    """

    def __init__(self, layer: MOELayer):
        super().__init__(layer.gate, GroupedExperts(layer.experts), layer.ep_group_name, layer.ep_size,
                         layer.num_local_experts)

    def dispatcher(self) -> TokenDispatcher:
        num_experts = self.gate.num_experts
        if self.ep_size == 1:
            return LocalDispatcher(num_experts)
        if self.ep_group is None:
            raise RuntimeError("expert-parallel MoE layer used before deepspeed.initialize set its EP group")
        return AllToAllDispatcher(num_experts, self.ep_group, self.ep_size)

    def forward(self, hidden_states: torch.Tensor, used_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        x_SD = hidden_states.reshape(-1, hidden_states.shape[-1])
        routing, self.l_aux, self.exp_counts = self.gate.route(x_SD, used_token)
        y_SD = routed_experts(x_SD, routing, self.experts, self.dispatcher())
        return y_SD.view(hidden_states.shape)


class ExpertParallelMoE(nn.Module):
    """``mlp`` of an MoE decoder layer under DeepSpeed: ``moe`` (DeepSpeed MoE with our router and the routed
    experts, EP-sharded) and ``shared_experts`` (a dense SwiGLU beside it, outside the MoE module so DeepSpeed
    never files it as a routed expert)."""

    def __init__(self, cfg: LanguageConfig, ep_size: int, dispatcher: str = "exact"):
        super().__init__()
        if dispatcher not in MOE_DISPATCHERS:
            raise ValueError(f"moe_dispatcher={dispatcher!r}: expected one of {MOE_DISPATCHERS}")
        self.moe = MoE(hidden_size=cfg.hidden_size, expert=MLP(cfg.hidden_size, cfg.moe_intermediate_size),
                       num_experts=cfg.n_routed_experts, ep_size=ep_size, k=cfg.num_experts_per_tok,
                       drop_tokens=False, use_rts=False)
        self.moe.deepspeed_moe.gate = DeepSeekGate(cfg)
        self.dispatcher = dispatcher
        if dispatcher == "exact":
            self.moe.deepspeed_moe = ExactSplitMOELayer(self.moe.deepspeed_moe)
            # one storage for the local experts' weights, so the grouped GEMMs read views (ZeRO's flat buffers
            # later give the same layout); kept through .to() and friends by _apply below
            pack_experts(self.moe.deepspeed_moe.experts.deepspeed_experts)
        self.shared_experts = MLP(cfg.hidden_size, cfg.shared_intermediate_size) if cfg.n_shared_experts else None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.dispatcher == "exact":
            pack_experts(self.moe.deepspeed_moe.experts.deepspeed_experts)
        return self

    @property
    def router(self) -> MoEGate:
        return self.moe.deepspeed_moe.gate.router

    def forward(self, x_BTD: torch.Tensor, segment_ids_BT: Optional[torch.Tensor] = None):
        """x [B, T, D], segment ids [B, T] (0 = padding) -> (y [B, T, D], aux loss fp32 scalar).

        Same contract as the single-device :class:`recipe.model.moe.DeepseekV2MoE`."""
        B, T, _ = x_BTD.shape
        groups, _ = balance_groups(B, T, segment_ids_BT, x_BTD.device)
        y, l_aux, _ = self.moe(x_BTD, groups)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_BTD)
        return y, l_aux
