"""Export a DeepSpeed checkpoint of DeepSeek-VL2 back to the Hugging Face layout.

    python converters/ds_to_hf.py --ds-dir save_dir --out exported/              # training run, 'latest' tag
    python converters/ds_to_hf.py --ds-dir save_dir --tag global_step500 --out exported/
    python converters/ds_to_hf.py --ds-dir ckpt/DeepSeekVL2 --out exported/ --dtype keep   # a converted layout
    python converters/ds_to_hf.py --ds-dir save_dir --merge-lora --out merged/         # LoRA run: W + B@A*scale
    python converters/ds_to_hf.py --ds-dir save_dir --lora-adapter-out adapter/       # LoRA run: PEFT adapter

--ds-dir is either a layout written by hf_to_ds.py (it has manifest.json) or a directory written by DeepSpeed's
save_checkpoint during training (<tag>/mp_rank_XX_model_states.pt per pipeline stage and
<tag>/layer_J_expert_E_mp_rank_XX_model_states.pt per routed expert; any pipeline split and expert-parallel size).

Output: released-style shards model-0000N-of-00000M.safetensors, model.safetensors.index.json, config.json and the
tokenizer / processor files. It loads in recipe.model.DeepseekVLV2ForCausalLM.from_pretrained and in the original
DeepSeek-VL2 code. The output directory appears only when complete.

A run with recipe.lora saves its frozen base and its adapters; export it merged (--merge-lora: every adapted weight
becomes W + (B @ A) * alpha / r, computed in fp32) and/or as a PEFT adapter directory (--lora-adapter-out DIR:
adapter_config.json + adapter_model.safetensors, which peft applies to the plain model). Exporting such a checkpoint
without either is an error: its base weights alone are not the trained model.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from converters.hf_to_ds import exit_on_sigterm  # noqa: E402
from recipe.checkpoint import CheckpointError  # noqa: E402
from recipe.config import ConfigError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds_to_hf.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds-dir", required=True,
                   help="converted layout (with manifest.json) or a DeepSpeed save_checkpoint directory")
    p.add_argument("--tag", default=None,
                   help="training checkpoints: the tag (sub-directory) to export (default: the one 'latest' names)")
    p.add_argument("--config-dir", default=None,
                   help="training checkpoints: directory with config.json and the tokenizer / processor files, "
                        "when they are not in --ds-dir or its tag directory (e.g. the converted model the run "
                        "started from)")
    p.add_argument("--out", default=None,
                   help="output directory of the full checkpoint; must not exist unless --overwrite (optional only "
                        "with --lora-adapter-out)")
    p.add_argument("--merge-lora", action="store_true",
                   help="LoRA runs: merge the adapters into the base weights (W + B@A*alpha/r, in fp32) for --out")
    p.add_argument("--lora-adapter-out", default=None, metavar="DIR",
                   help="LoRA runs: write the adapters as a PEFT adapter directory (adapter_config.json + "
                        "adapter_model.safetensors, tensors in --dtype)")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16", "keep"], default="bf16",
                   help="dtype of the exported floating tensors (default: %(default)s, as released; "
                        "'keep' writes them as stored)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest shard, e.g. 5GB, 8GiB, 500MB (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (the old one is removed only after the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logging only)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    exit_on_sigterm()
    from recipe.checkpoint.export import export_to_hf
    try:
        export_to_hf(args.ds_dir, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                     overwrite=args.overwrite, tag=args.tag, config_dir=args.config_dir,
                     progress=not args.no_progress, merge_lora=args.merge_lora,
                     lora_adapter_out=args.lora_adapter_out)
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as e:
        logging.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
