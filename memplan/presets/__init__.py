"""Named architectures and GPUs, as data files from public sources.

``models/NAME.json`` are Hugging Face configs (the public values of each model's config.json;
the two tiny presets are ours, for real CPU runs). ``gpus.json`` lists each GPU's capacity as the
card reports it (MiB, with the source) or, where no report was found, the vendor's gigabytes as a
lower bound; and its peak dense bf16 throughput with the datasheet it comes from.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from memplan.config import spec_from_config
from memplan.errors import MemplanError, unknown
from memplan.spec import ModelSpec


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator: its name, the bytes the driver reports, and where that number is from.

    ``bound``: no reported total was found, so ``capacity_bytes`` is the vendor's gigabytes
    × 10⁹, a lower bound on the real total. ``reported_mib``: the total as reported (nvidia-smi's
    memory.total, rocminfo's pool size). ``bf16_tflops``: peak dense bf16 tensor throughput from
    the datasheet in ``flops_source``/``flops_url`` (None where the card has no bf16 tensor cores
    or no figure is published).
    """

    name: str
    label: str
    capacity_bytes: int
    source: str
    bound: bool = False
    source_url: str = ""
    reported_mib: int | None = None
    aliases: tuple[str, ...] = ()
    device_names: tuple[str, ...] = ()
    bf16_tflops: float | None = None
    flops_source: str = ""
    flops_url: str = ""


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


def find_model(name: str, as_family: str | None = None) -> tuple[ModelSpec, str]:
    """A model as users name it, and a phrase saying where it came from.

    In order: a preset (``llama-3-8b``; presets win), a local model folder or config file
    (``./my-model``), a Hugging Face repository id (``meta-llama/Llama-3.1-8B``: its config.json
    from the local hub cache, else downloaded alone; :mod:`memplan.hub`). ``as_family``
    approximates a config's unprofiled model_type (``--as``); a preset needs none.

    Raises:
        MemplanError: an unknown name, or a hub config that cannot be had (one line each).
        UnprofiledModel: a config whose model_type has no profile (the CLI may measure it).
    """
    from pathlib import Path

    from memplan import hub
    from memplan.config import load_config

    key = name.strip()
    if key.lower() in model_names():
        if as_family is not None:
            raise MemplanError(f"--as approximates a config of another model_type; {key} is a "
                               "preset with its own profile: drop --as")
        spec = get_model(key)
        return spec, f"preset {spec.name}"
    try:
        path = Path(key).expanduser() if key else None
        local = path is not None and path.exists()
    except (OSError, ValueError, RuntimeError):  # too long, a NUL, ~user unknown
        local = False
    if local:
        return load_config(path, as_family=as_family), f"config {path}"
    if "/" in key and hub.is_repo_id(key):
        from dataclasses import replace

        try:
            config = hub.config_path(key)
        except MemplanError as exc:
            close = difflib.get_close_matches(key.rsplit("/", 1)[1].lower(), model_names(),
                                              n=1, cutoff=0.75)
            if not close:
                raise
            raise type(exc)(f"{exc}; or plan the preset: --model {close[0]}") from None
        spec = replace(load_config(config, as_family=as_family), name=key)
        return spec, f"config.json of {key} ({config})"
    cached = hub.cached_config(key) if key and hub.is_repo_id(key) else None
    if cached is not None:  # a hub name without an owner (gpt2, bert-base-uncased), cached
        from dataclasses import replace

        return replace(load_config(cached, as_family=as_family), name=key), \
            f"config.json of {key} ({cached})"
    raise MemplanError(f"{unknown('model preset', name, model_names())}; or give a Hugging "
                       "Face name such as meta-llama/Llama-3.1-8B, or a model folder")


@cache
def gpus() -> dict[str, GpuSpec]:
    """The GPU catalogue, keyed by name."""
    rows = json.loads((_data() / "gpus.json").read_text())["gpus"]
    table = {}
    for row in rows:
        row = dict(row)
        mib = row.pop("capacity_mib", None)
        if mib is not None:
            row["capacity_bytes"], row["reported_mib"] = mib * 2**20, mib
        row["aliases"] = tuple(row.get("aliases", ()))
        row["device_names"] = tuple(row.get("device_names", ()))
        table[row["name"]] = GpuSpec(**row)
    return table


_VENDOR_WORDS = frozenset({"nvidia", "geforce", "tesla", "amd", "instinct", "gpu"})


def gpu_key(name: str) -> str:
    """A name reduced to what identifies the card: lower case, no vendor words, no separators.

    ``"NVIDIA GeForce RTX 4090"``, ``"rtx-4090"`` and ``"RTX 4090"`` all become ``rtx4090``.
    """
    words = re.split(r"[^0-9a-z]+", name.lower())
    return "".join(w for w in words if w and w not in _VENDOR_WORDS)


@cache
def _gpu_index() -> dict[str, str]:
    """Every key a GPU answers to (its name, aliases and the names drivers report) → its name."""
    index: dict[str, str] = {}
    for g in gpus().values():
        for alias in (g.name, *g.aliases, *g.device_names):
            key = gpu_key(alias)
            if index.setdefault(key, g.name) != g.name:
                raise ValueError(f"gpus.json: {alias!r} names both {index[key]} and {g.name}")
    return index


def get_gpu(name: str) -> GpuSpec:
    """One GPU of the catalogue by name, forgivingly.

    Case, spaces, dashes and vendor words do not matter, and the names ``nvidia-smi`` and
    ``torch.cuda.get_device_name`` print are known: ``H100`` is the 80 GB SXM card, ``4090`` the
    GeForce RTX 4090, ``a100`` the 80 GB card. An unknown name raises one line with the closest
    names.
    """
    index = _gpu_index()
    key = gpu_key(str(name))
    if key in index:
        return gpus()[index[key]]
    close = difflib.get_close_matches(key, list(index), n=8, cutoff=0.6) if key else []
    names = list(dict.fromkeys(index[k] for k in close))[:3]
    if names:
        raise MemplanError(f"unknown GPU {name!r}; closest: {', '.join(names)} "
                           "(`memplan gpus` lists them all, or give --memory SIZE)")
    raise MemplanError(f"unknown GPU {name!r}; known: {', '.join(gpus())} "
                       "(or give --memory SIZE)")
