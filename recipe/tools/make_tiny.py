"""Write a random-initialised tiny DeepSeek-VL2 checkpoint in the released HF layout.

    python -m recipe.tools.make_tiny --like tiny|small|base --out DIR

Output: ``config.json``, sharded ``model-0000N-of-00000M.safetensors`` + ``model.safetensors.index.json`` (or one
``model.safetensors`` with ``--single-file``), ``processor_config.json`` and a small trained tokenizer with the real
special tokens. Same key names and config schema as the released checkpoints; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
from torch import nn

from recipe.checkpoint.files import atomic_output_dir
from recipe.checkpoint.hf import SINGLE_NAME, parse_size
from recipe.config import _tile_candidates
from recipe.data.processor_config import ProcessorConfig
from recipe.model import DeepseekVLV2ForCausalLM
from recipe.tools.tiny_config import TINY_LIKE, tiny_config
from recipe.tools.tiny_tokenizer import build_tokenizer

logger = logging.getLogger(__name__)


def init_weights(model: DeepseekVLV2ForCausalLM, seed: int, std: float = 0.02) -> None:
    """HF-style init for a from-scratch model: Linear / Embedding weights of the language model and projector
    ~ N(0, std) with zero biases; the router keeps kaiming-uniform, the vision tower PyTorch's defaults (the
    original's ``weight_init='skip'``). The noaux_tc correction bias gets small random values so tests see it
    change the routing (released checkpoints carry trained values)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in (model.language, model.projector):
            for name, module in part.named_modules():
                if isinstance(module, (nn.Linear, nn.Embedding)) and not name.endswith("mlp.gate"):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.05)


def make_tiny(out: str, like: str = "tiny", image_size: int = 384, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
              max_shard_size="1MB", single_file: bool = False, overwrite: bool = False, **config_overrides) -> str:
    """Build, initialise and write a tiny checkpoint; returns ``out``."""
    torch.manual_seed(seed)
    cfg = tiny_config(like, image_size=image_size, **config_overrides)
    model = DeepseekVLV2ForCausalLM(cfg)
    init_weights(model, seed)
    model = model.to(dtype)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        n_tok = build_tokenizer(tmp, vocab_size=min(500, cfg.language_config.vocab_size))
        if n_tok > cfg.language_config.vocab_size:
            raise ValueError(f"tokenizer has {n_tok} tokens, more than vocab_size={cfg.language_config.vocab_size}")
        if single_file:
            from safetensors.torch import save_file
            cfg.save_json(os.path.join(tmp, "config.json"))
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, SINGLE_NAME),
                      metadata={"format": "pt"})
        else:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        ProcessorConfig(candidate_resolutions=_tile_candidates(image_size)).save_json(
            os.path.join(tmp, "processor_config.json"))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m recipe.tools.make_tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--like", choices=TINY_LIKE, default="tiny",
                   help="which released size to imitate: tiny = MHA/softmax/greedy, small = MLA/softmax/greedy, "
                        "base = MLA/sigmoid/noaux_tc (default: %(default)s)")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--image-size", type=int, default=384,
                   help="tile size in pixels; 384 is the real processor, 42 makes fast test models")
    p.add_argument("--layers", type=int, default=3, help="decoder layers (first one dense)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--experts", type=int, default=8, help="routed experts per MoE layer")
    p.add_argument("--top-k", type=int, default=3, help="experts per token")
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="stored dtype (released: bf16)")
    p.add_argument("--max-shard-size", default="1MB", help="shard size limit, e.g. 1MB or 5GB")
    p.add_argument("--single-file", action="store_true", help="write one model.safetensors without an index")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_tiny(a.out, like=a.like, image_size=a.image_size, seed=a.seed,
              dtype=torch.bfloat16 if a.dtype == "bf16" else torch.float32,
              max_shard_size=parse_size(a.max_shard_size), single_file=a.single_file, overwrite=a.overwrite,
              num_hidden_layers=a.layers, hidden_size=a.hidden_size, n_routed_experts=a.experts,
              num_experts_per_tok=a.top_k, vision_layers=a.vision_layers)
    print(f"wrote tiny DeepSeek-VL2 checkpoint (like {a.like}) to {a.out}")


if __name__ == "__main__":
    main()
