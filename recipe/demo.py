"""The whole job end to end on a built-in tiny model, on CPU (the README's first command runs this).

    python -m recipe.demo [--workdir runs/demo] [--steps 40] [--ranks 4]

1. make a tiny DeepSeek-VL2 checkpoint in the released HF layout (like base: MLA, sigmoid noaux_tc routing)
2. make a synthetic ai2d-style dataset (diagrams with multiple-choice questions) in InternVL format
3. python recipe/prepare_ai2d.py       -> DeepSeek-VL2 conversations, validated; 12% held out by record id
4. python converters/hf_to_ds.py       -> DeepSpeed pipeline layer files
5. python -m recipe.evaluate           -> ai2d accuracy and loss of the converted (random) model on held-out records
6. deepspeed recipe/train.py           -> 4 CPU ranks: 2 pipeline stages x 2 data-parallel, experts split 2 ways;
                                          validation loss on the held-out records every 10 steps (eval_batch)
7. python converters/ds_to_hf.py       -> back to a Hugging Face checkpoint
8. python -m recipe.evaluate           -> the export reloaded; ai2d accuracy on the same records

Every step is a real subprocess of the user-facing command, except the two evaluations (5, 8), which run in this
process (one model load each; the command they stand for is printed); any failure stops the demo with its exit
code. At the end it prints the held-out loss (before: the plain model's token-mean loss, ``recipe.eval.loss``;
after: train.py's last validation, the same figure from the pipeline engine) and the ai2d accuracy before and
after fine-tuning. The tiny model starts from random weights, so "before" answers are not even option letters; 40
steps teach it the answer format (an option letter, then the end of the answer: chance-level accuracy, about 27%);
bench/learning.py trains long enough to read the pictures.
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


def score(when: str, model: str, paths: dict, recipe: dict, n_eval, with_loss: bool = True) -> dict:
    """ai2d accuracy (and, with ``with_loss``, the held-out loss) of a checkpoint on the first ``n_eval`` held-out
    records, in this process (one model load): ``recipe.evaluate.run_mcq``, what ``python -m recipe.evaluate``
    runs (greedy, at most 16 new tokens, lmms-eval's ai2d rules), and ``recipe.eval.loss.heldout_loss``, the plain
    model's token-mean loss: the figure train.py's validation reports (after training, the demo takes train.py's).
    One sample at a time: the prompts' lengths differ a lot (0.3-2k tokens)."""
    from recipe.data.processor import DeepseekVLV2Processor
    from recipe.eval.loading import load_for_inference
    from recipe.eval.loss import heldout_loss
    from recipe.evaluate import run_mcq

    limit = "" if n_eval is None else f" --limit {n_eval}"
    print(f"\n=== ai2d accuracy{' and held-out loss' if with_loss else ''} {when}\n$ python -m recipe.evaluate "
          f"--model {model} --data {paths['val']} --image-root {paths['raw']} --dtype fp32{limit}", flush=True)
    t = time.time()
    model_dir, val, root = (os.path.join(REPO, x) for x in (model, paths["val"], paths["raw"]))
    loaded = load_for_inference(model_dir, dtype="fp32", device="cpu")
    n_params = sum(p.numel() for p in loaded.model.parameters())
    summary = run_mcq(loaded, val, root, f"{val}.{when.split()[0]}.predictions.jsonl", batch_size=1, limit=n_eval,
                      progress=False)
    out = {"loss": None, "accuracy": summary["accuracy"], "correct": summary["correct"], "scored": summary["scored"]}
    if with_loss:
        processor = DeepseekVLV2Processor.from_pretrained(model_dir, mask_prompt=recipe["mask_prompt"],
                                                          max_seq_len=recipe["max_seq_len"])
        out["loss"] = heldout_loss(loaded.model, processor, val, root, num_samples=n_eval, batch_size=1,
                                   seq_bucket=recipe["seq_bucket"])["loss"]
    loss = "" if out["loss"] is None else f"held-out loss {out['loss']:.4f}, "
    print(f"--- {when}: {loaded.kind} checkpoint loads ({n_params:,} parameters); {loss}ai2d accuracy "
          f"{out['accuracy']:.3f} ({out['correct']}/{out['scored']}); {time.time() - t:.1f} s", flush=True)
    return out


def report_learning(before: dict, after: dict, log: list, n_eval, steps: int) -> None:
    """Print the before/after table (the loss after: train.py's last validation) and train.py's validation curve;
    fail when train.py did not validate after its last step or the held-out loss did not fall clearly."""
    curve = [(r["step"], r["eval_loss"]) for r in log if r.get("eval_loss") is not None]
    if not curve or curve[-1][0] != steps:
        print("DEMO FAILED: train.py did not validate after its last step", file=sys.stderr)
        raise SystemExit(1)
    after = dict(after, loss=curve[-1][1])
    print(f"\nheld-out records ({n_eval or 'all'}; never trained on):   loss    ai2d accuracy")
    for name, r in (("before fine-tuning", before), (f"after {steps} steps", after)):
        print(f"  {name:44s} {r['loss']:6.3f}   {r['accuracy']:.3f} ({r['correct']}/{r['scored']})")
    print("  (chance is about 0.27: four options, a few two-option questions; the random model does not answer with "
          "a letter)")
    print("validation during training (train.py, eval_batch on PP=2 x DP=2, EP=2): "
          + ", ".join(f"step {s} {v:.3f}" for s, v in curve))
    if not after["loss"] < before["loss"] - 0.5:
        print("DEMO FAILED: the held-out loss did not fall clearly", file=sys.stderr)
        raise SystemExit(1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/demo", help="where everything goes (recreated)")
    p.add_argument("--config", default="ds_configs/cpu_demo.json", help="DeepSpeed JSON of the training run")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--ranks", type=int, default=4, help="CPU processes (pipeline stages x data-parallel)")
    p.add_argument("--samples", type=int, default=300, help="synthetic dataset size")
    p.add_argument("--val-fraction", type=float, default=0.12, help="share held out for validation (by record id)")
    a = p.parse_args(argv)

    w = a.workdir
    if os.path.exists(os.path.join(REPO, w)):
        shutil.rmtree(os.path.join(REPO, w))
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    py = sys.executable
    paths = {"hf": f"{w}/ckpt_hf", "raw": f"{w}/ai2d", "data": f"{w}/ai2d_dsvl.jsonl", "ds": f"{w}/ckpt_ds",
             "save": f"{w}/save", "export": f"{w}/exported", "val": f"{w}/ai2d_val.jsonl"}
    run("tiny checkpoint", [py, "-m", "recipe.tools.make_tiny", "--like", "base", "--dtype", "fp32",
                            "--out", paths["hf"]], env)
    run("synthetic ai2d data", [py, "-m", "recipe.tools.make_synthetic_ai2d", "--out", paths["raw"],
                                "--num", str(a.samples)], env)
    run("prepare_ai2d.py", [py, "recipe/prepare_ai2d.py", "--input", f"{paths['raw']}/ai2d_train.jsonl",
                            "--image-root", paths["raw"], "--output", paths["data"], "--num-workers", "2",
                            "--val-fraction", str(a.val_fraction), "--val-output", paths["val"]], env)
    run("hf_to_ds.py", [py, "converters/hf_to_ds.py", "--hf-dir", paths["hf"], "--out", paths["ds"]], env)
    with open(os.path.join(REPO, a.config)) as f:
        recipe = json.load(f)["recipe"]
    n_eval = recipe.get("eval_samples")  # the records train.py validates on (a multiple of its global batch)
    before = score("before fine-tuning", paths["ds"], paths, recipe, n_eval)
    deepspeed = os.path.join(os.path.dirname(py), "deepspeed")
    run("deepspeed train.py", [deepspeed, "--num_gpus", str(a.ranks), "--master_port", str(29400 + os.getpid() % 500),
                               "recipe/train.py", "--deepspeed", a.config, "--model-dir", paths["ds"],
                               "--train-data", paths["data"], "--image-root", paths["raw"], "--save-dir",
                               paths["save"], "--train-steps", str(a.steps), "--resume", "none",
                               "--eval-data", paths["val"]], env)
    run("ds_to_hf.py", [py, "converters/ds_to_hf.py", "--ds-dir", paths["save"], "--out", paths["export"],
                        "--dtype", "fp32"], env)
    after = score("after fine-tuning", paths["export"], paths, recipe, n_eval, with_loss=False)  # reloads the export

    log = [json.loads(line) for line in open(os.path.join(REPO, paths["save"], "train_log.jsonl"))]
    k = max(1, min(5, len(log) // 4))
    first = sum(r["loss"] for r in log[:k]) / k
    last = sum(r["loss"] for r in log[-k:]) / k
    print(f"\nloss: mean of the first {k} steps {first:.3f} -> mean of the last {k} steps {last:.3f}")
    if not last < first - 0.5:
        print("DEMO FAILED: the loss did not fall clearly", file=sys.stderr)
        raise SystemExit(1)
    report_learning(before, after, log, n_eval, a.steps)
    print("\nwhere everything went:")
    for what, key in (("tiny HF checkpoint", "hf"), ("synthetic InternVL data", "raw"),
                      ("prepared conversations", "data"), ("converted DeepSpeed layers", "ds"),
                      ("training checkpoints + train_log.jsonl", "save"), ("exported HF checkpoint", "export")):
        print(f"  {what:40s} {paths[key]}")
    print(f"  {'held-out conversations':40s} {paths['val']}")
    print("DEMO OK")


if __name__ == "__main__":
    main()
