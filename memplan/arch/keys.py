"""Reading a config.json's keys: one line naming the key on anything that is not a size.

A :class:`Keys` wraps one parsed config (and where it came from, for messages). Absent or null
keys take the default the family's transformers config class gives them.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

from memplan.errors import ConfigError

# Bounds that no real transformer comes near, so that 1e308 fails fast and clearly.
MAX_DIM = 2**22
MAX_VOCAB = 2**26
MAX_LAYERS = 10_000
MAX_POSITIONS = 2**24

# Values quoted in error messages stay short and shallow, whatever the file holds.
_REPR = reprlib.Repr()  # Python 3.10 and 3.11 take no keyword arguments here
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 2


def show(value: Any) -> str:
    """A short, shallow repr of a config value for an error message."""
    return _REPR.repr(value)


class Keys:
    """Typed access to one config dictionary."""

    def __init__(self, cfg: dict[str, Any], where: str) -> None:
        self.cfg = cfg
        self.where = where

    def has(self, key: str) -> bool:
        return self.cfg.get(key) is not None

    def int(self, key: str, default: Any = None, upper: int = MAX_DIM, lower: int = 1) -> int:
        """A positive integer (``lower`` to ``upper``); ``default`` when absent or null."""
        value = self.cfg.get(key)
        if value is None:  # absent or null: transformers uses the default
            value = default
        if value is None:
            raise ConfigError(f"{self.where}: missing {key!r}; a {self.cfg.get('model_type')} "
                              "config needs it")
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.where}: {key} must be an integer, got {show(value)}")
        if not lower <= value <= upper:
            raise ConfigError(f"{self.where}: {key} = {value} is out of range "
                              f"({lower} to {upper})")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.cfg.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}: {key} must be true or false, got {show(value)}")
        return value

    def name(self, key: str, default: str) -> str:
        value = self.cfg.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not 0 < len(value) <= 64:
            raise ConfigError(f"{self.where}: {key} must be the name of an activation, got "
                              f"{show(value)}")
        return value

    def prob(self, key: str, default: float = 0.0) -> float:
        value = self.cfg.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ConfigError(f"{self.where}: {key} must be a probability in [0, 1), got "
                              f"{show(value)}")
        return float(value)

    def number(self, key: str, default: float | None) -> float | None:
        """A finite positive number (soft-capping values, scalars); None stays None."""
        value = self.cfg.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{self.where}: {key} must be a positive number, got "
                              f"{show(value)}")
        return float(value)

    def divides(self, small_key: str, small: int, big_key: str, big: int,
                fix: str = "fix one of the two keys") -> None:
        """``big`` must be a multiple of ``small``: one line naming both keys."""
        if big % small:
            raise ConfigError(f"{self.where}: {big_key} {big} is not a multiple of "
                              f"{small_key} {small}; {fix}")
