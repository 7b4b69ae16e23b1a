"""The whole job end to end on a built-in tiny model, on CPU (the README's first command runs this).

    python -m recipe.demo [--workdir runs/demo] [--steps 40] [--ranks 4]

1. make a tiny DeepSeek-VL2 checkpoint in the released HF layout (like base: MLA, sigmoid noaux_tc routing)
2. make a synthetic ai2d-style dataset (diagrams with multiple-choice questions) in InternVL format
3. python recipe/prepare_ai2d.py       -> DeepSeek-VL2 conversations, validated
4. python converters/hf_to_ds.py       -> DeepSpeed pipeline layer files
5. deepspeed recipe/train.py           -> 4 CPU ranks: 2 pipeline stages x 2 data-parallel, experts split 2 ways
6. python converters/ds_to_hf.py       -> back to a Hugging Face checkpoint, reloaded to check it

Every step is a real subprocess of the user-facing command; any failure stops the demo with its exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(step: str, cmd: list, env: dict) -> None:
    print(f"\n=== {step}\n$ {' '.join(cmd)}", flush=True)
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        print(f"\nDEMO FAILED at '{step}' (exit code {proc.returncode})", file=sys.stderr)
        raise SystemExit(proc.returncode or 1)
    print(f"--- {step}: done in {time.time() - t:.1f} s", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="where everything goes (recreated)")
    p.add_argument("--config", default="ds_configs/cpu_demo.json", help="DeepSpeed JSON of the training run")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--ranks", type=int, default=4, help="CPU processes (pipeline stages x data-parallel)")
    p.add_argument("--samples", type=int, default=300, help="synthetic dataset size")
    a = p.parse_args(argv)

    w = a.workdir
    if os.path.exists(os.path.join(REPO, w)):
        shutil.rmtree(os.path.join(REPO, w))
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    py = sys.executable
    paths = {"hf": f"{w}/ckpt_hf", "raw": f"{w}/ai2d", "data": f"{w}/ai2d_dsvl.jsonl", "ds": f"{w}/ckpt_ds",
             "save": f"{w}/save", "export": f"{w}/exported"}
    run("tiny checkpoint", [py, "-m", "recipe.tools.make_tiny", "--like", "base", "--dtype", "fp32",
                            "--out", paths["hf"]], env)
    run("synthetic ai2d data", [py, "-m", "recipe.tools.make_synthetic_ai2d", "--out", paths["raw"],
                                "--num", str(a.samples)], env)
    run("prepare_ai2d.py", [py, "recipe/prepare_ai2d.py", "--input", f"{paths['raw']}/ai2d_train.jsonl",
                            "--image-root", paths["raw"], "--output", paths["data"], "--num-workers", "2"], env)
    run("hf_to_ds.py", [py, "converters/hf_to_ds.py", "--hf-dir", paths["hf"], "--out", paths["ds"]], env)
    deepspeed = os.path.join(os.path.dirname(py), "deepspeed")
    run("deepspeed train.py", [deepspeed, "--num_gpus", str(a.ranks), "--master_port", str(29400 + os.getpid() % 500),
                               "recipe/train.py", "--deepspeed", a.config, "--model-dir", paths["ds"],
                               "--train-data", paths["data"], "--image-root", paths["raw"], "--save-dir",
                               paths["save"], "--train-steps", str(a.steps), "--resume", "none"], env)
    run("ds_to_hf.py", [py, "converters/ds_to_hf.py", "--ds-dir", paths["save"], "--out", paths["export"],
                        "--dtype", "fp32"], env)
    run("reload the export", [py, "-c", "from recipe.model import DeepseekVLV2ForCausalLM as M; "
                                        f"m = M.from_pretrained('{paths['export']}'); "
                                        "print(f'exported model loads: {sum(p.numel() for p in m.parameters()):,} "
                                        "parameters')"], env)

    log = [json.loads(line) for line in open(os.path.join(REPO, paths["save"], "train_log.jsonl"))]
    k = max(1, min(5, len(log) // 4))
    first = sum(r["loss"] for r in log[:k]) / k
    last = sum(r["loss"] for r in log[-k:]) / k
    print(f"\nloss: mean of the first {k} steps {first:.3f} -> mean of the last {k} steps {last:.3f}")
    if not last < first - 0.5:
        print("DEMO FAILED: the loss did not fall clearly", file=sys.stderr)
        raise SystemExit(1)
    print("\nwhere everything went:")
    for what, key in (("tiny HF checkpoint", "hf"), ("synthetic InternVL data", "raw"),
                      ("prepared conversations", "data"), ("converted DeepSpeed layers", "ds"),
                      ("training checkpoints + train_log.jsonl", "save"), ("exported HF checkpoint", "export")):
        print(f"  {what:40s} {paths[key]}")
    print("DEMO OK")


if __name__ == "__main__":
    main()
