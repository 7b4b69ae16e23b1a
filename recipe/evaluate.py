"""Score a checkpoint on a prepared ai2d-style jsonl the way lmms-eval scores ai2d (greedy, at most 16 new
tokens, the option letter extracted from the answer, exact match with the reference letter).

    python -m recipe.evaluate --model exported/ --data dataset/ai2d_val.jsonl --image-root dataset/ai2d \\
        [--batch-size 8] [--limit 500] [--dtype bf16] [--device-map auto] [--output preds.jsonl]

--model is an HF export, a converted layout or a training checkpoint directory (``--tag``; ``--config-dir`` when
config.json and the tokenizer are not beside it), detected from its contents. --data is ``prepare_ai2d.py``
output (e.g. its ``--val-output``). One prediction per record is written to --output (jsonl, record order), and a
summary (accuracy, skipped records by reason, throughput) to ``<output>.summary.json`` and the log.

A record that cannot be scored (invalid JSON, no option letter as the answer, an image that does not load, a
prompt the processor refuses) is listed in the predictions with its reason and counted; the run goes on. An
unusable checkpoint, data file or flag is a one-line error (exit code 2) before anything runs.
See docs/evaluate.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from recipe.checkpoint import CheckpointError
from recipe.data.dataset import index_jsonl
from recipe.data.image_io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, resolve_under_root
from recipe.data.processor import DeepseekVLV2Processor, pad_samples
from recipe.data.tokenizer import TokenizerError
from recipe.eval import ai2d
from recipe.eval.loading import LoadedModel, load_for_inference, parse_max_memory

logger = logging.getLogger("recipe.evaluate")


class McqDataset(Dataset):
    """Records of a prepared jsonl -> processed prompts (or the reason a record is skipped), read lazily so
    DataLoader workers decode images in parallel. Each item is a dict: ``line``, ``id``, ``answer``,
    ``post_prompt_added`` and either ``sample`` (the processor's output as a dict) or ``skipped`` (reason) with
    ``message``."""

    def __init__(self, path: str, image_root: str, processor: DeepseekVLV2Processor, limit: Optional[int] = None,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        self.path, self.image_root, self.processor = path, image_root, processor
        self.real_root = os.path.realpath(image_root)
        self.max_image_pixels = max_image_pixels
        self.offsets, self.line_numbers = index_jsonl(path)
        if limit is not None:
            self.offsets, self.line_numbers = self.offsets[:limit], self.line_numbers[:limit]
        self._fh, self._fh_pid = None, None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fh"], state["_fh_pid"] = None, None
        return state

    def _line(self, index: int) -> bytes:
        if self._fh is None or self._fh_pid != os.getpid():
            self._fh, self._fh_pid = open(self.path, "rb"), os.getpid()
        self._fh.seek(int(self.offsets[index]))
        return self._fh.readline()

    def __getitem__(self, index: int) -> dict:
        line_no = int(self.line_numbers[index])
        where = f"{self.path}:{line_no}"
        out = {"line": line_no, "id": None, "answer": None, "post_prompt_added": False}
        try:
            item = ai2d.parse_record(self._line(index), where)
            out.update(id=item.id, answer=item.answer, post_prompt_added=item.post_prompt_added)
            try:
                images = [load_image(resolve_under_root(self.image_root, p, self.real_root), self.max_image_pixels)
                          for p in item.image_paths]
            except ImageLoadError as e:
                raise ai2d.SkipRecord(ai2d.IMAGE_ERROR, f"{where}: image {e.path}: {e.reason}: {e.detail}") from None
            try:
                s = self.processor.process_one(item.messages, images, inference_mode=True)
            except ValueError as e:  # ConversationError (placeholders vs images, roles), SampleTooLongError
                raise ai2d.SkipRecord(ai2d.BAD_PROMPT, f"{where}: {type(e).__name__}: {e}") from None
            out["sample"] = {"input_ids": s.input_ids, "target_ids": s.target_ids, "images": s.images,
                             "images_seq_mask": s.images_seq_mask, "images_spatial_crop": s.images_spatial_crop}
        except ai2d.SkipRecord as e:
            out.update(skipped=e.reason, message=str(e))
        except Exception as e:  # a hostile record must not end the run
            out.update(skipped=ai2d.BAD_RECORD, message=f"{where}: {type(e).__name__}: {e}")
        return out


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "images": batch["images"].to(device, dtype), "images_seq_mask": batch["images_seq_mask"].to(device),
            "images_spatial_crop": batch["images_spatial_crop"]}


def run_mcq(loaded: LoadedModel, data: str, image_root: str, output: Optional[str] = None, *, batch_size: int = 8,
            limit: Optional[int] = None, max_new_tokens: int = ai2d.MAX_NEW_TOKENS, num_workers: int = 0,
            progress: bool = True) -> dict:
    """Generate and score every record of ``data`` with a loaded model; returns the summary dict.

    Writes the predictions (one JSON object per record, in record order) to ``output`` when given (atomically:
    the file appears when the run is complete) and the summary beside it (``<output>.summary.json``).
    """
    model, processor = loaded.model, loaded.processor
    dtype = model.language.get_input_embeddings().weight.dtype
    dataset = McqDataset(data, image_root, processor, limit)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    skipped, counts = Counter(), Counter()
    tmp = None
    if output is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        tmp = output + ".partial"
        out_f = open(tmp, "w", encoding="utf-8")
    t_start = time.perf_counter()
    t_generate = 0.0
    bar = tqdm(total=len(dataset), unit="sample", desc="evaluate", disable=not progress)
    try:
        for items in loader:
            good = [it for it in items if "sample" in it]
            rows = {}
            for it in items:
                if "skipped" in it:
                    skipped[it["skipped"]] += 1
                    rows[it["line"]] = {"line": it["line"], "id": it["id"], "answer": it["answer"],
                                        "skipped": it["skipped"], "message": it["message"]}
            if good:
                batch = pad_samples([it["sample"] for it in good], processor.pad_id, processor.ignore_id,
                                    padding="left")
                t0 = time.perf_counter()
                gen = model.generate(**_to_device(batch, loaded.device, dtype), max_new_tokens=max_new_tokens,
                                     eos_token_id=processor.eos_id, pad_token_id=processor.pad_id)
                new_ids = gen.token_lists()  # host copy: also waits for the device
                t_generate += time.perf_counter() - t0
                counts["prompt_tokens"] += gen.prompt_tokens
                counts["generated_tokens"] += int(gen.num_tokens.sum())
                for it, ids, n_new, n_prompt in zip(good, new_ids, gen.num_tokens.tolist(), batch["seq_lens"]):
                    response = processor.decode(ids, skip_special_tokens=True)
                    correct = ai2d.is_correct(response, it["answer"])
                    counts["scored"] += 1
                    counts["correct"] += int(correct)
                    counts["post_prompt_added"] += int(it["post_prompt_added"])
                    rows[it["line"]] = {"line": it["line"], "id": it["id"], "answer": it["answer"],
                                        "response": response, "choice": ai2d.extract_choice(response).strip(),
                                        "correct": correct, "new_tokens": n_new, "prompt_tokens": n_prompt}
            if tmp is not None:
                for line in sorted(rows):
                    out_f.write(json.dumps(rows[line], ensure_ascii=False) + "\n")
            bar.update(len(items))
            bar.set_postfix(acc=f"{counts['correct'] / max(counts['scored'], 1):.3f}", skipped=sum(skipped.values()),
                            refresh=False)
    except BaseException:
        if tmp is not None:
            out_f.close()
            os.unlink(tmp)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t_start
    if tmp is not None:
        out_f.close()
        os.replace(tmp, output)
    scored, tokens = counts["scored"], counts["prompt_tokens"] + counts["generated_tokens"]
    summary = {
        "checkpoint": loaded.path, "kind": loaded.kind, "tag": loaded.tag, "data": data,
        "records": len(dataset), "scored": scored, "correct": counts["correct"],
        "accuracy": counts["correct"] / scored if scored else None,
        "skipped": sum(skipped.values()), "skipped_by_reason": dict(sorted(skipped.items())),
        "post_prompt_added": counts["post_prompt_added"],
        "prompt_tokens": counts["prompt_tokens"], "generated_tokens": counts["generated_tokens"],
        "seconds": round(seconds, 3), "generate_seconds": round(t_generate, 3),
        "samples_per_s": scored / seconds if seconds else None,
        "tokens_per_s": tokens / seconds if seconds else None,
        "generated_tokens_per_s": counts["generated_tokens"] / seconds if seconds else None,
        "batch_size": batch_size, "max_new_tokens": max_new_tokens, "dtype": str(dtype).removeprefix("torch."),
        "device": str(loaded.device) if loaded.device_map is None else
        {k: str(v) for k, v in loaded.device_map.items()},
        "predictions": output,
    }
    if output is not None:
        with open(output + ".summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
    return summary


def _check_data(data: str, image_root: Optional[str]) -> str:
    """The image root to use; FileNotFoundError for a missing data file or image root."""
    if not os.path.isfile(data):
        raise FileNotFoundError(f"{data}: no such data file")
    image_root = image_root or os.path.dirname(os.path.abspath(data))
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{image_root}: image root is not a directory")
    return image_root


def evaluate(model_dir: str, data: str, image_root: Optional[str] = None, output: Optional[str] = None, *,
             tag: Optional[str] = None, config_dir: Optional[str] = None, dtype="bf16", device=None,
             device_map=None, max_memory: Optional[dict] = None, **kwargs) -> dict:
    """Load ``model_dir`` (any checkpoint form) and :func:`run_mcq` on ``data``; returns the summary."""
    image_root = _check_data(data, image_root)
    loaded = load_for_inference(model_dir, tag=tag, config_dir=config_dir, dtype=dtype, device=device,
                                device_map=device_map, max_memory=max_memory)
    return run_mcq(loaded, data, image_root, output, **kwargs)


def format_summary(s: dict) -> str:
    reasons = ", ".join(f"{k}={v}" for k, v in s["skipped_by_reason"].items())
    acc = "n/a" if s["accuracy"] is None else f"{s['accuracy']:.4f}"
    return (f"accuracy {acc} ({s['correct']}/{s['scored']} scored, {s['skipped']} skipped"
            f"{': ' + reasons if reasons else ''}) on {s['data']}\n"
            f"throughput: {s['samples_per_s'] or 0:.2f} samples/s, {s['tokens_per_s'] or 0:,.0f} tokens/s "
            f"(prompt + generated), {s['generated_tokens_per_s'] or 0:,.1f} generated tokens/s; {s['seconds']:.1f} s "
            f"({s['generate_seconds']:.1f} s in generate), batch size {s['batch_size']}, {s['dtype']}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model-loading flags ``recipe.evaluate`` and ``recipe.chat`` share."""
    p.add_argument("--model", required=True,
                   help="checkpoint directory: HF export, converted layout or training checkpoint (detected)")
    p.add_argument("--tag", default=None, help="training checkpoints: the tag to read (default: 'latest')")
    p.add_argument("--config-dir", default=None,
                   help="training checkpoints: where config.json and the tokenizer files are, when not beside it")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16", "keep"],
                   help="compute dtype (default: %(default)s; 'keep' = as stored)")
    p.add_argument("--device", default=None,
                   help="one device, e.g. cpu (default: DeepSpeed's accelerator, as DS_ACCELERATOR selects it)")
    p.add_argument("--device-map", default=None, choices=["auto"],
                   help="spread the model over every visible accelerator (and host memory) with accelerate")
    p.add_argument("--max-memory", default=None,
                   help="with --device-map auto: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB")


# What loading can raise for a wrong path, checkpoint or flag (reported in one line, exit code 2).
LOAD_ERRORS = (CheckpointError, TokenizerError, FileNotFoundError, NotADirectoryError, ValueError, ImportError)


def load_model_from_args(a: argparse.Namespace) -> LoadedModel:
    """:func:`load_for_inference` with the flags of :func:`add_model_args`."""
    return load_for_inference(a.model, tag=a.tag, config_dir=a.config_dir, dtype=a.dtype, device=a.device,
                              device_map=a.device_map, max_memory=parse_max_memory(a.max_memory))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, help="prepared jsonl (prepare_ai2d.py output)")
    p.add_argument("--image-root", default=None,
                   help="directory the records' image paths are relative to (default: the data file's directory)")
    p.add_argument("--output", default=None,
                   help="predictions jsonl (default: DATA without .jsonl + .predictions.jsonl); the summary goes to "
                        "OUTPUT.summary.json")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--max-new-tokens", type=int, default=ai2d.MAX_NEW_TOKENS,
                   help="new tokens per answer at most (default: %(default)s, as lmms-eval's ai2d)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader processes decoding and tiling images (default: %(default)s = in this process)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.batch_size < 1 or a.max_new_tokens < 1 or a.num_workers < 0 or (a.limit is not None and a.limit < 1):
        p.error("--batch-size, --max-new-tokens and --limit must be >= 1, --num-workers >= 0")
    output = a.output or os.path.splitext(a.data)[0] + ".predictions.jsonl"
    try:  # everything that can be wrong with the flags, the data or the checkpoint fails here, before any work
        image_root = _check_data(a.data, a.image_root)
        loaded = load_model_from_args(a)
    except LOAD_ERRORS as e:
        logger.error("%s", e)
        return 2
    summary = run_mcq(loaded, a.data, image_root, output, batch_size=a.batch_size, limit=a.limit,
                      max_new_tokens=a.max_new_tokens, num_workers=a.num_workers, progress=not a.quiet)
    logger.info("%s", format_summary(summary))
    logger.info("predictions: %s; summary: %s.summary.json", output, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
