"""InternVL SFT records (``{"id", "image"|"images", "conversations": [{"from", "value"}]}``) checked and converted
into DeepSeek-VL2 conversations, one raw jsonl line at a time, never trusting the input: every failure is an
:class:`Invalid` with one of :data:`REASONS` and a message that says where. ``recipe/prepare_ai2d.py`` streams a file
through :func:`process_chunk` in worker processes (this module imports no torch, so they start fast).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Optional

from recipe.data.conversation import ASSISTANT_ROLE, IMAGE_TOKEN, SYSTEM_ROLE, USER_ROLE
from recipe.data.image_io import DEFAULT_MAX_PIXELS, ImageLoadError, check_image, resolve_under_root

ROLE_MAP = {"human": USER_ROLE, "gpt": ASSISTANT_ROLE, "system": SYSTEM_ROLE}
REASONS = ("invalid_json", "not_an_object", "missing_key", "bad_type", "unknown_role", "bad_turn_order",
           "empty_turn", "placeholder_in_answer", "placeholder_mismatch", "bad_path", "path_escape",
           "missing_file", "undecodable_image", "image_too_large", "empty_image", "too_deep", "bad_text",
           "line_too_long", "conversion_error")
# A record needs 3 levels ({"conversations": [{...}]}); deeper nesting anywhere in a line is refused, the same way
# in every process (json's own limit is the interpreter's recursion limit, which depends on the caller's stack).
MAX_JSON_DEPTH = 64
MAX_LINE_BYTES = 16 << 20  # longer lines are reported (line_too_long), never read into memory whole
MAX_MESSAGE_CHARS = 1000  # report messages are clipped to this
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # the only code points UTF-8 cannot encode
_BOM = b"\xef\xbb\xbf"


class Invalid(Exception):
    """A record fails validation: ``reason`` is one of REASONS, the message says what and where."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Options:
    image_root: str
    real_root: str
    decode_check: bool = True
    max_image_pixels: Optional[int] = DEFAULT_MAX_PIXELS
    prepend_missing_image: bool = False
    max_line_bytes: int = MAX_LINE_BYTES


# --- hostile input helpers ----------------------------------------------------------------------------------
def _short(value: str, limit: int = 80) -> str:
    """repr() of a string, clipped (repr escapes lone surrogates and control characters)."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _check_text(value: str, where: str) -> None:
    """Raise Invalid(bad_text) when ``value`` holds a lone surrogate (json accepts "\\ud800"; UTF-8 cannot encode
    it, so the output write would fail)."""
    m = _SURROGATE.search(value)
    if m:
        raise Invalid("bad_text", f"{where} holds the lone surrogate U+{ord(m.group()):04X} (character {m.start()}), "
                                  f"which cannot be written as UTF-8")


def safe_text(value: str) -> str:
    """``value`` with lone surrogates written as \\uXXXX escapes, so the report can always be written as UTF-8."""
    if _SURROGATE.search(value):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _clip(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... ({len(message):,} characters)"


def _nested_deeper(value, limit: int) -> bool:
    """Whether JSON containers nest more than ``limit`` levels in ``value`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _is_id(value) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def parse_line(raw, opts: Options):
    """One raw input line (bytes, or its length when it was too long to read) -> the parsed JSON value, or raise
    :class:`Invalid` (line_too_long, bad_text, invalid_json, too_deep)."""
    if isinstance(raw, int):
        raise Invalid("line_too_long", f"the line is {raw:,} bytes long, over the limit of {opts.max_line_bytes:,} "
                                       f"(--max-line-bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Invalid("bad_text", f"the line is not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                                  f"({e.reason})") from None
    too_deep = Invalid("too_deep", f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        value = json.loads(text)
    except RecursionError:  # json's C parser stops at the interpreter's recursion limit (about 1000 levels)
        raise too_deep from None
    except ValueError as e:  # JSONDecodeError, and e.g. an integer over Python's 4300-digit conversion limit
        raise Invalid("invalid_json", f"not valid JSON: {e}") from None
    # Cheap bound first: a line with at most MAX_JSON_DEPTH brackets cannot nest deeper; only others are walked.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _nested_deeper(value, MAX_JSON_DEPTH):
        raise too_deep
    return value


# --- one record ---------------------------------------------------------------------------------------------
def _image_list(record: dict) -> list:
    if "image" in record and "images" in record:
        raise Invalid("bad_type", "has both 'image' and 'images'; use one")
    if "image" in record:
        if not isinstance(record["image"], str):
            raise Invalid("bad_type", f"'image' must be a string path, got {type(record['image']).__name__}")
        _check_text(record["image"], "'image'")
        return [record["image"]]
    images = record.get("images", [])
    if images is None:
        return []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise Invalid("bad_type", "'images' must be a list of string paths")
    for i, path in enumerate(images):
        _check_text(path, f"images[{i}]")
    return list(images)


def _turns(record: dict) -> list:
    """[(role, value)] after checking keys, roles and the turn order."""
    if "conversations" not in record:
        raise Invalid("missing_key", "no 'conversations'")
    conv = record["conversations"]
    if not isinstance(conv, list) or not conv:
        raise Invalid("bad_type", "'conversations' must be a non-empty list")
    turns = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise Invalid("bad_type", f"conversations[{t}] must be an object")
        for key in ("from", "value"):
            if key not in turn:
                raise Invalid("missing_key", f"conversations[{t}] has no '{key}'")
        if not isinstance(turn["value"], str):
            raise Invalid("bad_type", f"conversations[{t}].value must be a string")
        if not isinstance(turn["from"], str):
            raise Invalid("bad_type", f"conversations[{t}].from must be a string, got "
                                      f"{type(turn['from']).__name__}")
        if turn["from"] not in ROLE_MAP:
            raise Invalid("unknown_role", f"conversations[{t}].from={_short(turn['from'])}; expected one of "
                                          f"{sorted(ROLE_MAP)}")
        _check_text(turn["value"], f"conversations[{t}].value")
        turns.append((ROLE_MAP[turn["from"]], turn["value"]))
    body = turns[1:] if turns[0][0] == SYSTEM_ROLE else turns
    for t, (role, _) in enumerate(body):
        want = USER_ROLE if t % 2 == 0 else ASSISTANT_ROLE
        if role != want:
            pos = t + len(turns) - len(body)
            raise Invalid("bad_turn_order", f"conversations[{pos}] is {role!r}, expected {want!r} (an optional "
                                            f"system turn first, then human and gpt alternating)")
    if not body or body[-1][0] != ASSISTANT_ROLE:
        raise Invalid("bad_turn_order", "the conversation must end with a gpt answer")
    for t, (role, value) in enumerate(turns):
        if not value.strip():
            raise Invalid("empty_turn", f"conversations[{t}] ({role}) is empty")
        if role != USER_ROLE and IMAGE_TOKEN in value:
            raise Invalid("placeholder_in_answer", f"conversations[{t}] ({role}) contains {IMAGE_TOKEN}; images "
                                                   f"belong to human turns")
    return turns


def convert_record(record, opts: Options) -> tuple[dict, bool]:
    """Validate one parsed InternVL record; returns (DeepSeek-VL2 record, placeholder was added) or raises
    :class:`Invalid`."""
    if not isinstance(record, dict):
        raise Invalid("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    if "id" not in record:
        raise Invalid("missing_key", "no 'id'")
    if not _is_id(record["id"]):
        raise Invalid("bad_type", f"'id' must be a string or an integer, got {type(record['id']).__name__}")
    if isinstance(record["id"], str):
        _check_text(record["id"], "'id'")
    images = _image_list(record)
    turns = _turns(record)
    n_placeholders = sum(v.count(IMAGE_TOKEN) for r, v in turns if r == USER_ROLE)
    fixed = False
    if n_placeholders == 0 and len(images) == 1 and opts.prepend_missing_image:
        # InternVL's own loader puts a lone image in front of the first question when it has no placeholder.
        first = next(t for t, (r, _) in enumerate(turns) if r == USER_ROLE)
        turns[first] = (USER_ROLE, f"{IMAGE_TOKEN}\n{turns[first][1]}")
        n_placeholders, fixed = 1, True
    if n_placeholders != len(images):
        raise Invalid("placeholder_mismatch", f"{n_placeholders} {IMAGE_TOKEN} placeholders but {len(images)} "
                                              f"images")
    sizes = []
    for rel in images:
        try:
            full = resolve_under_root(opts.image_root, rel, opts.real_root)
            if not os.path.isfile(full):
                raise ImageLoadError(rel, "missing_file", f"no such file under the image root {opts.image_root}")
            if opts.decode_check:
                sizes.append(list(check_image(full, opts.max_image_pixels)))
        except ImageLoadError as e:
            raise Invalid(e.reason, f"image {_short(rel, 200)}: {e.detail}") from None
        except (OSError, ValueError) as e:  # e.g. a name too long for the file system
            raise Invalid("bad_path", f"image {_short(rel, 200)}: cannot be checked: {e}") from None
    conversations, used = [], 0
    for role, value in turns:
        msg = {"role": role, "content": value}
        n = value.count(IMAGE_TOKEN) if role == USER_ROLE else 0
        if n:
            msg["images"] = images[used: used + n]
            used += n
        conversations.append(msg)
    out = {"id": record["id"], "conversations": conversations}
    if opts.decode_check and sizes:
        out["image_sizes"] = sizes
    return out, fixed


def process_chunk(first_line: int, lines: list, opts: Options) -> list:
    """Worker: [(line_no, output_line | None, id, reason, message, fixed)] for a chunk of raw input lines. Never
    raises for a bad line: every failure converting one record becomes an invalid record with a reason."""
    results = []
    for k, raw in enumerate(lines):
        line_no = first_line + k
        if isinstance(raw, bytes):
            if raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                results.append((line_no, None, None, "blank", "", False))
                continue
        rec_id = None
        try:
            record = parse_line(raw, opts)
            if isinstance(record, dict) and _is_id(record.get("id")):
                rec_id = record["id"]
            out, fixed = convert_record(record, opts)
            line = json.dumps(out, ensure_ascii=False)
            _check_text(line, "the output record")  # guard: every string written was checked already
            results.append((line_no, line, rec_id, None, "", fixed))
            continue
        except Invalid as e:
            reason, message = e.reason, str(e)
        except RecursionError:
            reason, message = "too_deep", "nested too deeply to convert"
        except Exception as e:  # a hostile record must not end the run: report it like any other invalid one
            reason, message = "conversion_error", f"{type(e).__name__}: {e}"
        if isinstance(rec_id, str):
            rec_id = safe_text(rec_id)
        results.append((line_no, None, rec_id, reason, _clip(safe_text(message)), False))
    return results
