"""DeepSeek-V2 mixture of experts: router, routed experts, shared experts, the sequence-level load-balancing loss,
and the dispatch machinery every MoE layer shares (single device and expert parallel).

The forward reads as route -> dispatch -> experts -> combine: the router picks K experts per token (fp32); a
:class:`TokenDispatcher` brings each route's token row to its expert, grouped by expert (:class:`LocalDispatcher`
here, a permutation; the expert-parallel all-to-all one is ``recipe/parallel/dispatch.py``); the experts run as one
grouped GEMM per projection (:class:`RoutedExperts`, ``ops.grouped_linear``); combine brings the rows back and sums
them weighted, in fp32. Dropless and exact: one row per route, no capacity, no padding. Routing math is pure
functions of fp32 scores, reused unchanged by the DeepSpeed wrapper (``recipe/parallel/experts.py``).

Shape legend: S tokens (flattened batch), D hidden, E routed experts, K experts per token, F expert width,
N = S*K routes, G balance groups (a sample, or a packed segment, without padding) or, for grouped GEMMs, experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from recipe.config import LanguageConfig
from recipe.model import ops
from recipe.model.lora import LoraLinear, grouped_lora_delta


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------------------------------
# Routing (pure functions of fp32 scores)
# ---------------------------------------------------------------------------------------------------------------

def select_experts(scores_SE: torch.Tensor, method: str, k: int, n_group: Optional[int] = None,
                   topk_group: Optional[int] = None,
                   correction_bias_E: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices of the K experts each token is sent to, [S, K] int64.

    greedy: top-K of the scores. group_limited_greedy: keep the ``topk_group`` groups with the highest max score,
    top-K inside them. noaux_tc: the same on ``scores + correction_bias`` with groups ranked by the sum of their
    top-2 biased scores (the bias only steers the choice; the weights come from the unbiased scores).
    """
    S, E = scores_SE.shape
    if method == "greedy":
        return torch.topk(scores_SE, k=k, dim=-1, sorted=False).indices
    if method == "group_limited_greedy":
        choice = scores_SE
        group_scores = choice.view(S, n_group, -1).max(dim=-1).values
    elif method == "noaux_tc":
        choice = scores_SE + correction_bias_E.float()[None]
        group_scores = choice.view(S, n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
    else:
        raise ValueError(f"unknown topk_method {method!r}")
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    expert_mask = group_mask[:, :, None].expand(S, n_group, E // n_group).reshape(S, E).bool()
    return torch.topk(choice.masked_fill(~expert_mask, 0.0), k=k, dim=-1, sorted=False).indices


def routing_weights(scores_SE: torch.Tensor, topk_idx_SK: torch.Tensor, norm_topk_prob: bool,
                    scaling_factor: float) -> torch.Tensor:
    """Combine weights [S, K] fp32: the chosen (unbiased) scores, renormalised to sum 1 when ``norm_topk_prob``
    (and K > 1), times ``routed_scaling_factor``."""
    w = scores_SE.gather(1, topk_idx_SK)
    if w.shape[1] > 1 and norm_topk_prob:
        return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * scaling_factor
    return w * scaling_factor


def balance_groups(batch: int, seq: int, segment_ids_BT: Optional[torch.Tensor],
                   device: torch.device) -> tuple[torch.Tensor, int]:
    """Group id per token for the balance statistics, [B*T] int64 (-1 = excluded), and the group count.

    Without segment ids every row is one group and every token counts (the original's statistics). With them,
    each (row, segment) is a group and padding (segment 0) is excluded: padding is no real load, while image
    tokens are routed and cost expert compute, so they count.
    """
    if segment_ids_BT is None:
        return torch.arange(batch, device=device).repeat_interleave(seq), batch
    seg = segment_ids_BT.reshape(-1).long()
    row = torch.arange(batch, device=device).repeat_interleave(seq)
    key = row * (int(seg.max()) + 1) + seg
    uniq, group = torch.unique(key[seg > 0], return_inverse=True)
    out = torch.full_like(seg, -1)
    out[seg > 0] = group
    return out, int(uniq.numel())


def load_balance_loss(scores_SE: torch.Tensor, topk_idx_SK: torch.Tensor, groups_S: torch.Tensor,
                      num_groups: int, alpha: float, seq_aux: bool) -> torch.Tensor:
    """DeepSeek-V2 expert-balance loss (fp32 scalar), already multiplied by ``alpha``.

    seq_aux: per group g, f[g,e] = E / (n_g K) * #(slots routed to e), P[g,e] = mean score of e over the group's
    tokens; loss = alpha * mean_g sum_e f P. Otherwise the same over all counted tokens at once.
    """
    S, E = scores_SE.shape
    K = topk_idx_SK.shape[1]
    keep = groups_S >= 0
    if not seq_aux:
        scores, idx = scores_SE[keep], topk_idx_SK[keep]
        f = torch.zeros(E, device=scores.device).index_add_(
            0, idx.reshape(-1), torch.ones(idx.numel(), device=scores.device)) * E / max(idx.numel(), 1)
        return (scores.mean(0) * f).sum() * alpha
    g = groups_S[keep]
    scores, idx = scores_SE[keep], topk_idx_SK[keep]
    n_g = torch.zeros(num_groups, device=scores.device).index_add_(0, g, torch.ones_like(g, dtype=torch.float32))
    counts_GE = torch.zeros(num_groups * E, device=scores.device).index_add_(
        0, (g[:, None] * E + idx).reshape(-1), torch.ones(idx.numel(), device=scores.device)).view(num_groups, E)
    f_GE = counts_GE * E / (n_g[:, None] * K)
    P_GE = torch.zeros(num_groups, E, device=scores.device).index_add_(0, g, scores) / n_g[:, None]
    return (f_GE * P_GE).sum(dim=1).mean() * alpha


@dataclass
class Routing:
    topk_idx: torch.Tensor     # [S, K] int64
    topk_weight: torch.Tensor  # [S, K] fp32
    scores: torch.Tensor       # [S, E] fp32, unbiased


class MoEGate(nn.Module):
    """Router (``mlp.gate``): fp32 logits x W^T, softmax or sigmoid scores, expert choice, combine weights.

    ``e_score_correction_bias`` (noaux_tc only) is a persistent buffer: saved and loaded with the weights, never
    trained by gradients (it only enters through the choice); :meth:`update_correction_bias` implements the
    optional aux-loss-free balancing update.
    """

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_routed_experts = cfg.n_routed_experts
        self.topk_method = cfg.topk_method
        self.scoring_func = cfg.scoring_func
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts), persistent=True)
        else:
            self.e_score_correction_bias = None

    def scores(self, x_SD: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x_SD.float(), self.weight.float())
        return logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()

    def forward(self, x_SD: torch.Tensor) -> Routing:
        scores = self.scores(x_SD)
        idx = select_experts(scores, self.topk_method, self.top_k, self.n_group, self.topk_group,
                             self.e_score_correction_bias)
        w = routing_weights(scores, idx, self.norm_topk_prob, self.routed_scaling_factor)
        return Routing(idx, w, scores)

    @torch.no_grad()
    def update_correction_bias(self, tokens_per_expert_E: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3 style): raise the bias of under-loaded experts and lower that of
        over-loaded ones by ``rate``. Off unless the training config enables it."""
        load = tokens_per_expert_E.float()
        self.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load).to(self.e_score_correction_bias))


# ---------------------------------------------------------------------------------------------------------------
# Dispatch -> experts -> combine (dropless, exact: no capacity, no padding)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ExpertOrder:
    """The routes (token s, slot k; route id s*K + k) sorted by expert, stably (by route id within an expert)."""
    order_N: torch.Tensor      # [N] route id at each sorted position (N = S*K)
    position_N: torch.Tensor   # [N] sorted position of each route id (the inverse permutation)
    counts_E: torch.Tensor     # [E] int64 routes per expert
    k: int                     # routes per token


def expert_load(topk_idx_SK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routes per expert, [E] int64 (a scatter-add: unlike bincount, no host synchronisation on accelerators)."""
    flat = topk_idx_SK.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def sort_routes(topk_idx_SK: torch.Tensor, num_experts: int) -> ExpertOrder:
    """Sort the routes by expert (no host synchronisation)."""
    flat = topk_idx_SK.reshape(-1)
    order = flat.argsort(stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return ExpertOrder(order, position, expert_load(topk_idx_SK, num_experts), topk_idx_SK.shape[1])


class _GatherRoutes(torch.autograd.Function):
    """x [S, D] -> one row per route in expert order [N, D]. The backward sums each token's K route gradients
    (a gather and a sum over K, in slot order: no scatter-add, deterministic)."""

    @staticmethod
    def forward(ctx, x_SD, order_N, position_N, k):
        ctx.save_for_backward(position_N)
        ctx.shape = (x_SD.shape[0], k, x_SD.shape[1])
        return x_SD.index_select(0, order_N // k)

    @staticmethod
    def backward(ctx, grad_ND):
        (position_N,) = ctx.saved_tensors
        return grad_ND.index_select(0, position_N).view(ctx.shape).sum(1), None, None, None


class PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm`` of x's rows; the backward is the inverse gather ``grad[inverse]``
    (each row lands once, so nothing is accumulated)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_routes(x_SD: torch.Tensor, order: ExpertOrder) -> torch.Tensor:
    """Token rows, once per route, grouped by expert: [N, D] (N = S*K), block e has ``order.counts_E[e]`` rows."""
    return _GatherRoutes.apply(x_SD, order.order_N, order.position_N, order.k)


def unpermute_combine(y_ND: torch.Tensor, topk_weight_SK: torch.Tensor, order: ExpertOrder) -> torch.Tensor:
    """Expert outputs back to their tokens, weighted and summed over the K slots in fp32: [S, D] in y's dtype."""
    S, K = topk_weight_SK.shape
    y_SKD = PermuteRows.apply(y_ND, order.position_N, order.order_N).view(S, K, y_ND.shape[-1])
    return torch.bmm(topk_weight_SK.float().unsqueeze(1), y_SKD.float()).squeeze(1).to(y_ND.dtype)


class TokenDispatcher:
    """Brings every route's token row to the rank that holds its expert and the outputs back; the only part of
    the MoE block that knows where experts live. ``dispatch`` returns the rows for this rank's local experts,
    grouped by local expert, their counts (a device tensor), and a handle that ``combine`` needs."""

    num_experts: int

    def dispatch(self, x_SD: torch.Tensor, topk_idx_SK: torch.Tensor):
        raise NotImplementedError

    def combine(self, y_ND: torch.Tensor, topk_weight_SK: torch.Tensor, handle) -> torch.Tensor:
        raise NotImplementedError


class LocalDispatcher(TokenDispatcher):
    """All experts on this device: dispatch is a permutation by expert, combine its inverse plus the weighted sum."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_SD: torch.Tensor, topk_idx_SK: torch.Tensor):
        order = sort_routes(topk_idx_SK, self.num_experts)
        return permute_routes(x_SD, order), order.counts_E, order

    def combine(self, y_ND: torch.Tensor, topk_weight_SK: torch.Tensor, handle: ExpertOrder) -> torch.Tensor:
        return unpermute_combine(y_ND, topk_weight_SK, handle)


def expert_weight_groups(experts) -> tuple[list, list]:
    """The experts' weights as grouped-GEMM operands: [gate_proj, up_proj] per expert (one GEMM over both,
    N = 2F) and [down_proj] per expert."""
    return ([[e.gate_proj.weight, e.up_proj.weight] for e in experts], [[e.down_proj.weight] for e in experts])


def pack_experts(experts) -> None:
    """Lay the experts' weights out in one storage (per expert: gate, up, down) so the grouped GEMMs read them
    as strided views instead of copies; under DeepSpeed the ZeRO flat buffer already has this layout."""
    ops.pack_rows([[e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight] for e in experts])


_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def expert_lora(experts) -> Optional[dict]:
    """Which projections carry LoRA in every expert ({name: bool}), or None when the grouped path cannot run them:
    some experts of a projection adapted and others not, or a layer that is neither ``nn.Linear`` nor our
    :class:`LoraLinear` (e.g. a PEFT wrapper, whose forward the grouped GEMMs would bypass)."""
    kinds = {}
    for name in _PROJECTIONS:
        layers = [getattr(e, name) for e in experts]
        if not all(type(m) in (nn.Linear, LoraLinear) for m in layers):
            return None
        adapted = [isinstance(m, LoraLinear) for m in layers]
        if any(adapted) and not all(adapted):
            return None
        kinds[name] = bool(adapted) and adapted[0]
    return kinds


def grouped_experts(x_ND: torch.Tensor, tokens_per_expert_G: torch.Tensor, experts) -> torch.Tensor:
    """SwiGLU of every expert on its block of rows: two grouped GEMMs (gate+up, down). [N, D] -> [N, D].

    LoRA on a projection adds its update as two more grouped GEMMs (``grouped_lora_delta``); experts the grouped
    path cannot run (see :func:`expert_lora`) run one by one through their modules' forward."""
    lora = expert_lora(experts)
    if lora is None:
        return experts_reference(x_ND, tokens_per_expert_G, experts)
    gate_up, down = expert_weight_groups(experts)
    gate, up = ops.grouped_linear(x_ND, gate_up, tokens_per_expert_G).chunk(2, dim=-1)
    if lora["gate_proj"]:
        gate = gate + grouped_lora_delta(x_ND, tokens_per_expert_G, [e.gate_proj for e in experts])
    if lora["up_proj"]:
        up = up + grouped_lora_delta(x_ND, tokens_per_expert_G, [e.up_proj for e in experts])
    h = F.silu(gate) * up
    y = ops.grouped_linear(h, down, tokens_per_expert_G)
    if lora["down_proj"]:
        y = y + grouped_lora_delta(h, tokens_per_expert_G, [e.down_proj for e in experts])
    return y


class RoutedExperts(nn.ModuleList):
    """The routed experts, ``experts.{e}`` (one SwiGLU :class:`MLP` each, the checkpoint's names), called together:
    ``experts(x_ND, tokens_per_expert_G)`` runs every expert on its block of rows as grouped GEMMs."""

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_G: torch.Tensor) -> torch.Tensor:
        return grouped_experts(x_ND, tokens_per_expert_G, self)


def experts_reference(x_ND: torch.Tensor, tokens_per_expert_G: torch.Tensor, experts) -> torch.Tensor:
    """:func:`grouped_experts` as a loop over the expert modules (the reference)."""
    blocks = x_ND.split(tokens_per_expert_G.tolist())
    outs = [expert(block) for expert, block in zip(experts, blocks)]
    return torch.cat(outs) if outs else x_ND.new_zeros(0, x_ND.shape[-1])


def routed_experts(x_SD: torch.Tensor, routing: "Routing", experts: nn.Module,
                   dispatcher: TokenDispatcher) -> torch.Tensor:
    """The routed part of the MoE block: dispatch -> experts -> combine. [S, D] -> [S, D] in x's dtype.

    ``experts(x_ND, tokens_per_expert_G)`` computes the dispatcher's local experts (:class:`RoutedExperts`)."""
    x_ND, tokens_per_expert, handle = dispatcher.dispatch(x_SD, routing.topk_idx)
    y_ND = experts(x_ND, tokens_per_expert)
    return dispatcher.combine(y_ND, routing.topk_weight, handle)


def dispatch_local(x_SD: torch.Tensor, topk_idx_SK: torch.Tensor, topk_weight_SK: torch.Tensor,
                   experts: nn.ModuleList) -> torch.Tensor:
    """Dropless single-device MoE output [S, D] of all ``experts`` (SwiGLU :class:`MLP`s) for the given routes:
    :func:`routed_experts` with a :class:`LocalDispatcher`."""
    if not isinstance(experts, RoutedExperts):
        experts = RoutedExperts(experts)
    return routed_experts(x_SD, Routing(topk_idx_SK, topk_weight_SK, None), experts, LocalDispatcher(len(experts)))


class DeepseekV2MoE(nn.Module):
    """``mlp`` of an MoE layer: ``gate``, ``experts.{e}``, ``shared_experts``."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.aux_loss_alpha = cfg.aux_loss_alpha
        self.seq_aux = cfg.seq_aux
        self.gate = MoEGate(cfg)
        self.experts = RoutedExperts(MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = MLP(cfg.hidden_size, cfg.shared_intermediate_size) if cfg.n_shared_experts else None
        # Expert weights in one storage, so the grouped GEMMs read them without a copy; kept so after loading
        # (load_state_dict may assign new tensors) and after .to() / .float() / ... (they allocate new ones).
        pack_experts(self.experts)
        self.register_load_state_dict_post_hook(lambda module, incompatible: pack_experts(module.experts))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        pack_experts(self.experts)
        return self

    def forward(self, x_BTD: torch.Tensor, segment_ids_BT: Optional[torch.Tensor] = None):
        """Returns (y [B, T, D], aux loss fp32 scalar or None). The aux loss is computed in training mode when
        ``aux_loss_alpha > 0``, as in the original; the caller adds it to the loss."""
        B, T, D = x_BTD.shape
        x_SD = x_BTD.reshape(-1, D)
        routing = self.gate(x_SD)
        y = routed_experts(x_SD, routing, self.experts, LocalDispatcher(len(self.experts)))
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_SD)
        aux = None
        if self.training and self.aux_loss_alpha > 0:
            groups, n = balance_groups(B, T, segment_ids_BT, x_BTD.device)
            aux = load_balance_loss(routing.scores, routing.topk_idx, groups, n, self.aux_loss_alpha, self.seq_aux)
        return y.view(B, T, D), aux
