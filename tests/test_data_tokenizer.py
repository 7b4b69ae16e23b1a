"""Tokenizer loading: special tokens from the config files, transformers-4.38 additions, processor additions."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from recipe.data.conversation import format_sft_prompt, format_user_turn
from recipe.data.tokenizer import GROUNDING_TOKENS, ROLE_TOKENS, TextTokenizer, TokenizerError, add_processor_tokens
from recipe.tools import tiny_tokenizer as tt


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tt.build_tokenizer(str(d))
    return str(d)


def _copy(src, dst, edit_config=None, edit_map=None, drop_added=()):
    shutil.copytree(src, dst)
    for name, edit in (("tokenizer_config.json", edit_config), ("special_tokens_map.json", edit_map)):
        if edit:
            path = os.path.join(dst, name)
            cfg = json.load(open(path, encoding="utf-8"))
            edit(cfg)
            json.dump(cfg, open(path, "w", encoding="utf-8"), ensure_ascii=False)
    if drop_added:
        path = os.path.join(dst, "tokenizer.json")
        tj = json.load(open(path, encoding="utf-8"))
        tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] not in drop_added]
        json.dump(tj, open(path, "w", encoding="utf-8"), ensure_ascii=False)
    return str(dst)


def test_special_token_ids_of_the_tiny_tokenizer(tok_dir):
    tok = TextTokenizer.from_dir(tok_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    for t in (tt.IMAGE, *tt.GROUNDING, *tt.ROLES):
        assert len(tok.encode(t)) == 1 and tok.encode(t) == [tok.token_to_id(t)]
    # LlamaTokenizerFast defaults a missing unk_token to "<unk>" and adds it as a special token at the end,
    # as transformers 4.38 does (checked against the original stack).
    assert tok.token_to_id("<unk>") == 500 and len(tok) == 501
    assert tok.encode("a<unk>b")[1] == 500


def test_text_is_encoded_without_bos(tok_dir):
    tok = TextTokenizer.from_dir(tok_dir)
    ids = tok.encode("<|User|>: Which circle is red?")
    assert ids[0] == tok.token_to_id("<|User|>") and tok.bos_token_id not in ids
    assert tok.decode(ids) == "<|User|>: Which circle is red?"
    assert tok.encode("") == []


def test_explicit_null_unk_is_not_added(tok_dir, tmp_path):
    d = _copy(tok_dir, tmp_path / "t", edit_config=lambda c: c.update(unk_token=None),
              edit_map=lambda c: c.update(unk_token=None))
    assert TextTokenizer.from_dir(d).token_to_id("<unk>") is None


def test_processor_adds_missing_tokens_in_the_original_order(tok_dir, tmp_path):
    """Without pad in the configs and without <image> / roles in tokenizer.json, the processor appends pad,
    <image>, then the roles (grounding tokens exist), each at the next free id."""
    def strip(cfg):
        cfg.pop("pad_token", None)
        cfg["additional_special_tokens"] = list(GROUNDING_TOKENS)
    d = _copy(tok_dir, tmp_path / "t", edit_config=strip, edit_map=strip,
              drop_added={tt.IMAGE, *ROLE_TOKENS})
    tok = TextTokenizer.from_dir(d)
    n = len(tok)
    assert tok.pad_token is None and tok.token_to_id(tt.IMAGE) is None
    add_processor_tokens(tok, tt.PAD, tt.IMAGE)
    # PAD is still in tokenizer.json's vocabulary (id 2), so it keeps its id; the others are new.
    assert tok.pad_token_id == 2
    assert [tok.token_to_id(t) for t in (tt.IMAGE, *ROLE_TOKENS)] == [n, n + 1, n + 2]
    assert tok.encode("<|Assistant|>:")[0] == n + 2


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        TextTokenizer.from_dir(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        TextTokenizer.from_dir(str(tmp_path))


def test_added_tokens_decoder_in_config_is_honoured(tok_dir, tmp_path):
    """tokenizer_config.json's added_tokens_decoder is re-applied as transformers 4.38 does: a token listed only
    there is added, and its flags override tokenizer.json's (here lstrip on <|Assistant|> eats the newlines)."""
    def add(cfg):
        flags = {"special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
        cfg["added_tokens_decoder"] = {"499": {**flags, "content": "<|Assistant|>", "lstrip": True},
                                       "600": {**flags, "content": "<|extra|>"}}
    d = _copy(tok_dir, tmp_path / "t", edit_config=add)
    tok, plain = TextTokenizer.from_dir(d), TextTokenizer.from_dir(tok_dir)
    assert tok.encode("<|extra|>") == [tok.token_to_id("<|extra|>")]
    assistant = tok.token_to_id("<|Assistant|>")
    assert plain.encode("Q\n\n<|Assistant|>")[-3:] == plain.encode("\n\n") + [assistant]
    assert tok.encode("Q\n\n<|Assistant|>") == tok.encode("Q") + [assistant]


def test_user_turn_template():
    assert format_user_turn("  What is this?  ") == "<|User|>: What is this?\n\n<|Assistant|>:"
    assert format_user_turn("") == "<|User|>:<|Assistant|>:"
    conv = [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Q"},
            {"role": "<|Assistant|>", "content": " A "}]
    # The display string keeps the roles as given and separators by position (the original's behaviour).
    assert format_sft_prompt(conv, "P") == "P\n\nsystem: Sys.\n\nuser: Q<｜end▁of▁sentence｜><|Assistant|>: A"
