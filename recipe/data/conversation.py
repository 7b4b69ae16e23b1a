"""The ``deepseek`` conversation template of DeepSeek-VL2 and the message rules the processor applies.

A conversation is a list of messages ``{"role", "content", "images"?}``. Roles (the original accepts both
spellings): ``"<|User|>"`` / ``"user"``, ``"<|Assistant|>"`` / ``"assistant"``, and ``"system"`` /
``"deepseekapi-sys"`` (first message only).

What gets tokenised (one segment per message, encoded separately so text never merges across segments):

- user: ``"<|User|>: " + content.strip() + "\\n\\n<|Assistant|>:"``; an empty content gives
  ``"<|User|>:<|Assistant|>:"``. No space after the final colon.
- assistant: ``content.strip()`` followed by the EOS token id (the answer has no leading space).
- system: ``content.strip()`` as is, with no separator after it (the original's quirk; kept for parity).

:func:`format_sft_prompt` builds the human-readable ``sft_format`` string the original returns beside the ids.
It is *not* what gets tokenised (it has a space after ``"<|Assistant|>:"`` when the answer is non-empty).
"""

from __future__ import annotations

from typing import Iterable, Mapping

USER_ROLE = "<|User|>"
ASSISTANT_ROLE = "<|Assistant|>"
SYSTEM_ROLE = "system"
SEP = "\n\n"                       # after a user message
SEP2 = "<｜end▁of▁sentence｜>"      # after an assistant message (the EOS token's text)
IMAGE_TOKEN = "<image>"

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
_ROLE_KIND = {USER_ROLE: USER, "user": USER, ASSISTANT_ROLE: ASSISTANT, "assistant": ASSISTANT,
              SYSTEM_ROLE: SYSTEM, "deepseekapi-sys": SYSTEM}
ACCEPTED_ROLES = tuple(_ROLE_KIND)


class ConversationError(ValueError):
    """A conversation breaks the template's rules; the message names the message index and the rule."""


def role_kind(role: str, index: int = 0) -> str:
    """Map an accepted role spelling to ``"user"``, ``"assistant"`` or ``"system"``."""
    try:
        return _ROLE_KIND[role]
    except (KeyError, TypeError):
        raise ConversationError(f"message {index}: unknown role {role!r}; expected one of {ACCEPTED_ROLES}") from None


def _template_prompt(messages: Iterable[tuple[str, str]], system_message: str = "") -> str:
    """The DeepSeek separator style: ``system + SEP`` when a system message is set, then per message
    ``role + ": " + text + (SEP or SEP2, alternating by position)``, or ``role + ":"`` for an empty text."""
    seps = (SEP, SEP2)
    out = system_message + seps[0] if system_message else ""
    for i, (role, text) in enumerate(messages):
        out += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
    return out


def format_user_turn(content) -> str:
    """The text of one user turn as tokenised: ``"<|User|>: {content}\\n\\n<|Assistant|>:"``."""
    return _template_prompt([(USER_ROLE, str(content).strip()), (ASSISTANT_ROLE, "")])


def format_sft_prompt(conversations: Iterable[Mapping], system_prompt: str = "") -> str:
    """The display string (the original's ``sft_format``): every message with its role spelled as given."""
    return _template_prompt(((m["role"], m["content"].strip()) for m in conversations), system_prompt).strip()
