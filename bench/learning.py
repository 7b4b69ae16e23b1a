"""Does the whole vision path learn? A tiny random-initialised DeepSeek-VL2 trained on CPU on the synthetic ai2d
set until it answers held-out picture questions far above chance.

    python bench/learning.py [--minutes 10] [--workdir runs/bench_learning] [--threads 2]

Every question of ``recipe.tools.make_synthetic_ai2d`` can only be answered from its picture: the colour of a
shape, the number of shapes, the shape at a label, the label of a colour (four options each: chance is 25%), or
which of two pictures shows more shapes (two options). The bench

1. writes the data set (with ``--facts``: the items drawn on each picture) and holds out a part of it by record id
   (``prepare_ai2d.py --val-fraction``),
2. builds a tiny model (``recipe.tools.make_tiny``: random weights, small tiles) and the real processor,
3. adds drill conversations about the *training* pictures (``--drill-rounds``): several multiple-choice questions
   of the data set's own kinds and option distributions (the generator's ``ask``), and open questions plus a
   description of the picture, so one ViT pass serves many answers,
4. trains the plain single-process model (``recipe.model``) with torch AdamW on answer-only labels, the learning
   rate on a cosine over the training budget, and after every fifth of the budget prints the held-out loss
   (``recipe.eval.loss``, the figure train.py's validation reports) and the held-out accuracy of the greedy first
   answer token, per question kind,
5. ends with the real scoring of the held-out set (``recipe.evaluate.run_mcq``: KV-cached greedy generation, the
   lmms-eval ai2d rules) and prints a summary line.

Why the plain model and not train.py: on 2 cores, 4 ranks of pipeline + expert parallelism spend most of a step
in process overheads (bench/train_step.py); that both paths compute the same losses is what tests/test_train.py
and tests/test_validation.py check. Samples are processed once and kept in memory (the pictures are decoded and
tiled once, not once per epoch). Nothing is asserted: the figures are printed (and written to
``<workdir>/learning.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections import Counter

import torch

KINDS = (("What colour is the", "colour"), ("How many shapes", "count"), ("Which shape is labelled", "shape@label"),
         ("Which label marks", "label@colour"), ("Which image shows more", "two images"), ("What is ", "text"))


def question_kind(record: dict) -> str:
    first = record["conversations"][0]["content"]
    return next((kind for prefix, kind in KINDS if prefix in first), "other")


def make_data(workdir: str, num: int, seed: int, val_fraction: float) -> dict:
    from recipe.prepare_ai2d import prepare
    from recipe.tools.make_synthetic_ai2d import make_synthetic_ai2d

    raw = os.path.join(workdir, "ai2d")
    paths = {"root": raw, "train": os.path.join(workdir, "train.jsonl"), "val": os.path.join(workdir, "val.jsonl")}
    paths["facts"] = os.path.join(raw, "ai2d_facts.jsonl")
    if not os.path.isfile(paths["val"]) or not os.path.isfile(paths["facts"]):
        make_synthetic_ai2d(raw, num=num, seed=seed, facts=True)
        prepare(os.path.join(raw, "ai2d_train.jsonl"), raw, paths["train"], num_workers=2, progress=False,
                val_fraction=val_fraction, val_output_path=paths["val"])
    return paths


def make_model(workdir: str, a: argparse.Namespace) -> str:
    from recipe.tools.make_tiny import make_tiny

    ckpt = os.path.join(workdir, "model")
    moe = dict(n_routed_experts=a.experts, num_experts_per_tok=a.top_k) if a.experts else dict(
        n_routed_experts=None, first_k_dense_replace=a.layers)
    make_tiny(ckpt, like=a.like, image_size=a.image_size, seed=a.seed, dtype=torch.float32, overwrite=True,
              hidden_size=a.hidden, num_hidden_layers=a.layers, vision_width=a.vision_width,
              vision_layers=a.vision_layers, **moe)
    return ckpt


def open_answer_record(record: dict) -> dict:
    """The record's questions without their options, answered with the right option's text ("What colour is the
    circle?" -> "red"): the same pictures and facts as a denser signal than one letter."""
    turns = []
    for user, assistant in zip(record["conversations"][::2], record["conversations"][1::2]):
        lines = user["content"].split("\n")
        options = {line[0]: line[3:] for line in lines if len(line) > 3 and line[1:3] == ". " and line[0].isupper()}
        question = [line for line in lines if line[1:3] != ". " and not line.startswith("Answer with")]
        turns += [dict(user, content="\n".join(question)),
                  dict(assistant, content=options.get(assistant["content"].strip(), assistant["content"]))]
    return dict(record, conversations=turns)


def write_open_answers(path: str, out: str) -> str:
    with open(path, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for line in f:
            if line.strip():
                g.write(json.dumps(open_answer_record(json.loads(line))) + "\n")
    return out


def drill_conversations(items: list, rng: random.Random, questions: int) -> list:
    """Two more conversations about one training picture, from the items the generator drew on it: ``questions``
    multiple-choice turns (the generator's own ``ask``: the same kinds and option distributions as the data set)
    and ``questions`` open turns (the option's text as the answer) closed by a description of the whole picture
    ("A red circle, B blue square"). Many answers per picture: the ViT runs once for all of them."""
    from recipe.tools.make_synthetic_ai2d import SUFFIX, ask

    def turns(pairs: list) -> list:
        out = []
        for k, (q, ans) in enumerate(pairs):  # the post-prompt once, on the first question (a sixth of the tokens)
            q = "<image>\n" + q if k == 0 else q.replace("\n" + SUFFIX, "")
            out += [{"role": "<|User|>", "content": q}, {"role": "<|Assistant|>", "content": ans}]
        return out

    mcq = turns([ask(rng, items) for _ in range(questions)])
    opened = open_answer_record({"conversations": turns([ask(rng, items) for _ in range(questions)])})
    describe = ("Describe the diagram.", ", ".join(f"{it['label']} {it['colour']} {it['shape']}" for it in items))
    return [mcq, opened["conversations"] + [{"role": "<|User|>", "content": describe[0]},
                                            {"role": "<|Assistant|>", "content": describe[1]}]]


def conversation_sample(processor, messages: list, picture: dict) -> dict:
    """``picture`` (a processed training sample) with the tokens of another conversation about the same image:
    the processor's own token stream for these messages (``measure``'s path: image sizes, no pixels), the cached
    tiles reused (the same image and crop, so the same tiles)."""
    b, n_tok, n_img, _ = processor._build(messages, [tuple(s) for s in picture["image_sizes"]], False)
    if b.crops[:n_img] != picture["images_spatial_crop"].tolist():
        raise RuntimeError(f"{picture['id']}: the drill conversation tiles differently from its picture")
    ids = torch.tensor(b.ids[:n_tok], dtype=torch.long)
    labels = torch.tensor(b.labels[:n_tok], dtype=torch.long)
    labels[(ids < 0) | (ids == processor.image_token_id)] = processor.ignore_id
    ids[ids < 0] = processor.pad_id
    return dict(picture, input_ids=ids, target_ids=labels, num_turns_dropped=0,
                images_seq_mask=torch.tensor(b.mask[:n_tok], dtype=torch.bool))


def drill_samples(processor, train: list, facts_path: str, rounds: int, questions: int, seed: int) -> list:
    """``rounds`` x 2 drill conversations (:func:`drill_conversations`) per single-image training picture; held-out
    records are never among ``train``, so none of their pictures is drilled."""
    facts = {}
    with open(facts_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            facts[rec["id"]] = rec["items"]
    rng = random.Random(seed + 1)
    out = []
    for _ in range(rounds):
        for s in train:
            items = facts.get(s["id"], [])
            if len(items) != 1 or s["kind"] in ("text", "two images"):
                continue
            mcq, opened = drill_conversations(items[0], rng, questions)
            out.append(dict(conversation_sample(processor, mcq, s), kind="drill mcq"))
            out.append(dict(conversation_sample(processor, opened, s), kind="drill open"))
    return out


def to_uint8(tiles: torch.Tensor) -> torch.Tensor:
    """The processor's tiles ((u8 / 255 - 0.5) / 0.5 in fp32) back to their uint8 pixels: a quarter of the memory."""
    return torch.round((tiles * 0.5 + 0.5) * 255).to(torch.uint8)


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """The processor's normalisation, the same fp32 operations: bit-identical tiles."""
    return (pixels.float() / 255 - 0.5) / 0.5


def load_samples(path: str, root: str, processor, limit=None) -> list:
    """Processed training samples (``ConversationDataset`` items, tiles kept as uint8), with their question kind."""
    from recipe.data.dataset import ConversationDataset

    ds = ConversationDataset(path, root, processor)
    out = []
    for i in range(len(ds) if limit is None else min(limit, len(ds))):
        s = ds[i]
        record = ds.read_record(s["source_index"])
        s["kind"] = question_kind(record)
        s["image_sizes"] = record.get("image_sizes", [])
        s["images"] = to_uint8(s["images"])
        out.append(s)
    return out


def collate_cached(collate, samples: list) -> dict:
    return collate([dict(s, images=from_uint8(s["images"])) for s in samples])


def load_prompts(path: str, root: str, processor) -> list:
    """Held-out prompts (first user turn, ``recipe.evaluate.McqDataset``) with their answer letter and kind."""
    from recipe.evaluate import McqDataset

    ds = McqDataset(path, root, processor)
    kinds = [question_kind(json.loads(line)) for line in open(path, encoding="utf-8") if line.strip()]
    out = []
    for item, kind in zip((ds[i] for i in range(len(ds))), kinds):
        if "sample" in item:
            item["sample"]["images"] = to_uint8(item["sample"]["images"])
            out.append(dict(item, kind=kind))
    return out


@torch.no_grad()
def first_token_accuracy(model, processor, prompts: list, batch_size: int = 32) -> dict:
    """Share of held-out questions whose greedy first answer token is the right letter, overall and per kind
    (one forward per batch: the first token of greedy decoding, scored by the ai2d rule)."""
    from recipe.data.processor import pad_samples
    from recipe.eval import ai2d

    model.eval()
    right, total = Counter(), Counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        b = pad_samples([dict(p["sample"], images=from_uint8(p["sample"]["images"])) for p in chunk],
                        processor.pad_id, processor.ignore_id, padding="right")
        logits = model(input_ids=b["input_ids"], images=b["images"], images_seq_mask=b["images_seq_mask"],
                       images_spatial_crop=b["images_spatial_crop"], attention_mask=b["attention_mask"]).logits
        last = torch.tensor(b["seq_lens"]) - 1
        tokens = logits[torch.arange(len(chunk)), last].argmax(-1).tolist()
        for p, tok in zip(chunk, tokens):
            ok = ai2d.is_correct(processor.decode([tok], skip_special_tokens=True), p["answer"])
            for key in (p["kind"], "all"):
                total[key] += 1
                right[key] += int(ok)
    model.train()
    picture = [k for k in total if k not in ("all", "text")]
    out = {k: right[k] / total[k] for k in total}
    out["picture"] = sum(right[k] for k in picture) / max(1, sum(total[k] for k in picture))
    return out


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine to a tenth of ``peak`` at ``progress`` 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/bench_learning")
    p.add_argument("--data-dir", help="where the data set is written, or reused when it exists (default: workdir)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="training budget: this process's CPU time / --threads, in minutes (the wall time of an idle "
                        "machine; on a shared one the wall time is longer); evaluation excluded")
    p.add_argument("--steps", type=int, default=100000, help="at most this many steps")
    p.add_argument("--schedule-steps", type=int, default=0,
                   help="length of the cosine schedule in steps (0: the training budget, --minutes)")
    p.add_argument("--records", type=int, default=3000, help="synthetic records (before the split)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: --eval-points)")
    p.add_argument("--eval-points", type=int, default=5, help="evaluate after each 1/N of the training budget")
    p.add_argument("--eval-questions", type=int, default=300, help="held-out questions scored along the curve")
    p.add_argument("--like", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--image-size", type=int, default=112, help="tile size in pixels (patch 14)")
    p.add_argument("--max-tiles", type=int, default=2,
                   help="local tiles per image at most (the released processor: 9); the global view comes on top")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8, help="routed experts per MoE layer (0: dense layers only)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vision-width", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--drill-rounds", type=int, default=1,
                   help="drill conversations per training picture: N x (one of --drill-questions multiple-choice "
                        "turns, one of as many open turns and a description); 0: the records' own questions only")
    p.add_argument("--drill-questions", type=int, default=4)
    p.add_argument("--open-answers", type=int, default=0,
                   help="1: also train on each training question without its options, answered with the option's "
                        "text (held-out questions are always scored in the ai2d multiple-choice form)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from recipe.config import _tile_candidates
    from recipe.data.dataset import Collator
    from recipe.data.processor import DeepseekVLV2Processor
    from recipe.eval.loading import LoadedModel
    from recipe.eval.loss import token_mean_loss
    from recipe.evaluate import run_mcq
    from recipe.model import DeepseekVLV2ForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    os.makedirs(a.workdir, exist_ok=True)
    load = os.getloadavg()[0]
    t = time.time()
    paths = make_data(a.data_dir or a.workdir, a.records, a.seed, a.val_fraction)
    ckpt = make_model(a.workdir, a)
    processor = DeepseekVLV2Processor.from_pretrained(
        ckpt, mask_prompt=True, max_seq_len=1024, candidate_resolutions=_tile_candidates(a.image_size, a.max_tiles))
    train = load_samples(paths["train"], paths["root"], processor)
    if a.open_answers:
        open_path = write_open_answers(paths["train"], os.path.join(a.workdir, "train_open.jsonl"))
        train += [dict(s, kind="open " + s["kind"]) for s in load_samples(open_path, paths["root"], processor)]
    if a.drill_rounds:
        train += drill_samples(processor, train, paths["facts"], a.drill_rounds, a.drill_questions, a.seed)
    val = load_samples(paths["val"], paths["root"], processor)
    prompts = load_prompts(paths["val"], paths["root"], processor)
    collate = Collator.from_processor(processor, seq_bucket=16)
    val_batches = [val[i:i + 32] for i in range(0, len(val), 32)]  # collated when used: tiles stay uint8
    model = DeepseekVLV2ForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).train()
    n_params = sum(p.numel() for p in model.parameters())
    kinds = Counter(s["kind"] for s in train)
    print(f"data: {len(train)} training samples {dict(kinds)}, {len(val)} held out ({len(prompts)} questions); "
          f"prepared in {time.time() - t:.0f} s", flush=True)
    print(f"model: like {a.like}, {n_params:,} parameters (hidden {a.hidden}, {a.layers} decoder layers, "
          f"{a.experts} experts top-{a.top_k}; ViT {a.vision_layers} x {a.vision_width} on {a.image_size} px tiles, "
          f"<= {a.max_tiles} local tiles); "
          f"AdamW lr {a.lr}, batch {a.batch}; {a.threads} threads; load average {load:.1f}", flush=True)

    params = [p for n, p in model.named_parameters() if not n.startswith("vision.attn_pool.")]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng = random.Random(a.seed)
    order: list = []
    curve = []

    def evaluate(step: int, wall: float, cpu: float, train_loss) -> None:
        te = time.time()
        vl = token_mean_loss(model, (collate_cached(collate, b) for b in val_batches))["loss"]
        acc = first_token_accuracy(model, processor, prompts[:a.eval_questions])
        curve.append({"step": step, "wall_minutes": wall / 60, "cpu_minutes": cpu / 60, "train_loss": train_loss,
                      "val_loss": vl, "accuracy": acc})
        per_kind = " ".join(f"{k} {v:.2f}" for k, v in sorted(acc.items()) if k not in ("all", "picture"))
        shown = "-" if train_loss is None else f"{train_loss:.3f}"
        print(f"step {step:5d} | {cpu / 60 / a.threads:5.1f} min ({wall / 60:5.1f} wall) | train loss {shown} | "
              f"val loss {vl:.3f} | picture accuracy {acc['picture']:.3f} ({per_kind}) | load "
              f"{os.getloadavg()[0]:.1f} | eval {time.time() - te:.0f} s", flush=True)

    evaluate(0, 0.0, 0.0, None)
    budget = a.minutes * 60
    train_time, cpu_time, step, recent, next_point = 0.0, 0.0, 0, [], 1
    while step < a.steps and cpu_time / a.threads < budget:
        t0, c0 = time.perf_counter(), time.process_time()
        if len(order) < a.batch:
            idx = list(range(len(train)))
            rng.shuffle(idx)
            order += idx
        batch = collate_cached(collate, [train[i] for i in order[:a.batch]])
        del order[:a.batch]
        for g in opt.param_groups:
            progress = step / a.schedule_steps if a.schedule_steps else cpu_time / a.threads / budget
            g["lr"] = lr_at(step, progress, a.lr, a.warmup)
        out = model(**{k: batch[k] for k in ("input_ids", "labels", "segment_ids", "position_ids", "images",
                                             "images_seq_mask", "images_spatial_crop")})
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(out.loss.item())
        step += 1
        train_time += time.perf_counter() - t0
        cpu_time += time.process_time() - c0
        due = step % a.eval_every == 0 if a.eval_every else cpu_time / a.threads >= budget * next_point / a.eval_points
        if due and cpu_time / a.threads < budget:
            evaluate(step, train_time, cpu_time, sum(recent) / len(recent))
            recent, next_point = [], int(cpu_time / a.threads / budget * a.eval_points) + 1
    if not curve or curve[-1]["step"] != step:
        evaluate(step, train_time, cpu_time, sum(recent) / len(recent) if recent else None)

    loaded = LoadedModel(model=model.eval(), processor=processor, kind="hf", path=ckpt, tag=None,
                         device=torch.device("cpu"), device_map=None)
    mcq = run_mcq(loaded, paths["val"], paths["root"], batch_size=32, progress=False)
    result = {"args": vars(a), "parameters": n_params, "load_average_start": load,
              "load_average_end": os.getloadavg()[0], "steps": step, "train_wall_minutes": train_time / 60,
              "train_cpu_minutes": cpu_time / 60,
              "samples_seen": step * a.batch, "curve": curve, "ai2d_accuracy": mcq["accuracy"],
              "ai2d_scored": mcq["scored"]}
    with open(os.path.join(a.workdir, "learning.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{step} steps ({step * a.batch} samples) in {cpu_time / 60 / a.threads:.1f} min of training "
          f"({train_time / 60:.1f} wall, load average {load:.1f} -> {os.getloadavg()[0]:.1f}): held-out ai2d accuracy "
          f"(greedy generation, lmms-eval rules) {mcq['accuracy']:.3f} on {mcq['scored']} questions (chance ~0.27); "
          f"first-token picture accuracy {curve[-1]['accuracy']['picture']:.3f}; val loss "
          f"{curve[0]['val_loss']:.3f} -> {curve[-1]['val_loss']:.3f}")
    return result


if __name__ == "__main__":
    main()
