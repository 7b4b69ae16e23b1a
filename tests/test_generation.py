"""KV-cached generation (recipe/model/generation.py): every cached step equals a full forward over prompt +
generated tokens, for MHA (tiny) and MLA (small, base), with images and text-only, batched prompts of different
lengths (left padding; right padding is moved left); MLA's absorbed form equals the up-projected one; per-row EOS;
seeded sampling is reproducible. fp32 throughout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from recipe.data import DeepseekVLV2Processor
from recipe.model import DeepseekVLV2ForCausalLM
from recipe.model.attention import MultiHeadLatentAttention
from recipe.model.generation import KVCache, select_next, to_left_padding
from recipe.tools.tiny_config import tiny_config

LIKES = ["tiny", "small", "base"]


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _prompt(proc, text, images=()):
    return proc.process_one([{"role": "<|User|>", "content": text}, {"role": "<|Assistant|>", "content": ""}],
                            list(images), inference_mode=True)


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    """like -> (model in eval mode, processor), fp32, 42 px tiles."""
    out = {}
    for like in LIKES:
        path = tiny_ckpt(like=like)
        out[like] = DeepseekVLV2ForCausalLM.from_pretrained(path).eval(), DeepseekVLV2Processor.from_pretrained(path)
    return out


def _mixed_prompts(proc):
    """Different lengths: one image (2x1 tiles), text only, two images (one wide), a short text."""
    return [_prompt(proc, "<image>\nWhich colour is the circle?", [_image(80, 40, 0)]),
            _prompt(proc, "What is 2 + 3? Answer with the option's letter from the given choices directly."),
            _prompt(proc, "Image-1: <image>\nImage-2: <image>\nWhich shows more?", [_image(30, 30, 1),
                                                                                    _image(120, 40, 2)]),
            _prompt(proc, "Hi")]


def _generate(model, proc, samples, padding="left", **kw):
    b = proc.batchify(samples, padding=padding)
    kw.setdefault("eos_token_id", proc.eos_id)
    kw.setdefault("pad_token_id", proc.pad_id)
    return model.generate(b["input_ids"], b["attention_mask"], b["images"], b["images_seq_mask"],
                          b["images_spatial_crop"], **kw)


def _full_forward_check(model, samples, out, atol=2e-5):
    """For each row: one unpadded full forward over prompt + generated tokens; its argmax at every position
    that predicts a generated token is that token, and its logits equal the cached step's."""
    for b, s in enumerate(samples):
        n = int(out.num_tokens[b])
        gen = out.tokens[b, :n]
        ids = torch.cat([s.input_ids, gen])[None]
        seq_mask = torch.cat([s.images_seq_mask, torch.zeros(n, dtype=torch.bool)])[None]
        has_images = bool(s.images_spatial_crop.sum())
        full = model(ids, s.images[None] if has_images else None, seq_mask if has_images else None,
                     s.images_spatial_crop[None] if has_images else None).logits[0]
        ref = full[len(s) - 1: len(s) - 1 + n]
        assert torch.equal(ref.argmax(-1), gen), (b, ref.argmax(-1).tolist(), gen.tolist())
        torch.testing.assert_close(out.logits[b, :n], ref, atol=atol, rtol=0)


@pytest.mark.parametrize("like", LIKES)
def test_cached_decoding_equals_full_forward_with_images(models, like):
    model, proc = models[like]
    samples = _mixed_prompts(proc)
    assert len({len(s) for s in samples}) == len(samples)  # different prompt lengths -> real padding
    out = _generate(model, proc, samples, max_new_tokens=6, output_logits=True)
    assert out.tokens.shape == (4, 6) and out.prompt_tokens == sum(len(s) for s in samples)
    _full_forward_check(model, samples, out)


@pytest.mark.parametrize("like", LIKES)
def test_cached_decoding_equals_full_forward_text_only(models, like):
    model, proc = models[like]
    samples = [_prompt(proc, "Name a colour."), _prompt(proc, "A much longer question about shapes and letters?")]
    b = proc.batchify(samples, padding="left")
    out = model.generate(b["input_ids"], b["attention_mask"], max_new_tokens=5, eos_token_id=proc.eos_id,
                         output_logits=True)  # no images at all: the vision tower is not run
    _full_forward_check(model, samples, out)


@pytest.mark.parametrize("like", ["small", "base"])
def test_mla_absorbed_form_equals_up_projected(models, like):
    model, proc = models[like]
    samples = _mixed_prompts(proc)
    outs = {absorb: _generate(model, proc, samples, max_new_tokens=5, output_logits=True, absorb=absorb)
            for absorb in (None, True, False)}
    for absorb in (True, False):
        assert torch.equal(outs[absorb].tokens, outs[None].tokens)
        torch.testing.assert_close(outs[absorb].logits, outs[None].logits, atol=2e-5, rtol=0)


def test_mla_attention_step_absorbed_vs_up_projected():
    """One MLA layer, q LoRA variant too: a prefill of 5 tokens then 3 decode steps, both forms, with padding."""
    for q_lora in (None, 12):
        cfg = tiny_config("small", q_lora_rank=q_lora).language_config
        torch.manual_seed(0)
        attn = MultiHeadLatentAttention(cfg).eval()
        for p in attn.parameters():
            torch.nn.init.normal_(p, std=0.2)
        x = torch.randn(2, 8, cfg.hidden_size)
        valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        positions = torch.cat([(valid.cumsum(1) - 1).clamp(min=0), valid.sum(1, keepdim=True) + torch.arange(3)], 1)
        outs = {}
        for absorb in (True, False):
            cache = KVCache(cfg, batch=2, capacity=8, absorb=absorb)
            steps = [(slice(0, 5), valid)] + [(slice(t, t + 1), torch.ones(2, 1)) for t in range(5, 8)]
            ys = []
            for sl, seg in steps:
                mask = cache.begin(sl.stop - sl.start, seg, x.device)
                ys.append(attn(x[:, sl], positions[:, sl], mask, cache=cache.layers[0]))
                cache.end()
            outs[absorb] = torch.cat(ys, 1)
        torch.testing.assert_close(outs[True][1], outs[False][1], atol=1e-5, rtol=0)
        torch.testing.assert_close(outs[True][0, 2:], outs[False][0, 2:], atol=1e-5, rtol=0)  # padding rows aside


def test_right_padding_is_moved_left(models):
    model, proc = models["small"]
    samples = _mixed_prompts(proc)
    left = _generate(model, proc, samples, max_new_tokens=4)
    right = _generate(model, proc, samples, padding="right", max_new_tokens=4)
    assert torch.equal(left.tokens, right.tokens)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]])
    ids = torch.tensor([[5, 6, 0, 0], [0, 7, 8, 0], [1, 2, 3, 4]])
    m, i = to_left_padding(mask, ids)
    assert m.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]] and i[:, 2:].tolist() == [[5, 6], [7, 8], [3, 4]]
    with pytest.raises(ValueError, match="between real tokens"):
        to_left_padding(torch.tensor([[1, 0, 1]]))


@pytest.mark.parametrize("like", ["tiny", "base"])
def test_each_row_stops_at_its_eos(models, like):
    model, proc = models[like]
    samples = _mixed_prompts(proc)
    free = _generate(model, proc, samples, max_new_tokens=6, eos_token_id=[])
    stop_tok = int(free.tokens[0, 2])  # what row 0 emits at step 2: call it EOS
    out = _generate(model, proc, samples, max_new_tokens=6, eos_token_id=[stop_tok], pad_token_id=-1)
    for r in range(len(samples)):
        row = free.tokens[r].tolist()
        n = row.index(stop_tok) + 1 if stop_tok in row else 6
        assert int(out.num_tokens[r]) == n and bool(out.finished[r]) == (stop_tok in row)
        assert out.tokens[r, :n].tolist() == row[:n]
        assert (out.tokens[r, n:] == -1).all()
        assert out.token_lists()[r] == row[: n - (stop_tok in row)]
    assert int(out.num_tokens[0]) <= 3 and bool(out.finished[0])


def test_generation_stops_early_when_every_row_is_done(models):
    model, proc = models["tiny"]
    samples = [_prompt(proc, "One"), _prompt(proc, "Two words")]
    free = _generate(model, proc, samples, max_new_tokens=1, eos_token_id=[])
    out = _generate(model, proc, samples, max_new_tokens=8, eos_token_id=free.tokens[:, 0].tolist())
    assert out.tokens.shape == (2, 1) and out.finished.all() and out.num_tokens.tolist() == [1, 1]


def test_sampling_is_reproducible_with_a_seed(models):
    model, proc = models["base"]
    samples = _mixed_prompts(proc)

    def draw(seed, **kw):
        return _generate(model, proc, samples, max_new_tokens=8, eos_token_id=[], temperature=1.0,
                         generator=torch.Generator().manual_seed(seed), **kw).tokens

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert torch.equal(draw(3, top_p=0.9, top_k=20), draw(3, top_p=0.9, top_k=20))
    greedy = _generate(model, proc, samples, max_new_tokens=8, eos_token_id=[]).tokens
    assert torch.equal(draw(5, top_k=1), greedy)  # top-1 sampling is greedy
    assert model.training is False


def test_select_next_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(select_next(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token; the third is outside the nucleus
    draws = {int(select_next(logits, 1.0, top_p=0.5, generator=g)) for _ in range(100)}
    assert draws == {0}
    draws = {int(select_next(logits, 1.0, top_k=3, generator=g)) for _ in range(300)}
    assert draws == {0, 1, 2}
    assert int(select_next(logits, 0.0)) == 0


def test_generate_keeps_the_training_flag(models):
    model, proc = models["tiny"]
    model.train()
    try:
        _generate(model, proc, [_prompt(proc, "Hi")], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_mla_cache_holds_the_latent_and_rope_key_only(models):
    """Per token and layer: MLA caches r + dr values, MHA 2 x kv heads x head dim."""
    for like in ("tiny", "small"):
        model, _ = models[like]
        lc = model.config.language_config
        cache = KVCache(lc, batch=2, capacity=10)
        ids = torch.randint(3, 100, (2, 4))
        model.language.model(model.language.get_input_embeddings()(ids), torch.arange(4).expand(2, 4), None,
                             cache=cache)
        per_token = (lc.kv_lora_rank + lc.qk_rope_head_dim if lc.use_mla
                     else 2 * lc.num_key_value_heads * lc.head_dim)
        assert cache.nbytes() == 2 * 10 * lc.num_hidden_layers * per_token * 4 and cache.length == 4


def test_grouped_kv_heads(tiny_ckpt):
    path = tiny_ckpt(like="tiny", num_key_value_heads=2)
    model, proc = DeepseekVLV2ForCausalLM.from_pretrained(path).eval(), DeepseekVLV2Processor.from_pretrained(path)
    samples = _mixed_prompts(proc)
    _full_forward_check(model, samples, _generate(model, proc, samples, max_new_tokens=4, output_logits=True))


def test_prefill_through_the_cache_equals_the_plain_forward(models):
    """Without padding the cached prefill computes what the training path computes."""
    for like in LIKES:
        model, _ = models[like]
        ids = torch.randint(3, 100, (2, 7))
        embeds = model.language.get_input_embeddings()(ids)
        pos = torch.arange(7).expand(2, 7)
        plain, _ = model.language.model(embeds, pos, None)
        cached, _ = model.language.model(embeds, pos, None, cache=KVCache(model.config.language_config, 2, 7))
        torch.testing.assert_close(cached, plain, atol=1e-5, rtol=0)
