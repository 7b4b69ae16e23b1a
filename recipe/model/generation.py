"""KV-cached decoding for DeepSeek-VL2: per-layer caches for MHA and MLA, and greedy or sampled generation over a
batch of prompts (images included) that stops each row at EOS.

Caches (one per decoder layer, slots preallocated for prompt + new tokens, allocated on the layer's own device the
first time it writes, so a model spread over devices keeps each layer's cache beside it):

- MHA (tiny): post-RoPE keys and values per KV head, [B, H_kv, L, d] each (2 H_kv d values per token and layer).
- MLA (small/base): the normalised latent c = kv_a_layernorm(kv_a_proj(x)[:r]) [B, L, r] and the post-RoPE shared
  rope key [B, L, dr]: r + dr values per token and layer (576 for the released sizes) instead of the up-projected
  H (dn + dr + dv) (5,120 for small, 10,240 for base). The latent is stored *after* its RMSNorm because that is
  exactly what ``kv_b_proj`` reads: later steps recompute k_nope / v from it (up-projected form), or use it
  directly as the latent key and value (absorbed form), without renormalising the history every step.

Batches are left-padded (every row's last prompt token is the last column, so all rows write the same cache slot
at every decode step); right-padded input is moved to the left first. A token's RoPE position counts the real
tokens before it, so padding never shifts positions, and keys at padding slots are masked out.

The prefill runs the model's normal path (``prepare_inputs_embeds`` scatters the image tokens, then the decoder
with the cache); each decode step feeds one token per row. Finished rows keep decoding (their tokens are replaced
by ``pad_token_id``) until every row has stopped or ``max_new_tokens`` is reached.

Shapes: B batch, T tokens this step, S cached slots after this step, L slot capacity, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from recipe.config import LanguageConfig


# --- caches --------------------------------------------------------------------------------------------------------
class MHALayerCache:
    """One MHA layer's post-RoPE keys and values, [B, H_kv, L, d] each."""

    def __init__(self, owner: "KVCache"):
        self.owner = owner
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def update(self, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values at the next T slots; returns every filled slot's, [B, H_kv, S, d]."""
        start, end = self.owner.slots(k_BHTd.shape[2])
        if self.k is None:
            B, H, _, d = k_BHTd.shape
            self.k = k_BHTd.new_empty(B, H, self.owner.capacity, d)
            self.v = v_BHTd.new_empty(B, H, self.owner.capacity, v_BHTd.shape[-1])
        self.k[:, :, start:end] = k_BHTd
        self.v[:, :, start:end] = v_BHTd
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)


class MLALayerCache:
    """One MLA layer's normalised latents [B, L, r] and post-RoPE shared rope keys [B, L, dr]."""

    def __init__(self, owner: "KVCache"):
        self.owner = owner
        self.latent: Optional[torch.Tensor] = None
        self.k_rope: Optional[torch.Tensor] = None

    def update(self, latent_BTr: torch.Tensor, k_rope_BTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's latents and rope keys; returns every filled slot's, [B, S, r] and [B, S, dr]."""
        start, end = self.owner.slots(latent_BTr.shape[1])
        if self.latent is None:
            B, _, r = latent_BTr.shape
            self.latent = latent_BTr.new_empty(B, self.owner.capacity, r)
            self.k_rope = k_rope_BTd.new_empty(B, self.owner.capacity, k_rope_BTd.shape[-1])
        self.latent[:, start:end] = latent_BTr
        self.k_rope[:, start:end] = k_rope_BTd
        return self.latent[:, :end], self.k_rope[:, :end]

    @property
    def absorbed(self) -> bool:
        """Whether this step attends in the absorbed (latent-space) form: the cache's ``absorb`` setting, or by
        default when earlier tokens are cached (decode steps; the prefill up-projects, see :class:`KVCache`)."""
        return self.owner.absorb if self.owner.absorb is not None else self.owner.length > 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.latent, self.k_rope) if t is not None)


class KVCache:
    """The caches of every decoder layer for one batch, plus which slots hold real tokens.

    The decoder calls :meth:`begin` once per forward (it returns the attention mask over the cached slots), each
    attention layer calls its layer cache's ``update``, and :meth:`end` then advances :attr:`length`.

    Args:
        cfg: the language config (MHA or MLA, layer count).
        batch: rows.
        capacity: slots per row (prompt length + new tokens at most).
        absorb: MLA only: True = attend in the absorbed form at every step, False = always up-project the cached
            latents, None (default) = up-project in the prefill, absorb in decode steps. Absorbing multiplies the
            queries by the key half of ``kv_b_proj`` and the attention output by its value half, so a step costs
            O(S (r + dr)) per head instead of re-projecting all S cached latents (O(S r (dn + dv)) per head), but
            moving the queries into latent space and back costs O(r (dn + dv)) per query token: absorbing pays when
            few tokens attend over a long cache (below ~170 new tokens per step at the released sizes), while a
            prefill (T = S) is always cheaper up-projected. Both forms give the same result (tests check it).
    """

    def __init__(self, cfg: LanguageConfig, batch: int, capacity: int, absorb: Optional[bool] = None):
        self.batch, self.capacity, self.absorb = batch, capacity, absorb
        self.length = 0
        self.valid: Optional[torch.Tensor] = None  # [B, L] bool: slots that hold real (non-padding) tokens
        self._pending = 0
        layer_cls = MLALayerCache if cfg.use_mla else MHALayerCache
        self.layers = [layer_cls(self) for _ in range(cfg.num_hidden_layers)]

    def slots(self, num_tokens: int) -> tuple[int, int]:
        """[start, end) of the slots this step writes."""
        if num_tokens != self._pending:
            raise RuntimeError(f"a layer wrote {num_tokens} tokens in a step of {self._pending} (begin() not called?)")
        return self.length, self.length + num_tokens

    def begin(self, num_tokens: int, segment_ids_BT: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Start a step of ``num_tokens`` tokens per row (``segment_ids`` > 0 marks real tokens, None = all real).

        Returns the boolean "may attend" mask [B, 1, T, S]: a token sees the real tokens at or before its slot,
        and itself (so a padding row is never empty; nothing real ever attends to padding).
        """
        start, end = self.length, self.length + num_tokens
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} slots needed, capacity {self.capacity}")
        if self.valid is None:
            self.valid = torch.zeros(self.batch, self.capacity, dtype=torch.bool, device=device)
        self.valid[:, start:end] = True if segment_ids_BT is None else segment_ids_BT.to(self.valid.device) > 0
        q_slot = torch.arange(start, end, device=self.valid.device)[:, None]
        k_slot = torch.arange(end, device=self.valid.device)[None]
        may = ((k_slot <= q_slot)[None] & self.valid[:, None, :end]) | (k_slot == q_slot)[None]
        self._pending = num_tokens
        return may[:, None]

    def end(self) -> None:
        """Commit the step started by :meth:`begin`."""
        self.length += self._pending
        self._pending = 0

    def nbytes(self) -> int:
        """Bytes held by the layer caches (allocated at capacity)."""
        return sum(layer.nbytes() for layer in self.layers)


# --- token choice --------------------------------------------------------------------------------------------------
def select_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The next token of each row, [B] int64.

    ``temperature`` <= 0 is greedy (argmax). Otherwise the fp32 logits are divided by the temperature, limited to
    the ``top_k`` highest (0 = no limit) and to the smallest set whose probabilities add up to at least ``top_p``
    (nucleus; 1.0 = no limit; the most likely token is always kept), and one token is drawn with ``generator``
    (on the logits' device), so a seeded generator reproduces the draw.
    """
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before a token already reaches top_p
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


# --- batches -------------------------------------------------------------------------------------------------------
def to_left_padding(attention_mask_BT: torch.Tensor, *tensors_BT: Optional[torch.Tensor]) -> tuple:
    """Move each row's real tokens to the right end (left padding), in ``attention_mask`` and every [B, T]
    tensor given (ids, image masks, ...); rows already left-padded are unchanged. Real tokens must be contiguous
    (one run per row: right padding, left padding or none). Returns (mask, *tensors), None passed through."""
    real = attention_mask_BT.bool()
    B, T = real.shape
    lengths = real.sum(dim=1)
    starts = real.long().argmax(dim=1)  # first real token (0 for an empty row)
    cols = torch.arange(T, device=real.device)[None]
    if not torch.equal(real, (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])):
        raise ValueError("attention_mask has padding between real tokens; expected left or right padding")
    shift = T - starts - lengths  # how far right each row's run moves
    src = (cols - shift[:, None]) % T  # gather index: new[j] = old[j - shift]
    out = [real.gather(1, src).to(attention_mask_BT.dtype)]
    out += [None if t is None else t.gather(1, src.to(t.device)) for t in tensors_BT]
    return tuple(out)


@dataclass
class GenerationOutput:
    """tokens: [B, N] new tokens (N <= max_new_tokens), ``pad_token_id`` after a row's EOS.
    num_tokens: [B] tokens generated per row, its EOS included. finished: [B] bool, the row stopped at EOS.
    prompt_tokens: real (non-padding) prompt tokens in the batch. logits: [B, N, V] fp32 when requested."""

    tokens: torch.Tensor
    num_tokens: torch.Tensor
    finished: torch.Tensor
    prompt_tokens: int
    logits: Optional[torch.Tensor] = None

    def token_lists(self, strip_eos: bool = True) -> list[list[int]]:
        """Each row's generated ids (without the final EOS when ``strip_eos``)."""
        out = []
        for row, n, done in zip(self.tokens.tolist(), self.num_tokens.tolist(), self.finished.tolist()):
            out.append(row[: n - int(done and strip_eos)])
        return out


def input_device(model) -> torch.device:
    """Where the token embedding runs: its weight's device or, under accelerate's dispatch, its hook's execution
    device (an offloaded module keeps its weights elsewhere between calls)."""
    embed = model.language.get_input_embeddings()
    device = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else embed.weight.device


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             images: Optional[torch.Tensor] = None, images_seq_mask: Optional[torch.Tensor] = None,
             images_spatial_crop: Optional[torch.Tensor] = None, *, max_new_tokens: int = 16,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, absorb: Optional[bool] = None,
             output_logits: bool = False) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens per row with a KV cache.

    Args:
        model: a :class:`recipe.model.DeepseekVLV2ForCausalLM` (on one device, or spread by accelerate's
            ``dispatch_model``; inputs go to the device of the token embedding). It runs in eval mode here and
            gets its previous mode back afterwards.
        input_ids: [B, T] prompts, left- or right-padded (right padding is moved to the left).
        attention_mask: [B, T], 1/True at real tokens; None = no padding.
        images, images_seq_mask, images_spatial_crop: as for ``model.forward`` (None for text-only).
        max_new_tokens: new tokens per row at most.
        eos_token_id: stop token id(s); a row stops after emitting one. Default: the config's ``eos_token_id``;
            ``[]``: never stop early.
        pad_token_id: written after a row stopped (default: the first stop id).
        temperature, top_k, top_p, generator: token choice, see :func:`select_next` (temperature 0 = greedy).
        absorb: MLA attention form, see :class:`KVCache`.
        output_logits: also return each step's fp32 logits, [B, N, V].
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    lang = model.language
    device = input_device(model)
    if eos_token_id is None:
        eos_token_id = model.config.language_config.eos_token_id
    stop_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    pad_id = pad_token_id if pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.bool)
    attention_mask, input_ids, images_seq_mask = to_left_padding(attention_mask.to(device), input_ids.to(device),
                                                                 None if images_seq_mask is None
                                                                 else images_seq_mask.to(device))
    real = attention_mask.bool()
    if not bool(real.any(dim=1).all()):
        raise ValueError("a prompt has no real tokens")
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model.config.language_config, B, T + max_new_tokens, absorb)
        embeds = model.prepare_inputs_embeds(input_ids, None if images is None else images.to(device),
                                             images_seq_mask, images_spatial_crop)
        positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden, _ = lang.model(embeds, positions, real.long(), cache=cache)
        logits = lang.lm_head(hidden[:, -1]).float().to(device)
        next_position = real.sum(dim=1, keepdim=True)
        stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        ones = torch.ones(B, 1, dtype=torch.long, device=device)
        tokens, step_logits = [], []
        for step in range(max_new_tokens):
            if output_logits:
                step_logits.append(logits)
            chosen = select_next(logits, temperature, top_k, top_p, generator).to(device)
            tok = torch.where(finished, torch.full_like(chosen, pad_id), chosen)
            tokens.append(tok)
            finished |= torch.isin(tok, stop)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            # finished rows go on with their (discarded) choice: always a valid id, whatever pad_token_id is
            hidden, _ = lang.model(lang.get_input_embeddings()(chosen[:, None]), next_position, ones, cache=cache)
            logits = lang.lm_head(hidden[:, -1]).float().to(device)
            next_position = next_position + 1
    finally:
        model.train(was_training)
    out = torch.stack(tokens, dim=1)
    is_stop = torch.isin(out, stop)
    num_tokens = torch.where(is_stop.any(dim=1), is_stop.long().argmax(dim=1) + 1, out.shape[1])
    return GenerationOutput(tokens=out, num_tokens=num_tokens, finished=finished, prompt_tokens=int(real.sum()),
                            logits=torch.stack(step_logits, dim=1) if output_logits else None)
