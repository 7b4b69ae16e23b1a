"""Memory per pipeline stage and rank: the run's topology and optimizer wrapper from the DeepSpeed JSON, then
weights, gradients, optimizer state (DeepSpeed 0.19's ``BF16_Optimizer`` / ZeRO-1 layout), activations and
communication of each stage. The assumptions: ``docs/planner.md``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from recipe.checkpoint.dtypes import dtype_bytes
from recipe.config import ConfigError, VL2Config
from recipe.parallel import layout
from recipe.parallel.cost import ACT_BYTES, LayerInfo, Workload
from recipe.parallel.layout import CHECKPOINTED_KINDS
from recipe.train_config import RunLayout

GiB = 1024 ** 3
MOE_MAX_GROUP_SIZE = 178956971  # deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer default
BF16_ALIGNMENT_FACTOR = 2       # BF16_Optimizer.nccl_start_alignment_factor: flat buffers pad to 2 x group size
OPTIMIZER_STATE_BYTES = {"adam": 8, "adamw": 8, "fusedadam": 8, "lamb": 8, "onebitadam": 8, "zerooneadam": 8,
                         "onebitlamb": 8, "lion": 4, "muon": 4, "sgd": 4, "adagrad": 4}
# =================================================================================================================
# The run: topology and optimizer from the DeepSpeed JSON
# =================================================================================================================

@dataclass
class Topology:
    world_size: int
    pipeline_stages: int
    data_parallel: int
    expert_parallel: int
    micro_batch: int
    grad_accum_steps: int
    train_batch: int
    decoder_split: list
    parts: list
    seq_len: int
    activation_checkpointing: bool
    freeze: dict
    lora: Optional[dict]            # the recipe.lora block (None: full fine-tuning)
    optimizer: str                  # BF16_Optimizer | DeepSpeedZeroOptimizer (approximate) | ...
    grad_accum_bytes: int
    comm_bytes: int                 # bytes per element of the gradient all-reduce
    optimizer_state_bytes: int      # per parameter of this rank's partition

    @property
    def expert_data_parallel(self) -> int:
        return self.data_parallel // self.expert_parallel


def _dtype_bytes(name, default: int) -> int:
    """Bytes per element of a DeepSpeed dtype setting ("fp32", "bf16", ...), ``default`` when unset."""
    try:
        return dtype_bytes(name, default)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def topology(cfg: VL2Config, ds: dict, world_size: Optional[int] = None, seq_len: Optional[int] = None,
             **recipe_overrides) -> Topology:
    """Parallel layout and optimizer accounting of ``ds`` (a DeepSpeed JSON with a ``recipe`` block).

    The layout and batch sizes are train.py's own (:meth:`RunLayout.from_config`: world size ``world_size``, else
    train_batch_size / (micro-batch x GAS) x pipeline stages). ``recipe_overrides`` replace keys of the ``recipe``
    block (pipeline_stages, decoder_split, expert_parallel_size, ...).
    """
    rc = dict(ds.get("recipe", {}))
    rc.update({k: v for k, v in recipe_overrides.items() if v is not None})
    run = RunLayout.from_config(rc, ds, cfg, world_size)
    lc = cfg.language_config
    pp = run.pipeline_stages
    freeze = dict(rc.get("freeze", {}) or {})

    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    zero = int(ds.get("zero_optimization", {}).get("stage", 0))
    model_bytes = 2 if (bf16 or fp16) else 4
    accum = _dtype_bytes(ds.get("data_types", {}).get("grad_accum_dtype"), model_bytes)
    if bf16 and accum == 4 and zero == 1:
        opt_name = "BF16_Optimizer"
    elif bf16 and zero == 0 and pp > 1:
        opt_name = "BF16_Optimizer"
    elif zero >= 1:
        opt_name = "DeepSpeedZeroOptimizer (approximate accounting)"
    else:
        opt_name = "unwrapped (approximate accounting)"
    comm = _dtype_bytes(ds.get("communication_data_type"), model_bytes)
    opt_type = str(ds.get("optimizer", {}).get("type", "adamw")).lower().replace("_", "")
    state_bytes = 4 + OPTIMIZER_STATE_BYTES.get(opt_type, 8)   # fp32 master + optimizer state
    return Topology(world_size=run.world_size, pipeline_stages=pp, data_parallel=run.data_parallel,
                    expert_parallel=run.expert_parallel, micro_batch=run.micro_batch,
                    grad_accum_steps=run.grad_accum_steps, train_batch=run.global_batch,
                    decoder_split=list(run.decoder_split), parts=list(run.parts),
                    seq_len=int(seq_len or rc.get("max_seq_len") or lc.max_position_embeddings),
                    activation_checkpointing=bool(rc.get("activation_checkpointing", False)), freeze=freeze,
                    lora=rc.get("lora"), optimizer=opt_name, grad_accum_bytes=accum, comm_bytes=comm,
                    optimizer_state_bytes=state_bytes)


# =================================================================================================================
# Memory per stage
# =================================================================================================================

@dataclass
class StagePlan:
    stage: int
    first_layer: int
    last_layer: int
    decoder_layers: int
    moe_layers: int
    # parameters held by each rank of the stage
    dense_params: int
    dense_trainable: int
    expert_params_stage: int        # all experts of the stage's MoE layers
    expert_params_rank: int         # this rank's E/EP experts
    expert_trainable_rank: int
    buffers: int
    # bytes per rank
    weights_bytes: int              # bf16 weights (trainable ones inside padded flat buffers) + fp32 buffers
    lp_grad_bytes: int              # bf16 .grad of every trainable parameter
    grad_accum_bytes: int           # flat gradient accumulation buffers (whole groups, not partitioned)
    master_bytes: int               # fp32 master partition
    optimizer_bytes: int            # optimizer state of the partition (Adam: exp_avg + exp_avg_sq)
    state_bytes: int                # sum of the five above
    activation_per_mb_bytes: int    # one micro-batch, no checkpointing
    activation_per_mb_ckpt_bytes: int  # one micro-batch, layer inputs kept (checkpointed layers)
    in_flight: int                  # micro-batches whose activations the 1F1B schedule holds at once
    activation_bytes: int           # peak activation memory with the configured checkpointing
    activation_bytes_other: int     # the same with the checkpointing switch flipped
    step_transient_bytes: int       # grad all-reduce cast copy + optimizer temporaries (after backward)
    peak_bytes: int
    fits: bool
    forward_flops_per_sample: float
    alltoall_bytes_per_step: int    # sent by one rank, MoE dispatch + combine, forward + backward (+ recompute)
    p2p_send_bytes_per_step: int    # activations to the next stage (forward) or gradients to the previous
    allreduce_bytes_per_step: int   # gradient all-reduce payload sent by one rank (ring)


def _padded(n: int, group: int) -> int:
    align = BF16_ALIGNMENT_FACTOR * group
    return -(-n // align) * align if n else 0


def _expert_groups(local_expert_tensors: list) -> list[int]:
    """Element counts of the MoE optimizer groups DeepSpeed forms from this rank's expert parameters."""
    groups, cur = [], 0
    for n in local_expert_tensors:
        if cur + n <= MOE_MAX_GROUP_SIZE:
            cur += n
        else:
            groups.append(cur)
            cur = n
    if cur:
        groups.append(cur)
    return groups


def stage_plan(cfg: VL2Config, infos: Sequence[LayerInfo], topo: Topology, stage: int, lo: int, hi: int,
               usable_bytes: float, workload: Workload) -> StagePlan:
    """Memory, FLOPs and communication of pipeline stage ``stage`` holding layers ``lo`` .. ``hi - 1``."""
    layers = infos[lo:hi]
    ep, dp, edp = topo.expert_parallel, topo.data_parallel, topo.expert_data_parallel
    dense = sum(info.dense for info in layers)
    dense_tr = dense - sum(info.dense_frozen for info in layers)
    expert_stage = sum(info.expert for info in layers)
    expert_rank = expert_stage // ep
    expert_tr_rank = (expert_stage - sum(info.expert_frozen for info in layers)) // ep
    buffers = sum(info.buffers for info in layers)
    local_tensors = []
    for info in layers:  # expert_tensor_numels: one expert's trainable tensors (all of them, or its adapters)
        if info.expert and info.expert_frozen < info.expert:
            trained = info.expert - info.expert_frozen
            local_tensors += info.expert_tensor_numels * (trained // sum(info.expert_tensor_numels) // ep)
    groups = [(dense_tr, dp)] if dense_tr else []
    groups += [(n, edp) for n in _expert_groups(local_tensors)]
    padded = [(_padded(n, g), g) for n, g in groups]
    trainable = dense_tr + expert_tr_rank
    flat = sum(n for n, _ in padded)
    # + the router's per-expert token counter of every MoE layer (int64, runtime only, not in checkpoints)
    load_counters = 8 * sum(cfg.language_config.n_routed_experts for info in layers if info.is_moe)
    weights = 2 * (flat + (dense - dense_tr) + (expert_rank - expert_tr_rank)) + 4 * buffers + load_counters
    lp_grads = 2 * trainable
    accum = topo.grad_accum_bytes * flat
    partition = sum(n // g for n, g in padded)
    master = 4 * partition
    optim = (topo.optimizer_state_bytes - 4) * partition
    if not topo.optimizer.startswith("BF16_Optimizer"):
        accum = 4 * sum(n // g for n, g in padded)  # ZeRO-1 optimizer: an fp32 gradient partition
    states = weights + lp_grads + accum + master + optim

    in_flight = min(topo.pipeline_stages - stage, topo.grad_accum_steps)
    full = sum(info.act_full for info in layers)
    ckpt_keep = sum(info.act_input if info.kind in CHECKPOINTED_KINDS else info.act_full for info in layers)
    recompute = max([info.act_full for info in layers if info.kind in CHECKPOINTED_KINDS], default=0)
    lc = cfg.language_config
    T = workload.micro_batch * workload.seq_len
    boundary = ACT_BYTES * T * lc.hidden_size          # hidden states between stages
    pipe_buffers = boundary * ((stage > 0) + (stage < topo.pipeline_stages - 1))
    act_ckpt = in_flight * ckpt_keep + recompute + pipe_buffers
    act_full = in_flight * full + pipe_buffers
    act, other = (act_ckpt, act_full) if topo.activation_checkpointing else (act_full, act_ckpt)
    largest_group = max((n for n, _ in padded), default=0)
    comm_copy = topo.comm_bytes * largest_group if topo.comm_bytes != topo.grad_accum_bytes else 0
    transient = comm_copy + 4 * max((n // g for n, g in padded), default=0)
    peak = states + max(act, transient)

    moe_layers = sum(1 for info in layers if info.is_moe)
    a2a = 0
    if moe_layers and ep > 1:
        # DeepSpeed's MOELayer exchanges the whole [E, capacity, D] buffer: dispatch and combine, forward and
        # backward, and once more forward when the layer is recomputed
        payload = workload.moe_padding * T * lc.num_experts_per_tok * lc.hidden_size * ACT_BYTES
        ops = 4 + (2 if topo.activation_checkpointing else 0)
        a2a = int(moe_layers * topo.grad_accum_steps * ops * payload * (ep - 1) / ep)
    # forward: hidden states, int64 positions and segment ids, the fp32 aux scalar; backward: their float gradients
    to_next = boundary + 16 * T + 4 if stage < topo.pipeline_stages - 1 else 0
    to_previous = boundary + 4 if stage > 0 else 0
    p2p = topo.grad_accum_steps * (to_next + to_previous)
    # a ring all-reduce of n bytes over g ranks sends 2 (g - 1) / g x n bytes from each rank
    allreduce = sum(2 * (g - 1) * topo.comm_bytes * n // g for n, g in padded if g > 1)
    return StagePlan(
        stage=stage, first_layer=lo, last_layer=hi - 1,
        decoder_layers=sum(1 for info in layers if info.kind == layout.DECODER), moe_layers=moe_layers,
        dense_params=dense, dense_trainable=dense_tr, expert_params_stage=expert_stage, expert_params_rank=expert_rank,
        expert_trainable_rank=expert_tr_rank, buffers=buffers, weights_bytes=weights, lp_grad_bytes=lp_grads,
        grad_accum_bytes=accum, master_bytes=master, optimizer_bytes=optim, state_bytes=states,
        activation_per_mb_bytes=full, activation_per_mb_ckpt_bytes=ckpt_keep + recompute, in_flight=in_flight,
        activation_bytes=act, activation_bytes_other=other, step_transient_bytes=transient, peak_bytes=peak,
        fits=peak <= usable_bytes, forward_flops_per_sample=sum(info.flops for info in layers),
        alltoall_bytes_per_step=a2a, p2p_send_bytes_per_step=p2p, allreduce_bytes_per_step=allreduce)


def moe_on_every_stage(stages: Sequence[StagePlan], lc) -> bool:
    """Whether every stage joins DeepSpeed's expert collectives (a stage without MoE layers hangs the step)."""
    return not lc.is_moe or len(stages) == 1 or all(s.moe_layers for s in stages)



def add_lora(cfg: VL2Config, infos: Sequence[LayerInfo], lora: dict) -> int:
    """A LoRA run's parameters: every base tensor frozen (bf16 weights, no gradient, no optimizer state) and the
    adapters of ``lora`` (a ``recipe.lora`` block) added as the trainable ones, to the layer holding their module;
    expert adapters go with their experts (sharded by EP, in the MoE optimizer groups). Returns the adapter count."""
    from recipe.lora.config import LoraConfig
    from recipe.lora.inject import adapter_numels

    for info in infos:
        info.dense_frozen, info.expert_frozen = info.dense, info.expert
        info.expert_tensor_numels = []
    total, first_expert = 0, {}
    for module, (a, b) in adapter_numels(cfg, LoraConfig.from_dict(lora)).items():
        info = infos[layout.layer_index_of(cfg, module + ".weight")]
        parsed = layout.parse_expert_key(module + ".weight")
        if parsed is None:
            info.dense += a + b
        else:
            info.expert += a + b
            if first_expert.setdefault(info.index, parsed[1]) == parsed[1]:
                info.expert_tensor_numels += [a, b]
        total += a + b
    return total
