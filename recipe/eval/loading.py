"""Load a model and its processor for inference from any checkpoint form, through the existing readers.

- HF (``config.json`` + safetensors, as released or written by ``ds_to_hf.py``):
  ``DeepseekVLV2ForCausalLM.from_pretrained``.
- converted (``hf_to_ds.py`` output, ``manifest.json``): ``recipe.checkpoint.converted.iter_converted`` into a
  model built on the meta device (``load_state_dict(assign=True)``, strict).
- training (a ``train.py`` save directory or one tag directory): ``read_training_checkpoint`` (``latest`` or a
  tag; ``config_dir`` when config.json and the tokenizer are not beside it).

The kind is detected from the directory's contents; anything else is a :class:`CheckpointError` naming what was
expected. The processor (tokenizer + ``processor_config.json``) comes from the checkpoint directory, or for a
training checkpoint from the directory its config.json was found in.

One device by default (``recipe.accelerator.device()``: DeepSpeed's accelerator). ``device_map="auto"`` (or an
explicit {module name: device} dict) spreads a model too large for one device with accelerate's big-model
dispatch: whole decoder layers and the whole vision tower are placed (never split), each tensor is read straight
onto its device, and accelerate's hooks move activations between devices (modules mapped to "cpu" are offloaded:
kept in host memory and run on the first accelerator).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

import torch

from recipe.checkpoint import CheckpointError
from recipe.checkpoint.dtypes import parse_dtype
from recipe.checkpoint.export import detect_kind as detect_ds_kind
from recipe.checkpoint.hf import INDEX_NAME, SINGLE_NAME, iter_tensors, scan_hf
from recipe.checkpoint.validate import check_against_config
from recipe.config import VL2Config
from recipe.data.processor import DeepseekVLV2Processor
from recipe.model import DeepseekVLV2ForCausalLM, state_shapes
from recipe.model.generation import input_device

logger = logging.getLogger(__name__)

HF, CONVERTED, TRAINING = "hf", "converted", "training"
# Never split across devices: a decoder layer (attention + its MoE block and its KV cache), the vision tower and
# the projector (all tiles of a batch run through them together).
NO_SPLIT_MODULES = ["DecoderLayer", "VisionTransformer", "MlpProjector"]
# prepare_inputs_embeds combines these outside any single module call, so they must share a device.
INPUT_SIDE = ("language.model.embed_tokens", "vision", "projector", "image_newline", "view_seperator")


def detect_checkpoint(path: str) -> str:
    """``"hf"``, ``"converted"`` or ``"training"`` from the directory's contents; :class:`CheckpointError` (a
    one-line message saying what each kind holds) otherwise."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    if os.path.isfile(os.path.join(path, INDEX_NAME)) or os.path.isfile(os.path.join(path, SINGLE_NAME)):
        return HF
    try:
        return detect_ds_kind(path)
    except CheckpointError:
        raise CheckpointError(f"{path}: not a model checkpoint: expected an HF export (config.json + "
                              f"{INDEX_NAME} or {SINGLE_NAME}), a converted layout (manifest.json) or a training "
                              f"checkpoint ('latest' or <tag>/mp_rank_00_model_states.pt)") from None


@dataclass
class LoadedModel:
    model: DeepseekVLV2ForCausalLM
    processor: DeepseekVLV2Processor
    kind: str                  # hf / converted / training
    path: str
    tag: Optional[str]         # training checkpoints: the tag read
    device: torch.device       # where inputs go (the token embedding's device)
    device_map: Optional[dict]


def _tensor_stream(path: str, kind: str, tag: Optional[str], config_dir: Optional[str]):
    """(config, (name, tensor) iterator, side-file directory, tag) of a checkpoint, checked against config.json."""
    if kind == HF:
        cfg = VL2Config.from_json(path)
        weight_map, sources = scan_hf(path)
        check_against_config(cfg, {k: s.shape for k, s in sources.items()},
                             lambda k: os.path.join(path, weight_map[k]), path, state_shapes(cfg))
        return cfg, iter_tensors(path, weight_map=weight_map), path, None
    if kind == CONVERTED:
        from recipe.checkpoint.converted import iter_converted, load_manifest

        manifest = load_manifest(path)
        return VL2Config.from_json(path), iter_converted(path, manifest), path, None
    from recipe.checkpoint.training import read_training_checkpoint

    ckpt = read_training_checkpoint(path, tag, config_dir)
    side = ckpt.side_dir or config_dir
    if side is None:
        raise CheckpointError(f"{path}: pass --config-dir (where config.json and the tokenizer files are)")
    if ckpt.lora_refs:  # a LoRA run: the trained model is the base with its adapters merged (fp32, cast back)
        logger.info("%s: merging the LoRA adapters of %d tensors into their base weights", ckpt.tag_dir,
                    len(ckpt.lora_refs))
        stream = ((k, t.to(ckpt.refs[k].dtype)) for k, t in ckpt.iter_merged())
        return ckpt.config, stream, side, ckpt.tag
    return ckpt.config, iter(ckpt), side, ckpt.tag


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t


def _load_state(cfg: VL2Config, stream: Iterable, dtype: Optional[torch.dtype],
                device: torch.device) -> DeepseekVLV2ForCausalLM:
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(cfg)
    state = {name: _cast(t, dtype).to(device) for name, t in stream}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_for_inference(path: str, *, tag: Optional[str] = None, config_dir: Optional[str] = None,
                       dtype: Union[str, torch.dtype, None] = torch.bfloat16,
                       device: Union[str, torch.device, None] = None,
                       device_map: Union[str, dict, None] = None, max_memory: Optional[dict] = None,
                       force_hooks: bool = False) -> LoadedModel:
    """Model (eval mode) and processor from a checkpoint directory of any form.

    Args:
        tag, config_dir: training checkpoints only (``latest`` when no tag).
        dtype: floating tensors are cast to it (None / "keep": as stored).
        device: one device (default ``recipe.accelerator.device()``); ignored with ``device_map``.
        device_map: "auto" or {module name: device} (see the module docstring); needs ``accelerate``.
        max_memory: for "auto": {device index or "cpu": bytes or "70GiB"} (accelerate's default: what is free).
        force_hooks: attach accelerate's hooks even when everything lands on one device (tests).
    """
    kind = detect_checkpoint(path)
    if kind != TRAINING and (tag is not None or config_dir is not None):
        raise ValueError(f"{path} is a {kind} checkpoint: --tag and --config-dir apply to training checkpoints")
    dtype = parse_dtype(dtype)
    cfg, stream, side_dir, tag = _tensor_stream(path, kind, tag, config_dir)
    processor = DeepseekVLV2Processor.from_pretrained(side_dir)
    if device_map is not None:
        model, device_map = _dispatch(cfg, stream, dtype, device_map, max_memory, force_hooks)
        device = input_device(model)
    else:
        if device is None:
            from recipe.accelerator import device as accelerator_device

            device = accelerator_device()
        device = torch.device(device)
        if kind == HF:
            del stream  # from_pretrained reads the files itself (after the same checks)
            model = DeepseekVLV2ForCausalLM.from_pretrained(path, torch_dtype=dtype, device=device)
        else:
            model = _load_state(cfg, stream, dtype, device)
    model.eval()
    logger.info("loaded %s checkpoint %s%s (%s) on %s", kind, path, f" tag {tag}" if tag else "",
                "stored dtype" if dtype is None else str(dtype).replace("torch.", ""),
                "devices " + str(sorted({str(v) for v in device_map.values()})) if device_map else device)
    return LoadedModel(model, processor, kind, path, tag, torch.device(device), device_map)


# --- accelerate's big-model dispatch ------------------------------------------------------------------------------
def _import_accelerate():
    try:
        import accelerate
    except ImportError as e:
        raise ImportError(f"--device-map needs the accelerate package ({e}); pip install accelerate") from None
    return accelerate


def placement_units(cfg: VL2Config) -> list[str]:
    """The module (or parameter) names a device map assigns, in model order: the input side, each decoder layer,
    the final norm and the LM head."""
    return ["vision", "projector", "image_newline", "view_seperator", "language.model.embed_tokens",
            *(f"language.model.layers.{i}" for i in range(cfg.language_config.num_hidden_layers)),
            "language.model.norm", "language.lm_head"]


def _device_of_unit(device_map: dict, unit: str):
    """The device a (possibly coarser or finer) accelerate map gives ``unit``: its longest prefix entry, or the
    device of its first finer entry."""
    best = None
    for key, dev in device_map.items():
        if key == "" or unit == key or unit.startswith(key + "."):
            if best is None or len(key) > len(best[0]):
                best = (key, dev)
    if best is not None:
        return best[1]
    for key, dev in device_map.items():
        if key.startswith(unit + "."):
            return dev
    raise KeyError(unit)


def plan_device_map(model: torch.nn.Module, cfg: VL2Config, dtype: Optional[torch.dtype],
                    max_memory: Optional[dict] = None) -> dict:
    """{placement unit: device} for a meta-built model: accelerate's ``infer_auto_device_map`` (whole decoder
    layers, whole vision tower), then the input side moved onto the token embedding's device."""
    accelerate = _import_accelerate()
    inferred = accelerate.infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT_MODULES,
                                                dtype=dtype)
    return fine_device_map(inferred, cfg)


def fine_device_map(device_map: dict, cfg: VL2Config) -> dict:
    """Any device map (coarse or fine) -> one entry per :func:`placement_units` unit, with the input side on the
    token embedding's device; refuses disk offload."""
    fine = {unit: _device_of_unit(device_map, unit) for unit in placement_units(cfg)}
    first = fine["language.model.embed_tokens"]
    for unit in INPUT_SIDE:
        fine[unit] = first
    if "disk" in fine.values():
        raise ValueError("the model does not fit in accelerator and host memory (accelerate would offload to disk, "
                         "which this loader does not do); give more --max-memory or use more devices")
    return fine


def _dispatch(cfg: VL2Config, stream: Iterator, dtype: Optional[torch.dtype], device_map, max_memory,
              force_hooks: bool):
    accelerate = _import_accelerate()
    from accelerate.utils import set_module_tensor_to_device

    from recipe.model.moe import DeepseekV2MoE, pack_experts

    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(cfg)
    if device_map == "auto":
        device_map = plan_device_map(model, cfg, dtype, max_memory)
    elif isinstance(device_map, dict):
        device_map = fine_device_map(device_map, cfg)
    else:
        raise ValueError(f"device_map={device_map!r}: expected 'auto' or a dict")
    # The model's own parameters (image_newline, view_seperator) get no hook: put them where the input side runs
    # (the first accelerator when the input side is offloaded to host memory).
    accelerators = [d for d in device_map.values() if d not in ("cpu", "disk")]
    input_side = device_map["language.model.embed_tokens"]
    root_device = accelerators[0] if input_side == "cpu" and accelerators else input_side
    root_params = {name for name, _ in model.named_parameters(recurse=False)}
    expected = set(model.state_dict())
    seen = set()
    for name, t in stream:
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint")
        dev = root_device if name in root_params else _device_of_unit(device_map, name)
        value = _cast(t, dtype)
        set_module_tensor_to_device(model, name, dev, value=value, dtype=value.dtype)  # else: the meta tensor's
        seen.add(name)
    if expected - seen:
        raise CheckpointError(f"checkpoint misses tensors: {sorted(expected - seen)[:5]}")
    for module in model.modules():
        if isinstance(module, DeepseekV2MoE):
            pack_experts(module.experts)  # one storage per layer's experts, as load_state_dict leaves them
    device_map = {unit: root_device if unit in root_params else dev for unit, dev in device_map.items()}
    with warnings.catch_warnings():  # accelerate warns that the two parameters are no submodules: they need no hook
        warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
        model = accelerate.dispatch_model(model, device_map=device_map, force_hooks=force_hooks)
    return model, device_map


def parse_max_memory(text: Optional[str]) -> Optional[dict]:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` -> {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}; None passes through."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise ValueError(f"--max-memory {text!r}: expected DEVICE=SIZE[,DEVICE=SIZE...], e.g. 0=70GiB,cpu=200GiB")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = value.strip()
    return out
