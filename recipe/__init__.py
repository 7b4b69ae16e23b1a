"""DeepSpeed recipe for fine-tuning DeepSeek-VL2: model, data, parallel wrappers and the training entry point."""

__version__ = "0.1.0"
