"""The training run's settings: DeepSpeed's own keys plus the recipe's block, read from one JSON file.

``--deepspeed ds_configs/ep8.json`` holds DeepSpeed's standard keys (batch sizes, precision, ZeRO, optimizer,
scheduler, monitors), passed to ``deepspeed.initialize`` untouched, and one ``"recipe"`` block with everything
DeepSpeed does not know (model and data paths, pipeline split, expert parallelism, freezing, saving, ...),
described field by field in :class:`TrainConfig`. Everything is validated before any process group, model or
data is built, with messages that say what to change:

- every recipe key has the JSON type its field annotation says (:mod:`recipe.settings`), then
  :meth:`TrainConfig.validate` checks ranges;
- every top-level key must be one DeepSpeed reads (:mod:`recipe.deepspeed_keys`): DeepSpeed ignores a key it does
  not know, so a misspelt ``"zero_optimisation"`` would silently train without ZeRO;
- the parallel layout and the batch arithmetic against the model and the world size: :class:`RunLayout`, the one
  copy of that arithmetic and of the loss scale (the planner, ``recipe/plan``, builds the same one).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union

from recipe.config import ConfigError, VL2Config, load_json
from recipe.deepspeed_keys import check_deepspeed_keys
from recipe.lora.config import LoraConfig
from recipe.parallel import layout
from recipe.parallel.cost import balanced_decoder_split
from recipe.settings import AllowedKeys, PathStr, check_value, field_types, kind_of, show

RECIPE_KEY = "recipe"

@dataclass
class TrainConfig:
    """The ``"recipe"`` block of the DeepSpeed JSON.

    Each field's annotation is the JSON type its key must have (checked by :func:`check_value`); ranges and
    cross-field rules are in :meth:`validate`."""

    model_dir: PathStr = ""
    """Converted checkpoint (``converters/hf_to_ds.py`` output) or a Hugging Face checkpoint directory."""
    train_data: PathStr = ""
    """Prepared conversations (``recipe/prepare_ai2d.py`` output), jsonl."""
    image_root: PathStr = ""
    """Directory the records' image paths are relative to."""
    save_dir: PathStr = "save_dir"
    """Where training checkpoints go (DeepSpeed's layout; ``converters/ds_to_hf.py`` exports them)."""
    pipeline_stages: int = 1
    """Pipeline-parallel degree (PP). Must divide the world size; data parallelism is world / PP."""
    decoder_split: Union[list[int], Literal["auto"], None] = None
    """Decoder layers per stage, e.g. [13, 17]; null or "auto" balances them (ViT and projector sit on stage 0)."""
    expert_parallel_size: int = 1
    """EP: routed experts are sharded over this many data-parallel ranks of a stage; must divide DP and experts."""
    moe_dispatcher: Literal["exact", "capacity"] = "exact"
    """How MoE layers move tokens to experts: "exact" sorts routes by expert, exchanges exactly those rows
    (all_to_all_single with per-rank split sizes) and runs the local experts as grouped GEMMs; "capacity" is
    DeepSpeed's own MOELayer, which pads every expert to the step's largest load (expert compute and all-to-all
    bytes grow with routing imbalance). Same losses and gradients; see docs/moe.md."""
    max_seq_len: int = 4096
    """Longest sample in tokens; longer conversations are cut at a turn boundary (never inside an image)."""
    seq_bucket: int = 256
    """Micro-batches are right-padded to a multiple of this many tokens (bounds distinct shapes)."""
    packing: bool = True
    """Pack several samples into each row of at most ``max_seq_len`` tokens (first-fit-decreasing within a window
    of the shuffled sample stream, planned from a length index of the data file); the batch sizes then count rows.
    false: one sample per row, padded to the bucket (docs/data.md, "Packing")."""
    max_tiles_per_row: int = 20
    """Packing: at most this many ViT tiles (global views + local tiles) per row, bounding the ViT's work and
    activation memory per row. At 384 px every tile brings >= 196 image tokens, so a 4096-token row rarely
    reaches 20; a sample with more tiles gets a row of its own."""
    packing_window: int = 1024
    """Packing: consecutive samples of the shuffled stream packed together (capped at the data set size); larger
    windows fill rows better and delay more samples."""
    mask_prompt: bool = True
    """Answer-only loss (true) or train on prompts too (the released processor config: false)."""
    aux_loss_coef: Optional[float] = None
    """MoE balance-loss coefficient; null keeps the checkpoint's ``aux_loss_alpha`` (0.001)."""
    correction_bias_update_rate: float = 0.0
    """noaux_tc models: aux-loss-free balancing step for ``e_score_correction_bias`` per optimizer step
    (0 keeps the released bias fixed, the SFT default)."""
    activation_checkpointing: bool = False
    """Recompute each ViT block and decoder layer in backward (non-reentrant) to save activation memory."""
    freeze: Annotated[dict[str, bool], AllowedKeys(layout.FREEZE_GROUPS, "parts")] = field(
        default_factory=lambda: dict.fromkeys(layout.FREEZE_GROUPS, False))
    """Parts to keep fixed: vision (ViT), projector (+ image_newline, view_seperator), language (decoder + head),
    embeddings (token table). Parts left out of the JSON object stay trainable (false)."""
    lora: Optional[dict[str, Any]] = None
    """LoRA fine-tuning: null trains the model itself; an object ({} for the defaults) trains low-rank adapters on
    the target modules with every base weight frozen: rank (8), alpha (16), dropout (0), target_modules (patterns of
    checkpoint module names, '*' = one name part; default attention projections, shared experts, dense MLPs,
    projector). See recipe/lora/config.py and the README's LoRA section."""
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
    max_replaced_fraction: float = 0.1
    """Stop with an error once more than this share of the samples trained so far had to be replaced (corrupt or
    missing images, records too long or malformed): a few bad samples are skipped, a broken data set is not
    trained on."""
    eval_data: Optional[PathStr] = None
    """Held-out prepared conversations for validation (e.g. ``prepare_ai2d.py --val-fraction F --val-output``);
    null: no validation. The validation loss is the token-mean cross-entropy over the set (no balance loss), run
    by the pipeline engine's ``eval_batch`` and logged as ``eval_loss`` beside the step's training figures."""
    eval_image_root: Optional[PathStr] = None
    """Directory the eval records' image paths are relative to; null: ``image_root``."""
    eval_interval: int = 0
    """Validate every N optimizer steps and after the last step (0: after the last step only). Needs eval_data."""
    eval_samples: Optional[int] = None
    """Validate on the first N records of eval_data, in file order (null: all of them), rounded up to whole
    global batches; the same records at every validation."""

    @classmethod
    def from_dict(cls, raw: dict, where: str = RECIPE_KEY, require_paths: bool = True) -> "TrainConfig":
        """Check every given key's type, fill the rest with defaults (an object such as ``freeze`` keeps the
        defaults of the keys it leaves out), then :meth:`validate` (``require_paths=False``: the paths may be
        left out, for a block read only for its layout, as the planner does)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}={show(raw)}: expected a JSON object of recipe settings, got {kind_of(raw)}")
        types = field_types(cls)
        unknown = sorted(set(raw) - set(types))
        if unknown:
            hints = {k: difflib.get_close_matches(k, sorted(types), n=1) for k in unknown}
            hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in hints.items() if m)
            raise ConfigError(f"{where}: unknown keys {unknown}{f' ({hint})' if hint else ''}; "
                              f"known keys: {sorted(types)}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in raw:
                value = check_value(f"{where}.{f.name}", raw[f.name], types[f.name])
                if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
                    value = {**f.default_factory(), **value}
                values[f.name] = value
        cfg = cls(**values)
        cfg.validate(where, require_paths)
        return cfg

    def validate(self, where: str = RECIPE_KEY, require_paths: bool = True) -> None:
        """Paths set (unless not ``require_paths``), every field of its annotated type, then the ranges."""
        types = field_types(type(self))
        unset = [key for key, tp in types.items() if tp is PathStr and getattr(self, key) == ""]
        if unset and require_paths:
            raise ConfigError(f"{where}.{unset[0]} is not set (or pass it on the command line)")
        for key, tp in types.items():  # also catches a wrong type set in Python after from_dict
            if key not in unset:
                setattr(self, key, check_value(f"{where}.{key}", getattr(self, key), tp))
        for key in ("pipeline_stages", "expert_parallel_size", "max_seq_len", "seq_bucket", "train_steps",
                    "log_interval", "throughput_window", "max_tiles_per_row", "packing_window"):
            v = getattr(self, key)
            if v <= 0:
                raise ConfigError(f"{where}.{key}={v!r}: must be a positive integer")
        for key in ("save_interval", "num_workers", "seed"):
            v = getattr(self, key)
            if v < 0:
                raise ConfigError(f"{where}.{key}={v!r}: must be a non-negative integer")
        if self.split is not None and any(n < 0 for n in self.split):
            raise ConfigError(f"{where}.decoder_split={show(self.decoder_split)}: layer counts must be "
                              f"non-negative integers")
        if self.aux_loss_coef is not None and self.aux_loss_coef < 0:
            raise ConfigError(f"{where}.aux_loss_coef={self.aux_loss_coef}: must be >= 0")
        if self.correction_bias_update_rate < 0:
            raise ConfigError(f"{where}.correction_bias_update_rate={self.correction_bias_update_rate}: must be >= 0")
        if not 0 <= self.max_replaced_fraction <= 1:
            raise ConfigError(f"{where}.max_replaced_fraction={self.max_replaced_fraction}: must be in [0, 1]")
        if self.eval_interval < 0:
            raise ConfigError(f"{where}.eval_interval={self.eval_interval}: must be a non-negative integer")
        if self.eval_samples is not None and self.eval_samples <= 0:
            raise ConfigError(f"{where}.eval_samples={self.eval_samples}: must be a positive integer or null (all)")
        if self.eval_data is None and self.eval_interval > 0:
            raise ConfigError(f"{where}.eval_interval={self.eval_interval} needs {where}.eval_data (a prepared "
                              f"held-out jsonl, e.g. prepare_ai2d.py --val-fraction 0.02 --val-output PATH)")

        if self.lora is not None:
            self.lora_config  # noqa: B018 (checks the block)
            frozen = [k for k, v in self.freeze.items() if v]
            if frozen:
                raise ConfigError(f"{where}.freeze={show(self.freeze)} with {where}.lora: LoRA already freezes every "
                                  f"base weight and trains only the adapters; remove the freeze settings")

    @property
    def lora_config(self) -> Optional[LoraConfig]:
        """The validated ``lora`` block, or None when the run trains the model itself."""
        return None if self.lora is None else LoraConfig.from_dict(self.lora, f"{RECIPE_KEY}.lora")

    @property
    def split(self) -> Optional[list]:
        return None if self.decoder_split in (None, "auto") else list(self.decoder_split)


# --- the run JSON ------------------------------------------------------------------------------------------------

def load_run_config(path: str, overrides: Optional[dict] = None) -> tuple[dict, TrainConfig]:
    """Read the DeepSpeed JSON: (DeepSpeed's own keys, untouched; the validated recipe block).

    ``overrides`` (from the command line) replace recipe keys whose value is not None; they are checked like the
    JSON's values. Every top-level key other than ``"recipe"`` must be one DeepSpeed reads
    (:func:`check_deepspeed_keys`; imports deepspeed, about 2 s, once per process)."""
    raw = load_json(path, "DeepSpeed config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of DeepSpeed keys and a \"{RECIPE_KEY}\" block, "
                          f"got {kind_of(raw)}")
    if RECIPE_KEY not in raw:
        raise ConfigError(f"{path}: no \"{RECIPE_KEY}\" block; it holds model_dir, train_data, image_root, ... "
                          f"(see ds_configs/README.md)")
    recipe = raw.pop(RECIPE_KEY)
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: {RECIPE_KEY}={show(recipe)}: expected a JSON object of recipe settings, "
                          f"got {kind_of(recipe)}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    types = field_types(TrainConfig)
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        if key not in types:
            raise ConfigError(f"{flag}: not a recipe setting; known: {sorted(types)}")
        try:
            check_value(f"{RECIPE_KEY}.{key}", value, types[key])
        except ConfigError as e:
            raise ConfigError(f"{e} (set by {flag} on the command line)") from None
    try:
        tc = TrainConfig.from_dict({**recipe, **given})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    check_deepspeed_keys(raw, where=path, recipe_keys=field_types(TrainConfig), recipe_block=RECIPE_KEY)
    return raw, tc


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
    if tc.eval_data is not None and not os.path.isfile(tc.eval_data):
        raise ConfigError(f"recipe.eval_data={tc.eval_data!r}: no such file; hold out records with "
                          f"`python recipe/prepare_ai2d.py ... --val-fraction 0.02 --val-output {tc.eval_data}`")
    if tc.eval_image_root is not None and not os.path.isdir(tc.eval_image_root):
        raise ConfigError(f"recipe.eval_image_root={tc.eval_image_root!r}: not a directory")


@dataclass(frozen=True)
class RunLayout:
    """How a run spreads over its ranks and what one optimizer step holds: the one place the parallel layout and
    the batch arithmetic are checked and derived (train.py and the planner both build it with :meth:`from_config`).

    ``world_size = pipeline_stages x data_parallel``; the experts of a stage are sharded over ``expert_parallel``
    of its data-parallel ranks; ``global_batch = micro_batch x grad_accum_steps x data_parallel`` samples per
    optimizer step. ``decoder_split`` is the resolved decoder layers per stage, ``parts`` the pipeline layer index
    each stage starts at (plus the end), as ``layout.stage_parts`` returns them.

    With packing (``recipe.packing``, the default) the batch sizes count rows: a micro-batch is ``micro_batch``
    rows of up to ``max_seq_len`` tokens, each holding as many samples as fit, and ``global_batch`` rows make one
    step. :meth:`ce_scale` takes the step's label count whatever the rows hold, so the loss stays the token mean
    of the global batch."""

    world_size: int
    pipeline_stages: int
    data_parallel: int
    expert_parallel: int
    micro_batch: int
    grad_accum_steps: int
    global_batch: int
    decoder_split: list
    parts: list

    @property
    def expert_data_parallel(self) -> int:
        """Ranks of a stage holding the same experts (they all-reduce the expert gradients)."""
        return self.data_parallel // self.expert_parallel

    def ce_scale(self, num_label_tokens: float) -> float:
        """Factor for one micro-batch's cross-entropy *sum* such that DeepSpeed's mean over the step's micro-batches
        and data-parallel ranks equals the token mean of the global batch: ``grad_accum_steps x data_parallel /
        num_label_tokens``, where ``num_label_tokens`` counts the labelled tokens of the whole global batch (0.0
        when there are none)."""
        return self.grad_accum_steps * self.data_parallel / num_label_tokens if num_label_tokens else 0.0

    @classmethod
    def from_config(cls, recipe: Union[TrainConfig, dict], ds: dict, model: VL2Config,
                    world_size: Optional[int] = None) -> "RunLayout":
        """Check the layout and batch sizes of a run against the model and the world size; ConfigError otherwise.

        Args:
            recipe: the validated :class:`TrainConfig`, or a ``"recipe"`` block as a dict (validated here; the
                paths may be left out: only the layout is read).
            ds: DeepSpeed's keys (train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size,
                zero_optimization).
            world_size: ranks; None derives it from the batch keys: train_batch_size / (micro-batch x GAS) x PP.
        """
        tc = recipe if isinstance(recipe, TrainConfig) else TrainConfig.from_dict(recipe, require_paths=False)
        pp, ep = tc.pipeline_stages, tc.expert_parallel_size
        lc = model.language_config
        mbs = ds.get("train_micro_batch_size_per_gpu")
        gas = ds.get("gradient_accumulation_steps")
        tb = ds.get("train_batch_size")
        if mbs is None or (gas is None and tb is None):
            raise ConfigError("DeepSpeed config: set train_micro_batch_size_per_gpu and gradient_accumulation_steps "
                              "(or train_batch_size)")
        if world_size is None:
            if tb is None or gas is None:
                raise ConfigError("give --world-size, or train_batch_size and gradient_accumulation_steps in the "
                                  "JSON")
            if tb % (mbs * gas):
                raise ConfigError(f"train_batch_size={tb} is not a multiple of micro-batch {mbs} x GAS {gas}")
            world_size = tb // (mbs * gas) * pp
        if world_size % pp:
            raise ConfigError(f"recipe.pipeline_stages={pp} does not divide the world size {world_size}; "
                              f"use a divisor of {world_size}")
        dp = world_size // pp
        if dp % ep:
            raise ConfigError(f"recipe.expert_parallel_size={ep} does not divide the data-parallel size {dp} "
                              f"(world {world_size} / {pp} stages); the experts are sharded over data-parallel "
                              f"ranks, so it must divide the data-parallel size: use a divisor of {dp}")
        if lc.is_moe and lc.n_routed_experts % ep:
            raise ConfigError(f"recipe.expert_parallel_size={ep} does not divide the model's "
                              f"n_routed_experts={lc.n_routed_experts}; each rank holds n_routed_experts / "
                              f"expert_parallel_size of them, so it must divide n_routed_experts")
        if not lc.is_moe and ep != 1:
            raise ConfigError(f"recipe.expert_parallel_size={ep}: the model has no routed experts; use 1")
        split = tc.split if tc.split is not None else balanced_decoder_split(model, pp)
        parts = layout.stage_parts(model, pp, split)  # raises on a split that does not add up
        if gas is None:
            gas, rem = divmod(tb, mbs * dp)
            if rem or gas == 0:
                raise ConfigError(f"train_batch_size={tb} is not a multiple of micro-batch {mbs} x data-parallel {dp}")
        if tb is not None and tb != mbs * gas * dp:
            raise ConfigError(f"train_batch_size={tb} != train_micro_batch_size_per_gpu {mbs} x "
                              f"gradient_accumulation_steps {gas} x data-parallel size {dp} (world {world_size} / "
                              f"{pp} stages); fix one of them")
        zero = ds.get("zero_optimization", {}).get("stage", 0)
        if zero > 1:  # VL2Pipeline is a PipelineModule at any number of stages
            raise ConfigError(f"zero_optimization.stage={zero}: DeepSpeed's pipeline engine allows only ZeRO 0 and 1")
        if tc.freeze.get("vision") and tc.freeze.get("projector") and tc.freeze.get("embeddings") and \
                pp > 1 and (tc.freeze.get("language") or parts[1] == layout.first_decoder_index(model)):
            raise ConfigError("recipe.freeze leaves pipeline stage 0 without trainable parameters; DeepSpeed needs "
                              "a gradient to send back from it. Unfreeze a part or give stage 0 decoder layers")
        if tc.lora is not None:
            check_lora_layout(tc.lora_config, model, pp, split)
        return cls(world_size=world_size, pipeline_stages=pp, data_parallel=dp, expert_parallel=ep, micro_batch=mbs,
                   grad_accum_steps=gas, global_batch=mbs * gas * dp, decoder_split=list(split), parts=parts)


def check_lora_layout(lora: LoraConfig, model: VL2Config, pipeline_stages: int, decoder_split: list) -> list[str]:
    """Every target pattern adapts a layer of this model, and with PP > 1 stage 0 holds an adapter (DeepSpeed's
    pipeline needs a gradient to send back from every stage). Returns the adapted module names."""
    from recipe.lora.inject import model_linear_names

    targets = lora.targets(model_linear_names(model))
    if pipeline_stages > 1:
        first_stage = ("vision.", "projector.") + tuple(f"language.model.layers.{j}." for j in range(decoder_split[0]))
        if not any(t.startswith(first_stage) for t in targets):
            raise ConfigError(f"recipe.lora.target_modules={show(lora.target_modules)} put no adapter on pipeline "
                              f"stage 0 (ViT, projector and decoder layers 0..{decoder_split[0] - 1}); DeepSpeed "
                              f"needs a gradient to send back from it. Add e.g. \"projector.layers.*\"")
    return targets
