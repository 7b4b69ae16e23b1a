"""The plan of one run: memory per stage, FLOPs and throughput at an MFU, the MFU a measured samples/s implies,
warnings, and layouts that fit when a stage does not. See ``docs/planner.md``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from recipe.config import VL2Config
from recipe.parallel import layout
from recipe.parallel.cost import (
    Workload,
    activated_params,
    flops_balanced_split,
    flops_per_sample,
    layer_infos,
    packed_workload,
)
from recipe.plan.memory import GiB, Topology, add_lora, moe_on_every_stage, stage_plan, topology
from recipe.plan.suggest import suggest_layouts

# Atlas 800T A2 (Ascend 910B, 64 GB HBM) dense fp16/bf16 peak per NPU: 354 TFLOPS, the figure verl's MFU counter uses
# for "910B" (volcengine/verl, verl/utils/flops_counter.py, _DEVICE_FLOPS). Public bf16 GEMM measurements reach
# 315 TFLOPS (910B2, 4096^3) to 328 TFLOPS, consistent with it. Override with --peak-tflops.
ATLAS_800T_A2_BF16_TFLOPS = 354.0
DEVICE_MEMORY_GB = 64.0
# Packing's average row, from bench/packing.py's ai2d-like mix (12,000 samples: images sized and tiled like ai2d's,
# 40-140 text tokens): 1,297 real tokens and 5.87 ViT views per sample; first-fit-decreasing in windows of 1,024
# fills 97.6% of 4,096-token rows (3.08 samples per row). Override with --sample-tokens / --sample-views / --fill.
AI2D_SAMPLE_TOKENS = 1297.0
AI2D_SAMPLE_VIEWS = 5.87
PACKING_FILL = 0.976
# The original MindSpeed-MM DeepSeek-VL2 recipe: 4.924 samples/s end to end on 4 x 8 Atlas 800T A2 (its README).
ORIGINAL_RECIPE_SPS = 4.924
ORIGINAL_RECIPE_DEVICES = 32
ORIGINAL_RECIPE_MODEL = "base"  # the released model it was measured with


@dataclass
class Plan:
    model: str
    ds_config: str
    topology: Topology
    workload: Workload
    device_memory_gb: float
    usable_fraction: float
    peak_tflops: float
    mfu: float
    total_params: int
    dense_params: int
    expert_params: int
    buffer_params: int
    trainable_params: int
    activated_params_per_token: int
    layer_params: list              # per pipeline layer: [index, kind, block, dense, expert, buffers]
    stages: list
    bubble_fraction: float
    stage_balance: float            # mean / max stage forward FLOPs
    vision_share: float             # ViT + projector + embed FLOPs in units of one MoE decoder layer
    flops_balanced_split: Optional[list]  # decoder split minimising the largest stage's forward FLOPs
    flops_per_sample: dict          # forward, by category, per real sample of the planned workload
    train_flops_per_sample: float   # 3 x forward
    samples_per_s: float            # real samples at `mfu`
    tokens_per_s: float             # real tokens at `mfu`
    reference_sps: float
    reference_mfu: float            # MFU implied by the original recipe's samples/s, counting its padded work
    warnings: list
    suggestions: list
    packing: bool = False
    samples_per_row: float = 1.0    # the average row (packing), 1 without
    sample_tokens: float = 0.0      # real tokens per sample
    samples_per_step: float = 0.0   # global batch rows x samples per row
    reference_flops_per_sample: float = 0.0   # forward, the original recipe's sample (padded to seq_len, 10 views)
    reference_real_mfu: float = 0.0  # the original's samples/s counted on the planned workload's real samples
    lora_params: int = 0            # LoRA: adapter parameters (the only trainable ones), 0 for full fine-tuning


def plan(cfg: VL2Config, ds_config: dict, *, model_name: str = "", ds_name: str = "",
         world_size: Optional[int] = None, device_memory_gb: float = DEVICE_MEMORY_GB, usable_fraction: float = 0.92,
         peak_tflops: float = ATLAS_800T_A2_BF16_TFLOPS, mfu: float = 0.3, seq_len: Optional[int] = None,
         views: Optional[int] = None, moe_padding: float = 1.5, reference_sps: float = ORIGINAL_RECIPE_SPS,
         sample_tokens: float = AI2D_SAMPLE_TOKENS, sample_views: float = AI2D_SAMPLE_VIEWS,
         fill: float = PACKING_FILL, suggest: bool = True, **recipe_overrides) -> Plan:
    """Plan the run of ``cfg`` under ``ds_config`` (a DeepSpeed JSON with a ``recipe`` block).

    Args:
        world_size: devices; default train_batch_size / (micro-batch x GAS) x pipeline stages.
        device_memory_gb: memory per device in GiB; a stage fits when its peak stays under
            ``usable_fraction`` of it (the rest: HCCL buffers, workspaces, allocator fragmentation).
        peak_tflops: dense bf16 peak per device. mfu: the model-FLOPs utilisation to quote throughput at.
        seq_len: row length (default recipe.max_seq_len). views: ViT views per sample without packing (default
            10, one image at the largest tiling).
        moe_padding: DeepSpeed's dropless capacity buffer over the routed tokens (largest expert load / mean).
        sample_tokens, sample_views, fill: packing (``recipe.packing``, the default): the mean real tokens and ViT
            views of a sample and first-fit-decreasing's fill of a row (defaults: bench/packing.py's ai2d-like
            mix). Memory is planned for a full row with ``recipe.max_tiles_per_row`` views; FLOPs and throughput
            for the average row, attention within each sample.
        recipe_overrides: replace keys of the ``recipe`` block (pipeline_stages=..., decoder_split=..., ...).
    """
    topo = topology(cfg, ds_config, world_size, seq_len, **recipe_overrides)
    rc = {**ds_config.get("recipe", {}), **{k: v for k, v in recipe_overrides.items() if v is not None}}
    packing = bool(rc.get("packing", True))
    lc = cfg.language_config
    original = Workload(micro_batch=1, seq_len=topo.seq_len, views=10, moe_padding=moe_padding)
    if packing:
        max_tiles = int(rc.get("max_tiles_per_row", 20))
        mem_work = Workload(topo.micro_batch, topo.seq_len, max_tiles, moe_padding)  # the worst row
        work = packed_workload(topo.micro_batch, topo.seq_len, max_tiles, moe_padding, sample_tokens, sample_views,
                               fill)
    else:
        mem_work = work = Workload(topo.micro_batch, topo.seq_len, views or 10, moe_padding)
    infos = layer_infos(cfg, mem_work, topo.freeze)
    lora_params = add_lora(cfg, infos, topo.lora) if topo.lora is not None else 0
    if work is not mem_work:  # memory for the fullest row, FLOPs (stage balance, step time) for the average one
        for info, average in zip(infos, layer_infos(cfg, work, topo.freeze)):
            info.flops = average.flops
    usable = device_memory_gb * GiB * usable_fraction
    stages = [stage_plan(cfg, infos, topo, s, topo.parts[s], topo.parts[s + 1], usable, mem_work)
              for s in range(topo.pipeline_stages)]

    flops = flops_per_sample(cfg, work)
    train = 3 * flops["total"]
    peak = peak_tflops * 1e12
    sps = mfu * peak * topo.world_size / train
    ref_flops = flops_per_sample(cfg, original)["total"]
    ref_mfu = reference_sps * 3 * ref_flops / (peak * topo.world_size)
    stage_flops = [s.forward_flops_per_sample for s in stages]
    moe_layer_flops = next((info.flops for info in infos if info.kind == layout.DECODER and info.is_moe),
                           next(info.flops for info in infos if info.kind == layout.DECODER))
    vision_flops = sum(info.flops for info in infos if info.kind in (layout.EMBED, layout.VIT_BLOCK, layout.PROJECTOR))
    S, m = topo.pipeline_stages, topo.grad_accum_steps
    warnings = []
    for s in stages:
        if not s.fits:
            warnings.append(f"stage {s.stage} needs {s.peak_bytes / GiB:.1f} GiB per device, over the "
                            f"{usable / GiB:.1f} GiB usable of {device_memory_gb:g} GiB")
    if topo.comm_bytes < topo.grad_accum_bytes:
        warnings.append("gradients are accumulated in fp32 but all-reduced in bf16 (DeepSpeed's default "
                        "communication_data_type under bf16); set \"communication_data_type\": \"fp32\" to reduce in "
                        "fp32 and drop the bf16 copy of the largest gradient group")
    if not topo.optimizer.startswith("BF16_Optimizer"):
        warnings.append(f"optimizer wrapper {topo.optimizer}: state accounting is approximate")
    if not moe_on_every_stage(stages, lc):
        warnings.append(f"stages {[s.stage for s in stages if not s.moe_layers]} hold no MoE layer: DeepSpeed 0.19.8's "
                        f"optimizer step sums the expert gradient norm over the pipeline group, which those stages "
                        f"never join, so the first step hangs (reproduced with PP=2 on CPU); give every stage an MoE "
                        f"layer")
    suggestions = []
    if suggest and any(not s.fits for s in stages):
        suggestions = suggest_layouts(cfg, infos, topo, mem_work, usable, world_size=topo.world_size)
    dense = sum(info.dense for info in infos)
    expert = sum(info.expert for info in infos)
    buffers = sum(info.buffers for info in infos)
    frozen = sum(info.dense_frozen + info.expert_frozen for info in infos)
    return Plan(
        model=model_name, ds_config=ds_name, topology=topo, workload=mem_work, device_memory_gb=device_memory_gb,
        usable_fraction=usable_fraction, peak_tflops=peak_tflops, mfu=mfu, total_params=dense + expert + buffers,
        dense_params=dense, expert_params=expert, buffer_params=buffers, trainable_params=dense + expert - frozen,
        activated_params_per_token=activated_params(cfg, infos),
        layer_params=[[info.index, info.kind, info.block, info.dense, info.expert, info.buffers] for info in infos],
        stages=stages,
        bubble_fraction=(S - 1) / (m + S - 1), stage_balance=sum(stage_flops) / (S * max(stage_flops)),
        vision_share=vision_flops / moe_layer_flops,
        flops_balanced_split=flops_balanced_split(cfg, infos, topo.pipeline_stages),
        flops_per_sample=flops, train_flops_per_sample=train,
        samples_per_s=sps, tokens_per_s=sps * work.segment_tokens, reference_sps=reference_sps, reference_mfu=ref_mfu,
        warnings=warnings, suggestions=suggestions, packing=packing, samples_per_row=work.samples_per_row,
        sample_tokens=work.segment_tokens, samples_per_step=topo.train_batch * work.samples_per_row,
        reference_flops_per_sample=ref_flops, reference_real_mfu=reference_sps * train / (peak * topo.world_size),
        lora_params=lora_params)
