"""HF <-> converted pipeline layer files: bit-exact round trips, the manifest, per-layer reads, and every refusal."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from recipe.checkpoint import converted as converted_fmt
from recipe.checkpoint import export
from recipe.checkpoint.hf import INDEX_NAME, SINGLE_NAME, CheckpointError, iter_tensors, load_weight_map
from recipe.config import VL2Config
from recipe.model import DeepseekVLV2ForCausalLM
from recipe.parallel import layout as L

from helpers.launch import REPO

SHARD_RE = re.compile(r"^model-\d{5}-of-\d{6}\.safetensors$")


def hf_tensors(path):
    return dict(iter_tensors(path))


def assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def small_bf16(tiny_ckpt):
    """A like-base checkpoint (MLA, noaux_tc bias) in several small shards, so MoE layers span shards."""
    return tiny_ckpt("base", dtype="bf16", max_shard_size="200KB")


@pytest.fixture(scope="module")
def converted(small_bf16, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("conv") / "ds")
    converted_fmt.convert_hf_to_ds(small_bf16, out, progress=False)
    return out


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def edit_config(path, **language):
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw["language_config"].update(language)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)


def no_output_left(out):
    parent, name = os.path.split(str(out))
    return not os.path.exists(out) and not [n for n in os.listdir(parent) if n.startswith(name + ".tmp-")]


# --- bit-exact round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("single_file", [False, True], ids=["sharded", "single"])
@pytest.mark.parametrize("like", ["tiny", "small", "base"])
def test_round_trip_is_bit_exact(tiny_ckpt, tmp_path, like, single_file, dtype):
    kw = {"single_file": True} if single_file else {"max_shard_size": "150KB"}
    src = tiny_ckpt(like, dtype=dtype, **kw)
    if not single_file:
        assert len(set(load_weight_map(src).values())) > 2
    ds, back = tmp_path / "ds", tmp_path / "hf"
    converted_fmt.convert_hf_to_ds(src, ds, progress=False)
    export.export_to_hf(ds, back, dtype="keep", max_shard_size="300KB", progress=False)
    original = hf_tensors(src)
    assert_same_tensors(original, hf_tensors(back))
    assert any(k.startswith("vision.attn_pool.") for k in original)  # unused, but carried through
    files = os.listdir(back)
    assert INDEX_NAME in files and all(SHARD_RE.match(f) for f in files if f.endswith(".safetensors"))
    for side in ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(src, side), "rb") as a, open(os.path.join(back, side), "rb") as b:
            assert a.read() == b.read(), side
    # The default export dtype is bf16, as released.
    default = tmp_path / "hf_bf16"
    export.export_to_hf(ds, default, progress=False)
    assert_same_tensors({k: v.to(torch.bfloat16) for k, v in original.items()}, hf_tensors(default))


def test_export_loads_in_our_model_with_identical_logits(small_bf16, converted, tmp_path):
    out = tmp_path / "hf"
    export.export_to_hf(converted, out, progress=False)
    a = DeepseekVLV2ForCausalLM.from_pretrained(small_bf16).eval()
    b = DeepseekVLV2ForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(3, a.config.language_config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_dtype_cast_on_conversion(tiny_ckpt, tmp_path):
    src = tiny_ckpt("small", dtype="bf16")
    m = converted_fmt.convert_hf_to_ds(src, tmp_path / "ds", dtype="fp32", progress=False)
    assert m["dtype"] == "float32" and m["cast_to"] == "float32"
    export.export_to_hf(tmp_path / "ds", tmp_path / "hf", dtype="keep", progress=False)
    assert_same_tensors({k: v.float() for k, v in hf_tensors(src).items()}, hf_tensors(tmp_path / "hf"))


# --- the converted layout --------------------------------------------------------------------------------------

def test_manifest_and_layer_files(small_bf16, converted):
    m = converted_fmt.load_manifest(converted)
    cfg = VL2Config.from_json(converted)
    layers = L.build_layout(cfg)
    assert m["format"] == converted_fmt.FORMAT_NAME and m["format_version"] == converted_fmt.FORMAT_VERSION
    assert m["num_layers"] == len(layers) and m["dtype"] == "bfloat16" and m["cast_to"] is None
    assert m["source"]["path"] == os.path.abspath(small_bf16) and m["source"]["index"] == INDEX_NAME
    assert set(m["side_files"]) >= {"config.json", "processor_config.json", "tokenizer.json"}
    original = hf_tensors(small_bf16)
    assert m["num_tensors"] == len(original) == sum(e["num_tensors"] for e in m["layers"])
    assert m["total_bytes"] == sum(t.numel() * t.element_size() for t in original.values())
    for entry, layer in zip(m["layers"], layers):
        assert entry["file"] == L.ckpt_layer_file(layer.index) == f"layer_{layer.index:02d}-model_00-model_states.pt"
        assert entry["kind"] == layer.kind and entry["hf_prefixes"] == list(layer.hf_prefixes)
        state = torch.load(os.path.join(converted, entry["file"]), weights_only=True)
        assert list(state) == list(entry["tensors"])
        for name, t in state.items():
            assert layer.owns(name) and torch.equal(t, original[name])
            meta = entry["tensors"][name]
            assert meta["sha256"] == converted_fmt.tensor_sha256(t) and meta["shape"] == list(t.shape)
    moe = [e for e in m["layers"] if e["is_moe"]]
    assert moe and all(e["num_experts"] == cfg.language_config.n_routed_experts for e in moe)


def test_read_layer_experts_by_global_id(converted):
    m = converted_fmt.load_manifest(converted)
    idx = next(e["index"] for e in m["layers"] if e["is_moe"])
    full = converted_fmt.read_layer(converted, idx, manifest=m, verify=True)
    part = converted_fmt.read_layer(converted, idx, expert_ids=[5, 1], manifest=m)
    experts = {L.parse_expert_key(k)[1] for k in part if L.parse_expert_key(k)}
    assert experts == {1, 5}
    assert [k for k in full if k in part] == list(part)  # manifest order
    assert {k for k in full if not L.parse_expert_key(k)} <= set(part)  # router, bias, attention, shared experts
    assert any(k.endswith("mlp.gate.e_score_correction_bias") for k in part)
    with pytest.raises(CheckpointError, match=r"expert ids \[8\]"):
        converted_fmt.read_layer(converted, idx, expert_ids=[8], manifest=m)
    with pytest.raises(CheckpointError, match="out of range"):
        converted_fmt.read_layer(converted, len(m["layers"]), manifest=m)
    dense = converted_fmt.read_layer(converted, 0)
    assert set(converted_fmt.read_layer(converted, 0, expert_ids=[0])) == set(dense)  # dense layer: all of it


def test_read_layer_verify_catches_corruption(converted, tmp_path):
    ds = copy_ckpt(converted, tmp_path / "ds")
    m = converted_fmt.load_manifest(ds)
    entry = m["layers"][-1]
    name, meta = next(iter(entry["tensors"].items()))
    t = converted_fmt.read_layer(ds, entry["index"], mmap=False)[name]
    path = os.path.join(ds, entry["file"])
    raw = bytearray(open(path, "rb").read())
    pos = raw.find(t.reshape(-1).view(torch.uint8).numpy().tobytes()[:64])
    assert pos > 0
    raw[pos] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    converted_fmt.read_layer(ds, entry["index"], verify=False)  # shapes and names still fine
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*" + re.escape(name) + ".*sha256"):
        converted_fmt.read_layer(ds, entry["index"], verify=True)


def test_export_refuses_a_corrupt_layer_file(converted, tmp_path):
    """A flipped byte in a converted layer file fails the manifest's sha256 check on export, naming file and tensor."""
    ds = copy_ckpt(converted, tmp_path / "ds")
    entry = converted_fmt.load_manifest(ds)["layers"][1]
    name = next(iter(entry["tensors"]))
    t = converted_fmt.read_layer(ds, entry["index"], mmap=False)[name]
    path = os.path.join(ds, entry["file"])
    raw = bytearray(open(path, "rb").read())
    pos = raw.find(t.reshape(-1).view(torch.uint8).numpy().tobytes()[:64])
    raw[pos + 1] ^= 0x01
    open(path, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*" + re.escape(name) + ".*sha256"):
        export.export_to_hf(ds, str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("bad", ["../secret.pt", "/etc/passwd", "sub/../../x.pt"])
def test_manifest_paths_stay_inside(converted, tmp_path, bad):
    ds = copy_ckpt(converted, tmp_path / "ds")
    (tmp_path / "secret.pt").write_bytes(open(os.path.join(ds, "layer_00-model_00-model_states.pt"), "rb").read())
    mpath = os.path.join(ds, "manifest.json")
    m = json.load(open(mpath))
    m["layers"][0]["file"] = bad
    json.dump(m, open(mpath, "w"))
    with pytest.raises(CheckpointError, match="not a plain name inside|outside"):
        converted_fmt.load_manifest(ds)


def test_load_manifest_refusals(converted, tmp_path):
    ds = copy_ckpt(converted, tmp_path / "ds")
    os.remove(os.path.join(ds, "layer_03-model_00-model_states.pt"))
    with pytest.raises(CheckpointError, match="layer_03-model_00-model_states.pt: layer file missing"):
        converted_fmt.load_manifest(ds)
    with open(os.path.join(ds, converted_fmt.MANIFEST_NAME)) as f:
        m = json.load(f)
    m["format_version"] = converted_fmt.FORMAT_VERSION + 1
    with open(os.path.join(ds, converted_fmt.MANIFEST_NAME), "w") as f:
        json.dump(m, f)
    with pytest.raises(CheckpointError, match="newer than this reader"):
        converted_fmt.load_manifest(ds)
    os.remove(os.path.join(ds, converted_fmt.MANIFEST_NAME))
    with pytest.raises(CheckpointError, match="not a finished conversion"):
        converted_fmt.load_manifest(ds)


def test_export_refuses_layout_that_disagrees_with_its_config(converted, tmp_path):
    ds = copy_ckpt(converted, tmp_path / "ds")
    edit_config(ds, num_hidden_layers=2)
    with pytest.raises(CheckpointError, match=r"manifest\.json: 8 pipeline layers, config\.json gives 7"):
        export.export_to_hf(ds, tmp_path / "hf", progress=False)
    ds2 = copy_ckpt(converted, tmp_path / "ds2")
    edit_config(ds2, moe_intermediate_size=16)
    with pytest.raises(CheckpointError, match=r"tensor 'language\.model\.layers\.1\.mlp\.experts\.0\.gate_proj"
                                              r"\.weight' in .*layer_05-model_00-model_states\.pt has shape"):
        export.export_to_hf(ds2, tmp_path / "hf2", progress=False)
    assert no_output_left(tmp_path / "hf") and no_output_left(tmp_path / "hf2")


# --- refusals: config / tensor mismatches, damaged shards, existing output ------------------------------------

def _convert_fails(src, out, match):
    with pytest.raises(CheckpointError, match=match):
        converted_fmt.convert_hf_to_ds(src, out, progress=False)
    assert no_output_left(out)


def test_refuses_layer_count_mismatch(small_bf16, tmp_path):
    src = copy_ckpt(small_bf16, tmp_path / "src")
    edit_config(src, num_hidden_layers=2)
    _convert_fails(src, tmp_path / "out", r"(?s)3 decoder layers.*num_hidden_layers=2.*unexpected tensor "
                                          r"'language\.model\.layers\.2\.[^']*' in .*model-000\d\d-of-0000\d\d")


def test_refuses_expert_count_mismatch(small_bf16, tmp_path):
    src = copy_ckpt(small_bf16, tmp_path / "src")
    edit_config(src, n_routed_experts=16, n_group=1)
    _convert_fails(src, tmp_path / "out", r"(?s)8 routed experts per layer.*n_routed_experts=16.*"
                                          r"missing tensor 'language\.model\.layers\.1\.mlp\.experts\.8\.")


def test_refuses_shape_mismatch(small_bf16, tmp_path):
    src = copy_ckpt(small_bf16, tmp_path / "src")
    edit_config(src, intermediate_size=96)
    _convert_fails(src, tmp_path / "out", r"tensor 'language\.model\.layers\.0\.mlp\.gate_proj\.weight' in "
                                          r".*\.safetensors has shape \[128, 64\], config\.json implies \[96, 64\]")


def _rewrite_single(src, dst, edit):
    """A single-file copy of ``src`` with ``edit(tensors)`` applied."""
    os.makedirs(dst)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(src, name), dst)
    tensors = hf_tensors(src)
    edit(tensors)
    save_file(tensors, os.path.join(dst, SINGLE_NAME))
    return str(dst)


def test_refuses_missing_key(small_bf16, tmp_path):
    src = _rewrite_single(small_bf16, tmp_path / "src", lambda t: t.pop("vision.attn_pool.latent"))
    _convert_fails(src, tmp_path / "out", r"1 missing.*\n(.*\n)*  missing tensor 'vision\.attn_pool\.latent'")


def test_refuses_extra_key(small_bf16, tmp_path):
    src = _rewrite_single(small_bf16, tmp_path / "src", lambda t: t.update({"vision.extra.weight": torch.ones(2)}))
    _convert_fails(src, tmp_path / "out", "unexpected tensor 'vision.extra.weight' in .*model.safetensors")


def test_refuses_truncated_shard(small_bf16, tmp_path):
    src = copy_ckpt(small_bf16, tmp_path / "src")
    shard = shard_path(src, 1)
    os.truncate(shard, os.path.getsize(shard) - 100)
    _convert_fails(src, tmp_path / "out", re.escape(shard) + ": truncated")


def shard_path(ckpt, i):
    return os.path.join(ckpt, sorted(set(load_weight_map(ckpt, check_files=False).values()))[i])


def test_refuses_corrupt_header(small_bf16, tmp_path):
    src = copy_ckpt(small_bf16, tmp_path / "src")
    shard = shard_path(src, 1)
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"#garbage#")
    _convert_fails(src, tmp_path / "out", re.escape(shard) + ": corrupt safetensors header")


def test_refuses_header_with_wrong_byte_count(small_bf16, tmp_path):
    src = copy_ckpt(small_bf16, tmp_path / "src")
    shard = shard_path(src, 0)
    raw = open(shard, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__" and len(header[k]["shape"]) == 2)
    header[name]["shape"][0] //= 2  # the byte range no longer matches the shape
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    open(shard, "wb").write(raw[:8] + text + raw[8 + n:])
    _convert_fails(src, tmp_path / "out", re.escape(shard) + f": corrupt header: tensor '{re.escape(name)}'")


def test_refuses_missing_shard(small_bf16, tmp_path):
    src = copy_ckpt(small_bf16, tmp_path / "src")
    shard = shard_path(src, 2)
    os.remove(shard)
    _convert_fails(src, tmp_path / "out", re.escape(shard) + ": shard file missing")


def test_existing_output_needs_overwrite(small_bf16, converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=f"{out} already exists; pass --overwrite"):
        converted_fmt.convert_hf_to_ds(small_bf16, out, progress=False)
    assert (out / "keep.txt").exists()
    converted_fmt.convert_hf_to_ds(small_bf16, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and converted_fmt.load_manifest(str(out))
    with pytest.raises(FileExistsError):
        export.export_to_hf(converted, out, progress=False)
    with pytest.raises(ValueError, match="overlaps the input"):
        converted_fmt.convert_hf_to_ds(small_bf16, small_bf16, overwrite=True, progress=False)
    assert load_weight_map(small_bf16)


def test_failure_mid_conversion_leaves_nothing(small_bf16, tmp_path, monkeypatch):
    calls = []
    real = converted_fmt._write_layer

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("disk full")
        return real(*args, **kw)

    monkeypatch.setattr(converted_fmt, "_write_layer", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        converted_fmt.convert_hf_to_ds(small_bf16, tmp_path / "out", progress=False)
    assert no_output_left(tmp_path / "out")


_SLOW_CONVERT = """
import sys, time
sys.argv = ["hf_to_ds.py", "--hf-dir", {src!r}, "--out", {out!r}, "--no-progress"]
import converters.hf_to_ds as cli
import recipe.checkpoint.converted as converted_fmt
real = converted_fmt._write_layer
def slow(*a, **k):
    r = real(*a, **k)
    if a[2] == "layer_03-model_00-model_states.pt":
        open({flag!r}, "w").close()
        time.sleep(120)
    return r
converted_fmt._write_layer = slow
sys.exit(cli.main())
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_conversion_leaves_no_finished_output(small_bf16, tmp_path, sig):
    out, flag = str(tmp_path / "out"), str(tmp_path / "flag")
    code = _SLOW_CONVERT.format(src=small_bf16, out=out, flag=flag)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    deadline = time.time() + 60
    while not os.path.exists(flag):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(30)
    assert not os.path.exists(out)
    partial = [n for n in os.listdir(tmp_path) if n.startswith("out.tmp-")]
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM and partial == []  # cleaned up on the way out
    else:
        assert len(partial) == 1  # a killed process cannot clean up, but the leftover is no finished conversion
        with pytest.raises(CheckpointError, match="not a finished conversion"):
            converted_fmt.load_manifest(os.path.join(tmp_path, partial[0]))
    converted_fmt.convert_hf_to_ds(small_bf16, out, progress=False)  # a leftover does not block the next run
    assert converted_fmt.load_manifest(out)["num_tensors"] > 0


# --- command lines -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["hf_to_ds.py", "ds_to_hf.py"])
def test_cli_help(script):
    r = subprocess.run([sys.executable, os.path.join(REPO, "converters", script), "--help"], capture_output=True,
                       text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=120)
    assert r.returncode == 0 and "--out" in r.stdout and "--overwrite" in r.stdout and "--dtype" in r.stdout


def test_cli_round_trip_and_errors(small_bf16, tmp_path, caplog):
    from converters import ds_to_hf, hf_to_ds
    ds, hf = str(tmp_path / "ds"), str(tmp_path / "hf")
    assert hf_to_ds.main(["--hf-dir", small_bf16, "--out", ds, "--no-progress"]) == 0
    assert ds_to_hf.main(["--ds-dir", ds, "--out", hf, "--max-shard-size", "250KB", "--no-progress"]) == 0
    assert_same_tensors(hf_tensors(small_bf16), hf_tensors(hf))
    assert hf_to_ds.main(["--hf-dir", small_bf16, "--out", ds, "--no-progress"]) == 1
    assert "already exists; pass --overwrite" in caplog.text
    assert ds_to_hf.main(["--ds-dir", small_bf16, "--out", str(tmp_path / "x"), "--no-progress"]) == 1
    assert "already an HF safetensors checkpoint" in caplog.text
    assert hf_to_ds.main(["--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "y"), "--no-progress"]) == 1
    assert "nope: no such directory" in caplog.text


def test_progress_bar_counts_bytes_and_tensors(small_bf16, tmp_path, capsys):
    converted_fmt.convert_hf_to_ds(small_bf16, tmp_path / "ds", progress=True)
    err = capsys.readouterr().err
    m = converted_fmt.load_manifest(str(tmp_path / "ds"))
    assert "hf->ds" in err and f"{m['num_tensors']}/{m['num_tensors']} tensors" in err and "B/s" in err
