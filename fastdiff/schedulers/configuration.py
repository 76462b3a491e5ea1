"""Scheduler configs in diffusers' ``scheduler_config.json`` format.

A scheduler's constructor keywords are its config. ``ConfigMixin`` records them, exposes them as
``scheduler.config`` (read-only, attribute access), and saves/loads them as JSON that diffusers
reads too, so ``DDIMScheduler.from_pretrained("<a diffusers model>/scheduler")`` works.

Loading is strict where it can be: a key no diffusers scheduler knows is an error naming the
key, while options of the other schedulers, fastdiff's or diffusers' (a DDPM config's
``variance_type`` handed to DDIM, a PNDM config's ``skip_prk_steps``), are ignored, as diffusers
ignores them.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path
from typing import Any

from ..io import read_json, write_json

logger = logging.getLogger(__name__)

CONFIG_NAME = "scheduler_config.json"

# Constructor options of diffusers' schedulers that no fastdiff scheduler takes; configs written
# for those schedulers carry them, and diffusers' own loaders drop them silently.
FOREIGN_SCHEDULER_KEYS = frozenset("""
    algorithm_type disable_corrector euler_at_final final_sigmas_type flow_shift interpolation_type
    lambda_min_clipped lower_order_final original_inference_steps predict_x0 rho set_alpha_to_one
    shift_terminal sigma_data sigma_max sigma_min sigma_schedule skip_prk_steps solver_order solver_p
    solver_type time_shift_type timestep_scaling timestep_type use_beta_sigmas use_dynamic_shifting
    use_exponential_sigmas use_flow_sigmas use_karras_sigmas use_lu_lambdas variance_type
""".split())


@functools.cache
def _fastdiff_keys() -> frozenset[str]:
    """Every constructor keyword of fastdiff's schedulers: another scheduler's config carries them."""
    from . import SCHEDULERS

    return frozenset(key for cls in SCHEDULERS.values() for key in cls.init_keys())


class FrozenDict(dict):
    """A dict whose keys are also attributes (``config.num_train_timesteps``) and that refuses edits."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no attribute {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("a scheduler's config is read-only; build a new scheduler with from_config(config, key=value)")

    # the keys that took their default (diffusers' _use_default_values), an attribute, not an item:
    # a config compares equal to the same values however they were given
    defaults: frozenset = frozenset()

    @classmethod
    def with_defaults(cls, values: dict, defaults) -> FrozenDict:
        config = cls(values)
        object.__setattr__(config, "defaults", frozenset(defaults))
        return config

    def __reduce__(self):  # copy/deepcopy/pickle rebuild from a plain dict
        return (FrozenDict.with_defaults, (dict(self), self.defaults))

    __setitem__ = __delitem__ = __setattr__ = update = pop = popitem = setdefault = clear = _readonly


# diffusers' in-memory record, in a config dict, of the keys a scheduler took by default (never
# saved): loading another scheduler from the config lets that scheduler's own defaults apply to them
DEFAULTS_KEY = "_use_default_values"


def register_to_config(init):
    """Decorate ``__init__`` so every keyword it was called with (defaults filled in) becomes the
    config; the keys left at their defaults are the config's ``defaults`` (diffusers'
    ``_use_default_values``)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        given = set(bound.arguments)
        bound.apply_defaults()
        values = {k: _jsonable(v) for k, v in bound.arguments.items() if k != "self"}
        self._internal_dict = FrozenDict.with_defaults(values, (k for k in values if k not in given))
        init(self, *args, **kwargs)

    return wrapper


def _jsonable(value):
    if hasattr(value, "tolist"):  # numpy arrays and tensors (trained_betas)
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


class ConfigMixin:
    """``config``, ``from_config``, ``save_config``, ``from_pretrained``/``save_pretrained``."""

    config_name = CONFIG_NAME
    _internal_dict: FrozenDict

    @property
    def config(self) -> FrozenDict:
        return self._internal_dict

    @classmethod
    def init_keys(cls) -> list[str]:
        return [k for k in inspect.signature(cls.__init__).parameters if k != "self"]

    @classmethod
    def from_config(cls, config: dict | None = None, **kwargs):
        """Build from a config dict (ours or diffusers'); ``kwargs`` override its entries."""
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (e.g. another scheduler's .config), got {type(config).__name__}")
        known = set(cls.init_keys())
        foreign = FOREIGN_SCHEDULER_KEYS | _fastdiff_keys()
        # keys the source scheduler took by default: this scheduler's own defaults apply (diffusers' rule;
        # a diffusers config lists them under _use_default_values, a fastdiff config holds them as .defaults)
        defaults = set(getattr(config, "defaults", ())) | set(config.get(DEFAULTS_KEY, ()))
        config = {k: v for k, v in config.items() if k not in defaults}
        init = {}
        for key, value in {**config, **kwargs}.items():
            if key in known:
                init[key] = value
            elif key.startswith("_") or key in foreign:
                logger.debug("%s ignores config key %r", cls.__name__, key)
            else:
                raise ValueError(f"unknown config key {key!r} for {cls.__name__}; expected one of {sorted(known)}")
        return cls(**init)

    @classmethod
    def load_config(cls, path: str | os.PathLike, subfolder: str | None = None) -> dict:
        path = Path(path)
        if subfolder:
            path = path / subfolder
        if path.is_dir():
            path = path / cls.config_name
        return read_json(path, argument="pretrained_model_name_or_path")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs):
        """Load from a folder holding ``scheduler_config.json`` (diffusers' layout), or that file."""
        return cls.from_config(cls.load_config(pretrained_model_name_or_path, subfolder), **kwargs)

    def save_config(self, save_directory: str | os.PathLike) -> Path:
        from .. import __version__

        data = {"_class_name": type(self).__name__, "_fastdiff_version": __version__, **self.config}
        return write_json(data, Path(save_directory) / self.config_name)

    save_pretrained = save_config

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.config.items()
                          if not k.startswith("_") and (k != "trained_betas" or v is None))
        return f"{type(self).__name__}({items})"
