"""Convert InternVL SFT jsonl (e.g. ai2d_train_12k.jsonl) into DeepSeek-VL2 conversations, validating every record.

    python recipe/prepare_ai2d.py --input ai2d_train_12k.jsonl --image-root playground/data/ai2d \\
        --output ai2d_dsvl.jsonl [--num-workers 4] [--max-invalid-fraction 0.01] [--no-decode-check] \\
        [--val-fraction 0.02 --val-output ai2d_val.jsonl]

Input, one JSON object per line (InternVL-Chat-V1-2-SFT-Data):
    {"id": ..., "image": "rel/path.png" | "images": [...] (or neither: text-only),
     "conversations": [{"from": "system"|"human"|"gpt", "value": "<image>\\nQuestion ..."}, ...]}
Output, one per line, in input order:
    {"id": ..., "conversations": [{"role": "<|User|>", "content": "<image>\\nQuestion ...", "images": [...]},
                                  {"role": "<|Assistant|>", "content": "B"}], "image_sizes": [[w, h], ...]}
Each image is listed once, on the user turn that holds its <image> placeholder; a system turn stays "system".
"image_sizes" is written when images were decoded (the default).

Validation (reason codes in the report): invalid_json, not_an_object, missing_key, bad_type (a field of the wrong
JSON type: an 'id' that is not a string or an integer, a 'from' or 'value' that is not a string, ...), unknown_role,
bad_turn_order (optional system first, then human/gpt alternating, starting with human, ending with gpt),
empty_turn, placeholder_in_answer (<image> outside user turns), placeholder_mismatch (<image> count != images),
bad_path / path_escape (absolute, '..', or resolving outside the image root), missing_file, undecodable_image
(truncated, zero-byte, not an image), image_too_large (over --max-image-pixels: decompression-bomb guard),
empty_image, too_deep (JSON nested more than 64 levels, MAX_JSON_DEPTH, anywhere in the line), bad_text (the line is
not valid UTF-8, or a string that would be written holds a lone surrogate such as \\ud800, which UTF-8 cannot
encode), line_too_long (over --max-line-bytes; the line is skipped without being held in memory),
conversion_error (any other failure while converting the record: it is reported, the run goes on). Skipped
records are counted by reason and listed (line number, id, message) in the report (default:
OUTPUT.report.json). The run fails (exit code 1, no output written) when more than --max-invalid-fraction of
the records are invalid. Blank lines are counted apart; a UTF-8 byte-order mark and CRLF line ends are accepted.
An output or report path that cannot be written (e.g. under a regular file) is an error (exit code 2) before any
work is done.

Validation split (--val-fraction F --val-output PATH): a valid record goes to the validation file instead of the
output when a hash of its id (sha256 of the id as JSON, so "7" and 7 differ) falls below F, so the split depends only
on the ids: the same records are held out however the input is ordered or chunked, and records sharing an id land
on the same side. The report counts both sides.

The input is streamed in chunks (memory does not grow with its size) through --num-workers processes; the output
and the report are written to temporary files and renamed into place, so an interrupted run leaves no partial
output, and re-running gives byte-identical files. This module is the command line and the streaming pipeline; the
checks and the conversion of one record are ``recipe/data/internvl.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as `python recipe/prepare_ai2d.py`: Python put recipe/ first on sys.path, where its sub-packages
    # (data, model, ...) could shadow top-level modules. Use the package from the repository (or the
    # installed one) instead.
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _here:
        sys.path[0] = os.path.dirname(_here)

from tqdm import tqdm  # noqa: E402

from recipe.data.image_io import DEFAULT_MAX_PIXELS  # noqa: E402
from recipe.data.internvl import MAX_LINE_BYTES, Options, process_chunk, safe_text  # noqa: E402

logger = logging.getLogger("prepare_ai2d")


# --- streaming ----------------------------------------------------------------------------------------------
def read_chunks(path: str, chunk_lines: int, max_line_bytes: int = MAX_LINE_BYTES
                ) -> Iterator[tuple[int, list, int]]:
    """(first line number (1-based), raw lines, bytes) per chunk; never holds more than one chunk. A line longer
    than ``max_line_bytes`` (its newline not counted) is not held in memory: its length in bytes (an int) stands
    in for it."""
    with open(path, "rb") as f:
        lines, nbytes, first, line_no = [], 0, 1, 0
        while True:
            line = f.readline(max_line_bytes + 1)
            if not line:
                break
            line_no += 1
            n = len(line)
            if n > max_line_bytes and not line.endswith(b"\n"):
                rest = b""
                while True:  # skip the rest of the line in bounded pieces
                    rest = f.readline(1 << 20)
                    n += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
                line = n - rest.endswith(b"\n")  # its length without the newline stands in for it
            lines.append(line)
            nbytes += n
            if len(lines) == chunk_lines:
                yield first, lines, nbytes
                lines, nbytes, first = [], 0, line_no + 1
        if lines:
            yield first, lines, nbytes


def ordered_map(fn, items: Iterator, opts: Options, num_workers: int) -> Iterator[tuple[list, int]]:
    """fn(first, lines, opts) over the chunks, in order; at most 2 x num_workers chunks in flight (backpressure
    keeps memory bounded on inputs of any size)."""
    if num_workers <= 1:
        for first, lines, nbytes in items:
            yield fn(first, lines, opts), nbytes
        return
    with ProcessPoolExecutor(max_workers=num_workers) as pool:
        pending = deque()
        for first, lines, nbytes in items:
            pending.append((pool.submit(fn, first, lines, opts), nbytes))
            if len(pending) >= 2 * num_workers:
                fut, n = pending.popleft()
                yield fut.result(), n
        while pending:
            fut, n = pending.popleft()
            yield fut.result(), n


def _check_output_path(path: str, what: str) -> None:
    """Raise OSError with a one-line message naming ``path`` when it cannot be written (a directory, under a
    regular file, in a directory without write permission), before any work is done; creates nothing."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path}: is a directory")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{what} {path}: cannot be created, {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: cannot be created, {existing} is not writable")


def _atomic_writer(path: str):
    """A temp file next to ``path`` (same filesystem, so the final rename is atomic)."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    except OSError as e:
        raise OSError(f"{path}: cannot create a file in {d}: {e.strerror or e}") from None
    return os.fdopen(fd, "w", encoding="utf-8"), tmp


def _install(tmp: str, path: str) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the output normal permissions
    os.replace(tmp, path)


def in_validation_split(rec_id, fraction: float) -> bool:
    """Whether the record with id ``rec_id`` (a string or an integer) is held out for validation: the first 8
    bytes of sha256(json id) as a fraction of 2**64, below ``fraction``. Depends on the id alone."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(json.dumps(rec_id, ensure_ascii=False).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2 ** 64


@dataclass
class Summary:
    input: str
    output: str
    image_root: str
    records: int = 0
    valid: int = 0
    invalid: int = 0
    blank_lines: int = 0
    fixed_missing_placeholder: int = 0
    duplicate_ids: int = 0
    train_records: int = 0
    val_records: int = 0
    val_fraction: float = 0.0
    val_output: Optional[str] = None
    invalid_fraction: float = 0.0
    max_invalid_fraction: float = 0.0
    status: str = "ok"
    seconds: float = 0.0


def prepare(input_path: str, image_root: str, output_path: str, report_path: Optional[str] = None,
            num_workers: int = 1, max_invalid_fraction: float = 0.01, decode_check: bool = True,
            max_image_pixels: Optional[int] = DEFAULT_MAX_PIXELS, prepend_missing_image: bool = False,
            chunk_lines: int = 64, progress: bool = True, max_line_bytes: int = MAX_LINE_BYTES,
            val_fraction: float = 0.0, val_output_path: Optional[str] = None) -> dict:
    """Convert and validate; returns the report dict (also written to ``report_path``). When too many records
    are invalid (or there are none) the report's ``status`` starts with "failed" and the output is not written.
    Raises OSError / ValueError (before doing any work) for an unusable input, image root, output or report path;
    no bad input line makes it raise.

    ``val_fraction`` > 0 holds out the valid records whose id hashes below it (:func:`in_validation_split`)
    into ``val_output_path`` instead of the output; both files are written, or neither."""
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"{input_path}: no such input file")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{image_root}: image root is not a directory")
    if os.path.abspath(input_path) == os.path.abspath(output_path):
        raise ValueError("--output must differ from --input")
    report_path = report_path or output_path + ".report.json"
    if os.path.abspath(report_path) in (os.path.abspath(input_path), os.path.abspath(output_path)):
        raise ValueError("--report must differ from --input and --output")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction={val_fraction}: must be in [0, 1)")
    if val_fraction > 0 and not val_output_path:
        raise ValueError("--val-fraction needs --val-output (where the held-out records go)")
    if val_output_path and val_fraction <= 0:
        raise ValueError("--val-output needs --val-fraction > 0")
    if val_output_path and os.path.abspath(val_output_path) in (os.path.abspath(input_path),
                                                                os.path.abspath(output_path),
                                                                os.path.abspath(report_path)):
        raise ValueError("--val-output must differ from --input, --output and --report")
    _check_output_path(output_path, "--output")
    _check_output_path(report_path, "--report")
    if val_output_path:
        _check_output_path(val_output_path, "--val-output")
    opts = Options(image_root=image_root, real_root=os.path.realpath(image_root), decode_check=decode_check,
                   max_image_pixels=max_image_pixels, prepend_missing_image=prepend_missing_image,
                   max_line_bytes=max_line_bytes)
    s = Summary(input=input_path, output=output_path, image_root=image_root,
                max_invalid_fraction=max_invalid_fraction, val_fraction=val_fraction, val_output=val_output_path)
    by_reason, skipped, seen_ids, dup_examples = Counter(), [], set(), []
    t0 = time.time()
    out_f, out_tmp = _atomic_writer(output_path)
    val_f, val_tmp = None, None
    try:
        if val_output_path:
            val_f, val_tmp = _atomic_writer(val_output_path)
        with out_f, (val_f or contextlib.nullcontext()), \
                tqdm(total=os.path.getsize(input_path), unit="B", unit_scale=True, desc="prepare",
                     disable=not progress) as bar:
            for results, nbytes in ordered_map(process_chunk, read_chunks(input_path, chunk_lines, max_line_bytes),
                                               opts, num_workers):
                for line_no, line, rec_id, reason, message, fixed in results:
                    if reason == "blank":
                        s.blank_lines += 1
                        continue
                    s.records += 1
                    if reason is not None:
                        s.invalid += 1
                        by_reason[reason] += 1
                        skipped.append({"line": line_no, "id": rec_id, "reason": reason, "message": message})
                        continue
                    s.valid += 1
                    s.fixed_missing_placeholder += int(fixed)
                    key = json.dumps(rec_id)
                    if key in seen_ids:
                        s.duplicate_ids += 1
                        if len(dup_examples) < 20:
                            dup_examples.append({"line": line_no, "id": rec_id})
                    seen_ids.add(key)
                    if val_f is not None and in_validation_split(rec_id, val_fraction):
                        s.val_records += 1
                        val_f.write(line + "\n")
                    else:
                        s.train_records += 1
                        out_f.write(line + "\n")
                bar.update(nbytes)
                bar.set_postfix(valid=s.valid, invalid=s.invalid, refresh=False)
        s.invalid_fraction = s.invalid / s.records if s.records else 1.0
        s.seconds = round(time.time() - t0, 3)
        if s.records == 0:
            s.status = "failed: the input has no records"
        elif s.invalid_fraction > max_invalid_fraction:
            s.status = (f"failed: {s.invalid} of {s.records} records invalid ({s.invalid_fraction:.2%}) > "
                        f"--max-invalid-fraction {max_invalid_fraction:.2%}")
        report = {**asdict(s), "invalid_by_reason": dict(sorted(by_reason.items())),
                  "duplicate_id_examples": dup_examples, "skipped": skipped}
        for key in ("input", "output", "image_root", "val_output"):  # command-line paths may hold undecodable bytes
            if report[key] is not None:
                report[key] = safe_text(report[key])
        rep_f, rep_tmp = _atomic_writer(report_path)
        with rep_f:
            json.dump(report, rep_f, indent=1, ensure_ascii=False)
            rep_f.write("\n")
        _install(rep_tmp, report_path)
        if s.status != "ok":
            for tmp in (out_tmp, val_tmp):
                if tmp is not None:
                    os.unlink(tmp)
            return report
        if val_tmp is not None:
            _install(val_tmp, val_output_path)
        _install(out_tmp, output_path)
        return report
    except BaseException:
        for tmp in (out_tmp, val_tmp):
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python recipe/prepare_ai2d.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="InternVL-format jsonl (e.g. opensource/ai2d_train_12k.jsonl)")
    p.add_argument("--image-root", required=True,
                   help="directory the records' image paths are relative to; paths may not leave it")
    p.add_argument("--output", required=True, help="DeepSeek-VL2 conversation jsonl to write")
    p.add_argument("--report", default=None, help="validation report (JSON); default: OUTPUT.report.json")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="validation processes (1 = in this process; default: %(default)s)")
    p.add_argument("--max-invalid-fraction", type=float, default=0.01,
                   help="fail (exit 1, no output) when more than this fraction of records is invalid "
                        "(default: %(default)s)")
    p.add_argument("--no-decode-check", action="store_true",
                   help="only check that image files exist (faster); by default every image is fully decoded")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images with more pixels (decompression bombs; default: %(default)s)")
    p.add_argument("--prepend-missing-image", action="store_true",
                   help="InternVL's convention: a record with one image and no <image> placeholder gets one in "
                        "front of its first question (counted in the report); by default such records are "
                        "invalid (placeholder_mismatch)")
    p.add_argument("--chunk-lines", type=int, default=64, help="records per work unit (default: %(default)s)")
    p.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES,
                   help="longer input lines are invalid (line_too_long) and never read whole (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of the valid records (by a hash of their id: stable under "
                        "reordering) for validation; needs --val-output (default: %(default)s = no split)")
    p.add_argument("--val-output", default=None, help="jsonl for the held-out records (same format as --output)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not 0.0 <= a.max_invalid_fraction <= 1.0:
        p.error(f"--max-invalid-fraction={a.max_invalid_fraction}: must be in [0, 1]")
    if a.num_workers < 1 or a.chunk_lines < 1 or a.max_line_bytes < 1:
        p.error("--num-workers, --chunk-lines and --max-line-bytes must be >= 1")
    try:
        report = prepare(a.input, a.image_root, a.output, a.report, num_workers=a.num_workers,
                         max_invalid_fraction=a.max_invalid_fraction, decode_check=not a.no_decode_check,
                         max_image_pixels=a.max_image_pixels, prepend_missing_image=a.prepend_missing_image,
                         chunk_lines=a.chunk_lines, progress=not a.quiet, max_line_bytes=a.max_line_bytes,
                         val_fraction=a.val_fraction, val_output_path=a.val_output)
    except (OSError, ValueError) as e:  # unusable paths: one line, no traceback
        logger.error("%s", safe_text(str(e)))
        return 2
    report_path = a.report or a.output + ".report.json"
    reasons = ", ".join(f"{k}={v}" for k, v in report["invalid_by_reason"].items()) or "none"
    logger.info("%d records: %d valid, %d invalid (%s) in %.1f s; report: %s", report["records"], report["valid"],
                report["invalid"], reasons, report["seconds"], report_path)
    for item in report["skipped"][:5]:
        logger.warning("skipped line %d (id %s): %s: %s", item["line"], item["id"], item["reason"], item["message"])
    if len(report["skipped"]) > 5:
        logger.warning("... %d more skipped records listed in %s", len(report["skipped"]) - 5, report_path)
    if report["status"] != "ok":
        logger.error("%s; nothing written to %s", report["status"], a.output)
        return 1
    if a.val_output:
        logger.info("wrote %s (%d records) and %s (%d held-out records)", a.output, report["train_records"],
                    a.val_output, report["val_records"])
    else:
        logger.info("wrote %s", a.output)
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        # Run the package's copy of this module so worker processes can import the functions they run.
        from recipe.prepare_ai2d import main as _main
        sys.exit(_main())
    sys.exit(main())
