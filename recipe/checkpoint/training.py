"""Reading DeepSpeed 0.19 pipeline + MoE training checkpoints (``save_checkpoint``) for export: any PP split and
EP size, indexed and checked against config.json before a tensor is yielded, each file's sha256 checked against the
completion record (:mod:`recipe.checkpoint.commit`) when it is read.

Files of a tag: ``mp_rank_SS_model_states.pt`` (``['module']``: ``'{layer}.{local name}'`` -> tensor, the non-expert
tensors of stage SS), ``layer_J_expert_E_mp_rank_SS_model_states.pt`` (routed expert E of the J-th MoE layer of
stage SS), optimizer shards, and ours: ``rng_state_rankNNNNN.pt``, ``run_config.json``,
``checkpoint_complete.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from recipe.checkpoint import CheckpointError
from recipe.checkpoint.commit import (  # noqa: F401  (failpoint, resolve_tag, trim_log: train.py imports them here)
    failpoint,
    read_latest,
    read_record,
    resolve_tag,
    trim_log,
    verify_complete,
)
from recipe.checkpoint.files import load_torch, resolve_inside
from recipe.checkpoint.validate import check_against_config
from recipe.config import ConfigError, VL2Config
from recipe.lora.config import LoraConfig, is_lora_key, lora_module_of
from recipe.model import state_shapes
from recipe.model.lora import merged_weight
from recipe.parallel import layout

logger = logging.getLogger(__name__)

_STAGE_FILE_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_LEGACY_EXPERT_FILE_RE = re.compile(r"^expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")


def _tag_to_read(ckpt_dir: str, tag: Optional[str] = None) -> str:
    """``tag``, or the one ``<ckpt_dir>/latest`` names, kept inside ``ckpt_dir``. Errors list the tags present."""
    if tag is None:
        tag = read_latest(ckpt_dir)
        if tag is None:
            raise CheckpointError(f"{os.path.join(ckpt_dir, 'latest')}: no 'latest' file; pass --tag (tags here: "
                                  f"{list_tags(ckpt_dir) or 'none'})")
    tag_dir = resolve_inside(ckpt_dir, str(tag), "checkpoint tag")
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"{tag_dir}: tag {tag!r} not found (tags here: {list_tags(ckpt_dir) or 'none'})")
    return str(tag)


def list_tags(ckpt_dir: str) -> str:
    """Comma-separated tag directories (those holding a stage-0 file), "" when none."""
    if not os.path.isdir(ckpt_dir):
        return ""
    return ", ".join(sorted(d for d in os.listdir(ckpt_dir)
                         if os.path.isfile(os.path.join(ckpt_dir, d, "mp_rank_00_model_states.pt"))))


@dataclass(frozen=True)
class _Ref:
    """Where one HF tensor sits in a training checkpoint."""
    path: str
    key: str
    shape: tuple
    dtype: torch.dtype

    @property
    def is_expert(self) -> bool:
        return _EXPERT_FILE_RE.match(os.path.basename(self.path)) is not None


def _split_layer_key(key: str, path: str) -> tuple[int, str]:
    idx, _, local = key.partition(".")
    if not idx.isdigit() or not local:
        raise CheckpointError(f"{path}: key {key!r} is not '<pipeline layer>.<name>' (tied modules or a "
                              f"non-pipeline model are not supported)")
    return int(idx), local


def _hf_name(layers: list, idx: int, local: str, path: str, key: str) -> str:
    if idx >= len(layers):
        raise CheckpointError(f"{path}: key {key!r} names pipeline layer {idx}, config.json gives "
                              f"{len(layers)} layers (0..{len(layers) - 1})")
    try:
        return layout.local_to_hf(layers[idx], local)
    except KeyError:
        raise CheckpointError(f"{path}: key {key!r} is no tensor of pipeline layer {idx} "
                              f"({layers[idx].kind})") from None


def _index_training(tag_dir: str, cfg: VL2Config, load: Callable) -> dict:
    """HF name -> :class:`_Ref` for every tensor of a training checkpoint (file headers only, via mmap)."""
    layers = layout.build_layout(cfg)
    names = os.listdir(tag_dir)
    stages = sorted((int(m.group(1)), n) for n in names for m in [_STAGE_FILE_RE.match(n)] if m)
    if not stages:
        zero3 = [n for n in names if n.startswith("zero_pp_rank_")]
        raise CheckpointError(f"{tag_dir}: no mp_rank_XX_model_states.pt files"
                              + (" (ZeRO-3 layout, which the pipeline engine never writes)" if zero3 else ""))
    if [s for s, _ in stages] != list(range(len(stages))):
        raise CheckpointError(f"{tag_dir}: stage files {[n for _, n in stages]} are not numbered "
                              f"00..{len(stages) - 1:02d}")
    if any(_LEGACY_EXPERT_FILE_RE.match(n) for n in names):
        raise CheckpointError(f"{tag_dir}: old-style expert_E_mp_rank_XX files (pre-0.5 DeepSpeed) are not supported")
    refs: dict[str, _Ref] = {}

    def add(hf: str, ref: _Ref):
        if hf in refs:
            raise CheckpointError(f"{ref.path}: tensor {hf!r} ({ref.key}) also in {refs[hf].path}")
        refs[hf] = ref

    for _, fname in stages:
        path = os.path.join(tag_dir, fname)
        state = load(path)
        module = state.get("module") if isinstance(state, dict) else None
        if not isinstance(module, dict):
            raise CheckpointError(f"{path}: no 'module' state dict (a pipeline without MoE layers saves "
                                  f"layer_XX-model_states.pt files instead, which this reader does not handle)")
        for key, t in module.items():
            idx, local = _split_layer_key(key, path)
            if layout.expert_id_of_local(local) is not None:
                raise CheckpointError(f"{path}: routed expert tensor {key!r} in a stage file")
            add(_hf_name(layers, idx, local, path, key), _Ref(path, key, tuple(t.shape), t.dtype))
        del state, module
    stage_count = len(stages)
    for fname in sorted(names):
        m = _EXPERT_FILE_RE.match(fname)
        if not m:
            continue
        j, e, s = (int(g) for g in m.groups())
        path = os.path.join(tag_dir, fname)
        if s >= stage_count:
            raise CheckpointError(f"{path}: stage {s} but only {stage_count} mp_rank files")
        state = load(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: not a dict of tensors")
        for key, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            idx, local = _split_layer_key(key, path)
            if layout.expert_id_of_local(local) != e:
                raise CheckpointError(f"{path}: key {key!r} is not routed expert {e} (the file name's id)")
            add(_hf_name(layers, idx, local, path, key), _Ref(path, key, tuple(t.shape), t.dtype))
        del state
    return refs


def _config_for(ckpt_dir: str, tag_dir: str, config) -> tuple[VL2Config, str]:
    """The model config of a training checkpoint and the directory its side files come from."""
    if isinstance(config, VL2Config):
        return config, None
    candidates = [config] if config is not None else [tag_dir, ckpt_dir]
    for c in candidates:
        path = os.path.join(c, "config.json") if os.path.isdir(c) else c
        if os.path.isfile(path):
            return VL2Config.from_json(path), os.path.dirname(os.path.abspath(path))
    raise CheckpointError(f"{ckpt_dir}: no config.json in {' or '.join(candidates)}; pass --config-dir (the "
                          f"converted or HF directory the run started from)")


class TrainingCheckpoint:
    """An indexed, validated DeepSpeed training checkpoint; iterate it for (HF name, tensor) in layer order."""

    def __init__(self, ckpt_dir: str, tag: Optional[str] = None, config=None):
        self.ckpt_dir = os.path.abspath(ckpt_dir)
        if not os.path.isdir(self.ckpt_dir):
            raise CheckpointError(f"{self.ckpt_dir}: no such directory")
        if os.path.isfile(os.path.join(self.ckpt_dir, "mp_rank_00_model_states.pt")) and tag is None:
            # Pointed at a tag directory itself.
            self.ckpt_dir, tag = os.path.split(self.ckpt_dir)
        self.tag = _tag_to_read(self.ckpt_dir, tag)
        self.tag_dir = os.path.join(self.ckpt_dir, self.tag)
        # train.py writes a completion record (sizes, sha256); checkpoints saved by other means have none
        self.record = read_record(self.ckpt_dir, self.tag)
        if self.record is not None:
            verify_complete(self.ckpt_dir, self.tag)
        else:
            logger.warning("%s: no completion record (not saved by recipe/train.py, or interrupted): file sizes and "
                           "checksums cannot be verified", self.tag_dir)
        self._verified: set = set()
        self.config, self.side_dir = _config_for(self.ckpt_dir, self.tag_dir, config)
        self.refs = _index_training(self.tag_dir, self.config, self._load)
        # LoRA runs (recipe.lora) save their adapters beside the frozen base; they are no tensors of config.json's
        # model, so they are kept apart (export merges them or writes them as a PEFT adapter)
        self.lora_refs = {k: self.refs.pop(k) for k in [k for k in self.refs if is_lora_key(k)]}
        expected = check_against_config(self.config, {k: r.shape for k, r in self.refs.items()},
                                        lambda k: self.refs[k].path, self.tag_dir, state_shapes(self.config))
        self.order = [k for _, names in layout.keys_by_layer(self.config, expected).items() for k in names]

    def __len__(self) -> int:
        return len(self.order)

    def lora_config(self) -> LoraConfig:
        """The run's ``recipe.lora`` block, from the tag's ``run_config.json`` (alpha is in no tensor)."""
        path = os.path.join(self.tag_dir, "run_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                block = json.load(f).get("recipe", {}).get("lora")
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: cannot read the run's recipe.lora settings ({e})") from None
        if block is None:
            raise CheckpointError(f"{path}: the checkpoint holds LoRA tensors but its recipe has no lora block")
        try:
            return LoraConfig.from_dict(block, f"{path}: recipe.lora")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None

    def iter_merged(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Like iterating, with a LoRA run's adapters merged in: every adapted weight as ``W + (B @ A) * alpha / r``
        computed in fp32 (callers cast it); a checkpoint without adapters gives its tensors as stored. What export
        (``--merge-lora``) and inference read, so a LoRA checkpoint never passes for its base."""
        if not self.lora_refs:
            yield from self
            return
        cfg, tensors = self.lora_config(), self.lora_tensors()
        modules = sorted({lora_module_of(k)[0] for k in tensors})
        incomplete = [m for m in modules if m + ".lora_A.weight" not in tensors or m + ".lora_B.weight" not in tensors]
        orphans = [m for m in modules if m + ".weight" not in self.refs]
        if incomplete or orphans:
            raise CheckpointError(f"{self.tag_dir}: LoRA tensors without their pair {incomplete[:3]} or without a base "
                                  f"weight {orphans[:3]}")
        for name, t in self:
            module = name[:-len(".weight")] if name.endswith(".weight") else None
            if module is not None and module + ".lora_A.weight" in tensors:
                yield name, merged_weight(t, tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"],
                                          cfg.scale)
            else:
                yield name, t

    def lora_tensors(self) -> dict:
        """Every LoRA tensor of the checkpoint by HF-style name (``<module>.lora_A.weight``), copied into memory
        (rank x (in + out) values per module: small next to the base)."""
        out, path, state = {}, None, None
        for name, ref in sorted(self.lora_refs.items(), key=lambda kv: kv[1].path):
            if ref.path != path:  # one file mapped at a time, each once
                path, state = ref.path, self._load(ref.path)
            out[name] = (state if ref.is_expert else state["module"])[ref.key].clone()
        return out

    def _load(self, path: str):
        """A checkpoint file, its sha256 checked against the completion record the first time it is read."""
        rec = None
        if self.record is not None and path not in self._verified:
            rec = self.record["files"].get(os.path.relpath(path, self.tag_dir))
            if rec is None:
                raise CheckpointError(f"{path}: not listed in the checkpoint's completion record")
        state = load_torch(path, mmap=True, expected_size=rec["size"] if rec else None,
                           expected_sha256=rec["sha256"] if rec else None, stub_unknown=True)  # tensors only
        self._verified.add(path)
        return state

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Layer by layer. One stage file and one expert file are mapped at a time (a MoE layer alternates between
        its stage file and its expert files); tensors may be copy-on-write views of the files."""
        open_files = {False: (None, None), True: (None, None)}  # is_expert -> (path, state)
        for name in self.order:
            ref = self.refs[name]
            path, state = open_files[ref.is_expert]
            if path != ref.path:
                state = self._load(ref.path)
                state = state if ref.is_expert else state["module"]
                open_files[ref.is_expert] = (ref.path, state)
            t = state[ref.key]
            if tuple(t.shape) != ref.shape or t.dtype != ref.dtype:
                raise CheckpointError(f"{ref.path}: tensor {ref.key!r} changed while reading")
            yield name, t


def read_training_checkpoint(ckpt_dir: str, tag: Optional[str] = None, config=None) -> TrainingCheckpoint:
    """A DeepSpeed pipeline + MoE training checkpoint as an iterable of (FULL HF name, tensor), layer by layer.

    Args:
        ckpt_dir: the ``save_checkpoint`` directory (holding ``latest`` and the tag directories), or a tag
            directory itself.
        tag: the tag to read; None reads the one ``latest`` names.
        config: config.json path or directory, or a :class:`VL2Config`; None looks in the tag directory, then in
            ``ckpt_dir``.

    Any PP split and EP size: the stage files are self-describing (keys carry the global layer index, expert
    files the global expert id). Every file is indexed and checked against config.json (missing, extra, duplicate
    keys, shapes) before this returns, so errors surface before any output is written.
    """
    return TrainingCheckpoint(ckpt_dir, tag, config)
