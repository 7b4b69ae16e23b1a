"""Small DeepSpeed JSON files for train.py runs in tests."""

import json


def write_config(path, inputs, save_dir, ds=None, **recipe):
    """A CPU fp32 config (PP=2 over 4 ranks, EP=2, ZeRO-1, 4 samples per step) pointing at ``inputs``."""
    cfg = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "train_batch_size": 4,
        "gradient_clipping": 1.0, "steps_per_print": 1000,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3,
                                                       "warmup_num_steps": 3}},
        "zero_optimization": {"stage": 1},
        "recipe": {"model_dir": inputs["model_dir"], "train_data": inputs["train_data"],
                   "image_root": inputs["image_root"], "save_dir": str(save_dir), "pipeline_stages": 2,
                   "decoder_split": [2, 1], "expert_parallel_size": 2, "max_seq_len": 1024, "seq_bucket": 32,
                   "max_tiles_per_row": 40,
                   "train_steps": 6, "num_workers": 0, **recipe},
    }
    cfg.update(ds or {})
    path.write_text(json.dumps(cfg))
    return str(path)
