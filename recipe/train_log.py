"""What a training step leaves behind: its record (loss, lr, grad norm, throughput, padding, memory) in
``<save_dir>/train_log.jsonl``, a log line and DeepSpeed's monitors every ``log_interval`` steps, and the
throughput summary over the run's last steps."""

from __future__ import annotations

import json
import logging
import os

from recipe.train_config import TrainConfig

logger = logging.getLogger(__name__)


def step_record(engine, step: int, loss, totals, dt: float, global_batch: int) -> dict:
    """The step's figures on this rank: loss and its parts, lr, pre-clip global grad norm, time, samples/s; with
    ``totals`` (the step's data counters; None on middle pipeline stages) real-token throughput and padding; the
    accelerator's memory statistics."""
    from recipe.accelerator import memory_stats

    extra = {k: float(v) for k, v in (engine.agg_additional_losses or {}).items()}
    rec = {"step": step, "loss": float(loss), "ce": extra.get("ce"), "aux": extra.get("aux"),
           "lr": engine.get_lr()[0], "grad_norm": _maybe_float(engine.get_global_grad_norm()),
           "step_time": dt, "samples_per_s": global_batch / dt}
    if totals is not None:
        rec.update(step_metrics(totals, dt))
    rec.update({f"mem_{k}": v for k, v in memory_stats().items() if v is not None})
    return rec


def report_step(engine, tc: TrainConfig, rec: dict) -> None:
    """Rank 0's record of a step: every step to ``train_log.jsonl``; every ``log_interval``-th and the last one to
    the log and DeepSpeed's monitors."""
    step = rec["step"]
    append_jsonl(os.path.join(tc.save_dir, "train_log.jsonl"), rec)
    if step % tc.log_interval == 0 or step == tc.train_steps:
        log_step(rec, tc.train_steps)
        write_monitor(engine, rec, step)


def step_metrics(totals: dict, dt: float) -> dict:
    """What a step's data counters (summed over micro-batches and data-parallel ranks) say per second: real samples
    (SPS, as the original recipe counts them), real tokens (padding excluded), samples per row, padding."""
    real, pad = totals["num_real_tokens"], totals["num_padded_tokens"]
    return {"samples_per_s": totals["num_samples"] / dt, "tokens_per_s": real / dt,
            "padding_ratio": pad / max(real + pad, 1),
            "samples_per_row": totals["num_samples"] / max(totals["num_rows"], 1),
            "replaced_samples": int(totals["num_corrupt_images"] + totals["num_too_long"] + totals["num_bad_records"]),
            "dropped_samples": int(totals["num_dropped"])}


def append_jsonl(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _maybe_float(x):
    return None if x is None else float(x)


def log_step(r: dict, total: int) -> None:
    parts = [f"step {r['step']}/{total}", f"loss {r['loss']:.4f}"]
    if r.get("ce") is not None:
        parts.append(f"ce {r['ce']:.4f} aux {r['aux']:.5f}")
    parts.append(f"lr {r['lr']:.3g}")
    if r.get("grad_norm") is not None:
        parts.append(f"grad {r['grad_norm']:.3f}")
    parts.append(f"{r['samples_per_s']:.2f} samples/s")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:.0f} tok/s {r['samples_per_row']:.2f} samples/row "
                     f"pad {100 * r['padding_ratio']:.1f}%")
    parts.append(f"{r['step_time']:.2f} s/step")
    mem = r.get("mem_peak_allocated") or r.get("mem_peak_rss")
    if mem:
        parts.append(f"mem {mem / 2 ** 30:.2f} GiB")
    if r.get("replaced_samples"):
        parts.append(f"replaced {r['replaced_samples']}")
    if r.get("dropped_samples"):
        parts.append(f"dropped {r['dropped_samples']}")
    logger.info(" | ".join(parts))


def write_monitor(engine, r: dict, step: int) -> None:
    """The step's figures to DeepSpeed's monitors (CSV / TensorBoard / W&B, whichever the config enables)."""
    if not getattr(engine, "monitor", None) or not engine.monitor.enabled:
        return
    keys = ("loss", "ce", "aux", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "samples_per_row",
            "padding_ratio", "step_time")
    engine.monitor.write_events([(f"Train/{k}", float(r[k]), step) for k in keys if r.get(k) is not None])


def summarize(history: list, window: int) -> dict:
    """Mean throughput over the last ``window`` steps, leaving out the first (warm-up) step."""
    steady = history[1:][-window:]
    if not steady:
        return {}
    t = sum(r["step_time"] for r in steady) / len(steady)
    out = {"window": len(steady), "step_time": t, "sps": sum(r["samples_per_s"] for r in steady) / len(steady)}
    if all("tokens_per_s" in r for r in steady):
        out["tps"] = sum(r["tokens_per_s"] for r in steady) / len(steady)
        out["samples_per_row"] = sum(r["samples_per_row"] for r in steady) / len(steady)
        out["padding_ratio"] = sum(r["padding_ratio"] for r in steady) / len(steady)
    else:
        out["tps"] = float("nan")
    return out


def log_summary(summary: dict) -> None:
    logger.info("throughput over the last %d steps: SPS %.3f samples/s, TPS %.1f tokens/s (real tokens), "
                "%.3f s/step, %.2f samples/row, padding %.1f%%", summary["window"], summary["sps"],
                summary["tps"], summary["step_time"], summary.get("samples_per_row", float("nan")),
                100 * summary.get("padding_ratio", float("nan")))
