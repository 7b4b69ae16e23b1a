"""``processor_config.json``: the image tiling and the prompt template the processor applies, read with the same
checks as the model's config (:mod:`recipe.config`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field

from recipe.config import ConfigError, _fail, _split_known, _tile_candidates, load_json


@dataclass
class ProcessorConfig:
    """``processor_config.json``. Defaults are the released values except ``mask_prompt`` (released: false;
    the class default True is what answer-only SFT wants, so it stays a setting)."""

    candidate_resolutions: list = field(default_factory=lambda: _tile_candidates(384))
    patch_size: int = 14
    downsample_ratio: int = 2
    image_mean: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list = field(default_factory=lambda: [0.5, 0.5, 0.5])
    normalize: bool = True
    image_token: str = "<image>"
    pad_token: str = "<｜▁pad▁｜>"
    add_special_token: bool = False
    sft_format: str = "deepseek"
    mask_prompt: bool = False
    ignore_id: int = -100
    processor_class: str = "DeepseekVLV2Processor"
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def image_size(self) -> int:
        return int(self.candidate_resolutions[0][0])

    @classmethod
    def from_dict(cls, raw: dict) -> "ProcessorConfig":
        known, extra = _split_known(cls, copy.deepcopy(raw), "processor_config")
        cfg = cls(**known, extra=extra)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str) -> "ProcessorConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "processor_config.json")
        raw = load_json(path, "processor config")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(copy.deepcopy(self.extra))
        return d

    def save_json(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")

    def validate(self) -> None:
        w = "processor_config"
        res = self.candidate_resolutions
        if not isinstance(res, list) or not res or not all(
                isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, int) and v > 0 for v in r)
                for r in res):
            _fail(w, "candidate_resolutions", res, "must be a non-empty list of [width, height] positive integers")
        s = self.image_size
        if res[0][1] != s:
            _fail(w, "candidate_resolutions", res[0], "the first candidate must be the square tile size")
        for r in res:
            if r[0] % s or r[1] % s:
                _fail(w, "candidate_resolutions", r, f"every candidate must be a multiple of the tile size {s}")
        if self.sft_format != "deepseek":
            _fail(w, "sft_format", self.sft_format, "only the 'deepseek' template is used by DeepSeek-VL2")
        for key in ("image_mean", "image_std"):
            v = getattr(self, key)
            if not (isinstance(v, list) and len(v) == 3):
                _fail(w, key, v, "must be a list of 3 floats")
        if any(x == 0 for x in self.image_std):
            _fail(w, "image_std", self.image_std, "must be non-zero")
        if not isinstance(self.ignore_id, int) or self.ignore_id >= 0:
            _fail(w, "ignore_id", self.ignore_id, "must be a negative integer (-100)")
