"""The processor: token layout, label masking rules, image token counts, multi-image rules, truncation, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from recipe.config import VL2Config
from recipe.data import ConversationError, DeepseekVLV2Processor, SampleTooLongError
from recipe.data.conversation import ASSISTANT_ROLE as A
from recipe.data.conversation import USER_ROLE as U

IGNORE = -100


@pytest.fixture(scope="module")
def ckpt42(tiny_ckpt):
    return tiny_ckpt(image_size=42)


@pytest.fixture(scope="module")
def proc(ckpt42):
    return DeepseekVLV2Processor.from_pretrained(ckpt42)


def _img(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _ids(proc, text):
    return proc.tokenizer.encode(text)


def test_from_pretrained_reads_the_checkpoint(proc, ckpt42):
    assert proc.image_size == 42 and proc.tokens_per_side == 2
    assert (proc.bos_id, proc.eos_id, proc.pad_id) == (0, 1, 2)
    assert proc.image_token_id == proc.tokenizer.token_to_id("<image>")
    assert proc.mask_prompt is False  # the released processor_config.json value
    assert DeepseekVLV2Processor.from_pretrained(ckpt42, mask_prompt=True).mask_prompt is True
    with pytest.raises(FileNotFoundError):
        DeepseekVLV2Processor.from_pretrained(ckpt42 + "-missing")


def test_text_only_layout_and_labels(proc):
    conv = [{"role": U, "content": " Hi there "}, {"role": A, "content": " Hello. "}]
    out = proc(conversations=conv, images=[], inference_mode=False)
    user = _ids(proc, "<|User|>: Hi there\n\n<|Assistant|>:")
    answer = _ids(proc, "Hello.") + [proc.eos_id]
    assert out.input_ids.tolist() == [proc.bos_id] + user + answer
    assert out.input_ids.dtype == torch.long and out.target_ids.dtype == torch.long
    assert out.target_ids.tolist() == out.input_ids.tolist()  # mask_prompt=False: everything is a target
    assert not out.images_seq_mask.any() and out.images_seq_mask.dtype == torch.bool
    assert out.images.shape == (1, 3, 42, 42) and not out.images.any()
    assert out.images_spatial_crop.tolist() == [[0, 0]] and out.num_image_tokens == []


def test_mask_prompt_masks_user_and_system_turns_but_not_bos(ckpt42):
    proc = DeepseekVLV2Processor.from_pretrained(ckpt42, mask_prompt=True)
    conv = [{"role": "system", "content": "Be brief."}, {"role": U, "content": "Q1"}, {"role": A, "content": "A1"},
            {"role": U, "content": "Q2"}, {"role": A, "content": "A2"}]
    out = proc(conversations=conv, inference_mode=False)
    sys_ids, q1 = _ids(proc, "Be brief."), _ids(proc, "<|User|>: Q1\n\n<|Assistant|>:")
    a1, q2 = _ids(proc, "A1") + [proc.eos_id], _ids(proc, "<|User|>: Q2\n\n<|Assistant|>:")
    a2 = _ids(proc, "A2") + [proc.eos_id]
    assert out.input_ids.tolist() == [proc.bos_id] + sys_ids + q1 + a1 + q2 + a2  # no separator after system
    masked = [IGNORE] * (len(sys_ids) + len(q1))
    assert out.target_ids.tolist() == [proc.bos_id] + masked + a1 + [IGNORE] * len(q2) + a2


def test_single_image_span(proc):
    img = _img(100, 60)
    conv = [{"role": U, "content": "<image>\nDescribe."}, {"role": A, "content": "A box."}]
    out = proc(conversations=conv, images=[img], inference_mode=False)
    tw, th = out.images_spatial_crop[0].tolist()
    n = proc.num_image_tokens(tw, th)
    assert out.num_image_tokens == [n] and int(out.images_seq_mask.sum()) == n
    assert out.images.shape == (1 + tw * th, 3, 42, 42) and out.images.dtype == torch.float32
    pre = _ids(proc, "<|User|>: ")
    start = 1 + len(pre)
    assert out.input_ids[:start].tolist() == [proc.bos_id] + pre
    assert torch.all(out.input_ids[start:start + n] == proc.image_token_id)
    assert out.images_seq_mask[start:start + n].all() and out.images_seq_mask.sum() == n
    assert torch.all(out.target_ids[out.images_seq_mask] == IGNORE)
    # text on each side of the image is encoded separately
    assert out.input_ids[start + n:].tolist()[: len(_ids(proc, "\nDescribe."))] == _ids(proc, "\nDescribe.")


@pytest.mark.parametrize("tw, th, n", [(1, 1, 421), (2, 1, 617), (1, 2, 631), (2, 2, 1023), (3, 2, 1415),
                                       (3, 3, 2017), (1, 9, 2101)])
def test_image_token_count_formula_at_384(tw, th, n):
    cfg = VL2Config.from_dict({"tile_tag": "2D", "vision_config": {"image_size": 384, "patch_size": 14,
                                                                   "width": 1152, "heads": 16},
                               "projector_config": {"input_dim": 1152, "n_embed": 2048},
                               "language_config": {"hidden_size": 2048}}, validate=False)
    assert cfg.tokens_per_side == 14 and cfg.num_image_tokens(tw, th) == n


def test_processor_token_count_at_384(tiny_ckpt):
    proc = DeepseekVLV2Processor.from_pretrained(tiny_ckpt(image_size=384))
    assert proc.tokens_per_side == 14
    out = proc(conversations=[{"role": U, "content": "<image>"}, {"role": A, "content": ""}],
               images=[_img(800, 600)])  # (1152, 768) canvas: 3 x 2 tiles
    assert out.images_spatial_crop.tolist() == [[3, 2]] and out.num_image_tokens == [1415]
    assert out.images.shape == (7, 3, 384, 384)


def test_three_images_are_not_cropped_and_two_are(proc):
    imgs = [_img(100, 40, k) for k in range(3)]
    conv3 = [{"role": U, "content": "<image><image>"}, {"role": A, "content": "x"},
             {"role": U, "content": "and <image>"}, {"role": A, "content": "y"}]
    out = proc(conversations=conv3, images=imgs, inference_mode=False)
    # "At most 2 images" counts the whole conversation, not the turn.
    assert out.images_spatial_crop.tolist() == [[1, 1]] * 3 and out.images.shape[0] == 6
    out2 = proc(conversations=[{"role": U, "content": "<image> <image>"}, {"role": A, "content": "z"}],
                images=imgs[:2], inference_mode=False)
    assert out2.images_spatial_crop.tolist() == [[3, 1], [3, 1]]


def test_inference_mode_drops_the_final_eos(proc):
    conv = [{"role": U, "content": "Hi"}, {"role": A, "content": ""}]
    train = proc(conversations=conv, inference_mode=False)
    infer = proc(conversations=conv, inference_mode=True)
    assert train.input_ids[-1] == proc.eos_id and torch.equal(infer.input_ids, train.input_ids[:-1])
    with pytest.raises(ConversationError, match="must end with an assistant turn"):
        proc(conversations=[{"role": U, "content": "Hi"}], inference_mode=True)


@pytest.mark.parametrize("conv, images, match", [
    ([{"role": "bot", "content": "x"}], [], "unknown role"),
    ([{"role": U, "content": "<image>"}, {"role": A, "content": "x"}], [], "1 <image> placeholders .* 0 images"),
    ([{"role": U, "content": "hi"}, {"role": A, "content": "x"}], ["img"], "0 <image> placeholders .* 1 images"),
    ([{"role": U, "content": "q"}, {"role": A, "content": "<image>"}], [], "assistant turn"),
    ([{"role": U, "content": "q"}, {"role": "system", "content": "s"}], [], "only allowed first"),
])
def test_conversation_errors(proc, conv, images, match):
    images = [_img(10, 10) for _ in images]
    with pytest.raises(ConversationError, match=match):
        proc(conversations=conv, images=images, inference_mode=False)


def test_non_rgb_images_are_converted(proc):
    img = _img(50, 30)
    conv = [{"role": U, "content": "<image>"}, {"role": A, "content": "x"}]
    ref = proc(conversations=conv, images=[img.convert("L").convert("RGB")], inference_mode=False)
    out = proc(conversations=conv, images=[img.convert("L")], inference_mode=False)
    assert torch.equal(ref.images, out.images)


def test_extreme_images_1x1_and_10000x100(proc):
    conv = [{"role": U, "content": "<image>"}, {"role": A, "content": "x"}]
    for w, h in ((1, 1), (10000, 100), (100, 10000)):
        out = proc(conversations=conv, images=[_img(w, h)], inference_mode=False)
        tw, th = out.images_spatial_crop[0].tolist()
        assert out.images.shape[0] == 1 + tw * th and int(out.images_seq_mask.sum()) == proc.num_image_tokens(tw, th)
        assert torch.isfinite(out.images).all()


class TestTruncation:
    def _conv(self):
        return [{"role": U, "content": "<image>\nFirst question?"}, {"role": A, "content": "First answer."},
                {"role": U, "content": "<image>\nSecond question?"}, {"role": A, "content": "Second answer."}]

    def test_fits_unchanged(self, ckpt42, proc):
        imgs = [_img(60, 60, 1), _img(90, 40, 2)]
        full = proc(conversations=self._conv(), images=imgs, inference_mode=False)
        p = DeepseekVLV2Processor.from_pretrained(ckpt42, max_seq_len=len(full))
        out = p(conversations=self._conv(), images=imgs, inference_mode=False)
        assert out.num_turns_dropped == 0 and torch.equal(out.input_ids, full.input_ids)

    def test_shortened_at_a_turn_boundary_with_its_images(self, ckpt42, proc):
        imgs = [_img(60, 60, 1), _img(90, 40, 2)]
        full = proc(conversations=self._conv(), images=imgs, inference_mode=False)
        first = proc(conversations=self._conv()[:2], images=imgs[:1], inference_mode=False)
        # A limit that falls inside the second image span: the whole second exchange goes, not half an image.
        limit = len(first) + 10
        assert full.images_seq_mask[limit - 1]
        p = DeepseekVLV2Processor.from_pretrained(ckpt42, max_seq_len=limit)
        out = p(conversations=self._conv(), images=imgs, inference_mode=False)
        assert out.num_turns_dropped == 2
        assert torch.equal(out.input_ids, full.input_ids[: len(first)])
        assert out.input_ids[-1] == proc.eos_id
        assert torch.equal(out.images, first.images)
        assert out.images_spatial_crop.tolist() == first.images_spatial_crop.tolist()
        assert int(out.images_seq_mask.sum()) == sum(out.num_image_tokens)

    def test_first_exchange_too_long_is_dropped(self, ckpt42):
        p = DeepseekVLV2Processor.from_pretrained(ckpt42, max_seq_len=20)
        with pytest.raises(SampleTooLongError, match="max_seq_len=20"):
            p(conversations=self._conv(), images=[_img(60, 60), _img(60, 60)], inference_mode=False)


def test_batchify_right_padding(proc):
    a = proc(conversations=[{"role": U, "content": "<image>"}, {"role": A, "content": "x"}], images=[_img(90, 40)],
             inference_mode=False)
    b = proc(conversations=[{"role": U, "content": "Hi"}, {"role": A, "content": "Hello there"}],
             inference_mode=False)
    batch = proc.batchify([a, b])
    T = max(len(a), len(b))
    assert batch["input_ids"].shape == (2, T) and batch["seq_lens"] == [len(a), len(b)]
    assert batch["input_ids"][1, len(b):].eq(proc.pad_id).all()
    assert batch["labels"][1, len(b):].eq(IGNORE).all()
    assert batch["images_seq_mask"].dtype == torch.bool and not batch["images_seq_mask"][1].any()
    assert batch["attention_mask"].sum(1).tolist() == [len(a), len(b)]
    assert batch["images"].shape == (2, a.images.shape[0], 3, 42, 42)
    assert not batch["images"][1].any()
    assert batch["images_spatial_crop"].tolist() == [a.images_spatial_crop.tolist(), [[0, 0]]]
    left = proc.batchify([a, b], padding="left")
    assert torch.equal(left["input_ids"][1, T - len(b):], b.input_ids)
    with pytest.raises(ValueError, match="shorter than the longest"):
        proc.batchify([a, b], pad_to=T - 1)
