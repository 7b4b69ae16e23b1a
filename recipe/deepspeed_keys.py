"""Which top-level keys DeepSpeed reads: a misspelt key (``"zero_optimisation"``) is silently ignored by DeepSpeed,
so the run JSON is checked against the keys the installed DeepSpeed actually looks up, before any process starts.
"""

from __future__ import annotations

import collections.abc
import copy
import difflib
import functools
import logging
from typing import Iterable, Optional

from recipe.config import ConfigError
from recipe.settings import show

logger = logging.getLogger(__name__)

# Top-level keys DeepSpeed 0.19 reads that the probe in deepspeed_config_keys() cannot see, because only
# deepspeed.initialize, or DeepSpeedConfig once a process group exists, looks them up:
_DEEPSPEED_KEYS_NOT_PROBED = frozenset({
    "sequence_parallel_size",  # deepspeed.initialize: data x sequence mesh (with data_parallel_size);
                               # DeepSpeedConfig: data-parallel world size
    "data_parallel_size",      # deepspeed.initialize: data x sequence mesh
})


class _KeyRecorder(dict):
    """A dict that records every key looked up in it. DeepSpeedConfig works on ``copy.copy`` of its dict: the
    copy shares the record."""

    def __init__(self, data: dict, seen: Optional[set] = None):
        super().__init__(data)
        self.seen = set() if seen is None else seen

    def _saw(self, key):
        if isinstance(key, str):
            self.seen.add(key)

    def __getitem__(self, key):
        self._saw(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self._saw(key)
        return super().__contains__(key)

    def get(self, key, default=None):
        self._saw(key)
        return super().get(key, default)

    def setdefault(self, key, default=None):
        self._saw(key)
        return super().setdefault(key, default)

    def pop(self, key, *default):
        self._saw(key)
        return super().pop(key, *default)

    def keys(self):  # `key in d.keys()` goes through __contains__
        return collections.abc.KeysView(self)

    def __copy__(self):
        return _KeyRecorder(self, self.seen)

    def __deepcopy__(self, memo):
        return _KeyRecorder(copy.deepcopy(dict(self), memo), self.seen)


@functools.lru_cache(maxsize=None)
def deepspeed_config_keys() -> tuple[Optional[frozenset], dict, str]:
    """(the top-level keys the installed DeepSpeed reads, {removed key: DeepSpeed's message}, its version).

    Derived from DeepSpeed itself, not typed by hand: ``DeepSpeedConfig`` parses a minimal dict that records
    every key looked up in it (each ``get_*`` helper and sub-config model of ``deepspeed/runtime/config.py``
    asks for its key whether it is there or not), plus :data:`_DEEPSPEED_KEYS_NOT_PROBED`. Keys DeepSpeed
    refuses as removed features (``nebula``, ``amp``, ``elasticity``, ...) are returned apart, with its message.
    Should the probe fail (a DeepSpeed this was not written for), the keys are None: unchecked, with a warning,
    rather than a valid key refused."""
    import deepspeed
    from deepspeed.runtime import config as ds_config
    from deepspeed.utils import logger as ds_logger

    removed = dict(getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))
    probe = _KeyRecorder({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)  # it logs the world size it assumes
    try:
        ds_config.DeepSpeedConfig(probe)
    except Exception as e:  # noqa: BLE001 - any failure of the probe means: do not trust what it saw
        logging.getLogger(__name__).warning(
            "cannot list the top-level keys DeepSpeed %s reads (%s: %s); they are not checked",
            deepspeed.__version__, type(e).__name__, e)
        return None, removed, deepspeed.__version__
    finally:
        ds_logger.setLevel(level)
    known = (probe.seen | _DEEPSPEED_KEYS_NOT_PROBED) - set(removed)
    return frozenset(known), removed, deepspeed.__version__


def check_deepspeed_keys(ds: dict, where: str = "DeepSpeed config", recipe_keys: Iterable[str] = (),
                         recipe_block: str = "recipe") -> None:
    """Refuse a top-level key DeepSpeed does not read (it would ignore it silently: a misspelt
    ``zero_optimisation`` trains without ZeRO), naming the closest known key, and a key DeepSpeed refuses as a
    removed feature (before any process group exists, with DeepSpeed's own message)."""
    known, removed, version = deepspeed_config_keys()
    recipe_keys = set(recipe_keys)
    for key in ds:
        if key in removed:
            raise ConfigError(f"{where}: {show(key)}: {removed[key]}")
        if known is None or key in known:
            continue
        if key in recipe_keys:
            raise ConfigError(f"{where}: {show(key)} is a recipe setting, not a DeepSpeed key: move it into the "
                              f"\"{recipe_block}\" block")
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean {show(close[0])}? " if close else ""
        raise ConfigError(f"{where}: unknown DeepSpeed key {show(key)}: {hint}DeepSpeed {version} would ignore "
                          f"it without a word (recipe settings go in the \"{recipe_block}\" block; see "
                          f"ds_configs/README.md)")
