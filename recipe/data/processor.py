"""DeepSeek-VL2's processor: conversation + PIL images -> token ids, labels, image tiles and masks.

Reproduces ``deepseek_vl2.models.processing_deepseek_vl_v2.DeepseekVLV2Processor`` (the ``conversations=`` path
that training uses): same token ids, labels, masks and pixel values. Differences, all deliberate:

- ``__call__`` returns the single sample (the original wraps it in a left-padded batch by default);
  :meth:`DeepseekVLV2Processor.batchify` pads right by default (left padding shifts RoPE positions in training,
  and the original's left-padded ``images_seq_mask`` comes back as int64).
- More images than ``<image>`` placeholders is an error (the original ignores the extra images silently, while
  still counting them in the "at most 2 images -> crop" rule).
- Optional truncation to ``max_seq_len`` that never cuts through an image span (see :meth:`process_one`).
- No torchvision, no transformers tokenizer classes (see ``image.py`` and ``tokenizer.py``).

Per-sample shapes: T tokens, N tiles = sum over images of (1 + width_tiles * height_tiles), S tile size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

import torch
from PIL import Image

from recipe.config import VL2Config
from recipe.data.conversation import ASSISTANT, USER, ConversationError, format_sft_prompt, format_user_turn, role_kind
from recipe.data.image_io import to_rgb
from recipe.data.processor_config import ProcessorConfig
from recipe.data.tiling import ImageTiler
from recipe.data.tokenizer import TextTokenizer, add_processor_tokens

logger = logging.getLogger(__name__)


class SampleTooLongError(ValueError):
    """No prefix of complete turns fits ``max_seq_len`` (the first exchange alone is longer)."""


@dataclass(frozen=True)
class SampleSize:
    """What one processed conversation occupies (:meth:`DeepseekVLV2Processor.measure`): tokens (after truncation),
    real tiles (1 + width_tiles x height_tiles per kept image; a text-only sample has none), kept images, messages
    dropped by truncation."""

    num_tokens: int
    num_tiles: int
    num_images: int
    num_turns_dropped: int = 0


@dataclass
class ProcessorOutput:
    """One processed conversation.

    input_ids: [T] int64; image positions hold the ``<image>`` id.
    target_ids: [T] int64 labels aligned with ``input_ids`` (not shifted); ``ignore_id`` at image positions and,
        with ``mask_prompt``, over system and user turns.
    images: [N, 3, S, S] float32 in [-1, 1]; a text-only sample gets one zero tile.
    images_seq_mask: [T] bool, True at image-token positions.
    images_spatial_crop: [n_images, 2] int64 (width_tiles, height_tiles); text-only: [[0, 0]].
    num_image_tokens: image-token count of each image.
    sft_format: the human-readable prompt string (not what is tokenised).
    num_turns_dropped: trailing messages removed by truncation (0 when the sample fits).
    """

    input_ids: torch.Tensor
    target_ids: torch.Tensor
    images: torch.Tensor
    images_seq_mask: torch.Tensor
    images_spatial_crop: torch.Tensor
    num_image_tokens: list
    sft_format: str = ""
    num_turns_dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, key):
        return getattr(self, key)

    def keys(self):
        return [f for f in self.__dataclass_fields__]


@dataclass
class _Builder:
    """Token stream under construction, with the boundaries truncation may cut at."""

    ids: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    mask: list = field(default_factory=list)
    tiles: list = field(default_factory=list)
    crops: list = field(default_factory=list)
    n_image_tokens: list = field(default_factory=list)
    # After each complete assistant turn: (token count, image count, message count).
    cuts: list = field(default_factory=list)

    def add_text(self, ids: list, labels: Optional[list] = None) -> None:
        self.ids += ids
        self.labels += ids if labels is None else labels
        self.mask += [False] * len(ids)


class DeepseekVLV2Processor:
    """Conversation + images -> model inputs (see the module docstring).

    Build it with :meth:`from_pretrained` from a checkpoint directory (tokenizer files + ``processor_config.json``).
    """

    def __init__(self, tokenizer: TextTokenizer, config: ProcessorConfig, tokens_per_side: Optional[int] = None,
                 max_seq_len: Optional[int] = None):
        """
        Args:
            tokenizer: the checkpoint's tokenizer; the processor's special tokens are added to it if missing.
            config: ``processor_config.json`` (``mask_prompt`` decides prompt masking).
            tokens_per_side: image tokens per view side; default ceil((S // patch_size) / downsample_ratio), the
                original's formula (14 for S = 384).
            max_seq_len: truncate longer samples at a turn boundary (None: never truncate).
        """
        self.config = config
        self.tokenizer = tokenizer
        add_processor_tokens(tokenizer, config.pad_token, config.image_token)
        self.image_size = config.image_size
        self.image_token = config.image_token
        self.image_token_id = tokenizer.token_to_id(config.image_token)
        self.ignore_id = config.ignore_id
        self.mask_prompt = bool(config.mask_prompt)
        self.max_seq_len = max_seq_len
        S = self.image_size
        self.tokens_per_side = tokens_per_side or -(-(S // config.patch_size) // config.downsample_ratio)
        self.tiler = ImageTiler(config.candidate_resolutions, S, config.image_mean, config.image_std,
                                config.normalize)
        for name in ("bos_id", "eos_id", "pad_id"):
            if getattr(self, name) is None:
                raise ValueError(f"tokenizer has no {name[:3]} token; the processor needs bos, eos and pad")

    @classmethod
    def from_pretrained(cls, path: str, *, mask_prompt: Optional[bool] = None, max_seq_len: Optional[int] = None,
                        **config_overrides) -> "DeepseekVLV2Processor":
        """Read ``tokenizer.json`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``) and
        ``processor_config.json`` from a checkpoint directory (a released one or a tiny one).

        ``mask_prompt``: override the config's value (released: false, i.e. prompts are trained; answer-only SFT
        passes True). ``config_overrides``: other ``processor_config.json`` keys to override.
        """
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a checkpoint directory")
        raw = ProcessorConfig.from_json(path).to_dict()
        raw.update(config_overrides)
        if mask_prompt is not None:
            raw["mask_prompt"] = bool(mask_prompt)
        config = ProcessorConfig.from_dict(raw)
        tokens_per_side = None
        if os.path.isfile(os.path.join(path, "config.json")):
            model_cfg = VL2Config.from_json(path, validate=False)
            tokens_per_side = model_cfg.tokens_per_side
            if model_cfg.vision_config.image_size != config.image_size:
                raise ValueError(f"{path}: processor_config.json tiles are {config.image_size} px but "
                                 f"config.json's vision tower takes {model_cfg.vision_config.image_size} px")
        return cls(TextTokenizer.from_dir(path), config, tokens_per_side=tokens_per_side, max_seq_len=max_seq_len)

    # --- ids -----------------------------------------------------------------------------------------------
    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list:
        ids = self.tokenizer.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids, **kw) -> str:
        return self.tokenizer.decode(ids, **kw)

    def num_image_tokens(self, width_tiles: int, height_tiles: int) -> int:
        """Global view h x (h + 1) (a newline per row) + 1 separator + local grid (th*h) x (tw*h + 1)."""
        h = self.tokens_per_side
        return h * (h + 1) + 1 + (height_tiles * h) * (width_tiles * h + 1)

    # --- one sample ----------------------------------------------------------------------------------------
    def _tokenize_user(self, b: _Builder, text: str, images: Sequence, cropping: bool) -> None:
        """Encode the text pieces between ``<image>`` placeholders separately and insert each image's tokens.
        ``images``: PIL images, or (width, height) sizes when only measuring (:meth:`measure`: no tiles)."""
        pieces = text.split(self.image_token)
        for piece, img in zip(pieces, images):
            b.add_text(self.encode(piece))
            if isinstance(img, Image.Image):
                views = self.tiler(to_rgb(img), cropping=cropping)
                tw, th = views.width_tiles, views.height_tiles
                b.tiles.append(views.tiles)
            else:
                tw, th = self.tiler.grid(img, cropping=cropping)
            n = self.num_image_tokens(tw, th)
            b.ids += [self.image_token_id] * n
            b.labels += [self.image_token_id] * n  # masked below, with every image-token position
            b.mask += [True] * n
            b.crops.append([tw, th])
            b.n_image_tokens.append(n)
        b.add_text(self.encode(pieces[-1]))

    def process_one(self, conversations: Sequence[dict], images: Optional[Sequence[Image.Image]] = None,
                    inference_mode: bool = True, system_prompt: str = "") -> ProcessorOutput:
        """Tokenise one conversation (the original's ``format_messages_v2``).

        Args:
            conversations: messages ``{"role", "content"}`` (roles: ``<|User|>``/``user``,
                ``<|Assistant|>``/``assistant``, ``system`` first only). ``<image>`` placeholders in user turns
                take the images in order.
            images: PIL images, one per placeholder, in order (other modes are converted as
                :func:`recipe.data.image_io.to_rgb` documents; the original expects RGB).
            inference_mode: drop the final EOS (the conversation must end with an assistant turn, empty for
                generation); training passes False. The original's default is True.
            system_prompt: only changes ``sft_format`` (as in the original, it never reaches the tokens).

        Truncation (``max_seq_len`` set and the sample longer): keep the longest prefix of whole messages that
        ends with an assistant turn and fits; images of dropped turns are dropped with them, so no image span is
        ever cut. If not even the first exchange fits, raise :class:`SampleTooLongError`.
        """
        b, n_tok, n_img, dropped = self._build(conversations, list(images or []), inference_mode)
        input_ids = torch.tensor(b.ids, dtype=torch.long)
        target_ids = torch.tensor(b.labels, dtype=torch.long)
        seq_mask = torch.tensor(b.mask, dtype=torch.bool)
        target_ids[(input_ids < 0) | (input_ids == self.image_token_id)] = self.ignore_id
        input_ids[input_ids < 0] = self.pad_id
        input_ids, target_ids, seq_mask = input_ids[:n_tok], target_ids[:n_tok], seq_mask[:n_tok]
        tiles, crops, n_img_tokens = b.tiles[:n_img], b.crops[:n_img], b.n_image_tokens[:n_img]
        if tiles:
            all_tiles = tiles[0] if len(tiles) == 1 else torch.cat(tiles)
            spatial = torch.tensor(crops, dtype=torch.long)
        else:
            all_tiles = torch.zeros(1, 3, self.image_size, self.image_size)
            spatial = torch.zeros(1, 2, dtype=torch.long)
        return ProcessorOutput(input_ids=input_ids, target_ids=target_ids, images=all_tiles,
                               images_seq_mask=seq_mask, images_spatial_crop=spatial,
                               num_image_tokens=list(n_img_tokens),
                               sft_format=format_sft_prompt(conversations, system_prompt),
                               num_turns_dropped=dropped)

    def measure(self, conversations: Sequence[dict], image_sizes: Sequence[Sequence[int]],
                inference_mode: bool = False) -> "SampleSize":
        """What :meth:`process_one` would produce for these messages and images of these (width, height) sizes,
        without pixels: the same code path (tokenisation, tiling grid, truncation), so the two agree by
        construction. Raises what :meth:`process_one` raises (SampleTooLongError, ConversationError, ValueError
        for an empty image). Training measures with ``inference_mode=False``, its default here."""
        b, n_tok, n_img, dropped = self._build(conversations, [tuple(s) for s in image_sizes], inference_mode)
        return SampleSize(num_tokens=n_tok, num_tiles=sum(1 + w * h for w, h in b.crops[:n_img]), num_images=n_img,
                          num_turns_dropped=dropped)

    def _build(self, conversations: Sequence[dict], images: list, inference_mode: bool) -> tuple:
        """The token stream of a conversation and where truncation cuts it: (builder, kept tokens, kept images,
        messages dropped). ``images``: PIL images or (width, height) sizes."""
        n_placeholders = sum(str(m.get("content", "")).count(self.image_token)
                             for i, m in enumerate(conversations) if role_kind(m.get("role"), i) == USER)
        if n_placeholders != len(images):
            raise ConversationError(f"conversation has {n_placeholders} {self.image_token} placeholders in user "
                                    f"turns but {len(images)} images were given")
        cropping = len(images) <= 2
        b = _Builder()
        b.add_text([self.bos_id])
        used = 0
        for idx, message in enumerate(conversations):
            kind = role_kind(message.get("role"), idx)
            if "content" not in message:
                raise ConversationError(f"message {idx}: no 'content'")
            if kind == USER:
                text = format_user_turn(message["content"])
                n = text.count(self.image_token)
                start = len(b.labels)
                self._tokenize_user(b, text, images[used: used + n], cropping)
                used += n
                if self.mask_prompt:
                    b.labels[start:] = [self.ignore_id] * (len(b.labels) - start)
            elif kind == ASSISTANT:
                text = message["content"].strip()
                if self.image_token in text:
                    raise ConversationError(f"message {idx}: {self.image_token} in an assistant turn; images "
                                            f"belong to user turns")
                b.add_text(self.encode(text, eos=True))
                b.cuts.append((len(b.ids), len(b.crops), idx + 1))
            else:  # system
                if idx != 0:
                    raise ConversationError(f"message {idx}: a system message is only allowed first")
                ids = self.encode(message["content"].strip())
                b.add_text(ids, [self.ignore_id] * len(ids) if self.mask_prompt else None)

        n_total = len(b.ids)
        if inference_mode:
            if b.ids[-1] != self.eos_id:
                raise ConversationError("inference_mode=True drops the final EOS, so the conversation must end "
                                        "with an assistant turn (empty to generate its answer)")
            n_total -= 1
        n_tok, n_img, dropped = n_total, len(b.crops), 0
        if self.max_seq_len is not None and n_total > self.max_seq_len:
            # (kept length, images, messages) after each assistant turn; the last one lost its EOS in inference mode
            cuts = [(n - int(inference_mode and n == len(b.ids)), n_img, n_msg) for n, n_img, n_msg in b.cuts]
            fits = [c for c in cuts if c[0] <= self.max_seq_len]
            if not fits:
                need = cuts[0][0] if cuts else n_total
                raise SampleTooLongError(f"{n_total} tokens > max_seq_len={self.max_seq_len}, and the first "
                                         f"exchange alone needs {need}: nothing can be kept without cutting a turn")
            n_tok, n_img, n_msg = fits[-1]
            dropped = len(conversations) - n_msg
        return b, n_tok, n_img, dropped

    def fingerprint(self) -> str:
        """A digest of everything that decides sample lengths and contents: the processor config, tokens per view
        side, ``max_seq_len``, ``mask_prompt`` and the tokenizer (vocabulary, added and special tokens). The
        length index is cached under it."""
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps({"config": self.config.to_dict(), "tokens_per_side": self.tokens_per_side,
                             "max_seq_len": self.max_seq_len, "mask_prompt": self.mask_prompt,
                             "special": self.tokenizer.special}, sort_keys=True, default=str).encode())
        h.update(self.tokenizer.backend.to_str().encode())
        return h.hexdigest()

    def __call__(self, *, conversations: Sequence[dict], images: Optional[Sequence[Image.Image]] = None,
                 inference_mode: bool = True, system_prompt: str = "") -> ProcessorOutput:
        """Same as :meth:`process_one` (keyword-only, like the original's ``__call__``; its ``prompt=`` path and
        ``force_batchify`` are not offered: pass ``conversations=`` and call :meth:`batchify` yourself)."""
        return self.process_one(conversations, images, inference_mode=inference_mode, system_prompt=system_prompt)

    # --- batches -------------------------------------------------------------------------------------------
    def batchify(self, samples: Sequence[ProcessorOutput], padding: Literal["right", "left"] = "right",
                 pad_to: Optional[int] = None) -> dict:
        """Pad samples into a batch.

        Right padding (default): ids with ``pad_id``, labels with ``ignore_id``, ``images_seq_mask`` with False at
        the end of each row. ``pad_to`` pads T further (to a bucket length); it must be >= the longest sample.
        Tiles are padded with zero tiles to the largest tile count, ``images_spatial_crop`` with (0, 0) rows.

        Returns: ``input_ids`` [B, T] int64, ``labels`` [B, T] int64, ``attention_mask`` [B, T] bool,
        ``images_seq_mask`` [B, T] bool, ``images`` [B, max_tiles, 3, S, S] float32, ``images_spatial_crop``
        [B, max_images, 2] int64, ``seq_lens`` list[int], ``sft_format`` list[str].
        """
        return pad_samples(samples, self.pad_id, self.ignore_id, padding=padding, pad_to=pad_to)


def pad_samples(samples: Sequence, pad_id: int, ignore_id: int = -100,
                padding: Literal["right", "left"] = "right", pad_to: Optional[int] = None) -> dict:
    """Pad processed samples (:class:`ProcessorOutput`, or dicts with its keys) into a batch; see
    :meth:`DeepseekVLV2Processor.batchify`."""
    if not samples:
        raise ValueError("batchify needs at least one sample")
    if padding not in ("right", "left"):
        raise ValueError(f"padding={padding!r}: expected 'right' or 'left'")
    seq_lens = [len(s["input_ids"]) for s in samples]
    T = max(seq_lens)
    if pad_to is not None:
        if pad_to < T:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sample ({T} tokens)")
        T = pad_to
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), ignore_id, dtype=torch.long)
    seq_mask = torch.zeros(B, T, dtype=torch.bool)
    attention = torch.zeros(B, T, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(samples, seq_lens)):
        sl = slice(0, n) if padding == "right" else slice(T - n, T)
        input_ids[i, sl] = s["input_ids"]
        labels[i, sl] = s["target_ids"]
        seq_mask[i, sl] = s["images_seq_mask"]
        attention[i, sl] = True
    max_tiles = max(s["images"].shape[0] for s in samples)
    images = torch.zeros(B, max_tiles, *samples[0]["images"].shape[1:], dtype=samples[0]["images"].dtype)
    max_images = max(s["images_spatial_crop"].shape[0] for s in samples)
    spatial = torch.zeros(B, max_images, 2, dtype=torch.long)
    for i, s in enumerate(samples):
        images[i, : s["images"].shape[0]] = s["images"]
        spatial[i, : s["images_spatial_crop"].shape[0]] = s["images_spatial_crop"]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "images_seq_mask": seq_mask,
            "images": images, "images_spatial_crop": spatial, "seq_lens": seq_lens,
            "sft_format": [s.get("sft_format", "") if isinstance(s, dict) else s.sft_format for s in samples]}
