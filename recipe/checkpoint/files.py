"""File primitives every checkpoint form shares.

- :func:`resolve_inside`: the one resolver for names read from checkpoints or settings (``latest``, ``--resume``,
  manifest entries): a name stays inside its root or is refused.
- :func:`load_torch`: the one ``torch.load`` of the project. ``weights_only=True`` always: tensors, containers and
  plain values load; the few data-holder classes a caller names (DeepSpeed's) are allowed; anything else (a pickled
  callable, an unknown class) is refused with a message naming the file. Nothing from a checkpoint is executed.
- :class:`HashingWriter` / :func:`file_sha256`: sha256 computed while a file is written (no second pass) and a
  streaming check when it is read back.
- :func:`atomic_write_text` and :func:`atomic_output_dir`: a file or a directory appears complete or not at all.
- :func:`check_output_dir`, :func:`byte_progress`: what every converter does before and while writing.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import logging
import os
import shutil
from typing import Optional, Sequence

import torch

from recipe.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

_HASH_CHUNK = 16 << 20


def resolve_inside(root: str, name: str, what: str = "name") -> str:
    """``root/name`` as an absolute path, refusing names that leave ``root``.

    Refused: empty names, absolute paths, ``..`` components, NUL bytes, and names whose real path (symlinks
    followed) lies outside the real ``root``. ``what`` says where the name came from, for the message.
    """
    if not isinstance(name, str) or not name.strip():
        raise CheckpointError(f"{what}: empty or non-string name {name!r}")
    if "\x00" in name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise CheckpointError(f"{what}: {name!r} is not a plain name inside {root} (absolute paths and '..' are "
                              f"refused)")
    root_real = os.path.realpath(root)
    path = os.path.join(os.path.abspath(root), name)
    real = os.path.realpath(path)
    if real != root_real and not real.startswith(root_real + os.sep):
        raise CheckpointError(f"{what}: {name!r} resolves to {real}, outside {root_real}")
    return path


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through it: ``torch.save(obj, HashingWriter(path))`` writes the
    file once and knows its sha256 and size at the end. ``close`` flushes and fsyncs."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self._f = open(path, "wb")
        self._h = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = self._f.write(b)
        self._h.update(memoryview(b)[:n])
        self.size += n
        return n

    def flush(self) -> None:
        if not self._f.closed:
            self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        super().close()

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename: readers see the old or the new."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False):
    """Yield a temporary sibling directory that becomes ``out_dir`` only when the block finishes.

    A run killed or failing inside the block leaves ``<out_dir>.tmp-<pid>`` (removed on a clean failure), never a
    directory at ``out_dir`` that looks complete. An existing ``out_dir`` is an error unless ``overwrite``.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def check_output_dir(src_dir: str, out_dir: str, overwrite: bool) -> tuple[str, str]:
    src_dir, out_dir = os.path.abspath(src_dir), os.path.abspath(out_dir)
    if out_dir == src_dir or src_dir.startswith(out_dir + os.sep) or out_dir.startswith(src_dir + os.sep):
        raise ValueError(f"output directory {out_dir} overlaps the input directory {src_dir}; choose another")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite (overwrite=True) to replace it")
    stale = sorted(glob.glob(glob.escape(out_dir) + ".tmp-*"))
    if stale:
        logger.warning("found %s: left by an interrupted run (never a finished output); safe to delete",
                       ", ".join(stale))
    return src_dir, out_dir


def byte_progress(total_bytes: int, total_tensors: int, desc: str, enabled: bool):
    """A tqdm bar over bytes (scaled units) with a tensor count in the postfix; a no-op bar when disabled."""
    from tqdm.auto import tqdm
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled,
               dynamic_ncols=True, smoothing=0.1)
    bar.set_postfix_str(f"0/{total_tensors} tensors", refresh=False)
    return bar


# --- the one torch.load ------------------------------------------------------------------------------------------

class _Inert:
    """Stand-in for a pickled object of an unknown class: swallows constructor arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def load_torch(path: str, *, mmap: bool = False, expected_sha256: Optional[str] = None,
               expected_size: Optional[int] = None, safe_globals: Sequence = (), stub_unknown: bool = False,
               map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Args:
        mmap: map the file instead of reading it (tensors become copy-on-write views).
        expected_sha256 / expected_size: checked before the file is unpickled (a streaming hash pass); a mismatch
            is a :class:`CheckpointError` naming the file.
        safe_globals: classes the caller knows to be plain data holders, allowed besides tensors and containers
            (DeepSpeed's loss scalers and the like: :mod:`recipe.parallel.checkpointing`).
        stub_unknown: for readers that need only the tensors (export): objects of other classes are rebuilt as
            inert stand-ins (constructor and state swallowed, nothing run) instead of refusing the file.
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing") from None
    if expected_size is not None and size != expected_size:
        raise CheckpointError(f"{path}: {size} bytes, the checkpoint's record says {expected_size} (truncated or "
                              f"replaced)")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise CheckpointError(f"{path}: sha256 differs from the checkpoint's record (the file was modified or "
                              f"corrupted after it was written)")
    allowed = list(safe_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001
        if not stub_unknown:
            _raise_load_error(path, e)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - not a zip checkpoint, truncated, ...
        _raise_load_error(path, e)
    logger.warning("%s: stubbing non-tensor objects %s (their contents are not needed and are not executed)",
                   path, ", ".join(unsafe))
    stubs = [(type(q.rsplit(".", 1)[-1], (_Inert,), {}), q) for q in unsafe]
    try:
        with torch.serialization.safe_globals(allowed + stubs):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001
        _raise_load_error(path, e)


def _raise_load_error(path: str, e: Exception):
    """Re-raise a ``torch.load`` failure as a :class:`CheckpointError` that names the file and the likely cause."""
    if isinstance(e, FileNotFoundError):
        raise CheckpointError(f"{path}: file missing") from None
    # UnpicklingError, RuntimeError (bad zip), EOFError, ...
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "weights_only" in str(e) or "Unsupported global" in str(e):
        raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain data "
                              f"({detail[:300]}); checkpoints are never unpickled with code execution") from None
    raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {detail[:300]}); the file is truncated or "
                          f"corrupt") from None
