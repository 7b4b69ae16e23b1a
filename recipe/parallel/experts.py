"""The MoE block on DeepSpeed's ``MoE`` layer with expert parallelism, routed by our DeepSeek router.

DeepSpeed builds the expert-parallel groups across pipeline stages, reduces expert gradients over the
expert-data-parallel ranks only and saves experts by global id; it recognises MoE layers only as
``deepspeed.moe.layer.MoE`` instances, so we keep that wrapper and swap its gate for :class:`DeepSeekGate`.

DeepSpeed 0.19's ``MOELayer`` calls ``gate(tokens[S, D], used_token, True, use_tutel)`` and unpacks 7 values:
``l_aux, capacity C, num experts E, indices [K, S], locations [K, S] (< C), gates [K, S] fp32, exp_counts [E]``;
then scatters tokens into an [E, C, D] buffer, all-to-alls it over the EP group (split evenly, so C must be equal
on every EP rank), runs the local experts and combines with the gates in fp32. Dropless: C is the largest expert
load of the step, all-reduced (MAX) over the EP group.

Shape legend: S tokens, D hidden, E routed experts, K experts per token.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from recipe.config import LanguageConfig
from recipe.model.moe import MLP, MoEGate, balance_groups, load_balance_loss


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

    def forward(self, tokens_SD: torch.Tensor, used_token: Optional[torch.Tensor] = None, sparse_routes: bool = True,
                use_tutel: bool = False):
        if not sparse_routes or use_tutel:
            raise NotImplementedError("DeepSeekGate implements DeepSpeed's sparse-route gate interface only")
        routing = self.router(tokens_SD)
        indices = routing.topk_idx.t().contiguous()            # [K, S]
        locations, load = slot_locations(indices, self.num_experts)
        capacity = load.max().reshape(1)
        if self.ep_group is not None and dist.get_world_size(group=self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        self.last_capacity = int(capacity)
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
        gates = routing.topk_weight.t().contiguous()           # [K, S] fp32
        return (l_aux, max(self.last_capacity, 1), self.num_experts, indices.int(), locations.int(), gates,
                load)


class ExpertParallelMoE(nn.Module):
    """``mlp`` of an MoE decoder layer under DeepSpeed: ``moe`` (DeepSpeed MoE with our router and the routed
    experts, EP-sharded) and ``shared_experts`` (a dense SwiGLU beside it, outside the MoE module so DeepSpeed
    never files it as a routed expert)."""

    def __init__(self, cfg: LanguageConfig, ep_size: int):
        super().__init__()
        self.moe = MoE(hidden_size=cfg.hidden_size, expert=MLP(cfg.hidden_size, cfg.moe_intermediate_size),
                       num_experts=cfg.n_routed_experts, ep_size=ep_size, k=cfg.num_experts_per_tok,
                       drop_tokens=False, use_rts=False)
        self.moe.deepspeed_moe.gate = DeepSeekGate(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.shared_intermediate_size) if cfg.n_shared_experts else None

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
