"""ai2d-style multiple-choice scoring, the way lmms-eval scores its ``ai2d`` task, over prepared records.

lmms-eval (task ``ai2d``): the prompt is the question, one ``"X. option"`` line per choice and the post-prompt
``"\\nAnswer with the option's letter from the given choices directly."``; decoding is greedy with at most 16
new tokens; a response that starts with ``"X."`` (optional leading whitespace) is reduced to the letter X, any
other response is kept whole; the metric is exact match against the reference letter, ignoring case and
punctuation. We also ignore surrounding whitespace (lmms-eval's model wrappers strip their outputs).

Records are ``prepare_ai2d.py`` output: the first user turn (with its images) is the prompt, the first assistant
turn is the reference (a single letter A-Z). A user turn that does not end with the post-prompt gets it appended
(counted). Anything unusable is a :class:`SkipRecord` with a reason code; the evaluation counts it and goes on.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field

from recipe.data.conversation import ASSISTANT, IMAGE_TOKEN, USER, ConversationError, role_kind

POST_PROMPT = "Answer with the option's letter from the given choices directly."
MAX_NEW_TOKENS = 16
_LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")
_PUNCTUATION = str.maketrans("", "", string.punctuation)

# Why a record was not scored (the predictions file and the summary use these codes).
INVALID_JSON, BAD_RECORD, NO_ANSWER_LETTER, IMAGE_ERROR, BAD_PROMPT = (
    "invalid_json", "bad_record", "no_answer_letter", "image_error", "bad_prompt")
SKIP_REASONS = (INVALID_JSON, BAD_RECORD, NO_ANSWER_LETTER, IMAGE_ERROR, BAD_PROMPT)


class SkipRecord(ValueError):
    """A record that cannot be scored; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class McqItem:
    """One multiple-choice question: the prompt conversation (user turn + empty assistant turn), its image paths
    (relative to the image root, in placeholder order) and the reference letter."""

    id: str
    messages: list
    image_paths: list = field(default_factory=list)
    answer: str = ""
    post_prompt_added: bool = False


def extract_choice(response: str) -> str:
    """lmms-eval's ai2d filter: the option letter when the response starts with ``"X."``, else the response."""
    m = _LEADING_LETTER.match(response)
    return m.group(1) if m else response


def normalise(text: str) -> str:
    """Exact-match normalisation: lower case, no punctuation, no surrounding whitespace."""
    return text.lower().translate(_PUNCTUATION).strip()


def is_correct(response: str, answer: str) -> bool:
    return normalise(extract_choice(response)) == normalise(answer)


def parse_record(line: bytes, where: str) -> McqItem:
    """A prepared jsonl line -> :class:`McqItem`, or :class:`SkipRecord` (invalid_json, bad_record,
    no_answer_letter)."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise SkipRecord(INVALID_JSON, f"{where}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise SkipRecord(BAD_RECORD, f"{where}: expected a JSON object, got {type(record).__name__}")
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise SkipRecord(BAD_RECORD, f"{where}: 'conversations' must be a non-empty list")
    user = answer = None
    system = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise SkipRecord(BAD_RECORD, f"{where}: conversations[{i}] needs a string 'content'")
        try:
            kind = role_kind(turn.get("role"), i)
        except ConversationError as e:
            raise SkipRecord(BAD_RECORD, f"{where}: {e}") from None
        if kind == USER and user is None:
            user = turn
        elif kind == ASSISTANT and user is not None:
            answer = turn
            break
        elif kind not in (USER, ASSISTANT) and user is None:
            system.append({"role": turn["role"], "content": turn["content"]})
    if user is None:
        raise SkipRecord(BAD_RECORD, f"{where}: no user turn")
    letter = answer["content"].strip() if answer is not None else ""
    if len(letter) != 1 or letter not in string.ascii_uppercase:
        shown = "no assistant turn" if answer is None else f"the answer is {letter[:40]!r}"
        raise SkipRecord(NO_ANSWER_LETTER, f"{where}: {shown}, not an option letter A-Z")
    images = user.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise SkipRecord(BAD_RECORD, f"{where}: the user turn's 'images' must be a list of paths")
    n_placeholders = user["content"].count(IMAGE_TOKEN)
    if n_placeholders != len(images):
        raise SkipRecord(BAD_PROMPT, f"{where}: {n_placeholders} {IMAGE_TOKEN} placeholders but {len(images)} images")
    question = user["content"].rstrip()
    added = not question.endswith(POST_PROMPT)
    if added:
        question = f"{question}\n{POST_PROMPT}"
    messages = system + [{"role": "<|User|>", "content": question}, {"role": "<|Assistant|>", "content": ""}]
    rec_id = record.get("id")
    return McqItem(id=str(rec_id) if rec_id is not None else where, messages=messages, image_paths=list(images),
                   answer=letter, post_prompt_added=added)
