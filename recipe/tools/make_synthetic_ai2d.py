"""Write a synthetic ai2d-style dataset in InternVL format, for the demo and the tests.

    python -m recipe.tools.make_synthetic_ai2d --out DIR --num 400 --seed 0

Writes DIR/images/NNNNNN.png (diagrams of coloured, letter-labelled shapes on white, in varied sizes: small,
square, wide, tall, large) and DIR/ai2d_train.jsonl (image paths relative to DIR). Each record is a
multiple-choice question whose answer can be read off its picture (the colour of a shape, the number of shapes,
the shape with a given label, the label of a colour) in the ai2d prompt style ("...Answer with the option's
letter from the given choices directly." -> "C"). About 20% have a second question on the same image, 5% are
text-only and 5% compare two images. Everything is a function of the seed.

``--facts`` also writes DIR/ai2d_facts.jsonl: per record its id and, per image, the drawn items in label order
(``{"shape", "colour", "label"}``), so more questions can be asked about the same pictures (``bench/learning.py``).
It draws nothing from the random generator: the images and ai2d_train.jsonl are the same with or without it.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20),
           "purple": (140, 50, 170), "orange": (245, 130, 20), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
LETTERS = "ABCD"
SIZE_KINDS = (("small", 0.15), ("square", 0.35), ("wide", 0.2), ("tall", 0.2), ("large", 0.1))
SUFFIX = "Answer with the option's letter from the given choices directly."


def _size(rng: random.Random) -> tuple[int, int]:
    kind = rng.choices([k for k, _ in SIZE_KINDS], weights=[w for _, w in SIZE_KINDS])[0]
    if kind == "small":
        return rng.randint(60, 160), rng.randint(60, 160)
    if kind == "square":
        s = rng.randint(240, 640)
        return s, s
    if kind == "wide":
        h = rng.randint(150, 400)
        return int(h * rng.uniform(2.0, 4.0)), h
    if kind == "tall":
        w = rng.randint(150, 400)
        return w, int(w * rng.uniform(2.0, 4.0))
    return rng.randint(1000, 1700), rng.randint(900, 1400)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, colour: tuple) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)


def make_diagram(rng: random.Random, path: str) -> list[dict]:
    """Draw 2-4 distinct (shape, colour) items with letter labels in a row/column; returns the items."""
    w, h = _size(rng)
    n = rng.randint(2, 4)
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    horizontal = w >= h
    cell = (w if horizontal else h) / n
    side = int(min(cell, h if horizontal else w) * 0.6)
    font = ImageFont.load_default(size=max(10, side // 3))
    items = []
    for i in range(n):
        cx = (i + 0.5) * cell if horizontal else w / 2
        cy = h / 2 if horizontal else (i + 0.5) * cell
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        _draw_shape(draw, shapes[i], box, COLOURS[colours[i]])
        draw.text((box[0], max(0, box[1] - side // 3 - 2)), LETTERS[i], fill=(0, 0, 0), font=font)
        items.append({"shape": shapes[i], "colour": colours[i], "label": LETTERS[i]})
    img.save(path, compress_level=1)
    return items


def _choice_question(rng: random.Random, question: str, answer: str, distractors: list) -> tuple[str, str]:
    options = rng.sample(distractors, 3) + [answer]
    rng.shuffle(options)
    lines = [question] + [f"{LETTERS[k]}. {o}" for k, o in enumerate(options)] + [SUFFIX]
    return "\n".join(lines), LETTERS[options.index(answer)]


def ask(rng: random.Random, items: list) -> tuple[str, str]:
    """One multiple-choice question about a diagram and its answer letter."""
    it = rng.choice(items)
    kind = rng.randrange(4)
    if kind == 0:
        return _choice_question(rng, f"What colour is the {it['shape']}?", it["colour"],
                                [c for c in COLOURS if c != it["colour"]])
    if kind == 1:
        n = str(len(items))
        return _choice_question(rng, "How many shapes are in the diagram?", n,
                                [str(k) for k in range(1, 8) if str(k) != n])
    if kind == 2:
        return _choice_question(rng, f"Which shape is labelled {it['label']}?", it["shape"],
                                [s for s in SHAPES if s != it["shape"]] + ["star", "arrow"])
    return _choice_question(rng, f"Which label marks the {it['colour']} shape?", it["label"],
                            [c for c in "ABCDEFG" if c != it["label"]])


def make_synthetic_ai2d(out: str, num: int = 400, seed: int = 0, facts: bool = False) -> str:
    """Write the dataset; returns the jsonl path. ``facts``: also write ai2d_facts.jsonl (the drawn items)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    jsonl = os.path.join(out, "ai2d_train.jsonl")
    tmp = jsonl + ".tmp"
    facts_path = os.path.join(out, "ai2d_facts.jsonl")
    facts_file = open(facts_path + ".tmp", "w", encoding="utf-8") if facts else None
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(num):
            kind = rng.random()
            rec = {"id": f"synth-{seed}-{i:06d}"}
            drawn = []
            if kind < 0.05:  # text-only
                a, b = rng.randint(1, 9), rng.randint(1, 9)
                q, ans = _choice_question(rng, f"What is {a} + {b}?", str(a + b),
                                          [str(k) for k in range(2, 19) if k != a + b])
                rec["conversations"] = [{"from": "human", "value": q}, {"from": "gpt", "value": ans}]
            elif kind < 0.10:  # two images
                paths = [f"images/{i:06d}_{k}.png" for k in (1, 2)]
                drawn = [make_diagram(rng, os.path.join(out, p)) for p in paths]
                while len(drawn[0]) == len(drawn[1]):
                    drawn[1] = make_diagram(rng, os.path.join(out, paths[1]))
                counts = [len(d) for d in drawn]
                q = ("Image-1: <image>\nImage-2: <image>\nWhich image shows more shapes?\nA. Image-1\nB. Image-2\n"
                     + SUFFIX)
                rec["images"] = paths
                rec["conversations"] = [{"from": "human", "value": q},
                                        {"from": "gpt", "value": "A" if counts[0] > counts[1] else "B"}]
            else:
                path = f"images/{i:06d}.png"
                items = make_diagram(rng, os.path.join(out, path))
                drawn = [items]
                q, ans = ask(rng, items)
                rec["image"] = path
                conv = [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": ans}]
                if rng.random() < 0.2:  # a follow-up question on the same picture
                    q2, ans2 = ask(rng, items)
                    conv += [{"from": "human", "value": q2}, {"from": "gpt", "value": ans2}]
                rec["conversations"] = conv
            f.write(json.dumps(rec) + "\n")
            if facts_file is not None:
                images = rec.get("images", [rec["image"]] if "image" in rec else [])
                facts_file.write(json.dumps({"id": rec["id"], "images": images, "items": drawn}) + "\n")
    if facts_file is not None:
        facts_file.close()
        os.replace(facts_path + ".tmp", facts_path)
    os.replace(tmp, jsonl)
    return jsonl


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m recipe.tools.make_synthetic_ai2d", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (images/ and ai2d_train.jsonl)")
    p.add_argument("--num", type=int, default=400, help="number of records (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--facts", action="store_true", help="also write ai2d_facts.jsonl: the drawn items per image")
    a = p.parse_args(argv)
    if a.num <= 0:
        p.error("--num must be positive")
    path = make_synthetic_ai2d(a.out, a.num, a.seed, facts=a.facts)
    print(f"wrote {a.num} records to {path} (images under {os.path.join(a.out, 'images')})")


if __name__ == "__main__":
    main()
