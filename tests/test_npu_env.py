"""recipe/npu_env.sh sets the Ascend variables with their documented defaults, and the .deepspeed_env it writes is
carried to every host by DeepSpeed's own multi-node launcher code; the hostfiles parse with DeepSpeed's parser."""

from __future__ import annotations

import os
import subprocess
import types

import pytest

from helpers.launch import REPO

SCRIPT = os.path.join(REPO, "recipe", "npu_env.sh")

# The documented defaults (docs/scale_out.md, the script's own table); the original MindSpeed-MM recipe's values
# where it set one.
DEFAULTS = {
    "DS_ACCELERATOR": "npu",
    "HCCL_CONNECT_TIMEOUT": "1200",
    "HCCL_EXEC_TIMEOUT": "1800",
    "TASK_QUEUE_ENABLE": "2",
    "CPU_AFFINITY_CONF": "1",
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
    "ACLNN_CACHE_LIMIT": "100000",
    "MULTI_STREAM_MEMORY_REUSE": "1",
    "COMBINED_ENABLE": "1",
    "NPU_ASD_ENABLE": "0",
    "ASCEND_LAUNCH_BLOCKING": "0",
    "ASCEND_GLOBAL_LOG_LEVEL": "3",
    "ASCEND_SLOG_PRINT_TO_STDOUT": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
# Forwarded by DeepSpeed's launcher only through the file (no exported prefix matches them)
NOT_FORWARDED_BY_PREFIX = {"TASK_QUEUE_ENABLE", "CPU_AFFINITY_CONF", "PYTORCH_NPU_ALLOC_CONF", "ACLNN_CACHE_LIMIT",
                           "MULTI_STREAM_MEMORY_REUSE", "COMBINED_ENABLE", "NPU_ASD_ENABLE", "TOKENIZERS_PARALLELISM",
                           "DS_ACCELERATOR"}


def _bash(command: str, cwd: str, **env) -> subprocess.CompletedProcess:
    """Run ``command`` in a clean bash (no inherited Ascend/DeepSpeed variables) with ``set -u``."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": cwd, "ASCEND_HOME": os.path.join(cwd, "no-cann")}
    base.update(env)
    return subprocess.run(["bash", "-c", "set -u\n" + command], cwd=cwd, env=base, capture_output=True, text=True,
                          timeout=60)


def _printed_env(out: str) -> dict:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_sourcing_sets_every_variable_to_its_default(tmp_path):
    names = " ".join(DEFAULTS)
    r = _bash(f'source "{SCRIPT}"\nfor v in {names}; do echo "$v=${{!v}}"; done\necho still-running', str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("still-running")  # sourcing neither exits nor turns on errexit in the caller
    assert _printed_env(r.stdout) == DEFAULTS
    assert r.stderr == ""


def test_values_set_before_sourcing_win(tmp_path):
    r = _bash(f'source "{SCRIPT}"; source "{SCRIPT}"; echo "HCCL_CONNECT_TIMEOUT=$HCCL_CONNECT_TIMEOUT"; '
              f'echo "NPU_ASD_ENABLE=$NPU_ASD_ENABLE"', str(tmp_path), HCCL_CONNECT_TIMEOUT="3600")
    assert r.returncode == 0, r.stderr
    assert _printed_env(r.stdout) == {"HCCL_CONNECT_TIMEOUT": "3600", "NPU_ASD_ENABLE": "0"}


def _replay_deepspeed_env(cwd: str) -> dict:
    """What DeepSpeed 0.19.8's multi-node launcher exports from the .deepspeed_env files (runner.main, replayed with
    its own constants and its PDSH backend), as the KEY -> 'export KEY=VAL;' pieces of the remote command."""
    from deepspeed.launcher import runner
    from deepspeed.launcher.multinode_runner import PDSHRunner

    args = runner.parse_args(["--hostfile", os.path.join(REPO, "hostfiles", "4x8"), "recipe/train.py",
                              "--deepspeed", "ds_configs/ep8.json"])
    args.master_addr = "node0"
    pdsh = PDSHRunner(args, "e30=")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        for environ_path in runner.DEEPSPEED_ENVIRONMENT_PATHS:  # the same loop as runner.main
            environ_file = os.path.join(environ_path, runner.DEEPSPEED_ENVIRONMENT_NAME)
            if os.path.isfile(environ_file):
                with open(environ_file) as fd:
                    for var in fd.readlines():
                        key, val = var.split("=", maxsplit=1)
                        pdsh.add_export(key, val)
        cmd, _, _ = pdsh.get_cmd({}, {"node0": list(range(8)), "node1": list(range(8))})
    finally:
        os.chdir(old)
    exports = next(part for part in cmd if part.startswith("export "))
    return {piece.split("=", 1)[0].replace("export ", "").strip(): piece.split("=", 1)[1]
            for piece in exports.split(";") if "=" in piece}


def test_written_deepspeed_env_reaches_every_host(tmp_path):
    (tmp_path / ".deepspeed_env").write_text("MY_SITE_VAR=1\nHCCL_CONNECT_TIMEOUT=7\n")
    r = _bash(f'source "{SCRIPT}" && "{SCRIPT}" --write-deepspeed-env', str(tmp_path), HCCL_EXEC_TIMEOUT="2400")
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / ".deepspeed_env").read_text().splitlines()
    # DeepSpeed splits every line on '=': no comments, no blank lines, one entry per variable
    assert all("=" in line and not line.startswith("#") for line in lines), lines
    assert len(lines) == len({line.split("=", 1)[0] for line in lines})
    written = _printed_env("\n".join(lines))
    assert written == {**DEFAULTS, "HCCL_EXEC_TIMEOUT": "2400", "MY_SITE_VAR": "1"}  # others kept, ours refreshed

    exported = _replay_deepspeed_env(str(tmp_path))
    for name, value in {**DEFAULTS, "HCCL_EXEC_TIMEOUT": "2400"}.items():
        assert exported[name] == value, name


def test_prefixes_deepspeed_forwards_by_itself():
    """Why the file is needed: the variables below match none of the prefixes the launcher exports on its own."""
    from deepspeed.accelerator.npu_accelerator import NPU_Accelerator
    from deepspeed.launcher import runner

    prefixes = runner.EXPORT_ENVS + NPU_Accelerator.export_envs(types.SimpleNamespace())
    assert {"ASCEND", "HCCL"} <= set(prefixes)
    for name in DEFAULTS:
        forwarded = any(name.startswith(p) for p in prefixes)
        assert forwarded == (name not in NOT_FORWARDED_BY_PREFIX), name


def test_deepspeed_env_file_name_follows_ds_env_file(tmp_path):
    r = _bash(f'"{SCRIPT}" --write-deepspeed-env', str(tmp_path), DS_ENV_FILE="cluster.env")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cluster.env").is_file() and not (tmp_path / ".deepspeed_env").exists()


def test_list_and_bad_option(tmp_path):
    r = _bash(f'"{SCRIPT}" --list', str(tmp_path))
    assert r.returncode == 0 and all(name in r.stdout for name in DEFAULTS)
    assert _bash(f'"{SCRIPT}" --nope', str(tmp_path)).returncode == 2


def test_docs_document_every_variable_and_default():
    with open(os.path.join(REPO, "docs", "scale_out.md"), encoding="utf-8") as f:
        doc = f.read()
    for name, value in DEFAULTS.items():
        assert f"`{name}`" in doc and f"`{value}`" in doc, name


@pytest.mark.parametrize("name, hosts", [("4x8", {"node0": 8, "node1": 8, "node2": 8, "node3": 8}),
                                         ("local", {"localhost": 4})])
def test_hostfiles_parse_with_deepspeed(name, hosts):
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(os.path.join(REPO, "hostfiles", name))) == hosts
