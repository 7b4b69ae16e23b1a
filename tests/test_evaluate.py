"""recipe.evaluate / recipe.chat / recipe.eval: ai2d scoring rules, batched evaluation equal to one-by-one, every
checkpoint form (HF, converted, training) giving the same predictions, accelerate's dispatch, bad records counted
without ending the run, one-line errors for unusable checkpoints and flags."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict

import pytest
import torch
from PIL import Image

from recipe.checkpoint import CheckpointError
from recipe.checkpoint.converted import convert_hf_to_ds
from recipe.checkpoint.hf import iter_tensors
from recipe.config import VL2Config
from recipe.eval import ai2d
from recipe.eval.loading import detect_checkpoint, fine_device_map, load_for_inference, parse_max_memory
from recipe.parallel import layout as L
from recipe.prepare_ai2d import prepare
from recipe.tools.make_synthetic_ai2d import make_synthetic_ai2d

NUM_RECORDS = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(prepared jsonl, image root) of a small synthetic ai2d set."""
    root = tmp_path_factory.mktemp("eval-data")
    make_synthetic_ai2d(str(root / "raw"), num=NUM_RECORDS, seed=5)
    out = str(root / "ai2d.jsonl")
    report = prepare(str(root / "raw" / "ai2d_train.jsonl"), str(root / "raw"), out, progress=False)
    assert report["valid"] == NUM_RECORDS
    return out, str(root / "raw")


@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    return tiny_ckpt(like="small")  # MLA, fp32, 42 px tiles


def _responses(path):
    return {row["line"]: row.get("response", row.get("skipped")) for row in map(json.loads, open(path))}


def _run(loaded, data, out, **kw):
    from recipe.evaluate import run_mcq

    kw.setdefault("progress", False)
    return run_mcq(loaded, data[0], data[1], str(out), **kw)


# --- scoring rules -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("response,answer,correct", [
    ("B", "B", True), (" B", "B", True), ("b", "B", True), ("B.", "B", True), ("B. larva", "B", True),
    ("  C. because", "C", True), ("(B)", "B", True), ("B)", "B", True), ("The answer is B", "B", False),
    ("A", "B", False), ("B. larva", "A", False), ("", "A", False), ("AB", "A", False),
])
def test_scoring_follows_lmms_eval_ai2d(response, answer, correct):
    assert ai2d.is_correct(response, answer) is correct


def test_parse_record_prompt_and_reasons():
    good = {"id": "q1", "conversations": [
        {"role": "system", "content": "Be brief."},
        {"role": "<|User|>", "content": "<image>\nQ?\nA. x\nB. y\n" + ai2d.POST_PROMPT, "images": ["i.png"]},
        {"role": "<|Assistant|>", "content": " B "},
        {"role": "<|User|>", "content": "Follow-up?"}, {"role": "<|Assistant|>", "content": "A"}]}
    item = ai2d.parse_record(json.dumps(good).encode(), "f:1")
    assert item.answer == "B" and item.image_paths == ["i.png"] and not item.post_prompt_added
    assert [m["role"] for m in item.messages] == ["system", "<|User|>", "<|Assistant|>"]
    assert item.messages[-1]["content"] == ""
    plain = {"id": 3, "conversations": [{"role": "<|User|>", "content": "Q?\nA. x\nB. y"},
                                        {"role": "<|Assistant|>", "content": "A"}]}
    item = ai2d.parse_record(json.dumps(plain).encode(), "f:2")
    assert item.post_prompt_added and item.messages[0]["content"].endswith("\n" + ai2d.POST_PROMPT) and item.id == "3"
    bad = [(b"{nope", ai2d.INVALID_JSON), (b"[1]", ai2d.BAD_RECORD), (b'{"conversations": []}', ai2d.BAD_RECORD),
           (json.dumps({"conversations": [{"role": "<|User|>", "content": "Q"},
                                          {"role": "<|Assistant|>", "content": "maybe"}]}).encode(),
            ai2d.NO_ANSWER_LETTER),
           (json.dumps({"conversations": [{"role": "<|User|>", "content": "Q"}]}).encode(), ai2d.NO_ANSWER_LETTER),
           (json.dumps({"conversations": [{"role": "bot", "content": "Q"}]}).encode(), ai2d.BAD_RECORD)]
    for line, reason in bad:
        with pytest.raises(ai2d.SkipRecord) as e:
            ai2d.parse_record(line, "f:9")
        assert e.value.reason == reason and "f:9" in str(e.value)


# --- evaluation ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(hf):
    return load_for_inference(hf, dtype="fp32", device="cpu")


def test_batched_evaluation_equals_one_by_one(loaded, data, tmp_path):
    s1 = _run(loaded, data, tmp_path / "b1.jsonl", batch_size=1)
    s4 = _run(loaded, data, tmp_path / "b4.jsonl", batch_size=4)
    assert _responses(tmp_path / "b1.jsonl") == _responses(tmp_path / "b4.jsonl")
    rows = [json.loads(x) for x in open(tmp_path / "b4.jsonl")]
    assert [r["line"] for r in rows] == list(range(1, NUM_RECORDS + 1))
    assert all(0 < r["new_tokens"] <= ai2d.MAX_NEW_TOKENS and r["answer"] in "ABCD" for r in rows)
    assert all(r["correct"] == ai2d.is_correct(r["response"], r["answer"]) for r in rows)
    for s in (s1, s4):
        assert s["records"] == s["scored"] == NUM_RECORDS and s["skipped"] == 0
        assert s["accuracy"] == sum(r["correct"] for r in rows) / NUM_RECORDS
        assert s["samples_per_s"] > 0 and s["tokens_per_s"] > 0
        assert s["generated_tokens"] == sum(r["new_tokens"] for r in rows)
    assert json.load(open(str(tmp_path / "b4.jsonl") + ".summary.json"))["correct"] == s4["correct"]
    assert s4["kind"] == "hf" and s4["dtype"] == "float32"
    limited = _run(loaded, data, tmp_path / "lim.jsonl", batch_size=3, limit=4)
    assert limited["records"] == 4 and sum(1 for _ in open(tmp_path / "lim.jsonl")) == 4


def test_bad_records_are_counted_and_the_run_goes_on(loaded, data, tmp_path):
    good_lines = open(data[0]).read().splitlines()
    with open(os.path.join(data[1], "broken_eval_test.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not a png")

    def record(user, answer, images=None):
        turn = {"role": "<|User|>", "content": user}
        if images:
            turn["images"] = images
        return json.dumps({"id": "x", "conversations": [turn, {"role": "<|Assistant|>", "content": answer}]})

    lines = [good_lines[0], "{not json", record("Q?\nA. x\nB. y", "a diagram"),
             record("<image>\nQ?", "A", ["broken_eval_test.png"]), record("<image> <image> two", "A", ["x.png"]),
             json.dumps(["a", "list"]), good_lines[1]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    from recipe.evaluate import run_mcq

    s = run_mcq(loaded, str(path), data[1], str(tmp_path / "p.jsonl"), batch_size=3, progress=False)
    assert s["records"] == 7 and s["scored"] == 2
    assert s["skipped_by_reason"] == {"bad_prompt": 1, "bad_record": 1, "image_error": 1, "invalid_json": 1,
                                      "no_answer_letter": 1}
    rows = [json.loads(x) for x in open(tmp_path / "p.jsonl")]
    assert [r.get("skipped") for r in rows] == [None, "invalid_json", "no_answer_letter", "image_error", "bad_prompt",
                                                "bad_record", None]
    assert all(str(path) in r["message"] for r in rows if "skipped" in r)


def _write_training_checkpoint(hf_dir: str, save_dir: str, tag: str = "global_step3") -> None:
    """One pipeline stage in DeepSpeed 0.19's file layout (see tests/test_checkpoint_training.py for all splits)."""
    cfg = VL2Config.from_json(hf_dir)
    tensors = dict(iter_tensors(hf_dir))
    layers = L.build_layout(cfg)
    tag_dir = os.path.join(save_dir, tag)
    os.makedirs(tag_dir)
    module, moe_j = {}, 0
    for idx, names in L.keys_by_layer(cfg, tensors).items():
        experts = defaultdict(dict)
        for name in names:
            local = L.hf_to_local(layers[idx], name)
            e = L.expert_id_of_local(local)
            (module if e is None else experts[e])[f"{idx}.{local}"] = tensors[name].clone()
        for e, state in experts.items():
            torch.save(state, os.path.join(tag_dir, f"layer_{moe_j}_expert_{e}_mp_rank_00_model_states.pt"))
        moe_j += bool(experts)
    torch.save({"module": module}, os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write(tag)


def test_every_checkpoint_form_gives_the_same_predictions(hf, data, tmp_path, caplog):
    from recipe.evaluate import main

    conv = str(tmp_path / "converted")
    convert_hf_to_ds(hf, conv, progress=False)
    train = str(tmp_path / "train")
    _write_training_checkpoint(hf, train)
    assert [detect_checkpoint(p) for p in (hf, conv, train)] == ["hf", "converted", "training"]
    common = ["--data", data[0], "--image-root", data[1], "--dtype", "fp32", "--batch-size", "4", "--limit", "5",
              "--quiet"]
    runs = {"hf": [], "converted": [], "training": ["--config-dir", hf], "training_tag": ["--tag", "global_step3",
                                                                                          "--config-dir", hf]}
    for name, extra in runs.items():
        model = {"hf": hf, "converted": conv}.get(name, train)
        with caplog.at_level(logging.INFO, logger="recipe.evaluate"):
            assert main(["--model", model, "--output", str(tmp_path / f"{name}.jsonl")] + common + extra) == 0
        assert "accuracy" in caplog.text and "samples/s" in caplog.text
    preds = {name: _responses(tmp_path / f"{name}.jsonl") for name in runs}
    assert preds["hf"] == preds["converted"] == preds["training"] == preds["training_tag"] and len(preds["hf"]) == 5
    summary = json.load(open(str(tmp_path / "training_tag.jsonl") + ".summary.json"))
    assert summary["kind"] == "training" and summary["tag"] == "global_step3"


def test_device_map_dispatch_gives_the_same_predictions(hf, loaded, data, tmp_path):
    """accelerate's dispatch path (hooks attached even on one device): every tensor read onto its mapped device,
    the caches allocated per layer; generation and scores equal the single-device run."""
    spread = load_for_inference(hf, dtype="fp32", device_map="auto", force_hooks=True)
    assert hasattr(spread.model.language.model.layers[0], "_hf_hook")
    assert set(spread.device_map) >= {"vision", "language.model.layers.2", "language.lm_head"}
    _run(spread, data, tmp_path / "spread.jsonl", batch_size=4, limit=4)
    _run(loaded, data, tmp_path / "one.jsonl", batch_size=4, limit=4)
    assert _responses(tmp_path / "spread.jsonl") == _responses(tmp_path / "one.jsonl")
    bf16 = load_for_inference(hf, dtype="bf16", device_map="auto")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}


def test_device_map_keeps_the_input_side_together(hf):
    cfg = VL2Config.from_json(hf)
    fine = fine_device_map({"": 0}, cfg)
    assert set(fine.values()) == {0} and "language.model.layers.2" in fine
    coarse = {"vision": 0, "projector": 0, "image_newline": 0, "view_seperator": 0, "language.model.embed_tokens": 1,
              "language.model.layers.0": 1, "language.model.layers.1": 1, "language.model.layers.2": 2,
              "language.model.norm": 2, "language.lm_head": "cpu"}
    fine = fine_device_map(coarse, cfg)
    assert all(fine[u] == 1 for u in ("vision", "projector", "image_newline", "view_seperator"))
    assert fine["language.model.layers.2"] == 2 and fine["language.lm_head"] == "cpu"
    with pytest.raises(ValueError, match="does not fit"):
        fine_device_map({"language": "disk", "vision": 0, "projector": 0, "image_newline": 0,
                         "view_seperator": 0}, cfg)
    assert parse_max_memory("0=70GiB, cpu=200GiB") == {0: "70GiB", "cpu": "200GiB"}
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        parse_max_memory("70GiB")


def test_unusable_inputs_are_one_line_errors(hf, data, tmp_path, caplog):
    from recipe.evaluate import main

    not_a_ckpt = tmp_path / "empty"
    not_a_ckpt.mkdir()
    (not_a_ckpt / "config.json").write_text("{}")
    base = ["--data", data[0], "--image-root", data[1], "--quiet", "--output", str(tmp_path / "o.jsonl")]
    cases = [(["--model", str(not_a_ckpt)], "not a model checkpoint"),
             (["--model", str(tmp_path / "missing")], "no such directory"),
             (["--model", hf, "--tag", "x"], "apply to training checkpoints"),
             (["--model", hf, "--data", str(tmp_path / "nope.jsonl")], "no such data file")]
    for args, message in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="recipe.evaluate"):
            assert main(base + args) == 2
        (rec,) = [r for r in caplog.records if r.levelname == "ERROR"]
        assert message in rec.getMessage() and rec.exc_info is None
    assert not os.path.exists(tmp_path / "o.jsonl")
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        detect_checkpoint(str(not_a_ckpt))


# --- chat ------------------------------------------------------------------------------------------------------
def test_chat_answers_and_samples_reproducibly(hf, tmp_path, capsys):
    from recipe.chat import build_question, main

    for i, size in enumerate([(90, 40), (30, 30)]):
        Image.new("RGB", size, (200, 30 * i, 10)).save(tmp_path / f"{i}.png")
    common = ["--model", hf, "--dtype", "fp32", "--image", str(tmp_path / "0.png"), "--image",
              str(tmp_path / "1.png"), "--question", "Which image is wider?", "--max-new-tokens", "6"]
    outs = []
    for extra in ([], [], ["--temperature", "1.0", "--seed", "7"], ["--temperature", "1.0", "--seed", "7"]):
        assert main(common + extra) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[2] == outs[3] and all(o.endswith("\n") for o in outs)
    assert build_question("Q", 2) == "<image>\n<image>\nQ" and build_question("a <image> b", 1) == "a <image> b"
    assert main(common[:-4] + ["--question", "<image> <image> <image>"]) == 2  # 3 placeholders, 2 images
    assert main(["--model", hf, "--image", str(tmp_path / "missing.png"), "--question", "Q"]) == 2
