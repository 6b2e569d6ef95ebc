"""Architecture profiles: one module per model family, registered by Hugging Face model_type.

Every module of this package except ``base``, ``keys`` and ``parts`` is a family; it lists its
profiles in ``PROFILES``. Adding a family is adding a module: the registry finds it.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType

from memplan.arch.base import Job, LinearShape, Profile, Weight

__all__ = ["Job", "LinearShape", "Profile", "Weight", "families", "get", "model_types",
           "profile_of"]

_SHARED = {"base", "keys", "parts"}


@cache
def _modules() -> tuple[ModuleType, ...]:
    """The family modules, by name."""
    return tuple(importlib.import_module(f"{__name__}.{info.name}")
                 for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
                 if info.name not in _SHARED and not info.name.startswith("_"))


@cache
def _registry() -> dict[str, Profile]:
    table: dict[str, Profile] = {}
    for module in _modules():
        for profile in getattr(module, "PROFILES", ()):
            for model_type in profile.model_types:
                if model_type in table:
                    raise RuntimeError(f"model_type {model_type!r} is claimed by two profiles")
                table[model_type] = profile
    return table


def model_types() -> tuple[str, ...]:
    """Every Hugging Face model_type with a profile."""
    return tuple(sorted(_registry()))


@cache
def families() -> tuple[str, ...]:
    """The family names a ModelSpec may carry."""
    return tuple(sorted({p.family for p in _registry().values()}))


def get(model_type: str) -> Profile | None:
    """The profile of a model_type, or None."""
    return _registry().get(model_type)


def profile_of(spec) -> Profile:  # noqa: ANN001 (a ModelSpec; typed loosely to stay cycle-free)
    """The profile that plans ``spec``: its model_type's, else its family's first."""
    found = _registry().get(spec.model_type)
    if found is not None and found.family == spec.family:
        return found
    for profile in _registry().values():
        if profile.family == spec.family and profile.model_types[0] == spec.family:
            return profile
    return next(p for p in _registry().values() if p.family == spec.family)


def validation_rows(table: str) -> list[tuple]:
    """The rows a family module adds to a validation matrix (``HF_CPU_ROWS``,
    ``HF_FAKE_ROWS``): (preset, TrainSpec fields, ModelSpec fields), in module order."""
    return [row for module in _modules() for row in getattr(module, table, ())]
