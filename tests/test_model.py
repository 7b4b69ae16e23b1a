"""The whole model: images into text, loss, gradients, dtypes, and HF checkpoint I/O."""

import filecmp
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from recipe.checkpoint.hf import INDEX_NAME, CheckpointError
from recipe.model import DeepseekVLV2ForCausalLM
from recipe.model.loss import causal_lm_loss
from recipe.tools.tiny_config import tiny_config


def make_batch(cfg, T=48, crops=((2, 1), (1, 1)), starts=(2, 5), seed=0):
    """A right-padded batch with one image per sample (crop (0, 0) = text-only)."""
    g = torch.Generator().manual_seed(seed)
    B = len(crops)
    S = cfg.vision_config.image_size
    ids = torch.randint(3, cfg.language_config.vocab_size, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    tiles = max(1 + w * h for w, h in crops)
    images = torch.zeros(B, tiles, 3, S, S)
    for b, ((w, h), s) in enumerate(zip(crops, starts)):
        if w:
            mask[b, s:s + cfg.num_image_tokens(w, h)] = True
            images[b, :1 + w * h] = torch.rand(1 + w * h, 3, S, S, generator=g) * 2 - 1
    crop = torch.tensor([[list(c)] for c in crops])
    labels = ids.masked_fill(mask, -100)
    return dict(input_ids=ids, images=images, images_seq_mask=mask, images_spatial_crop=crop, labels=labels)


@pytest.fixture(params=["tiny", "base"])
def model(request):
    torch.manual_seed(0)
    return DeepseekVLV2ForCausalLM(tiny_config(request.param, image_size=42))


def test_loss_is_shifted_fp32_cross_entropy(model):
    batch = make_batch(model.config)
    out = model.eval()(**batch)
    assert out.logits.dtype == torch.float32 and out.aux_loss is None
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    manual = -torch.log_softmax(logits[keep].double(), -1).gather(1, labels[keep][:, None]).mean()
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-6)


def test_train_mode_adds_aux_loss_and_same_logits(model):
    batch = make_batch(model.config)
    ev = model.eval()(**batch)
    tr = model.train()(**batch)
    torch.testing.assert_close(tr.logits, ev.logits)  # no dropout: the modes differ only by the aux loss
    assert tr.aux_loss is not None and tr.aux_loss.item() > 0
    torch.testing.assert_close(tr.loss, tr.ce_loss + tr.aux_loss)


def test_every_trainable_parameter_gets_a_gradient(model):
    torch.manual_seed(1)
    batch = make_batch(model.config, T=64, crops=((2, 1), (1, 2)), starts=(1, 10))
    model.train()(**batch).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith("vision.attn_pool")]
    # 22 tokens x 3 slots over 8 experts: every expert is chosen at least once for this seed
    assert missing == []
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("vision.attn_pool"))
    if model.config.language_config.topk_method == "noaux_tc":
        bias = model.language.model.layers[1].mlp.gate.e_score_correction_bias
        assert not bias.requires_grad  # a buffer: steered by the balancing rule, not by gradients


def test_images_land_at_the_masked_positions(model):
    batch = make_batch(model.config)
    embeds = model.prepare_inputs_embeds(batch["input_ids"], batch["images"], batch["images_seq_mask"],
                                         batch["images_spatial_crop"])
    text = model.language.model.embed_tokens(batch["input_ids"])
    mask = batch["images_seq_mask"]
    torch.testing.assert_close(embeds[~mask], text[~mask])
    tokens = model.encode_images(batch["images"], batch["images_spatial_crop"].tolist())
    torch.testing.assert_close(embeds[0][mask[0]], tokens[0])
    h = model.config.tokens_per_side
    torch.testing.assert_close(embeds[0][mask[0]][h], model.image_newline.detach())  # end of the first row
    torch.testing.assert_close(embeds[0][mask[0]][h * (h + 1)], model.view_seperator.detach())


def test_text_only_and_mixed_batches(model):
    text_only = make_batch(model.config, crops=((0, 0), (0, 0)))
    out = model(**text_only)
    plain = model(input_ids=text_only["input_ids"], labels=text_only["labels"])
    torch.testing.assert_close(out.logits, plain.logits)
    mixed = make_batch(model.config, crops=((0, 0), (2, 2)), starts=(0, 3))
    assert torch.isfinite(model(**mixed).loss)


def test_multi_image_sample():
    torch.manual_seed(0)
    model = DeepseekVLV2ForCausalLM(tiny_config("small", image_size=42))
    cfg = model.config
    n1, n2 = cfg.num_image_tokens(1, 1), cfg.num_image_tokens(1, 2)
    T = 5 + n1 + n2
    ids = torch.randint(3, 400, (1, T))
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, 2:2 + n1] = True
    mask[0, 4 + n1:4 + n1 + n2] = True
    images = torch.randn(1, 5, 3, 42, 42)
    crop = torch.tensor([[[1, 1], [1, 2]]])
    embeds = model.prepare_inputs_embeds(ids, images, mask, crop)
    first = model.encode_images(images[:, :2], [[[1, 1]]])[0]
    torch.testing.assert_close(embeds[0, 2:2 + n1], first)


def test_mask_and_image_count_mismatch_is_an_error(model):
    batch = make_batch(model.config)
    batch["images_seq_mask"][0, 40] = True  # one position too many
    with pytest.raises(ValueError, match="sample 0: images_seq_mask marks"):
        model(**batch)
    text_only = make_batch(model.config, crops=((0, 0), (0, 0)))
    text_only["images_seq_mask"][1, 3] = True
    with pytest.raises(ValueError, match="no images"):
        model(**text_only)


def test_right_padding_and_attention_mask_keep_real_logits(model):
    batch = make_batch(model.config, T=40, crops=((1, 1), (1, 1)), starts=(2, 2))
    short = {k: (v[:1, :30] if v.dim() == 2 else v[:1]) for k, v in batch.items()}
    padded = {k: v[:1] for k, v in batch.items()}
    attn = torch.zeros(1, 40, dtype=torch.long)
    attn[0, :30] = 1
    padded["labels"] = padded["labels"].clone()
    padded["labels"][0, 30:] = -100
    a = model.eval()(**short)
    b = model(**padded, attention_mask=attn)
    torch.testing.assert_close(b.logits[:, :30], a.logits, rtol=1e-5, atol=1e-5)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)


def test_bf16_model_runs_with_fp32_logits_and_loss():
    torch.manual_seed(0)
    model = DeepseekVLV2ForCausalLM(tiny_config("base", image_size=42)).to(torch.bfloat16).train()
    batch = make_batch(model.config)
    out = model(**batch)
    assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32
    out.loss.backward()
    ref = DeepseekVLV2ForCausalLM(tiny_config("base", image_size=42))
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert abs(ref.train()(**batch).ce_loss.item() - out.ce_loss.item()) < 0.05


def test_causal_lm_loss_sum_and_ignore():
    logits = torch.randn(2, 4, 10)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, 4]])
    s = causal_lm_loss(logits, labels, reduction="sum")
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(s, want)
    assert causal_lm_loss(logits, labels).item() == pytest.approx(s.item() / 4)


# --- checkpoints ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("like", ["tiny", "small", "base"])
def test_save_pretrained_of_from_pretrained_is_bit_identical(tiny_ckpt, tmp_path, like):
    src = tiny_ckpt(like=like, image_size=42, dtype="bf16", max_shard_size=200_000)
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):06d}.safetensors")
    model = DeepseekVLV2ForCausalLM.from_pretrained(src)
    assert model.image_newline.dtype == torch.bfloat16
    out = tmp_path / "again"
    model.save_pretrained(str(out), max_shard_size=200_000)
    for name in shards + [INDEX_NAME, "config.json"]:
        assert filecmp.cmp(os.path.join(src, name), out / name, shallow=False), name


def test_from_pretrained_single_file_and_dtype(tiny_ckpt):
    src = tiny_ckpt(like="base", image_size=42, dtype="bf16", single_file=True)
    assert not os.path.exists(os.path.join(src, INDEX_NAME))
    model = DeepseekVLV2ForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    stored = load_file(os.path.join(src, "model.safetensors"))
    torch.testing.assert_close(model.state_dict()["language.lm_head.weight"], stored["language.lm_head.weight"].float())
    assert "language.model.layers.1.mlp.gate.e_score_correction_bias" in stored
    assert "vision.attn_pool.latent" in stored


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_strict_loading_errors_name_the_key(tiny_ckpt, tmp_path):
    src = tiny_ckpt(like="tiny", image_size=42, single_file=True)
    bad = _copy(src, tmp_path / "missing")
    sd = load_file(os.path.join(bad, "model.safetensors"))
    sd.pop("language.model.layers.2.mlp.experts.3.up_proj.weight")
    sd["language.model.layers.9.extra.weight"] = torch.zeros(1)
    save_file(sd, os.path.join(bad, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)experts\.3\.up_proj.*layers\.9\.extra"):
        DeepseekVLV2ForCausalLM.from_pretrained(bad)

    bad = _copy(src, tmp_path / "shape")
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["language_config"]["moe_intermediate_size"] = 16
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"has shape .* config\.json implies"):
        DeepseekVLV2ForCausalLM.from_pretrained(bad)

    bad = _copy(src, tmp_path / "truncated")
    path = os.path.join(bad, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        DeepseekVLV2ForCausalLM.from_pretrained(bad)
