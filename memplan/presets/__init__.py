"""Named architectures and GPUs, as data files from public sources.

``models/NAME.json`` are Hugging Face configs (the public values of each model's config.json;
the two tiny presets are ours, for real CPU runs). ``gpus.json`` lists capacities in bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

from memplan.config import spec_from_config
from memplan.errors import unknown
from memplan.spec import ModelSpec


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator: its name, the bytes the driver reports, and where that number is from."""

    name: str
    label: str
    capacity_bytes: int
    source: str


def _data():
    return resources.files("memplan.presets")


@cache
def model_names() -> tuple[str, ...]:
    """The names of every model preset."""
    names = (p.name[:-5] for p in (_data() / "models").iterdir() if p.name.endswith(".json"))
    return tuple(sorted(names))


@cache
def get_model(name: str) -> ModelSpec:
    """The ModelSpec of a preset, e.g. ``llama-2-7b``."""
    key = name.strip().lower()
    if key not in model_names():
        raise unknown("model preset", name, model_names())
    cfg = json.loads((_data() / "models" / f"{key}.json").read_text())
    return spec_from_config(cfg, name=key)


@cache
def gpus() -> dict[str, GpuSpec]:
    """The GPU catalogue, keyed by name."""
    rows = json.loads((_data() / "gpus.json").read_text())["gpus"]
    return {row["name"]: GpuSpec(**row) for row in rows}


def get_gpu(name: str) -> GpuSpec:
    """One GPU of the catalogue by name (case-insensitive)."""
    key = name.strip().lower()
    table = gpus()
    if key not in table:
        raise unknown("GPU", name, table)
    return table[key]
