"""Training checkpoints' commit protocol inside ``save_dir``: completion records, tag resolution, verification,
the failpoints the failure tests kill at, and trimming ``train_log.jsonl`` back to a resumed step.

The commit protocol (the DeepSpeed side is :mod:`recipe.parallel.checkpointing`):
  1. every rank writes its files through a hashing writer, so each file's size and sha256 are known without
     reading it again, and each file is fsync'd;
  2. DeepSpeed's ``save_checkpoint(save_latest=False)`` returns on every rank;
  3. the per-rank file lists are gathered to rank 0, which writes ``<tag>/checkpoint_complete.json`` (every file
     with its size and sha256, :func:`write_record`) and only then ``latest``, both atomically.
A tag without ``checkpoint_complete.json`` is incomplete, and ``latest`` never names one.

On resume :func:`resolve_tag` keeps the tag inside ``save_dir``, :func:`verify_complete` refuses an incomplete tag
and missing or resized files (cheap, on every rank before any collective), and each file is checked against its
sha256 when it is read. Errors name the file and offer the newest complete tag.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from typing import Optional

from recipe.checkpoint import CheckpointError
from recipe.checkpoint.files import atomic_write_text, load_torch, resolve_inside

logger = logging.getLogger(__name__)

COMPLETE_NAME = "checkpoint_complete.json"
COMPLETE_FORMAT = "dsvl2-training-checkpoint"
COMPLETE_VERSION = 1
LATEST_NAME = "latest"
FAILPOINT_ENV = "DSVL2_FAILPOINT"
_STEP_TAG_RE = re.compile(r"^global_step(\d+)$")


def failpoint(name: str, rank: int, tag: str = "") -> None:
    """Die here, as ``kill -9`` would, when ``$DSVL2_FAILPOINT`` is ``name@rank`` or ``name@rank@tag``: lets the
    failure tests stop a rank at an exact point of the save protocol. A no-op otherwise."""
    want = os.environ.get(FAILPOINT_ENV)
    if want and want in (f"{name}@{rank}", f"{name}@{rank}@{tag}"):
        logger.warning("failpoint %s reached on rank %d: exiting", want, rank)
        logging.shutdown()
        os._exit(86)


def write_record(save_dir: str, tag: str, per_rank: list) -> dict:
    """Merge the per-rank file lists (``[{name relative to the tag dir: {"size", "sha256"}}]``, one per rank) into
    ``<tag>/checkpoint_complete.json``, then point ``latest`` at ``tag``. Rank 0 only, after every rank saved."""
    tag_dir = resolve_inside(save_dir, tag, "checkpoint tag")
    files: dict[str, dict] = {}
    for r, part in enumerate(per_rank):
        for name, rec in part.items():
            resolve_inside(tag_dir, name, f"file written by rank {r}")
            if name in files and files[name]["sha256"] != rec["sha256"]:
                raise CheckpointError(f"{os.path.join(tag_dir, name)}: written by ranks {files[name]['rank']} and "
                                      f"{r} with different contents")
            files.setdefault(name, {**rec, "rank": r})
    record = {"format": COMPLETE_FORMAT, "version": COMPLETE_VERSION, "tag": tag, "world_size": len(per_rank),
              "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "files": dict(sorted(files.items()))}
    atomic_write_text(os.path.join(tag_dir, COMPLETE_NAME), json.dumps(record, indent=1) + "\n")
    failpoint("before_latest", 0, tag)
    atomic_write_text(os.path.join(save_dir, LATEST_NAME), tag)
    return record


# --- resolving and verifying -------------------------------------------------------------------------------------

def read_record(save_dir: str, tag: str) -> Optional[dict]:
    """The completion record of ``tag``, or None when the tag is incomplete (no record, or an unreadable one)."""
    path = os.path.join(resolve_inside(save_dir, tag, "checkpoint tag"), COMPLETE_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("format") != COMPLETE_FORMAT or \
            not isinstance(record.get("files"), dict):
        return None
    return record


def complete_tags(save_dir: str) -> list[str]:
    """Tags under ``save_dir`` with a completion record, oldest first (by step for ``global_stepN`` tags)."""
    if not os.path.isdir(save_dir):
        return []
    tags = [d for d in os.listdir(save_dir)
            if os.path.isfile(os.path.join(save_dir, d, COMPLETE_NAME)) and read_record(save_dir, d) is not None]

    def order(t):
        m = _STEP_TAG_RE.match(t)
        return (0, int(m.group(1)), t) if m else (1, 0, t)
    return sorted(tags, key=order)


def _offer(save_dir: str, exclude: Optional[str] = None) -> str:
    tags = [t for t in complete_tags(save_dir) if t != exclude]
    if not tags:
        return "no complete checkpoint exists there; start fresh with --resume none"
    return f"the newest complete checkpoint is {tags[-1]!r}: resume from it with --resume {tags[-1]}"


def read_latest(save_dir: str) -> Optional[str]:
    """The tag ``save_dir/latest`` names (None when there is no ``latest``); refuses an empty file."""
    path = os.path.join(save_dir, LATEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            tag = f.read().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); {_offer(save_dir)}") from None
    if not tag:
        raise CheckpointError(f"{path}: empty; {_offer(save_dir)}")
    return tag


def resolve_tag(save_dir: str, mode: Optional[str]) -> Optional[str]:
    """The tag to resume from: ``mode`` is "auto" (``latest`` when present, else a fresh start: None), "latest"
    (must exist), a tag name, or None/"none" (fresh start). The tag is resolved inside ``save_dir``."""
    if mode in (None, "", "none", "null"):
        return None
    if mode in ("auto", "latest"):
        tag = read_latest(save_dir)
        if tag is None:
            if mode == "latest":
                raise CheckpointError(f"resume=latest but {os.path.join(save_dir, LATEST_NAME)} does not exist; "
                                      f"{_offer(save_dir)}")
            return None
        where = f"{os.path.join(save_dir, LATEST_NAME)} names {tag!r}"
    else:
        tag, where = mode, f"resume tag {mode!r}"
    tag_dir = resolve_inside(save_dir, tag, where)
    if not os.path.isdir(tag_dir):
        raise CheckpointError(f"{where}: no checkpoint directory {tag_dir}; {_offer(save_dir)}")
    return tag


def verify_complete(save_dir: str, tag: str) -> dict:
    """The completion record of ``tag`` after checking that every file it lists exists with its recorded size
    (cheap: no file is read). Raises :class:`CheckpointError` naming the first bad files and offering the newest
    complete tag."""
    tag_dir = resolve_inside(save_dir, tag, "checkpoint tag")
    record = read_record(save_dir, tag)
    if record is None:
        raise CheckpointError(f"{tag_dir}: incomplete checkpoint (no valid {COMPLETE_NAME}: the save was interrupted, "
                              f"or it was not written by recipe/train.py); {_offer(save_dir, tag)}")
    problems = []
    for name, rec in record["files"].items():
        try:
            path = resolve_inside(tag_dir, name, f"{COMPLETE_NAME} entry")
        except CheckpointError as e:
            problems.append(str(e))
            continue
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if size != rec.get("size"):
            problems.append(f"{path}: {size} bytes, recorded {rec.get('size')} (truncated or replaced)")
    if problems:
        shown = "\n  ".join(problems[:8])
        more = f"\n  (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CheckpointError(f"{tag_dir}: damaged checkpoint:\n  {shown}{more}\n{_offer(save_dir, tag)}")
    return record


def load_extra(save_dir: str, tag: str, record: dict, name: str):
    """A file this run saved beside DeepSpeed's (its RNG state), checked against the record; None if not there."""
    rec = record["files"].get(name)
    if rec is None:
        return None
    path = resolve_inside(os.path.join(save_dir, tag), name, f"{COMPLETE_NAME} entry")
    return load_torch(path, expected_size=rec["size"], expected_sha256=rec["sha256"])


def trim_log(path: str, last_step: int) -> int:
    """Drop the records of steps after ``last_step`` from a ``train_log.jsonl`` (a killed run's steps that the
    resumed run repeats); returns how many were dropped. Rewritten atomically; unparsable lines are kept."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                step = None
            if isinstance(step, int) and step > last_step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped
