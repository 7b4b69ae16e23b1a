"""Ask a checkpoint one question about one or more images and print the answer.

    python -m recipe.chat --model exported/ --image a.png [--image b.png] --question "What does the arrow show?" \\
        [--max-new-tokens 512] [--temperature 0.7 --top-p 0.9 --seed 0] [--dtype bf16] [--device-map auto]

--model takes every checkpoint form ``recipe.evaluate`` takes (HF export, converted layout, training checkpoint
with ``--tag`` / ``--config-dir``). The images go into the question at its ``<image>`` placeholders, or, when it
has none, one per line in front of it. Temperature 0 (the default) is greedy decoding; otherwise tokens are
sampled (``--top-k``, ``--top-p``; ``--seed`` makes the draw reproducible). Only the answer goes to stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import torch

from recipe.data.conversation import IMAGE_TOKEN
from recipe.data.image_io import load_image
from recipe.eval.loading import LoadedModel
from recipe.evaluate import LOAD_ERRORS, add_model_args, load_model_from_args

logger = logging.getLogger("recipe.chat")


def build_question(question: str, num_images: int) -> str:
    """The user turn: ``question`` as is when its ``<image>`` placeholders match the images, else one placeholder
    line per image in front of it; ValueError when it has placeholders but not as many as images."""
    n = question.count(IMAGE_TOKEN)
    if n == num_images:
        return question
    if n:
        raise ValueError(f"the question has {n} {IMAGE_TOKEN} placeholders but {num_images} images were given")
    return "".join(f"{IMAGE_TOKEN}\n" for _ in range(num_images)) + question


def answer(loaded: LoadedModel, images: Sequence, question: str, *, max_new_tokens: int = 512,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None) -> str:
    """The model's answer to ``question`` about the PIL ``images``."""
    model, processor = loaded.model, loaded.processor
    messages = [{"role": "<|User|>", "content": build_question(question, len(images))},
                {"role": "<|Assistant|>", "content": ""}]
    sample = processor.process_one(messages, list(images), inference_mode=True)
    dtype = model.language.get_input_embeddings().weight.dtype
    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=loaded.device).manual_seed(seed)
    out = model.generate(sample.input_ids[None], None, sample.images[None].to(loaded.device, dtype),
                         sample.images_seq_mask[None], sample.images_spatial_crop[None],
                         max_new_tokens=max_new_tokens, eos_token_id=processor.eos_id, pad_token_id=processor.pad_id,
                         temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return processor.decode(out.token_lists()[0], skip_special_tokens=True).strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--question", required=True, help="the question (may place images with <image>)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling generator (reproducible answers)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.max_new_tokens < 1 or a.temperature < 0 or a.top_k < 0 or not 0 < a.top_p <= 1:
        p.error("--max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    try:
        images = [load_image(path) for path in a.image]
        build_question(a.question, len(images))
        loaded = load_model_from_args(a)
    except LOAD_ERRORS as e:  # ImageLoadError is a ValueError
        logger.error("%s", e)
        return 2
    print(answer(loaded, images, a.question, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                 top_k=a.top_k, top_p=a.top_p, seed=a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
