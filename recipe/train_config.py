"""The training run's settings: DeepSpeed's own keys plus the recipe's block, read from one JSON file.

``--deepspeed ds_configs/ep8.json`` holds DeepSpeed's standard keys (batch sizes, precision, ZeRO, optimizer,
scheduler, monitors), passed to ``deepspeed.initialize`` untouched, and one ``"recipe"`` block with everything
DeepSpeed does not know (model and data paths, pipeline split, expert parallelism, freezing, saving, ...),
described field by field in :class:`TrainConfig`. Everything is validated before any process group, model or
data is built, with messages that say what to change.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from recipe.config import ConfigError, VL2Config, load_json
from recipe.parallel import layout

RECIPE_KEY = "recipe"
FREEZE_PARTS = ("vision", "projector", "language", "embeddings")


@dataclass
class TrainConfig:
    """The ``"recipe"`` block of the DeepSpeed JSON."""

    model_dir: str = ""
    """Converted checkpoint (``converters/hf_to_ds.py`` output) or a Hugging Face checkpoint directory."""
    train_data: str = ""
    """Prepared conversations (``recipe/prepare_ai2d.py`` output), jsonl."""
    image_root: str = ""
    """Directory the records' image paths are relative to."""
    save_dir: str = "save_dir"
    """Where training checkpoints go (DeepSpeed's layout; ``converters/ds_to_hf.py`` exports them)."""
    pipeline_stages: int = 1
    """Pipeline-parallel degree (PP). Must divide the world size; data parallelism is world / PP."""
    decoder_split: Union[list, str, None] = None
    """Decoder layers per stage, e.g. [13, 17]; null or "auto" balances them (ViT and projector sit on stage 0)."""
    expert_parallel_size: int = 1
    """EP: routed experts are sharded over this many data-parallel ranks of a stage; must divide DP and experts."""
    max_seq_len: int = 4096
    """Longest sample in tokens; longer conversations are cut at a turn boundary (never inside an image)."""
    seq_bucket: int = 256
    """Micro-batches are right-padded to a multiple of this many tokens (bounds distinct shapes)."""
    mask_prompt: bool = True
    """Answer-only loss (true) or train on prompts too (the released processor config: false)."""
    aux_loss_coef: Optional[float] = None
    """MoE balance-loss coefficient; null keeps the checkpoint's ``aux_loss_alpha`` (0.001)."""
    correction_bias_update_rate: float = 0.0
    """noaux_tc models: aux-loss-free balancing step for ``e_score_correction_bias`` per optimizer step
    (0 keeps the released bias fixed, the SFT default)."""
    activation_checkpointing: bool = False
    """Recompute each ViT block and decoder layer in backward (non-reentrant) to save activation memory."""
    freeze: dict = field(default_factory=lambda: dict.fromkeys(FREEZE_PARTS, False))
    """Parts to keep fixed: vision (ViT), projector (+ image_newline, view_seperator), language (decoder + head),
    embeddings (token table)."""
    train_steps: int = 100
    """Optimizer steps to run (a resumed run continues up to this step)."""
    save_interval: int = 0
    """Save every N steps (0: only at the end)."""
    resume: Optional[str] = "auto"
    """"auto": continue from ``save_dir/latest`` when it exists; "latest" or a tag: must exist; null: never."""
    log_interval: int = 1
    """Log every N steps."""
    throughput_window: int = 20
    """The final SPS/TPS summary averages the last N steps (the first step is always left out)."""
    seed: int = 42
    """Data order and initialisation seed."""
    num_workers: int = 2
    """DataLoader worker processes per data-loading rank (first and last pipeline stage)."""

    @classmethod
    def from_dict(cls, raw: dict, where: str = RECIPE_KEY) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; known keys: {sorted(names)}")
        cfg = cls(**copy.deepcopy(raw))
        cfg.validate(where)
        return cfg

    def validate(self, where: str = RECIPE_KEY) -> None:
        for key in ("pipeline_stages", "expert_parallel_size", "max_seq_len", "seq_bucket", "train_steps",
                    "log_interval", "throughput_window"):
            v = getattr(self, key)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{where}.{key}={v!r}: must be a positive integer")
        for key in ("save_interval", "num_workers", "seed"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{where}.{key}={v!r}: must be a non-negative integer")
        for key in ("model_dir", "train_data", "image_root", "save_dir"):
            if not getattr(self, key):
                raise ConfigError(f"{where}.{key} is not set (or pass it on the command line)")
        if self.decoder_split not in (None, "auto") and not (
                isinstance(self.decoder_split, list) and all(isinstance(n, int) for n in self.decoder_split)):
            raise ConfigError(f"{where}.decoder_split={self.decoder_split!r}: a list of layer counts, or null/auto")
        unknown = sorted(set(self.freeze) - set(FREEZE_PARTS))
        if unknown:
            raise ConfigError(f"{where}.freeze: unknown parts {unknown}; expected {list(FREEZE_PARTS)}")
        if self.aux_loss_coef is not None and self.aux_loss_coef < 0:
            raise ConfigError(f"{where}.aux_loss_coef={self.aux_loss_coef}: must be >= 0")
        if self.correction_bias_update_rate < 0:
            raise ConfigError(f"{where}.correction_bias_update_rate={self.correction_bias_update_rate}: must be >= 0")

    @property
    def split(self) -> Optional[list]:
        return None if self.decoder_split in (None, "auto") else list(self.decoder_split)


def load_run_config(path: str, overrides: Optional[dict] = None) -> tuple[dict, TrainConfig]:
    """Read the DeepSpeed JSON: (DeepSpeed's own keys, untouched; the validated recipe block).

    ``overrides`` (from the command line) replace recipe keys whose value is not None.
    """
    raw = load_json(path, "DeepSpeed config")
    if RECIPE_KEY not in raw:
        raise ConfigError(f"{path}: no \"{RECIPE_KEY}\" block; it holds model_dir, train_data, image_root, ... "
                          f"(see ds_configs/README.md)")
    recipe = dict(raw.pop(RECIPE_KEY))
    recipe.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return raw, TrainConfig.from_dict(recipe)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def check_paths(tc: TrainConfig) -> None:
    """Inputs exist; say which and what to run to make them."""
    if not os.path.isfile(os.path.join(tc.model_dir, "config.json")):
        raise ConfigError(f"recipe.model_dir={tc.model_dir!r}: no config.json there; convert a checkpoint with "
                          f"`python converters/hf_to_ds.py --hf-dir <HF dir> --out {tc.model_dir}`")
    if not os.path.isfile(tc.train_data):
        raise ConfigError(f"recipe.train_data={tc.train_data!r}: no such file; prepare it with "
                          f"`python recipe/prepare_ai2d.py --input <InternVL jsonl> --image-root <dir> "
                          f"--output {tc.train_data}`")
    if not os.path.isdir(tc.image_root):
        raise ConfigError(f"recipe.image_root={tc.image_root!r}: not a directory")


def check_layout(tc: TrainConfig, ds: dict, model: VL2Config, world_size: int) -> dict:
    """Parallel layout and batch arithmetic against the model and the world size; returns derived sizes
    (dp, gas, micro_batch, global_batch, parts)."""
    pp, ep = tc.pipeline_stages, tc.expert_parallel_size
    lc = model.language_config
    if world_size % pp:
        raise ConfigError(f"recipe.pipeline_stages={pp} does not divide the world size {world_size}; "
                          f"use a divisor of {world_size}")
    dp = world_size // pp
    if dp % ep:
        raise ConfigError(f"recipe.expert_parallel_size={ep} does not divide the data-parallel size {dp} "
                          f"(world {world_size} / {pp} stages); use a divisor of {dp}")
    if lc.is_moe and lc.n_routed_experts % ep:
        raise ConfigError(f"recipe.expert_parallel_size={ep} does not divide the model's "
                          f"n_routed_experts={lc.n_routed_experts}")
    if not lc.is_moe and ep != 1:
        raise ConfigError(f"recipe.expert_parallel_size={ep}: the model has no routed experts; use 1")
    parts = layout.stage_parts(model, pp, tc.split)  # raises on a split that does not add up
    mbs = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    tb = ds.get("train_batch_size")
    if mbs is None or (gas is None and tb is None):
        raise ConfigError("DeepSpeed config: set train_micro_batch_size_per_gpu and gradient_accumulation_steps "
                          "(or train_batch_size)")
    if gas is None:
        gas, rem = divmod(tb, mbs * dp)
        if rem or gas == 0:
            raise ConfigError(f"train_batch_size={tb} is not a multiple of micro-batch {mbs} x data-parallel {dp}")
    if tb is not None and tb != mbs * gas * dp:
        raise ConfigError(f"train_batch_size={tb} != train_micro_batch_size_per_gpu {mbs} x "
                          f"gradient_accumulation_steps {gas} x data-parallel size {dp} (world {world_size} / "
                          f"{pp} stages); fix one of them")
    if ds.get("zero_optimization", {}).get("stage", 0) > 1:
        raise ConfigError("zero_optimization.stage > 1: DeepSpeed's pipeline engine allows ZeRO 0 or 1 only")
    if tc.freeze.get("vision") and tc.freeze.get("projector") and tc.freeze.get("embeddings") and \
            pp > 1 and (tc.freeze.get("language") or parts[1] == layout.first_decoder_index(model)):
        raise ConfigError("recipe.freeze leaves pipeline stage 0 without trainable parameters; DeepSpeed needs a "
                          "gradient to send back from it. Unfreeze a part or give stage 0 decoder layers")
    return {"dp": dp, "gas": gas, "micro_batch": mbs, "global_batch": mbs * gas * dp, "parts": parts}
