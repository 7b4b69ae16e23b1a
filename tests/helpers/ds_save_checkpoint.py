"""Write a DeepSpeed training checkpoint with the real engine (run under torchrun, CPU + gloo).

    torchrun --nproc_per_node 2 tests/helpers/ds_save_checkpoint.py --ds-dir CONVERTED --save-dir OUT \
        --pp 2 --ep 1 --decoder-split 2,3

The pipeline is made of parameter holders: each pipeline layer module carries exactly the tensors
``layout.hf_to_local`` names (routed experts inside a real ``deepspeed.moe.layer.MoE`` with ``ep_size``, the router
under ``deepspeed_moe.gate.router``), filled from the converted directory with each rank's own experts. The engine
(bf16, ZeRO-1, Adam) then saves with ``save_checkpoint``, so the files are exactly what DeepSpeed writes for that
PP split and EP size, independent of the forward code in ``recipe/parallel/pipeline.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from torch import nn  # noqa: E402


def _skip_shm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory op on CPU init (~50 s); training never uses it."""
    import deepspeed.comm.torch  # noqa: F401
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


class Expert(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


class Gate(nn.Module):
    """Stands where our router sits inside DeepSpeed's MOELayer (``deepspeed_moe.gate``)."""

    def _set_ep_group(self, group) -> None:
        pass


def _put(root: nn.Module, dotted: str, shape, buffer: bool) -> None:
    """Create ``dotted`` (nested modules, then a parameter or persistent buffer) under ``root``."""
    *path, leaf = dotted.split(".")
    mod = root
    for part in path:
        if part not in mod._modules:
            mod.add_module(part, nn.Module())
        mod = mod._modules[part]
    if buffer:
        mod.register_buffer(leaf, torch.zeros(shape))
    else:
        mod.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))


class Holder(nn.Module):
    """One pipeline layer's tensors under the local names of ``layout.hf_to_local``; forward is the identity
    plus a zero-weighted sum so every parameter is part of the graph."""

    def __init__(self, ds_dir: str, index: int, ep_size: int):
        super().__init__()
        from deepspeed.moe.layer import MoE

        from recipe.checkpoint.converted import load_manifest
        from recipe.config import VL2Config
        from recipe.parallel import layout as L
        cfg = VL2Config.from_json(ds_dir)
        layer = L.build_layout(cfg)[index]
        entry = load_manifest(ds_dir)["layers"][index]
        lc = cfg.language_config
        if layer.is_moe:
            self.add_module("mlp", nn.Module())
            self.mlp.add_module("moe", MoE(lc.hidden_size, Expert(lc.hidden_size, lc.moe_intermediate_size),
                                           num_experts=lc.n_routed_experts, ep_size=ep_size, k=1))
            self.mlp.moe.deepspeed_moe.gate = Gate()
        for name, meta in entry["tensors"].items():
            local = L.hf_to_local(layer, name)
            if L.expert_id_of_local(local) is None:
                _put(self, local, meta["shape"], buffer=name.endswith("e_score_correction_bias"))

    def forward(self, x):
        return x + sum(p.sum() for p in self.parameters()) * 0


def load_weights(engine, ds_dir: str) -> None:
    """Fill each local layer from the converted directory (this rank's experts, renumbered to local ids)."""
    from deepspeed.utils import groups

    from recipe.checkpoint.converted import load_manifest, read_layer
    from recipe.config import VL2Config
    from recipe.parallel import layout as L
    cfg = VL2Config.from_json(ds_dir)
    layers = L.build_layout(cfg)
    manifest = load_manifest(ds_dir)
    pipe = engine.module
    for idx_str, module in pipe._modules.items():
        if not idx_str.isdigit():
            continue
        idx = int(idx_str)
        layer = layers[idx]
        first = 0
        wanted = None
        if layer.is_moe:
            moe = module.mlp.moe
            ep_rank = groups._get_expert_parallel_rank(moe.expert_group_name)
            first = ep_rank * moe.num_local_experts
            wanted = range(first, first + moe.num_local_experts)
        own = module.state_dict(keep_vars=True)
        tensors = read_layer(ds_dir, idx, expert_ids=wanted, manifest=manifest)
        seen = set()
        for name, t in tensors.items():
            local = L.hf_to_local(layer, name)
            e = L.expert_id_of_local(local)
            if e is not None:
                local = L.renumber_expert(local, e - first)
            with torch.no_grad():
                own[local].copy_(t)
            seen.add(local)
        assert seen == set(own), (idx, sorted(set(own) - seen))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ds-dir", required=True)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--tag", default="global_step3")
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--decoder-split", default=None, help="decoder layers per stage, e.g. 2,1")
    a = p.parse_args()
    _skip_shm_build()
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule

    from recipe.config import VL2Config
    from recipe.parallel import layout as L
    from recipe.parallel.cost import balanced_decoder_split

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = VL2Config.from_json(a.ds_dir)
    split = [int(x) for x in a.decoder_split.split(",")] if a.decoder_split else balanced_decoder_split(cfg, a.pp)
    parts = L.stage_parts(cfg, a.pp, split)

    class Pipe(PipelineModule):
        def _partition_layers(self, method="uniform"):
            self.parts = list(parts)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    specs = [LayerSpec(Holder, a.ds_dir, i, a.ep) for i in range(len(L.build_layout(cfg)))]
    pipe = Pipe(layers=specs, num_stages=a.pp, loss_fn=lambda out, label: out.sum())
    world = int(os.environ["WORLD_SIZE"])
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "train_batch_size": world // a.pp, "bf16": {"enabled": True},
                 "zero_optimization": {"stage": 1},
                 "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=list(pipe.parameters()), config=ds_config)
    load_weights(engine, a.ds_dir)
    engine.save_checkpoint(a.save_dir, tag=a.tag)


if __name__ == "__main__":
    main()
