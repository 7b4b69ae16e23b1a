"""Load a checkpoint's tokenizer files the way the original processor sees them, without transformers' classes.

The released checkpoints ship ``tokenizer.json`` (a byte-level BPE) with ``tokenizer_config.json`` naming
``LlamaTokenizerFast``. transformers 4.38 (what DeepSeek-VL2 pins) builds that class straight from
``tokenizer.json`` and then adds, as special tokens at the end of the vocabulary, every special-token string
that the backend does not already know: the ``added_tokens_decoder`` entries of ``tokenizer_config.json``, then
bos / eos / unk / sep / pad / cls / mask and ``additional_special_tokens``; ``LlamaTokenizerFast`` defaults a
missing ``unk_token`` to ``"<unk>"`` (and bos / eos to ``"<s>"`` / ``"</s>"``). transformers 5 rebuilds
tokenizers by class and warns about this one, so we reproduce the 4.38 steps on the ``tokenizers`` backend
directly: same library, same files, same ids, and nothing is downloaded or executed.

:func:`add_processor_tokens` then applies what ``DeepseekVLV2Processor.__init__`` adds (pad if missing,
``<image>`` if missing, the grounding and role tokens).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

from tokenizers import AddedToken, Tokenizer

logger = logging.getLogger(__name__)

SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# LlamaTokenizerFast.__init__ defaults (used when tokenizer_config.json does not name the token at all).
_LLAMA_DEFAULTS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
ROLE_TOKENS = ("<|User|>", "<|Assistant|>")


class TokenizerError(ValueError):
    """Tokenizer files are missing or inconsistent; the message names the file."""


def _content(tok: Any) -> Optional[str]:
    """A special token from a config file: a string, an AddedToken dict, or null."""
    if tok is None or isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and "content" in tok:
        return tok["content"]
    raise TokenizerError(f"cannot read special token {tok!r} (expected a string or an AddedToken object)")


def _special(content: str) -> AddedToken:
    """How transformers adds a string special token: no stripping, not normalised."""
    return AddedToken(content, lstrip=False, rstrip=False, normalized=False, special=True)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


class TextTokenizer:
    """The backend ``tokenizers.Tokenizer`` plus the special tokens of the config files.

    Attributes: ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token`` (strings or None) and their ids.
    """

    def __init__(self, backend: Tokenizer, special: dict[str, Optional[str]], additional: list[str]):
        self.backend = backend
        self.special = dict(special)
        self.additional_special_tokens = list(additional)

    # --- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str) -> "TextTokenizer":
        """Read ``tokenizer.json`` (required), ``tokenizer_config.json`` and ``special_tokens_map.json``."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise TokenizerError(f"{path}: no tokenizer.json (a fast tokenizer file is required; "
                                 f"sentencepiece-only checkpoints are not supported)")
        try:
            backend = Tokenizer.from_file(tok_file)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{tok_file}: cannot load ({e})") from None
        cfg_file = os.path.join(path, "tokenizer_config.json")
        cfg = _read_json(cfg_file) if os.path.isfile(cfg_file) else {}
        map_file = os.path.join(path, "special_tokens_map.json")
        # transformers 4.38 reads special_tokens_map.json only when tokenizer_config.json has no
        # added_tokens_decoder (its "legacy" path); tokenizer_config.json keys win otherwise.
        if "added_tokens_decoder" not in cfg and os.path.isfile(map_file):
            for key, value in _read_json(map_file).items():
                if key == "additional_special_tokens":
                    merged = list(cfg.get("additional_special_tokens") or [])
                    merged += [t for t in value if _content(t) not in {_content(m) for m in merged}]
                    cfg["additional_special_tokens"] = merged
                else:
                    cfg[key] = value
        llama = str(cfg.get("tokenizer_class", "")).startswith("Llama")
        special = {}
        for attr in SPECIAL_ATTRS:
            if attr in cfg:
                special[attr] = _content(cfg[attr])
            else:
                special[attr] = _LLAMA_DEFAULTS.get(attr) if llama else None
        additional = [_content(t) for t in cfg.get("additional_special_tokens") or []]

        # 1. Every added_tokens_decoder entry of tokenizer_config.json, in id order and with its flags. 4.38 means to
        #    skip the ones the backend has, but its membership test compares AddedTokens with the int keys of a
        #    dict, so it re-adds them all: existing ids stay, the config's flags win, unknown tokens get new ids.
        specials = {special[a] for a in SPECIAL_ATTRS} | set(additional)
        decoder = cfg.get("added_tokens_decoder") or {}
        batch, batch_special = [], None
        for idx in sorted(decoder, key=int):
            entry = decoder[idx]
            content = entry["content"]
            flags = {k: entry[k] for k in ("lstrip", "rstrip", "normalized", "single_word") if k in entry}
            is_special = bool(entry.get("special", False)) or content in specials
            if batch and is_special != batch_special:  # consecutive runs in one call each, as 4.38 (fewer rebuilds)
                (backend.add_special_tokens if batch_special else backend.add_tokens)(batch)
                batch = []
            batch.append(AddedToken(content, special=bool(entry.get("special", False)), **flags))
            batch_special = is_special
        if batch:
            (backend.add_special_tokens if batch_special else backend.add_tokens)(batch)
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        # 2. special-token strings the backend lacks (transformers' all_special_tokens_extended order).
        missing = []
        for content in [special[a] for a in SPECIAL_ATTRS] + additional:
            if content is not None and content not in known and content not in missing:
                missing.append(content)
        if missing:
            logger.debug("%s: adding special tokens missing from tokenizer.json: %s", path, missing)
            backend.add_special_tokens([_special(t) for t in missing])
        return cls(backend, special, additional)

    # --- vocabulary ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.backend.token_to_id(token)

    def add_special_tokens(self, tokens: list[str]) -> None:
        self.backend.add_special_tokens([_special(t) for t in tokens])

    def _id(self, attr: str) -> Optional[int]:
        return self.token_to_id(self.special.get(attr))

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> Optional[int]:
        return self._id("pad_token")

    @property
    def pad_token(self) -> Optional[str]:
        return self.special.get("pad_token")

    # --- text ----------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOS (``add_special_tokens=False``); special tokens in the text are matched."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def add_processor_tokens(tok: TextTokenizer, pad_token: str, image_token: str) -> None:
    """What ``DeepseekVLV2Processor.__init__`` adds, in its order: the pad token if the tokenizer has none, the
    image token if unknown, then the grounding and role tokens (always re-added as special; a no-op for ids that
    exist, a new id at the end of the vocabulary otherwise)."""
    if tok.pad_token is None:
        tok.add_special_tokens([pad_token])
        tok.special["pad_token"] = pad_token
    if tok.token_to_id(image_token) is None:
        tok.add_special_tokens([image_token])
    tok.add_special_tokens(list(GROUNDING_TOKENS))
    tok.add_special_tokens(list(ROLE_TOKENS))
