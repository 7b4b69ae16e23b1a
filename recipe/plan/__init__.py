"""Capacity planner: memory per pipeline stage and rank, communication, FLOPs and throughput of a run, from
``config.json`` and the DeepSpeed JSON. ``python -m recipe.plan --help``; the model behind it: ``docs/planner.md``.

    memory    topology and optimizer wrapper from the DeepSpeed JSON; weights, gradients, optimizer state,
              activations and communication per stage
    suggest   layouts of the same devices that fit
    planner   the plan of one run: stages, FLOPs, throughput, warnings
    cli       the command line and the Markdown report

The per-layer parameters, activations and FLOPs they use come from :mod:`recipe.parallel.cost`.
"""

from recipe.parallel.cost import Workload, flops_per_sample, layer_infos
from recipe.plan.cli import format_plan, main, resolve_model
from recipe.plan.memory import GiB, StagePlan, Topology, stage_plan, topology
from recipe.plan.planner import ATLAS_800T_A2_BF16_TFLOPS, DEVICE_MEMORY_GB, ORIGINAL_RECIPE_SPS, Plan, plan
from recipe.plan.suggest import suggest_layouts

__all__ = ["ATLAS_800T_A2_BF16_TFLOPS", "DEVICE_MEMORY_GB", "GiB", "ORIGINAL_RECIPE_SPS", "Plan", "StagePlan",
           "Topology", "Workload", "flops_per_sample", "format_plan", "layer_infos", "main", "plan", "resolve_model",
           "stage_plan", "suggest_layouts", "topology"]
