"""The run JSON's types: every recipe key strictly typed from TrainConfig's annotations, DeepSpeed's top-level keys
checked against the keys the installed DeepSpeed reads, command-line overrides through the same checker, and a
bad setting stopping train.py with exit code 2 and one line (no process group, no model)."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import subprocess
import sys
from typing import Literal, Optional

import pytest

from recipe.config import ConfigError
from recipe.deepspeed_keys import deepspeed_config_keys
from recipe.parallel.layout import FREEZE_GROUPS as FREEZE_PARTS
from recipe.settings import PathStr, check_value, describe_type, field_types
from recipe.train_config import TrainConfig, load_run_config

from helpers.launch import REPO, cpu_env
from helpers.runs import write_config

EP8 = os.path.join(REPO, "ds_configs", "ep8.json")
DS_CONFIGS = sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json")))


def run_json(tmp_path, recipe=None, drop=(), **ds):
    """ep8.json with ``recipe`` keys replaced (``drop``: removed) and top-level DeepSpeed keys added."""
    raw = json.load(open(EP8))
    raw["recipe"].update(recipe or {})
    for key in drop:
        raw["recipe"].pop(key)
    raw.update(ds)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(raw))
    return str(path)


# (key, bad value, what the message says is expected, the label if not recipe.<key>, the value shown if nested)
BOOL, INT, PATH = "expected true or false (a JSON boolean)", "expected an integer", "a non-empty string (a path)"
FREEZE = "expected an object whose keys are some of vision, projector, language, embeddings and whose values are " \
         "true or false"
SPLIT = 'expected a list of integers, "auto" or null'
BAD = [
    ("mask_prompt", "false", BOOL, None, None),
    ("mask_prompt", "true", BOOL, None, None),
    ("mask_prompt", None, BOOL, None, None),
    ("activation_checkpointing", "false", BOOL, None, None),
    ("activation_checkpointing", 1, BOOL, None, None),
    ("activation_checkpointing", 0, BOOL, None, None),
    ("activation_checkpointing", [True], BOOL, None, None),
    ("train_steps", True, INT, None, None),
    ("train_steps", "100", INT, None, None),
    ("train_steps", 100.0, INT, None, None),
    ("train_steps", None, INT, None, None),
    ("seed", False, INT, None, None),
    ("pipeline_stages", [2], INT, None, None),
    ("num_workers", "2", INT, None, None),
    ("aux_loss_coef", "0.1", "expected a number or null", None, None),
    ("aux_loss_coef", [0.1], "expected a number or null", None, None),
    ("aux_loss_coef", True, "expected a number or null", None, None),
    ("aux_loss_coef", {"value": 0.1}, "expected a number or null", None, None),
    ("aux_loss_coef", math.inf, "expected a number or null", None, None),
    ("correction_bias_update_rate", None, "expected a number,", None, None),
    ("correction_bias_update_rate", "0.001", "expected a number,", None, None),
    ("correction_bias_update_rate", False, "expected a number,", None, None),
    ("freeze", ["vision"], FREEZE, None, None),
    ("freeze", "vision", FREEZE, None, None),
    ("freeze", None, FREEZE, None, None),
    ("freeze", True, FREEZE, None, None),
    ("freeze", {"vision": "yes"}, BOOL, "recipe.freeze.vision", '"yes"'),
    ("freeze", {"vision": 1}, BOOL, "recipe.freeze.vision", "1"),
    ("freeze", {"language": None}, BOOL, "recipe.freeze.language", "null"),
    ("freeze", {"vit": True}, "unknown parts ['vit']; expected some of ['vision', 'projector', 'language', "
                              "'embeddings']", None, None),
    ("resume", 5, "expected a string or null", None, None),
    ("resume", False, "expected a string or null", None, None),
    ("resume", ["latest"], "expected a string or null", None, None),
    ("save_dir", ["x"], PATH, None, None),
    ("save_dir", "", PATH, None, None),
    ("save_dir", None, PATH, None, None),
    ("model_dir", 3, PATH, None, None),
    ("train_data", {"path": "x"}, PATH, None, None),
    ("image_root", True, PATH, None, None),
    ("decoder_split", "balanced", SPLIT, None, None),
    ("decoder_split", 30, SPLIT, None, None),
    ("decoder_split", {"0": 13}, SPLIT, None, None),
    ("decoder_split", [13, "17"], INT, "recipe.decoder_split[1]", '"17"'),
    ("decoder_split", [13.0, 17], INT, "recipe.decoder_split[0]", "13.0"),
    ("decoder_split", [True, 1], INT, "recipe.decoder_split[0]", "true"),
]


@pytest.mark.parametrize("key, value, expected, label, shown", BAD,
                         ids=[f"{k}={json.dumps(v)}" for k, v, *_ in BAD])
def test_a_wrong_type_is_a_config_error_naming_key_value_and_type(tmp_path, key, value, expected, label, shown):
    path = run_json(tmp_path, {key: value})
    with pytest.raises(ConfigError) as err:  # never a TypeError / AttributeError
        load_run_config(path)
    message = str(err.value)
    assert f"{label or 'recipe.' + key}={shown or json.dumps(value)}: " in message, message
    assert expected in message, message
    assert message.startswith(path + ": ") and "\n" not in message


def test_the_issue_example_message_exactly(tmp_path):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"model_dir": "m", "train_data": "d", "image_root": "i",
                               "activation_checkpointing": "false"})
    assert str(err.value) == \
        'recipe.activation_checkpointing="false": expected true or false (a JSON boolean), got a string'


@pytest.mark.parametrize("recipe, message", [
    ({"train_steps": 0}, "recipe.train_steps=0: must be a positive integer"),
    ({"expert_parallel_size": -8}, "recipe.expert_parallel_size=-8: must be a positive integer"),
    ({"save_interval": -1}, "recipe.save_interval=-1: must be a non-negative integer"),
    ({"decoder_split": [-1, 31]}, "recipe.decoder_split=[-1, 31]: layer counts must be non-negative integers"),
    ({"aux_loss_coef": -0.1}, "recipe.aux_loss_coef=-0.1: must be >= 0"),
    ({"correction_bias_update_rate": -1}, "recipe.correction_bias_update_rate=-1.0: must be >= 0"),
    ({"trian_steps": 5}, "unknown keys ['trian_steps'] ('trian_steps': did you mean 'train_steps'?)"),
])
def test_ranges_and_unknown_keys_are_still_checked(tmp_path, recipe, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(run_json(tmp_path, recipe))
    assert message in str(err.value)


def test_a_missing_path_says_it_is_not_set(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe\.model_dir is not set \(or pass it on the command line\)"):
        load_run_config(run_json(tmp_path, drop=["model_dir"]))


@pytest.mark.parametrize("recipe, want", [
    ({"aux_loss_coef": 1, "correction_bias_update_rate": 0},
     {"aux_loss_coef": 1.0, "correction_bias_update_rate": 0.0}),
    ({"aux_loss_coef": 0.01, "correction_bias_update_rate": 0.001},
     {"aux_loss_coef": 0.01, "correction_bias_update_rate": 0.001}),
    ({"aux_loss_coef": None, "resume": None}, {"aux_loss_coef": None, "resume": None}),
    ({"resume": "none"}, {"resume": "none"}),
    ({"resume": "global_step500"}, {"resume": "global_step500"}),
    ({"decoder_split": None}, {"decoder_split": None, "split": None}),
    ({"decoder_split": "auto"}, {"decoder_split": "auto", "split": None}),
    ({"decoder_split": [0, 30]}, {"decoder_split": [0, 30], "split": [0, 30]}),
    ({"freeze": {}}, {"freeze": dict.fromkeys(FREEZE_PARTS, False)}),
    ({"freeze": {"vision": True}}, {"freeze": {**dict.fromkeys(FREEZE_PARTS, False), "vision": True}}),
    ({"mask_prompt": False, "activation_checkpointing": False}, {"mask_prompt": False,
                                                                 "activation_checkpointing": False}),
])
def test_valid_forms_parse(tmp_path, recipe, want):
    _, tc = load_run_config(run_json(tmp_path, recipe))
    for key, value in want.items():
        got = getattr(tc, key)
        assert got == value and type(got) is type(value), (key, got)


def test_defaults_are_valid_for_their_own_annotations():
    """Every field's annotation is one the checker understands, and its default passes it (paths aside: they
    must be set)."""
    tc = TrainConfig()
    for key, tp in field_types(TrainConfig).items():
        assert describe_type(tp)
        if getattr(tc, key) != "":
            assert check_value(key, getattr(tc, key), tp) == getattr(tc, key)


def test_readme_types_table_matches_the_annotations():
    """ds_configs/README.md's "Types" table lists every recipe key once, each row's keys sharing one annotation."""
    readme = open(os.path.join(REPO, "ds_configs", "README.md")).read()
    table = readme.split("### Types", 1)[1].split("```", 1)[0]
    types = field_types(TrainConfig)
    listed = []
    for row in re.findall(r"^\| [a-z ]+ \| (.+?) \|", table, re.M):
        keys = re.findall(r"`([a-z_]+)`", row)  # none in the header row
        if not keys:
            continue
        listed += keys
        assert len({describe_type(types[k]) for k in keys}) == 1, keys
    assert sorted(listed) == sorted(types)


def test_check_value_rules():
    assert check_value("x", 3, float) == 3.0 and isinstance(check_value("x", 3, float), float)
    assert check_value("x", "", str) == "" and check_value("x", None, Optional[int]) is None
    for value, tp in [(True, int), (1, bool), ("false", bool), (1.0, int), (True, float), ("1", float),
                      (math.nan, float), (None, float), (10 ** 400, float), ("", PathStr), (None, str),
                      (True, Literal[1]), ("x", Literal["auto"]), ([1, None], list[int])]:
        with pytest.raises(ConfigError, match=r"^x(\[1\])?=.*: expected .*, got "):
            check_value("x", value, tp)


def test_validate_catches_a_wrong_type_set_in_python():
    tc = TrainConfig.from_dict({"model_dir": "m", "train_data": "d", "image_root": "i"})
    tc.train_steps = "5"
    with pytest.raises(ConfigError, match=r'recipe\.train_steps="5": expected an integer, got a string'):
        tc.validate()


def test_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object .*, got a list"):
        load_run_config(str(path))
    path.write_text(json.dumps({"train_batch_size": 8, "recipe": []}))
    with pytest.raises(ConfigError, match=r"recipe=\[\]: expected a JSON object of recipe settings, got a list"):
        load_run_config(str(path))


# --- command-line overrides -----------------------------------------------------------------------------------------

def test_overrides_replace_and_go_through_the_same_checker(tmp_path):
    path = run_json(tmp_path)
    _, tc = load_run_config(path, {"train_steps": 7, "save_dir": "elsewhere", "resume": "none", "model_dir": None})
    assert (tc.train_steps, tc.save_dir, tc.resume, tc.model_dir) == (7, "elsewhere", "none", "ckpt/DeepSeekVL2")
    for overrides, message in [
        ({"train_steps": True}, "recipe.train_steps=true: expected an integer, got a boolean "
                                "(set by --train-steps on the command line)"),
        ({"train_steps": "7"}, 'recipe.train_steps="7": expected an integer, got a string (set by --train-steps'),
        ({"save_dir": ""}, 'recipe.save_dir="": expected a non-empty string (a path), got an empty string '
                           '(set by --save-dir on the command line)'),
        ({"resume": 3}, "recipe.resume=3: expected a string or null, got an integer (set by --resume"),
        ({"train_steps": 0}, "recipe.train_steps=0: must be a positive integer"),
        ({"no_such": 1}, "--no-such: not a recipe setting"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_run_config(path, overrides)
        assert message in str(err.value), str(err.value)


# --- DeepSpeed's top-level keys -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", DS_CONFIGS, ids=os.path.basename)
def test_project_configs_load(path):
    ds, tc = load_run_config(path)
    assert "recipe" not in ds and ds["zero_optimization"]["stage"] == 1 and tc.model_dir


def test_the_test_suites_configs_load(tmp_path):
    """The DeepSpeed keys of tests/helpers/runs.py (with a monitor, as test_train.py adds), of
    tests/workers/train_pipeline.py and tests/test_plan.py."""
    inputs = {"model_dir": "m", "train_data": "d", "image_root": "i"}
    monitor = {"csv_monitor": {"enabled": True, "output_path": "mon", "job_name": "full"}}
    load_run_config(write_config(tmp_path / "runs.json", inputs, tmp_path / "save", ds=monitor))
    others = {"bf16": {"enabled": False}, "data_types": {"grad_accum_dtype": "fp32"},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    load_run_config(write_config(tmp_path / "others.json", inputs, tmp_path / "save", ds=others))


def test_documented_deepspeed_keys_are_known():
    """Every key in ds_configs/README.md's "DeepSpeed keys used" table is one DeepSpeed reads."""
    readme = open(os.path.join(REPO, "ds_configs", "README.md")).read()
    table = readme.split("## DeepSpeed keys used", 1)[1].split("\n## ", 1)[0]
    documented = {name.split(".")[0] for row in re.findall(r"^\| (`.+?) \|", table, re.M)
                  for name in re.findall(r"`([a-z_.0-9]+)`", row)}
    known, _, _ = deepspeed_config_keys()
    assert len(documented) >= 12 and documented <= known, documented - known


def test_known_keys_come_from_the_deepspeed_probe():
    known, removed, version = deepspeed_config_keys()
    assert version.startswith("0.19.")
    assert {"zero_optimization", "train_batch_size", "bf16", "fp16", "optimizer", "scheduler", "csv_monitor",
            "tensorboard", "wandb", "pipeline", "activation_checkpointing", "gradient_clipping",
            "communication_data_type", "data_types", "sequence_parallel_size"} <= known
    # the probe, not the wide fallback: sub-keys and removed features are not top-level keys
    assert not {"enabled", "stage", "params", "type", "recipe"} & known
    assert {"amp", "nebula", "elasticity"} <= set(removed) and not set(removed) & known


def test_a_failing_probe_leaves_the_keys_unchecked_with_a_warning(tmp_path, monkeypatch, caplog):
    """A DeepSpeed whose config parser the probe cannot drive: warn, refuse nothing valid (removed features
    still are)."""
    from deepspeed.runtime import config as ds_config

    def broken(*a, **kw):
        raise RuntimeError("a future DeepSpeed")

    monkeypatch.setattr(ds_config, "DeepSpeedConfig", broken)
    deepspeed_config_keys.cache_clear()
    try:
        assert deepspeed_config_keys()[0] is None
        with caplog.at_level(logging.WARNING, logger="recipe.deepspeed_keys"):
            load_run_config(run_json(tmp_path, sequence_parallel_size=1))
        assert "cannot list the top-level keys DeepSpeed" in caplog.text and "a future DeepSpeed" in caplog.text
        with pytest.raises(ConfigError, match="has been removed"):
            load_run_config(run_json(tmp_path, nebula={"enabled": True}))
    finally:
        deepspeed_config_keys.cache_clear()


@pytest.mark.parametrize("key, message", [
    ("zero_optimisation", 'unknown DeepSpeed key "zero_optimisation": did you mean "zero_optimization"?'),
    ("gradient_cliping", 'unknown DeepSpeed key "gradient_cliping": did you mean "gradient_clipping"?'),
    ("bf_16", 'unknown DeepSpeed key "bf_16": did you mean "bf16"?'),
    ("csv_monitors", 'did you mean "csv_monitor"?'),
    ("xyzzy", 'unknown DeepSpeed key "xyzzy": DeepSpeed 0.19'),
    ("train_steps", '"train_steps" is a recipe setting, not a DeepSpeed key: move it into the "recipe" block'),
    ("amp", 'Apex AMP integration has been removed'),
])
def test_an_unknown_deepspeed_key_is_refused(tmp_path, key, message):
    path = run_json(tmp_path, **{key: {"stage": 1}})
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert str(err.value).startswith(path + ": ") and message in str(err.value), str(err.value)


# --- through train.py -------------------------------------------------------------------------------------------

@pytest.fixture
def restore_logging():
    """train.main configures the root logger (stdout, force=True); put pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("change, message", [
    ({"recipe": {"activation_checkpointing": "false"}}, 'recipe.activation_checkpointing="false": expected true or '
                                                        'false (a JSON boolean), got a string'),
    ({"recipe": {"freeze": {"vision": "yes"}}}, 'recipe.freeze.vision="yes": expected true or false'),
    ({"zero_optimisation": {"stage": 1}}, 'did you mean "zero_optimization"?'),
])
def test_train_main_exits_2_with_one_line(tmp_path, capsys, restore_logging, monkeypatch, change, message):
    from recipe import train

    def no_process_group(*a, **kw):
        raise AssertionError("init_distributed must not run on a bad config")

    monkeypatch.setattr("recipe.parallel.dist.init_distributed", no_process_group)
    path = run_json(tmp_path, change.pop("recipe", None), **change)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--deepspeed", path])
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "configuration error: " in lines[0] and message in lines[0], lines


def test_train_script_exits_2_with_one_line(tmp_path):
    """The real command line (a fresh interpreter, as the launcher starts it): exit code 2, one line, no
    traceback."""
    path = run_json(tmp_path, {"train_steps": True})
    proc = subprocess.run([sys.executable, os.path.join("recipe", "train.py"), "--deepspeed", path], cwd=REPO,
                          env=cpu_env(PYTHONPATH=REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "recipe.train_steps=true: expected an integer, got a boolean" in lines[0], lines
    assert "Traceback" not in proc.stderr, proc.stderr
