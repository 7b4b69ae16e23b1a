"""Convert a DeepSeek-VL2 Hugging Face checkpoint into DeepSpeed pipeline layer files.

    python converters/hf_to_ds.py --hf-dir raw_ckpt/DeepSeekVL2 --out ckpt/DeepSeekVL2

Input: a checkpoint directory as released (config.json + model-0000N-of-00000M.safetensors with
model.safetensors.index.json, or one model.safetensors; bf16 or fp32; tiny, small or base). Only the safetensors
files and config.json are read: no transformers, no remote code.

Output: one layer_XX-model_00-model_states.pt per pipeline layer (the tensors of that layer under their HF names,
routed experts by global id), the config / tokenizer / processor files, and manifest.json (format version, source,
layer -> HF key prefixes, dtype, tensor counts and sha256 checksums). One conversion serves every pipeline split
and expert-parallel size. Memory stays around one pipeline layer; the output directory appears only when complete.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipe.checkpoint import CheckpointError  # noqa: E402
from recipe.config import ConfigError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hf_to_ds.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output directory; must not exist unless --overwrite")
    p.add_argument("--dtype", choices=["keep", "bf16", "fp32", "fp16"], default="keep",
                   help="dtype of the written floating tensors (default: keep each tensor's stored dtype)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (the old one is removed only after the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logging only)")
    return p.parse_args(argv)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so the temporary output directory is removed on the way out."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    exit_on_sigterm()
    from recipe.checkpoint.converted import convert_hf_to_ds
    try:
        convert_hf_to_ds(args.hf_dir, args.out, dtype=args.dtype, overwrite=args.overwrite,
                         progress=not args.no_progress)
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as e:
        logging.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
