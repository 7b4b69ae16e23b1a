"""Synthetic tokenised samples and a minimal right-padding collator, for tests and benchmarks that need exact control
over the batches fed to the pipeline and to a single-process reference (the real data path is recipe.data)."""

from __future__ import annotations

import torch


def synthetic_samples(cfg, n: int, seed: int, max_text: int = 24, text_only_every: int = 4) -> list[dict]:
    """``n`` samples with 0-2 images (random crops up to 2x2), random token ids and labels (-100 at images)."""
    g = torch.Generator().manual_seed(seed)
    S = cfg.vision_config.image_size
    V = cfg.language_config.vocab_size
    out = []
    for i in range(n):
        n_img = 0 if i % text_only_every == text_only_every - 1 else int(torch.randint(1, 3, (1,), generator=g))
        crops = [tuple(int(v) for v in torch.randint(1, 3, (2,), generator=g)) for _ in range(n_img)]
        pieces, mask = [], []
        for w, h in crops:
            t = int(torch.randint(1, max_text, (1,), generator=g))
            pieces.append(torch.randint(3, V, (t,), generator=g))
            mask.append(torch.zeros(t, dtype=torch.bool))
            k = cfg.num_image_tokens(w, h)
            pieces.append(torch.full((k,), 3))
            mask.append(torch.ones(k, dtype=torch.bool))
        t = int(torch.randint(2, max_text, (1,), generator=g))
        pieces.append(torch.randint(3, V, (t,), generator=g))
        mask.append(torch.zeros(t, dtype=torch.bool))
        ids, m = torch.cat(pieces), torch.cat(mask)
        labels = ids.masked_fill(m, -100)
        labels[: int(torch.randint(0, 4, (1,), generator=g))] = -100  # a masked prompt prefix
        n_tiles = sum(1 + w * h for w, h in crops)
        tiles = torch.rand(max(n_tiles, 1), 3, S, S, generator=g) * 2 - 1
        if not crops:
            tiles.zero_()
        out.append(dict(input_ids=ids, labels=labels, images_seq_mask=m, tiles=tiles,
                        crop=crops or [(0, 0)]))
    return out


def collate(samples: list[dict], pad_to_multiple: int = 8) -> dict:
    """Right-pad samples into model inputs (the contract of recipe.data's collator)."""
    B = len(samples)
    T = max(s["input_ids"].numel() for s in samples)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    tiles = max(s["tiles"].shape[0] for s in samples)
    n_img = max(len(s["crop"]) for s in samples)
    S = samples[0]["tiles"].shape[-1]
    batch = dict(input_ids=torch.full((B, T), 2, dtype=torch.long), labels=torch.full((B, T), -100, dtype=torch.long),
                 images_seq_mask=torch.zeros(B, T, dtype=torch.bool), segment_ids=torch.zeros(B, T, dtype=torch.long),
                 position_ids=torch.arange(T).repeat(B, 1), images=torch.zeros(B, tiles, 3, S, S),
                 images_spatial_crop=torch.zeros(B, n_img, 2, dtype=torch.long))
    for b, s in enumerate(samples):
        n = s["input_ids"].numel()
        batch["input_ids"][b, :n] = s["input_ids"]
        batch["labels"][b, :n] = s["labels"]
        batch["images_seq_mask"][b, :n] = s["images_seq_mask"]
        batch["segment_ids"][b, :n] = 1
        batch["images"][b, :s["tiles"].shape[0]] = s["tiles"]
        batch["images_spatial_crop"][b, :len(s["crop"])] = torch.tensor(s["crop"])
    return batch


def label_count(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def collate_packed(rows: list[list[dict]], pad_to_multiple: int = 8) -> dict:
    """Pack synthetic samples, ``rows[b]`` into row b, with the training collator
    (:class:`recipe.data.packing.PackedCollator`: segment ids 1..n, positions restarting per sample, each sample's
    first label ignored). Returns the model inputs, like :func:`collate`."""
    from recipe.data.packing import PackedCollator

    items = [{"input_ids": s["input_ids"], "target_ids": s["labels"], "images_seq_mask": s["images_seq_mask"],
              "images": s["tiles"], "images_spatial_crop": torch.tensor(s["crop"], dtype=torch.long), "row": b}
             for b, row in enumerate(rows) for s in row]
    batch = PackedCollator(pad_id=2, seq_bucket=pad_to_multiple)(items)
    return {k: batch[k] for k in ("input_ids", "labels", "images_seq_mask", "segment_ids", "position_ids", "images",
                                  "images_spatial_crop")}
