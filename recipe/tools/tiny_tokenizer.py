"""A small byte-level BPE tokenizer with DeepSeek-VL2's special tokens, trained offline from a built-in corpus.

Same shape as the released tokenizer files (``tokenizer.json`` + ``tokenizer_config.json`` with
``LlamaTokenizerFast`` + ``special_tokens_map.json``): BOS/EOS/pad at ids 0/1/2 as in tiny/base, byte-level BPE
in the middle, and the image, grounding and role tokens as special added tokens at the end of the vocabulary.
"""

from __future__ import annotations

import itertools
import json
import os

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image>"
GROUNDING = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"]
ROLES = ["<|User|>", "<|Assistant|>"]
ADDED_SPECIAL = [IMAGE, *GROUNDING, *ROLES]


def corpus() -> list[str]:
    """Deterministic English text in the register of diagram QA (ai2d): shapes, colours, parts, options."""
    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
    shapes = ["circle", "square", "triangle", "rectangle", "star", "arrow", "line", "box"]
    topics = ["the sun", "the moon", "a plant", "the water cycle", "a food web", "the earth", "a frog", "a leaf",
              "the stem", "the root", "a flower", "an insect", "the larva", "the egg", "the adult", "the pupa"]
    questions = ["Which {s} is {c}?", "What does the {c} {s} show?", "How many {s}s are there?",
                 "What is labelled {l} in the diagram?", "Which stage comes after {t}?",
                 "Where is the {c} {s}?", "What colour is the {s} next to {t}?"]
    answers = ["The {c} {s} is on the left.", "It shows {t}.", "There are {n} {s}s.", "The answer is {l}.",
               "{t} comes next.", "It is in the top right corner.", "It is {c}."]
    lines = []
    for i, (c, s, t) in enumerate(itertools.product(colours, shapes, topics[:6])):
        letter, n = "ABCD"[i % 4], i % 10
        lines.append(questions[i % len(questions)].format(s=s, c=c, t=t, l=letter))
        lines.append(answers[i % len(answers)].format(s=s, c=c, t=t, l=letter, n=n))
    lines += [f"Options: A. {a} B. {b} C. {c} D. {d}" for a, b, c, d in zip(topics, topics[1:], topics[2:], topics[3:])]
    lines += ["Answer with the option's letter from the given choices directly.", "Describe the image.",
              "0 1 2 3 4 5 6 7 8 9 10 100 1000", "The diagram shows the life cycle of a frog.",
              "Look at the picture and answer the question below."]
    return lines


def build_tokenizer(out_dir: str, vocab_size: int = 500) -> int:
    """Train and write the tokenizer files into ``out_dir``; returns the tokenizer's length (<= vocab_size)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(ADDED_SPECIAL), special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_SPECIAL])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                   "additional_special_tokens": ADDED_SPECIAL}
    tok_config = {"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384,
                  "padding_side": "left", **special_map}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2, ensure_ascii=False)
    return tok.get_vocab_size(with_added_tokens=True)
