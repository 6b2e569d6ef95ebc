"""The error types of memplan.

Every bad input raises :class:`MemplanError` (or a subclass) with one line that names the
value and the fix. The CLI catches it in one place and exits with code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MemplanError(ValueError):
    """A bad input: the message names the value and how to fix it."""


class ConfigError(MemplanError):
    """A model config file that cannot be read or is not supported."""


class UnprofiledModel(ConfigError):
    """A config whose model_type has no architecture profile. ``cfg`` is the parsed config,
    so that a caller with transformers can measure it instead; ``train`` is set by the CLI."""

    def __init__(self, message: str, cfg: dict, where: str) -> None:
        super().__init__(message)
        self.cfg = cfg
        self.where = where
        self.train = None


class OutOfMemory(RuntimeError):
    """A measured run exceeded the memory it was given (a result, not a crash)."""

    def __init__(self, message: str, measured_bytes: int = 0) -> None:
        super().__init__(message)
        self.measured_bytes = measured_bytes


def suggest(value: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(kind: str, value: str, choices: Iterable[str]) -> MemplanError:
    """Build the error for an unknown name, suggesting the closest known one."""
    choices = sorted(choices)
    return MemplanError(
        f"unknown {kind} {value!r}{suggest(value, choices)}; known: {', '.join(choices)}"
    )
