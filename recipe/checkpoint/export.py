"""Export to the HF layout: from a converted directory or a DeepSpeed training checkpoint (detected from the
contents), to released-style safetensors shards + index + config, tokenizer and processor files, which our model
and the original DeepSeek-VL2 code load. Streams tensor by tensor; the output appears only when complete.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from typing import Optional, Union

import torch

from recipe.checkpoint import CheckpointError
from recipe.checkpoint.converted import MANIFEST_NAME, cast_floating, iter_converted, load_manifest
from recipe.checkpoint.dtypes import DtypeArg, dtype_name, parse_dtype, spec_nbytes
from recipe.checkpoint.files import atomic_output_dir, byte_progress, check_output_dir, resolve_inside
from recipe.checkpoint.hf import INDEX_NAME, SINGLE_NAME, copy_side_files, load_weight_map, parse_size, write_hf_shards
from recipe.checkpoint.training import list_tags, read_training_checkpoint
from recipe.checkpoint.validate import check_against_config
from recipe.config import VL2Config
from recipe.lora.adapter import write_adapter
from recipe.lora.config import lora_module_of
from recipe.model import state_shapes
from recipe.parallel import layout

logger = logging.getLogger(__name__)

CONVERTED, TRAINING = "converted", "training"


def detect_kind(src_dir: str) -> str:
    """"converted" (a manifest.json), "training" (``latest`` or mp_rank files) or a :class:`CheckpointError`."""
    if os.path.isfile(os.path.join(src_dir, MANIFEST_NAME)):
        return CONVERTED
    if os.path.isfile(os.path.join(src_dir, "latest")) or \
            os.path.isfile(os.path.join(src_dir, "mp_rank_00_model_states.pt")) or list_tags(src_dir):
        return TRAINING
    if os.path.isfile(os.path.join(src_dir, INDEX_NAME)) or os.path.isfile(os.path.join(src_dir, SINGLE_NAME)):
        raise CheckpointError(f"{src_dir}: already an HF safetensors checkpoint")
    if not os.path.isdir(src_dir):
        raise CheckpointError(f"{src_dir}: no such directory")
    raise CheckpointError(f"{src_dir}: neither a converted layout ({MANIFEST_NAME}) nor a DeepSpeed training "
                          f"checkpoint ('latest' or <tag>/mp_rank_00_model_states.pt)")


def export_to_hf(src_dir: str, out_dir: Optional[str], dtype: DtypeArg = torch.bfloat16,
                 max_shard_size: Union[int, str] = "5GB", overwrite: bool = False, *, tag: Optional[str] = None,
                 config_dir: Optional[str] = None, progress: bool = True, merge_lora: bool = False,
                 lora_adapter_out: Optional[str] = None) -> dict:
    """Write an HF checkpoint (released-style shards, index, config, tokenizer and processor files) from a
    converted directory or a DeepSpeed training checkpoint (detected from the contents of ``src_dir``).

    Args:
        dtype: floating tensors are cast to it (default bf16, as released); None / "keep" keeps stored dtypes.
        max_shard_size: shard size limit ("5GB", "500MB", bytes).
        tag: training checkpoints only; None = the ``latest`` tag.
        config_dir: training checkpoints only: where config.json and the tokenizer / processor files are, when
            not in the checkpoint directory.
        merge_lora: a LoRA run's checkpoint: write W + (B @ A) * alpha / r (computed in fp32) for every adapted
            weight. A LoRA checkpoint needs it (or only ``lora_adapter_out``): its base alone is not the trained
            model.
        lora_adapter_out: a LoRA run's checkpoint: also (or, with ``out_dir`` None, only) write its adapters as a
            PEFT adapter directory there (``recipe.lora.adapter``), tensors in ``dtype``.

    Returns the written weight map (name -> shard file); {} when only the adapter was written.
    """
    src_dir = os.path.abspath(src_dir)
    kind = detect_kind(src_dir)
    if merge_lora and out_dir is None:
        raise ValueError("--merge-lora writes a full checkpoint: give --out")
    if out_dir is None and lora_adapter_out is None:
        raise ValueError("give an output directory (--out), a LoRA adapter directory (--lora-adapter-out), or both")
    if out_dir is not None:
        _, out_dir = check_output_dir(src_dir, out_dir, overwrite)
    if lora_adapter_out is not None:
        check_output_dir(src_dir, lora_adapter_out, overwrite)
    dtype = parse_dtype(dtype)
    if kind == CONVERTED and (merge_lora or lora_adapter_out):
        raise ValueError(f"{src_dir} is a converted layout, which holds no LoRA adapters; --merge-lora and "
                         f"--lora-adapter-out apply to checkpoints of runs with recipe.lora")
    if kind == CONVERTED:
        if tag is not None:
            raise ValueError(f"{src_dir} is a converted layout; --tag applies to training checkpoints only")
        manifest = load_manifest(src_dir)
        cfg = VL2Config.from_json(src_dir)
        _check_manifest_layers(manifest, cfg, src_dir)
        stored = {k: (tuple(v["shape"]), getattr(torch, v["dtype"])) for e in manifest["layers"]
                  for k, v in e["tensors"].items()}
        files = {k: resolve_inside(src_dir, e["file"], MANIFEST_NAME) for e in manifest["layers"] for k in e["tensors"]}
        check_against_config(cfg, {k: shape for k, (shape, _) in stored.items()}, files.get, src_dir,
                             state_shapes(cfg))
        stream, side_dir = iter_converted(src_dir, manifest), src_dir
    else:
        ckpt = read_training_checkpoint(src_dir, tag, config_dir)
        if ckpt.side_dir is None:
            raise CheckpointError(f"{src_dir}: pass config_dir (where config.json and the tokenizer files are)")
        stored = {k: (ckpt.refs[k].shape, ckpt.refs[k].dtype) for k in ckpt.order}
        stream, side_dir = iter(ckpt), ckpt.side_dir
        if ckpt.lora_refs or merge_lora or lora_adapter_out:
            stream = _lora_outputs(ckpt, stream, merge_lora, lora_adapter_out, dtype, overwrite)
            if out_dir is None:
                return {}
    specs = OrderedDict((k, (shape, _out_dtype(d, dtype))) for k, (shape, d) in stored.items())
    # merged weights come out of the stream in fp32; each tensor takes its spec's dtype on the way to the file
    stream = ((k, t.to(specs[k][1]) if t.is_floating_point() else t) for k, t in stream)
    total = sum(spec_nbytes(spec) for spec in specs.values())
    logger.info("exporting %s checkpoint %s -> %s (%d tensors, %.2f GB, dtype %s)", kind, src_dir, out_dir,
                len(specs), total / 1e9, dtype_name(dtype) if dtype else "kept")
    bar = byte_progress(total, len(specs), "ds->hf", progress)
    done = [0]

    def on_tensor(name: str, nbytes: int) -> None:
        done[0] += 1
        bar.update(nbytes)
        bar.set_postfix_str(f"{done[0]}/{len(specs)} tensors", refresh=False)

    t0 = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        weight_map = write_hf_shards(specs, stream, tmp,
                                     parse_size(max_shard_size), on_tensor=on_tensor)
        copy_side_files(side_dir, tmp)
        load_weight_map(tmp, check_files=True)  # re-read every header: the export is complete and consistent
    bar.close()
    dt = time.perf_counter() - t0
    logger.info("exported %d tensors into %d shards at %s: %.2f GB in %.1f s (%.2f GB/s)", len(weight_map),
                len(set(weight_map.values())), out_dir, total / 1e9, dt, total / 1e9 / max(dt, 1e-9))
    return weight_map


def _check_manifest_layers(manifest: dict, cfg: VL2Config, ds_dir: str) -> None:
    """The manifest's layers are config.json's pipeline layers, and each holds only tensors that layer owns."""
    layers = layout.build_layout(cfg)
    if len(manifest["layers"]) != len(layers):
        raise CheckpointError(f"{os.path.join(ds_dir, MANIFEST_NAME)}: {len(manifest['layers'])} pipeline layers, "
                              f"config.json gives {len(layers)}")
    for entry, layer in zip(manifest["layers"], layers):
        for name in entry["tensors"]:
            if not layer.owns(name):
                raise CheckpointError(f"{os.path.join(ds_dir, entry['file'])}: tensor {name!r} does not belong to "
                                      f"pipeline layer {layer.index} ({layer.kind})")


def _out_dtype(stored: torch.dtype, dtype: Optional[torch.dtype]) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def _lora_outputs(ckpt, stream, merge: bool, adapter_out: Optional[str], dtype: Optional[torch.dtype],
                  overwrite: bool):
    """Check the LoRA options against the checkpoint, write the PEFT adapter directory when asked, and return the
    tensor stream for the full export: the base as stored, with ``W + (B @ A) * scale`` (fp32) for adapted
    weights when merging."""
    if not ckpt.lora_refs:
        raise CheckpointError(f"{ckpt.tag_dir}: no LoRA tensors (not a run with recipe.lora); drop --merge-lora and "
                              f"--lora-adapter-out")
    modules = sorted({lora_module_of(k)[0] for k in ckpt.lora_refs})
    if not merge and adapter_out is None:
        raise CheckpointError(f"{ckpt.tag_dir}: a LoRA run's checkpoint (adapters on {len(modules)} modules, e.g. "
                              f"{modules[0]}); its base weights alone are not the trained model. Pass --merge-lora "
                              f"for a full merged checkpoint and/or --lora-adapter-out DIR for a PEFT adapter")
    cfg = ckpt.lora_config()
    if adapter_out is not None:
        tensors = ckpt.lora_tensors()
        write_adapter(adapter_out, cfg, {k: cast_floating(t, dtype) for k, t in tensors.items()}, overwrite)
        logger.info("wrote the PEFT adapter of %d modules (rank %d, alpha %g) to %s", len(modules), cfg.rank,
                    cfg.alpha, adapter_out)
    if not merge:
        return stream
    logger.info("merging LoRA (rank %d, alpha %g, scale %g) into %d weights", cfg.rank, cfg.alpha, cfg.scale,
                len(modules))
    return ckpt.iter_merged()
