"""Reading DeepSpeed's pipeline + MoE training checkpoints (any PP split, any EP size) and exporting them to HF.

Hand-written checkpoints in DeepSpeed 0.19's exact file layout cover many splits quickly; two runs of the real
engine (``tests/workers/train_pipeline.py`` under torchrun) pin the layout to what DeepSpeed actually writes.
"""

import os
import shutil
from collections import OrderedDict, defaultdict

import pytest
import torch

from recipe.checkpoint import converted as converted_fmt
from recipe.checkpoint import export, training
from recipe.checkpoint.hf import CheckpointError, iter_tensors
from recipe.config import VL2Config
from recipe.model import DeepseekVLV2ForCausalLM
from recipe.parallel import layout as L
from recipe.parallel.cost import balanced_decoder_split

from helpers.launch import REPO, torchrun

WORKER = os.path.join(REPO, "tests", "workers", "train_pipeline.py")


def write_training_checkpoint(tensors: dict, cfg: VL2Config, save_dir: str, tag: str = "global_step7",
                              num_stages: int = 2, decoder_split=None, latest: bool = True) -> list[int]:
    """Write ``tensors`` (HF names) the way DeepSpeed 0.19's pipeline engine saves a MoE model: per stage
    ``mp_rank_SS_model_states.pt`` (``module`` = '{layer}.{local}' -> tensor plus engine metadata) and one
    ``layer_J_expert_E_mp_rank_SS_model_states.pt`` per routed expert (J = MoE layer index within the stage,
    E = global expert id). Which EP rank wrote an expert file does not show in the layout. Returns the parts."""
    layers = L.build_layout(cfg)
    parts = L.stage_parts(cfg, num_stages, decoder_split or balanced_decoder_split(cfg, num_stages))
    tag_dir = os.path.join(save_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    groups = L.keys_by_layer(cfg, tensors)
    for s in range(num_stages):
        module, moe_j = OrderedDict(), 0
        for idx in range(parts[s], parts[s + 1]):
            experts = defaultdict(dict)
            for name in groups[idx]:
                local = L.hf_to_local(layers[idx], name)
                e = L.expert_id_of_local(local)
                (module if e is None else experts[e])[f"{idx}.{local}"] = tensors[name].clone()
            for e, state in experts.items():
                torch.save(state, os.path.join(tag_dir, f"layer_{moe_j}_expert_{e}_mp_rank_{s:02d}_model_states.pt"))
            moe_j += bool(experts)
        torch.save({"module": module, "buffer_names": [], "optimizer": None, "param_shapes": None,
                    "lr_scheduler": None, "global_steps": 7, "dp_world_size": 2, "mp_world_size": num_stages,
                    "ds_config": {"train_batch_size": 8, "bf16": {"enabled": True}}, "ds_version": "0.19.8",
                    "num_experts": [cfg.language_config.n_routed_experts] * moe_j},
                   os.path.join(tag_dir, f"mp_rank_{s:02d}_model_states.pt"))
    if latest:
        with open(os.path.join(save_dir, "latest"), "w") as f:
            f.write(tag)
    return parts


def hf_tensors(path):
    return dict(iter_tensors(path))


def assert_same(a: dict, b: dict, cast=None):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        x = a[k] if cast is None else a[k].to(cast)
        assert x.dtype == b[k].dtype and torch.equal(x, b[k]), k


@pytest.fixture(scope="module")
def src(tiny_ckpt):
    return tiny_ckpt("base", dtype="bf16", num_hidden_layers=5)


@pytest.mark.parametrize("num_stages,split", [(1, None), (2, [2, 3]), (2, [4, 1]), (3, [2, 2, 1]), (4, [2, 1, 1, 1])])
def test_reads_any_pipeline_split(src, tmp_path, num_stages, split):
    cfg = VL2Config.from_json(src)
    original = hf_tensors(src)
    parts = write_training_checkpoint(original, cfg, str(tmp_path), num_stages=num_stages, decoder_split=split)
    assert len(parts) == num_stages + 1
    ckpt = training.read_training_checkpoint(str(tmp_path), config=src)
    assert ckpt.tag == "global_step7" and len(ckpt) == len(original)
    got = OrderedDict(ckpt)
    assert_same(original, got)
    assert [L.layer_index_of(cfg, k) for k in got] == sorted(L.layer_index_of(cfg, k) for k in got)  # layer order


def test_tag_selection_and_tag_dir(src, tmp_path):
    cfg = VL2Config.from_json(src)
    original = hf_tensors(src)
    write_training_checkpoint(original, cfg, str(tmp_path), tag="step1")
    changed = {k: (v + 1 if k == "language.lm_head.weight" else v) for k, v in original.items()}
    write_training_checkpoint(changed, cfg, str(tmp_path), tag="step2")  # latest -> step2
    assert torch.equal(dict(training.read_training_checkpoint(str(tmp_path), config=src))["language.lm_head.weight"],
                       changed["language.lm_head.weight"])
    assert_same(original, dict(training.read_training_checkpoint(str(tmp_path), tag="step1", config=src)))
    assert_same(original, dict(training.read_training_checkpoint(str(tmp_path / "step1"), config=src)))
    with pytest.raises(CheckpointError, match=r"tag 'step9' not found \(tags here: step1, step2\)"):
        training.read_training_checkpoint(str(tmp_path), tag="step9", config=src)
    os.remove(tmp_path / "latest")
    with pytest.raises(CheckpointError, match=r"latest: no 'latest' file; pass --tag \(tags here: step1, step2\)"):
        training.read_training_checkpoint(str(tmp_path), config=src)


def test_export_of_training_checkpoint_loads_with_identical_logits(src, tmp_path):
    cfg = VL2Config.from_json(src)
    original = hf_tensors(src)
    save = tmp_path / "save"
    write_training_checkpoint(original, cfg, str(save), num_stages=2, decoder_split=[2, 3])
    shutil.copy(os.path.join(src, "config.json"), save)  # the run keeps its config beside the checkpoints
    with pytest.raises(CheckpointError, match="no config.json"):
        export.export_to_hf(str(save / "global_step7"), tmp_path / "x", config_dir=str(tmp_path / "none"),
                            progress=False)
    out = tmp_path / "hf"
    export.export_to_hf(str(save), out, max_shard_size="200KB", progress=False)
    assert_same(original, hf_tensors(out))
    assert sorted(os.listdir(out))[0] == "config.json"
    a = DeepseekVLV2ForCausalLM.from_pretrained(src).eval()
    b = DeepseekVLV2ForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(3, cfg.language_config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_fp32_training_checkpoint_exports_bf16_by_default(tiny_ckpt, tmp_path):
    src32 = tiny_ckpt("small", dtype="fp32")
    original = hf_tensors(src32)
    write_training_checkpoint(original, VL2Config.from_json(src32), str(tmp_path / "save"), num_stages=2,
                              decoder_split=[2, 1])
    export.export_to_hf(str(tmp_path / "save"), tmp_path / "bf16", config_dir=src32, progress=False)
    assert_same(original, hf_tensors(tmp_path / "bf16"), cast=torch.bfloat16)
    export.export_to_hf(str(tmp_path / "save"), tmp_path / "keep", dtype="keep", config_dir=src32, progress=False)
    assert_same(original, hf_tensors(tmp_path / "keep"))
    assert os.path.isfile(tmp_path / "keep" / "tokenizer.json")


def _broken(src, tmp_path, damage):
    cfg = VL2Config.from_json(src)
    save = str(tmp_path / "save")
    write_training_checkpoint(hf_tensors(src), cfg, save, num_stages=2, decoder_split=[2, 3])
    damage(os.path.join(save, "global_step7"))
    return save


def test_refuses_missing_expert_file(src, tmp_path):
    save = _broken(src, tmp_path, lambda d: os.remove(os.path.join(d, "layer_1_expert_3_mp_rank_01_model_states.pt")))
    with pytest.raises(CheckpointError, match=r"missing tensor 'language\.model\.layers\.3\.mlp\.experts\.3\."):
        training.read_training_checkpoint(save, config=src)


def test_refuses_missing_stage_file(src, tmp_path):
    save = _broken(src, tmp_path, lambda d: os.rename(os.path.join(d, "mp_rank_01_model_states.pt"),
                                                      os.path.join(d, "mp_rank_02_model_states.pt")))
    with pytest.raises(CheckpointError, match=r"stage files .* are not numbered 00\.\.01"):
        training.read_training_checkpoint(save, config=src)


def _edit_stage(d, edit, stage=0):
    path = os.path.join(d, f"mp_rank_{stage:02d}_model_states.pt")
    state = torch.load(path, weights_only=True)
    edit(state["module"])
    torch.save(state, path)


def test_refuses_duplicate_and_foreign_keys(src, tmp_path):
    head = L.layer_index_of(VL2Config.from_json(src), "language.model.norm.weight")
    dup = _broken(src, tmp_path / "a", lambda d: _edit_stage(
        d, lambda m: m.update({f"{head}.norm.weight": torch.ones(64)})))
    with pytest.raises(CheckpointError, match=rf"mp_rank_01_model_states.pt: tensor 'language\.model\.norm\.weight' "
                                              rf"\({head}\.norm\.weight\) also in .*mp_rank_00_model_states\.pt"):
        training.read_training_checkpoint(dup, config=src)
    foreign = _broken(src, tmp_path / "b", lambda d: _edit_stage(
        d, lambda m: m.update({"tied_modules.embed.weight": torch.ones(2)})))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: key 'tied_modules\.embed\.weight'"):
        training.read_training_checkpoint(foreign, config=src)
    moe = L.layer_index_of(VL2Config.from_json(src), "language.model.layers.1.mlp.gate.weight")
    extra = _broken(src, tmp_path / "c", lambda d: _edit_stage(
        d, lambda m: m.update({f"{moe}.mlp.moe.deepspeed_moe.gate.wg.weight": torch.ones(8, 64)})))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'language\.model\.layers\.1\.mlp\.moe\.deepspeed_moe"
                                              r"\.gate\.wg\.weight' in .*mp_rank_00_model_states\.pt"):
        training.read_training_checkpoint(extra, config=src)


def test_refuses_shape_mismatch_and_corrupt_file(src, tmp_path):
    head = L.layer_index_of(VL2Config.from_json(src), "language.model.norm.weight")
    shaped = _broken(src, tmp_path / "a", lambda d: _edit_stage(
        d, lambda m: m.update({f"{head}.norm.weight": torch.ones(65)}), stage=1))
    with pytest.raises(CheckpointError, match=r"tensor 'language\.model\.norm\.weight' in .*mp_rank_01_model_states"
                                              r"\.pt has shape \[65\], config\.json implies \[64\]"):
        training.read_training_checkpoint(shaped, config=src)

    def truncate(d):
        path = os.path.join(d, "layer_0_expert_2_mp_rank_00_model_states.pt")
        os.truncate(path, os.path.getsize(path) // 2)
    corrupt = _broken(src, tmp_path / "b", truncate)
    with pytest.raises(CheckpointError, match=r"layer_0_expert_2_mp_rank_00_model_states\.pt: cannot read"):
        training.read_training_checkpoint(corrupt, config=src)


class _ClientThing:
    """A training client_state object: unpickling it for real would run its __setstate__."""

    def __setstate__(self, state):
        raise AssertionError("checkpoint code was executed")


def test_unknown_pickled_objects_are_stubbed_not_run(src, tmp_path, caplog):
    """An object of a class the safe unpickler does not know is replaced by an inert stand-in, never built."""
    save = _broken(src, tmp_path, lambda d: None)
    path = os.path.join(save, "global_step7", "mp_rank_00_model_states.pt")
    state = torch.load(path, weights_only=True)
    thing = _ClientThing()
    thing.consumed = 12
    state["client_state"] = {"sampler": thing}
    torch.save(state, path)
    assert_same(hf_tensors(src), dict(training.read_training_checkpoint(save, config=src)))
    assert "stubbing non-tensor objects test_checkpoint_training._ClientThing" in caplog.text


def test_detect_kind(src, tmp_path):
    with pytest.raises(CheckpointError, match="already an HF safetensors checkpoint"):
        export.detect_kind(src)
    with pytest.raises(CheckpointError, match="no such directory"):
        export.detect_kind(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a converted layout"):
        export.detect_kind(str(tmp_path / "empty"))


# --- the real engine -----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("pp,ep,split", [(2, 1, "2,3"), (1, 2, None)], ids=["pp2-ep1", "pp1-dp2-ep2"])
def test_real_deepspeed_checkpoint_exports_exactly(src, tmp_path, pp, ep, split):
    """DeepSpeed's own save_checkpoint (bf16, ZeRO-1) of a pipeline with MoE layers, filled from a converted
    directory with each rank's experts: reading it back gives the source tensors bit for bit."""
    ds = str(tmp_path / "ds")
    converted_fmt.convert_hf_to_ds(src, ds, progress=False)
    save = str(tmp_path / "save")
    args = ["--converted", ds, "--bf16", "--steps", "0", "--save-dir", save, "--tag", "global_step3",
            "--stages", str(pp), "--ep", str(ep)]
    torchrun(WORKER, 2, args + (["--split", split] if split else []), str(tmp_path / "save.log"))
    files = os.listdir(os.path.join(save, "global_step3"))
    assert sum(f.startswith("layer_") and "_expert_" in f for f in files) == 8 * 4  # 4 MoE layers x 8 experts
    out = str(tmp_path / "hf")
    export.export_to_hf(save, out, config_dir=ds, progress=False)  # bf16, as the run stored it
    assert_same(hf_tensors(src), hf_tensors(out))


@pytest.mark.slow
@pytest.mark.parametrize("stages,ep,split", [(2, 1, "2,3"), (1, 2, None)], ids=["pp2-ep1", "pp1-dp2-ep2"])
def test_real_training_run_exports_with_identical_logits(src, tmp_path, stages, ep, split):
    """Load the pipeline from a converted directory (read_layer), train 2 steps (bf16, ZeRO-1), save with the
    engine, export: the HF checkpoint holds exactly the engine's weights and gives identical logits."""
    from recipe.tools.synthetic_batches import collate, synthetic_samples

    ds, save = str(tmp_path / "ds"), str(tmp_path / "save")
    converted_fmt.convert_hf_to_ds(src, ds, progress=False)
    args = ["--converted", ds, "--bf16", "--lr", "1e-2", "--seed", "3", "--steps", "2", "--save-dir", save,
            "--stages", str(stages), "--ep", str(ep)]
    torchrun(WORKER, 2, args + (["--split", split] if split else []), str(tmp_path / "train.log"))
    live = {}
    for r in range(2):
        for k, v in torch.load(os.path.join(save, f"live_rank{r}.pt"), weights_only=True).items():
            assert k not in live or torch.equal(live[k], v), k  # data-parallel replicas agree
            live[k] = v
    original = hf_tensors(src)
    assert sum(not torch.equal(original[k], live[k].to(original[k].dtype)) for k in original) > len(original) // 2

    out = tmp_path / "hf"
    export.export_to_hf(save, out, dtype="keep", config_dir=ds, progress=False)
    assert_same(live, hf_tensors(out))
    export.export_to_hf(save, tmp_path / "hf_bf16", config_dir=ds, progress=False)  # the default export dtype
    assert_same(live, hf_tensors(tmp_path / "hf_bf16"), cast=torch.bfloat16)

    cfg = VL2Config.from_json(ds)
    with torch.device("meta"):
        reference = DeepseekVLV2ForCausalLM(cfg)
    reference.load_state_dict(live, strict=True, assign=True)
    exported = DeepseekVLV2ForCausalLM.from_pretrained(str(out))
    batch = collate(synthetic_samples(cfg, 2, seed=11))
    inputs = {k: batch[k] for k in ("input_ids", "images", "images_seq_mask", "images_spatial_crop")}
    with torch.no_grad():
        assert torch.equal(reference.eval()(**inputs).logits, exported.eval()(**inputs).logits)
