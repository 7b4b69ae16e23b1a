"""Data for DeepSeek-VL2 fine-tuning: the conversation template, the processor (dynamic tiling, tokenisation,
label masking), the dataset over prepared jsonl, the collator and the resumable data-parallel sampler, the length
index (tokens and tiles per record without pixels) and packing (several samples per row).

See ``docs/data.md`` for the file formats and the batch contract.

The names below are imported on first use (PEP 562), so ``recipe.data.image_io`` and
``recipe.data.conversation`` load without torch (fast start for ``prepare_ai2d.py`` worker processes).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Collator": "dataset", "ConversationDataset": "dataset", "RecordError": "dataset",
    "ResumableBatchSampler": "dataset", "build_dataloader": "dataset",
    "DeepseekVLV2Processor": "processor", "ProcessorOutput": "processor", "SampleTooLongError": "processor",
    "pad_samples": "processor",
    "ConversationError": "conversation", "format_sft_prompt": "conversation", "format_user_turn": "conversation",
    "ImageLoadError": "image_io", "load_image": "image_io", "resolve_under_root": "image_io",
    "ImageTiler": "tiling", "select_best_resolution": "tiling",
    "LengthIndex": "lengths", "build_length_index": "lengths",
    "PackedBatchSampler": "packing", "PackedCollator": "packing", "first_fit_decreasing": "packing",
    "SampleSize": "processor",
    "TextTokenizer": "tokenizer", "TokenizerError": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'recipe.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"recipe.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
