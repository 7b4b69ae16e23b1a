"""recipe.parallel.pipeline in one process: each stage of a PP=1..4 split built on a one-rank gloo group and chained
by hand gives the plain model's loss and gradients; what crosses a stage boundary is exactly (hidden, aux,
position_ids, segment_ids); the attention mask is built once per micro-batch and stage, activation checkpointing's
recomputation included; layer modules use layout's names; freezing. The engine-driven multi-process runs of the
same module: test_train.py."""

from __future__ import annotations

import os

import pytest
import torch

from recipe.model import DeepseekVLV2ForCausalLM
from recipe.parallel import layout
from recipe.parallel import pipeline as pipe
from recipe.parallel.experts import ExpertParallelMoE
from recipe.parallel.loading import load_layers, tensor_source_from_state_dict
from recipe.tools.synthetic_batches import collate, label_count, synthetic_samples
from recipe.tools.tiny_config import tiny_config

from helpers.launch import free_port

LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    """A one-rank gloo process group (a DeepSpeed PipelineModule needs one), torn down after this module, with the
    launcher variables put back as they were."""
    from recipe.parallel.dist import init_distributed

    saved = {k: os.environ.get(k) for k in LAUNCH_ENV}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_distributed()
    yield
    torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class StageOf(pipe.VL2Pipeline):
    """Stage ``stage`` of a ``len(split)``-stage pipeline, built in this one-rank process: DeepSpeed's topology has
    one stage, only the layer range is the one that stage of the real split holds."""

    def __init__(self, cfg, split, stage, **kw):
        self.test_split, self.test_stage = list(split), stage
        super().__init__(cfg, num_stages=1, decoder_split=[sum(split)], **kw)

    def _partition_layers(self, method="explicit"):
        self.parts = layout.stage_parts(self.cfg, len(self.test_split), self.test_split)
        self._set_bounds(start=self.parts[self.test_stage], stop=self.parts[self.test_stage + 1])


def build_stages(plain, split, activation_checkpointing=True):
    stages = []
    for s in range(len(split)):
        stage = StageOf(plain.config, split, s, activation_checkpointing=activation_checkpointing)
        load_layers(stage, tensor_source_from_state_dict(plain.state_dict()))
        for _, m in stage.local_layers():
            if isinstance(getattr(m, "mlp", None), ExpertParallelMoE):
                m.mlp.moe.set_deepspeed_parallelism()  # the engine does this in deepspeed.initialize
        stages.append(stage)
    return stages


def plain_model(like: str, **kw):
    torch.manual_seed(0)
    cfg = tiny_config(like, image_size=42, **kw)
    return DeepseekVLV2ForCausalLM(cfg).train()


def make_batch(cfg, packed: bool) -> dict:
    batch = collate(synthetic_samples(cfg, 2, seed=3, text_only_every=2))
    if packed:  # row 0 holds two sequences: the second half of its real tokens is segment 2, positions restart
        n = int(batch["segment_ids"][0].count_nonzero())
        batch["segment_ids"][0, n // 2:n] = 2
        batch["position_ids"][0, n // 2:] = torch.arange(batch["position_ids"].shape[1] - n // 2)
    return batch


@pytest.fixture
def mask_builds(monkeypatch):
    """Counts the attention masks the pipeline builds."""
    calls = []

    def counted(segment_ids):
        calls.append(tuple(segment_ids.shape))
        return build(segment_ids)

    build = pipe.build_attention_layout
    monkeypatch.setattr(pipe, "build_attention_layout", counted)
    return calls


CASES = {  # name: (like, config overrides, decoder split)
    "pp1": ("base", {"num_hidden_layers": 5}, [5]),
    "pp2": ("base", {"num_hidden_layers": 5}, [2, 3]),
    "pp3": ("base", {"num_hidden_layers": 5}, [2, 2, 1]),
    "pp4": ("base", {"num_hidden_layers": 5}, [2, 1, 1, 1]),
    "pp2-vit-only-stage0": ("tiny", {"num_hidden_layers": 3, "n_routed_experts": None}, [0, 3]),
}


@pytest.mark.parametrize("packed", [False, True], ids=["right-padded", "packed"])
@pytest.mark.parametrize("case", list(CASES))
def test_stages_chained_give_the_plain_models_loss_and_build_one_mask_per_stage(case, packed, mask_builds):
    like, overrides, split = CASES[case]
    plain = plain_model(like, **overrides)
    batch = make_batch(plain.config, packed)
    assert (pipe.build_attention_layout(batch["segment_ids"]).kind != "causal") == packed  # packed rows need a mask
    mask_builds.clear()
    want = plain(**batch)
    want.loss.backward()

    stages = build_stages(plain, split)
    inputs, labels = pipe.pipe_batch(batch, 1.0 / label_count(batch))
    hidden_shape = (*batch["input_ids"].shape, plain.config.language_config.hidden_size)
    x = inputs
    for stage in stages[:-1]:
        x = stage(x)
        # what DeepSpeed sends to the next stage: floats first, no mask
        assert [t.dtype for t in x] == [torch.float32, torch.float32, torch.int64, torch.int64]
        assert x[0].shape == hidden_shape and x[1].dim() == 0
        assert torch.equal(x[2], batch["position_ids"]) and torch.equal(x[3], batch["segment_ids"])
    out = stages[-1](x)
    assert len(out) == 2 and out[0].shape == hidden_shape and out[1].dim() == 0  # (normed hidden, aux): the loss
    loss = stages[-1].loss(out, labels)
    loss.backward()

    assert loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    want_aux = 0.0 if want.aux_loss is None else want.aux_loss.item()  # None: a dense model
    assert stages[-1]._losses["aux"].item() == pytest.approx(want_aux, rel=1e-5)
    stages_with_decoders = sum(any(layer.kind == layout.DECODER for layer, _ in s.local_layers()) for s in stages)
    assert stages_with_decoders == sum(1 for n in split if n)
    assert len(mask_builds) == stages_with_decoders  # forward and checkpointed recomputation together
    grads = {layout.local_to_hf(layer, name): p.grad for s in stages for layer, m in s.local_layers()
             for name, p in m.named_parameters()}
    for name in ("language.model.embed_tokens.weight", "language.lm_head.weight", "vision.blocks.0.attn.qkv.weight",
                 "language.model.layers.1.self_attn.o_proj.weight"):
        torch.testing.assert_close(grads[name], plain.get_parameter(name).grad, rtol=1e-4, atol=1e-6)


def test_mask_is_built_once_per_micro_batch_with_and_without_checkpointing(mask_builds):
    plain = plain_model("base", num_hidden_layers=4)
    inputs, labels = pipe.pipe_batch(make_batch(plain.config, packed=True), 0.1)
    for checkpointing in (False, True):
        (stage,) = build_stages(plain, [4], activation_checkpointing=checkpointing)
        mask_builds.clear()
        for _ in range(3):  # three micro-batches
            stage.loss(stage(inputs), labels).backward()
        assert len(mask_builds) == 3


def test_checkpointed_layers_come_from_layouts_kinds():
    plain = plain_model("tiny")
    (stage,) = build_stages(plain, [plain.config.language_config.num_hidden_layers])
    assert stage.checkpointable_layers == ["VitBlockPipe", "DecoderPipe"]
    assert [pipe.LAYER_CLASSES[kind].__name__ for kind in layout.CHECKPOINTED_KINDS] == stage.checkpointable_layers
    assert stage.is_checkpointable_results == [layer.kind in layout.CHECKPOINTED_KINDS
                                               for layer, _ in stage.local_layers()]
    assert all(isinstance(m, pipe.LAYER_CLASSES[layer.kind]) for layer, m in stage.local_layers())


def test_layer_modules_use_layouts_names_and_always_frozen_is_frozen():
    plain = plain_model("base")
    sd = plain.state_dict()
    (stage,) = build_stages(plain, [plain.config.language_config.num_hidden_layers])
    for layer, m in stage.local_layers():
        assert set(m.state_dict()) == {layout.hf_to_local(layer, k) for k in sd if layer.owns(k)}, layer
        for name, p in m.named_parameters():
            assert p.requires_grad != layout.local_to_hf(layer, name).startswith(layout.ALWAYS_FROZEN), name
    assert any(not p.requires_grad for p in stage.parameters())  # the tiny configs keep attn_pool too


def test_freeze_by_layouts_groups():
    plain = plain_model("base")
    (stage,) = build_stages(plain, [plain.config.language_config.num_hidden_layers])
    frozen = pipe.freeze(stage, vision=True, embeddings=True, language=False)
    names = {layout.local_to_hf(layer, n): p for layer, m in stage.local_layers() for n, p in m.named_parameters()}
    assert set(frozen) == {n for n in names if layout.freeze_group(n) in ("vision", "embeddings")}
    assert "language.model.embed_tokens.weight" in frozen and "vision.blocks.0.attn.qkv.weight" in frozen
    assert all(p.requires_grad == (n not in frozen and not n.startswith(layout.ALWAYS_FROZEN))
               for n, p in names.items())
    assert pipe.freeze(stage) == []
    with pytest.raises(ValueError, match="unknown parts \\['vit'\\]"):
        pipe.freeze(stage, vit=True)
    with pytest.raises(TypeError, match="takes a VL2Pipeline"):
        pipe.freeze(plain, vision=True)
