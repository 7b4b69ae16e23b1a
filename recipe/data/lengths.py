"""The length index: what every record of a prepared jsonl occupies in a training row (tokens, image tiles), computed
once per data file without decoding pixels, so the packer can plan rows before any sample is loaded.

Per record it runs the processor's own :meth:`~recipe.data.processor.DeepseekVLV2Processor.measure`, which shares
the tokenisation, the tiling grid (best of the candidate resolutions from the image size) and the truncation code
with :meth:`~recipe.data.processor.DeepseekVLV2Processor.process_one`: the lengths equal what the dataset produces
by construction (``tests/test_data_packing.py`` checks every record of the synthetic set). Image sizes come from
the record's ``image_sizes`` (``prepare_ai2d.py`` writes them); a record without them has its image headers read
(Pillow's ``open``, no pixel data).

A record the dataset would not use (malformed, an image path outside the root, an unreadable header, a first
exchange longer than ``max_seq_len``) gets a status; :meth:`LengthIndex.resolved` maps every record to the one
:class:`~recipe.data.dataset.ConversationDataset` loads in its place (the next usable one), with the same rule.

Built with Hugging Face ``datasets``: ``Dataset.map(num_proc=...)`` over the records' byte offsets, saved as an
Arrow table and memory-mapped when read. Cached beside the data (``<data>.lengths/lengths-<key>/``, or under
``~/.cache/dsvl2-recipe`` when that directory is not writable); the key digests the data file's bytes, the image
root, the processor settings (:meth:`DeepseekVLV2Processor.fingerprint`: config, tokenizer, ``max_seq_len``) and the
pixel limit, so a changed data file or processor gets a new index. Built into a temporary directory and renamed:
concurrent builders (one per host) never see a partial index.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

from recipe.data.conversation import ConversationError
from recipe.data.dataset import RecordError, index_jsonl, parse_record, record_messages
from recipe.data.image_io import DEFAULT_MAX_PIXELS, ImageLoadError, image_size, resolve_under_root
from recipe.data.processor import DeepseekVLV2Processor, SampleTooLongError

logger = logging.getLogger(__name__)

INDEX_VERSION = 1  # bump when what the index stores or how it measures changes
OK, TOO_LONG, BAD_RECORD, BAD_IMAGE = 0, 1, 2, 3
STATUS_NAMES = {OK: "ok", TOO_LONG: "too_long", BAD_RECORD: "bad_record", BAD_IMAGE: "bad_image"}
COLUMNS = ("num_tokens", "num_tiles", "num_images", "status", "sizes_from_header")


@dataclass
class LengthIndex:
    """Per record of the data file ([n] arrays): ``num_tokens`` (after truncation at a turn boundary),
    ``num_tiles`` (real ViT tiles: 1 + w*h per kept image; 0 for text-only), ``num_images``, ``status``
    (:data:`OK`, :data:`TOO_LONG`, :data:`BAD_RECORD`, :data:`BAD_IMAGE`) and ``sizes_from_header`` (the record
    had no usable ``image_sizes``). ``path``: the cache directory it was read from."""

    num_tokens: np.ndarray
    num_tiles: np.ndarray
    num_images: np.ndarray
    status: np.ndarray
    sizes_from_header: np.ndarray
    path: str = ""

    def __len__(self) -> int:
        return len(self.num_tokens)

    def resolved(self, max_substitutions: int) -> np.ndarray:
        """[n] int64: the record :class:`ConversationDataset` actually loads for index i, i.e. the first j of i,
        i+1, ..., i+max_substitutions (wrapping around) whose status is OK; -1 where there is none (the dataset
        then raises)."""
        n = len(self)
        ok = np.flatnonzero(np.concatenate([self.status == OK, self.status == OK]))
        i = np.arange(n)
        k = np.searchsorted(ok, i)
        j = np.where(k < len(ok), ok[np.minimum(k, len(ok) - 1)], -1) if len(ok) else np.full(n, -1)
        found = (j >= 0) & (j - i <= max_substitutions)
        return np.where(found, j % n, -1).astype(np.int64)

    def summary(self) -> dict:
        counts = {STATUS_NAMES[s]: int((self.status == s).sum()) for s in STATUS_NAMES}
        ok = self.status == OK
        return {"records": len(self), **counts, "sizes_from_header": int(self.sizes_from_header.sum()),
                "mean_tokens": float(self.num_tokens[ok].mean()) if ok.any() else 0.0,
                "mean_tiles": float(self.num_tiles[ok].mean()) if ok.any() else 0.0}

    @classmethod
    def load(cls, path: str) -> "LengthIndex":
        """Memory-map a saved index (``datasets.load_from_disk``) and take its columns as numpy arrays."""
        import datasets

        table = datasets.load_from_disk(path).data
        cols = {c: table.column(c).to_numpy() for c in COLUMNS}
        return cls(**cols, path=path)


def recorded_sizes(record: dict, n_images: int) -> Optional[list]:
    """The record's ``image_sizes`` when it is a list of ``n_images`` [width, height] pairs of positive
    integers, else None (the headers are read instead)."""
    sizes = record.get("image_sizes")
    if not isinstance(sizes, list) or len(sizes) != n_images:
        return None
    for s in sizes:
        if (not isinstance(s, list) or len(s) != 2 or any(type(v) is not int or v <= 0 for v in s)):
            return None
    return [tuple(s) for s in sizes]


def measure_record(line: bytes, where: str, processor: DeepseekVLV2Processor, image_root: str,
                   real_root: Optional[str] = None, max_image_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> tuple:
    """(num_tokens, num_tiles, num_images, status, sizes_from_header) of one jsonl line, as the dataset will
    process it (training: ``inference_mode=False``)."""
    from_header = False
    try:
        record = parse_record(line, where)
        messages, paths = record_messages(record, where)
        files = [resolve_under_root(image_root, p, real_root) for p in paths]
        sizes = recorded_sizes(record, len(paths))
        if sizes is None:
            from_header = bool(paths)
            sizes = [image_size(f, max_image_pixels) for f in files]
        elif max_image_pixels is not None and any(w * h > max_image_pixels for w, h in sizes):
            return 0, 0, 0, BAD_IMAGE, from_header
        m = processor.measure(messages, sizes)
    except SampleTooLongError:
        return 0, 0, 0, TOO_LONG, from_header
    except ImageLoadError as e:
        return 0, 0, 0, BAD_RECORD if e.reason in ("path_escape", "bad_path") else BAD_IMAGE, from_header
    except (RecordError, ConversationError, ValueError, TypeError):
        return 0, 0, 0, BAD_RECORD, from_header
    return m.num_tokens, m.num_tiles, m.num_images, OK, from_header


class _Measure:
    """The ``datasets.map`` function: a batch of byte offsets -> the index columns (each worker process opens
    the data file once)."""

    def __init__(self, path: str, image_root: str, processor: DeepseekVLV2Processor, max_image_pixels):
        self.path, self.image_root, self.processor = path, image_root, processor
        self.real_root = os.path.realpath(image_root)
        self.max_image_pixels = max_image_pixels
        self._fh, self._pid = None, None

    def __getstate__(self):
        return {**self.__dict__, "_fh": None, "_pid": None}

    def __call__(self, batch: dict) -> dict:
        if self._fh is None or self._pid != os.getpid():
            self._fh, self._pid = open(self.path, "rb"), os.getpid()
        out = {c: [] for c in COLUMNS}
        for offset, line_no in zip(batch["offset"], batch["line"]):
            self._fh.seek(int(offset))
            values = measure_record(self._fh.readline(), f"{self.path}:{int(line_no)}", self.processor,
                                    self.image_root, self.real_root, self.max_image_pixels)
            for c, v in zip(COLUMNS, values):
                out[c].append(v)
        return out


def _file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def index_key(data_path: str, image_root: str, processor: DeepseekVLV2Processor,
              max_image_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> str:
    """The cache key: digests of the data file's bytes, the image root, the processor settings and the pixel
    limit (and :data:`INDEX_VERSION`)."""
    h = hashlib.blake2b(digest_size=12)
    for part in (str(INDEX_VERSION), _file_digest(data_path), os.path.realpath(image_root), processor.fingerprint(),
                 str(max_image_pixels)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def cache_root(data_path: str) -> str:
    """``<data>.lengths`` beside the data file, or ``~/.cache/dsvl2-recipe/lengths/<digest of its path>`` when that
    is not writable."""
    beside = os.path.abspath(data_path) + ".lengths"
    if _writable_dir(beside):
        return beside
    digest = hashlib.blake2b(os.path.abspath(data_path).encode(), digest_size=8).hexdigest()
    return os.path.join(os.path.expanduser("~"), ".cache", "dsvl2-recipe", "lengths", digest)


def build_length_index(data_path: str, image_root: str, processor: DeepseekVLV2Processor, *,
                       num_proc: Optional[int] = None, cache_dir: Optional[str] = None,
                       max_image_pixels: Optional[int] = DEFAULT_MAX_PIXELS, progress: bool = False) -> LengthIndex:
    """The length index of ``data_path``: read from the cache when its key matches, else built and cached.

    Args:
        num_proc: processes for ``datasets.map`` (default: 1 below 2,000 records, else up to 8).
        cache_dir: where the index lives (default :func:`cache_root`).
        progress: show ``datasets``' progress bar while building.
    """
    root = cache_dir or cache_root(data_path)
    key = index_key(data_path, image_root, processor, max_image_pixels)
    final = os.path.join(root, f"lengths-{key}")
    if os.path.isdir(final):
        try:
            return LengthIndex.load(final)
        except Exception as e:  # a damaged cache is rebuilt, not trusted
            logger.warning("length index %s is unreadable (%s); rebuilding it", final, e)
            shutil.rmtree(final, ignore_errors=True)
    import datasets

    offsets, line_nos = index_jsonl(data_path)
    if len(offsets) == 0:
        raise ValueError(f"{data_path}: no records")
    if num_proc is None:
        num_proc = 1 if len(offsets) < 2000 else max(1, min(8, os.cpu_count() or 1))
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=root)
    bars = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        features = datasets.Features({"num_tokens": datasets.Value("int32"), "num_tiles": datasets.Value("int32"),
                                      "num_images": datasets.Value("int32"), "status": datasets.Value("int8"),
                                      "sizes_from_header": datasets.Value("bool")})
        src = datasets.Dataset.from_dict({"offset": offsets, "line": line_nos})
        built = src.map(_Measure(data_path, image_root, processor, max_image_pixels), batched=True, batch_size=256,
                        num_proc=num_proc if num_proc > 1 else None, remove_columns=["offset", "line"],
                        features=features, cache_file_name=os.path.join(tmp, "map.arrow"), new_fingerprint=key,
                        desc="length index")
        built.save_to_disk(os.path.join(tmp, "index"))
        try:
            os.rename(os.path.join(tmp, "index"), final)
        except OSError:
            if not os.path.isdir(final):  # not "another process renamed its copy first"
                raise
    finally:
        if bars and not progress:
            datasets.enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)
    index = LengthIndex.load(final)
    logger.info("length index of %s: %s (cached in %s)", data_path, index.summary(), final)
    return index
