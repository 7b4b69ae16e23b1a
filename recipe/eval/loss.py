"""Held-out loss of a plain, single-process model: the token-mean cross-entropy over the first records of a
prepared jsonl, batched as training batches them (``recipe.data``'s dataset and collator).

It is the figure ``train.py``'s validation reports from the pipeline engine (``recipe.eval_data``), computed
without DeepSpeed, so a checkpoint of any form can be scored the same way (``recipe.demo``, ``bench/learning.py``,
the tests).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch.utils.data import DataLoader, Subset

from recipe.data.dataset import Collator, ConversationDataset
from recipe.data.processor import DeepseekVLV2Processor

MODEL_KEYS = ("input_ids", "labels", "segment_ids", "position_ids", "images", "images_seq_mask",
              "images_spatial_crop")


@torch.no_grad()
def token_mean_loss(model, batches: Iterable[dict]) -> dict:
    """The cross-entropy over every labelled token of ``batches`` (collated training batches), the model in eval
    mode (so no MoE balance loss), restored to its previous mode afterwards.

    Returns ``{"loss": sum of token losses / labelled tokens (None without any), "tokens": labelled tokens,
    "samples": samples}``; each batch's mean is weighted by its ``num_label_tokens``, so the batch size and the
    padding do not change the figure."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    total, tokens, samples = 0.0, 0, 0
    try:
        for batch in batches:
            n = int(batch["num_label_tokens"])
            samples += int(batch["num_samples"])
            if n == 0:
                continue
            inputs = {k: batch[k].to(param.device) for k in MODEL_KEYS}
            inputs["images"] = inputs["images"].to(param.dtype)
            total += float(model(**inputs).ce_loss) * n
            tokens += n
    finally:
        model.train(was_training)
    return {"loss": total / tokens if tokens else None, "tokens": tokens, "samples": samples}


def heldout_loss(model, processor: DeepseekVLV2Processor, data: str, image_root: str, *,
                 num_samples: Optional[int] = None, batch_size: int = 8, seq_bucket: int = 64,
                 num_workers: int = 0) -> dict:
    """:func:`token_mean_loss` over the first ``num_samples`` records of ``data`` (all when None), in file order.

    ``processor`` decides the labels: give it the run's ``mask_prompt`` and ``max_seq_len``
    (``DeepseekVLV2Processor.from_pretrained(dir, mask_prompt=..., max_seq_len=...)``). Unusable records are
    replaced by the next usable one, as in training."""
    dataset = ConversationDataset(data, image_root, processor)
    n = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=Collator.from_processor(processor, seq_bucket))
    return token_mean_loss(model, loader)
