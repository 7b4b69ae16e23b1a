"""The DeepSpeed side of the training-checkpoint protocol (:mod:`recipe.checkpoint.commit`): a checkpoint engine
that hashes what it writes and verifies what it reads, the collective save, and the resume.

DeepSpeed 0.19 reads and writes every file of a pipeline + MoE checkpoint through ``engine.checkpoint_engine``
(model states, expert files, optimizer shards); its stock engine unpickles with ``weights_only=False``. Ours keeps
the engine's interface and serialization setting and changes only ``save`` and ``load``.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from recipe.checkpoint import CheckpointError
from recipe.checkpoint.commit import COMPLETE_NAME, failpoint, load_extra, resolve_tag, verify_complete, write_record
from recipe.checkpoint.files import HashingWriter, atomic_write_text, file_sha256, load_torch, resolve_inside

logger = logging.getLogger(__name__)


def deepspeed_safe_globals() -> list:
    """Non-tensor types DeepSpeed 0.19 writes into checkpoints of this recipe's runs (bf16 / ZeRO-1 optimizer
    states, the pipeline's model states). They are data holders, not callables of the file's choosing."""
    found = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        found += [LossScaler, DynamicLossScaler]
    except ImportError:  # a DeepSpeed without them writes none of them
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        found.append(fragment_address)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        found.append(ZeroStageEnum)
    except ImportError:
        pass
    return found


class VerifiedCheckpointEngine(TorchCheckpointEngine):
    """Saves record (size, sha256) per file, computed while writing; loads check the file against the armed
    completion record (size, then sha256) before unpickling it with ``weights_only=True``."""

    def __init__(self, rank: int, zipfile_serialization: bool = True):
        super().__init__(None)
        self.zipfile_serialization = zipfile_serialization
        self.rank = rank
        self.written: dict[str, dict] = {}   # absolute path -> {"size", "sha256"}, since the last take_written()
        self.expected: Optional[dict] = None  # absolute path -> record entry, once armed for a resume

    def save(self, state_dict, path: str):
        writer = HashingWriter(path)
        try:
            torch.save(state_dict, writer, _use_new_zipfile_serialization=self.zipfile_serialization)
        finally:
            writer.close()
        self.written[os.path.abspath(path)] = {"size": writer.size, "sha256": writer.sha256}
        failpoint("after_first_file", self.rank, os.path.basename(os.path.dirname(path)))

    def load(self, path: str, map_location=None):
        size = sha = None
        if self.expected is not None:
            entry = self.expected.get(os.path.normpath(os.path.abspath(path)))
            if entry is None:
                raise CheckpointError(f"{path}: DeepSpeed asked for a file that the checkpoint's {COMPLETE_NAME} does "
                                      f"not list (was it saved with another pipeline or data-parallel layout?)")
            size, sha = entry["size"], entry["sha256"]
        return load_torch(path, map_location=map_location or "cpu", expected_size=size, expected_sha256=sha,
                          safe_globals=deepspeed_safe_globals())

    def take_written(self) -> dict:
        out, self.written = self.written, {}
        return out

    def arm(self, tag_dir: str, record: dict) -> None:
        """Check every later load against ``record`` (the completion record of ``tag_dir``)."""
        tag_dir = os.path.abspath(tag_dir)
        self.expected = {os.path.normpath(os.path.join(tag_dir, name)): rec for name, rec in record["files"].items()}


def install_engine(engine, rank: int) -> VerifiedCheckpointEngine:
    """Swap a :class:`VerifiedCheckpointEngine` in for the one ``deepspeed.initialize`` created."""
    old = getattr(engine, "checkpoint_engine", None)
    ours = VerifiedCheckpointEngine(rank, zipfile_serialization=getattr(old, "zipfile_serialization", True))
    engine.checkpoint_engine = ours
    return ours


def save(engine, save_dir: str, tag: str, client_state: dict, rank_files: dict,
         rank0_texts: Optional[dict] = None) -> str:
    """Save under ``save_dir/tag`` with the commit protocol; collective over the world. Returns the tag directory.

    Args:
        rank_files: name -> object this rank torch-saves into the tag directory (its RNG state, ...).
        rank0_texts: name -> text rank 0 writes into the tag directory (the run config).
    """
    ours = engine.checkpoint_engine
    if not isinstance(ours, VerifiedCheckpointEngine):
        raise TypeError("call install_engine(engine, rank) after deepspeed.initialize")
    rank = dist.get_rank()
    tag_dir = resolve_inside(save_dir, tag, "checkpoint tag")
    if rank == 0:
        os.makedirs(tag_dir, exist_ok=True)
        stale = os.path.join(tag_dir, COMPLETE_NAME)
        if os.path.exists(stale):  # re-saving a tag: incomplete until this save commits
            os.remove(stale)
    dist.barrier()
    ours.take_written()
    for name, obj in rank_files.items():
        ours.save(obj, os.path.join(tag_dir, name))
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    written = {os.path.relpath(path, tag_dir): rec for path, rec in ours.take_written().items()}
    if rank == 0:
        for name, text in (rank0_texts or {}).items():
            path = os.path.join(tag_dir, name)
            atomic_write_text(path, text)
            written[name] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    failpoint("after_rank_files", rank, tag)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, written)
    if rank == 0:
        write_record(save_dir, tag, per_rank)
    dist.barrier()
    return tag_dir


def resume(engine, save_dir: str, mode: Optional[str], rank_file: Optional[str] = None):
    """Resolve and verify the tag ``mode`` names (see :func:`recipe.checkpoint.commit.resolve_tag`), load it into
    ``engine`` with every file checked, and return ``(tag, client_state, this rank's extra file or None)``;
    ``(None, None, None)`` for a fresh start. Every rank runs the same checks before DeepSpeed's first collective,
    so a damaged checkpoint stops every rank with the same message."""
    tag = resolve_tag(save_dir, mode)
    if tag is None:
        return None, None, None
    record = verify_complete(save_dir, tag)
    ours = engine.checkpoint_engine
    ours.arm(os.path.join(save_dir, tag), record)
    try:
        path, client = engine.load_checkpoint(save_dir, tag=tag)
    finally:
        ours.expected = None
    if path is None:
        raise CheckpointError(f"{os.path.join(save_dir, tag)}: DeepSpeed found no model states to load")
    extra = load_extra(save_dir, tag, record, rank_file) if rank_file else None
    return tag, client, extra
