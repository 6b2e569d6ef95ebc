"""Read a Hugging Face model config (config.json) into a ModelSpec, without transformers.

Each model type is read by its architecture profile (:mod:`memplan.arch`), with the defaults
of its transformers config class for missing keys.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from memplan import arch
from memplan.arch.keys import show
from memplan.errors import ConfigError, UnprofiledModel
from memplan.spec import ModelSpec

# A real config.json is a few KiB; anything far larger is not one (and must not fill memory).
MAX_CONFIG_BYTES = 4 * 2**20


def supported_types() -> tuple[str, ...]:
    """Every model_type memplan has an architecture profile for."""
    return arch.model_types()


def spec_from_config(cfg: Any, name: str = "config", where: str | None = None,
                     as_family: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a parsed Hugging Face config dictionary.

    The config's ``model_type`` picks the architecture profile that reads it. A type with no
    profile is refused, unless ``as_family`` names a profile to approximate it with: the spec
    then says so in ``approximation``, and every output repeats it.
    """
    where = where or name
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: a model config must be a JSON object, got "
                          f"{type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type is not None and (not isinstance(model_type, str) or len(model_type) > 64):
        raise ConfigError(f"{where}: model_type must be a name such as 'llama', got "
                          f"{show(model_type)}")
    if as_family is not None:
        profile = arch.get(as_family)
        if profile is None:
            raise ConfigError(f"--as {as_family!r} is not a model type memplan knows; use one "
                              f"of {', '.join(supported_types())}")
        if model_type == as_family:
            return profile.read(cfg, name, where)
        spec = profile.read(cfg | {"model_type": as_family}, name, where)
        note = (f"approximation: model_type {model_type!r} planned with the {as_family} "
                "profile (--as); its own layout may differ")
        return replace(spec, model_type=str(model_type), approximation=note)
    profile = arch.get(model_type) if isinstance(model_type, str) else None
    if profile is None:
        raise UnprofiledModel(
            f"{where}: model_type {show(model_type)} is not supported: no architecture profile "
            f"(supported: {', '.join(supported_types())}); pip install 'memplan[hf]' to measure "
            "it with a dry run of the transformers model, or approximate it with --as llama",
            cfg, where)
    return profile.read(cfg, name, where)


def approximation_warning(spec: ModelSpec) -> str | None:
    """The warning for a spec planned with another family's profile (``--as``), or None."""
    return spec.approximation or None


def load_config(path: str | Path, as_family: str | None = None) -> ModelSpec:
    """Read config.json at ``path`` (a file, or a folder holding config.json)."""
    path, raw = _read(Path(path))
    try:
        cfg = json.loads(raw.decode("utf-8-sig"), parse_constant=_reject_constant)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a model config") from None
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of thousands of digits
        reason = str(exc).splitlines()[0][:200]
        raise ConfigError(f"{path} is not valid JSON ({reason}); give a Hugging Face "
                          "config.json") from None
    name = path.parent.name if path.name == "config.json" else path.stem
    return spec_from_config(cfg, name=name or "config", where=str(path), as_family=as_family)


def _read(path: Path) -> tuple[Path, bytes]:
    """The config file's bytes, refused by its size before reading: never more than the limit."""
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ConfigError(f"{path} is a directory without a config.json; give the file")
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist; check the path")
        if not path.is_file():  # a pipe or a device could block or never end
            raise ConfigError(f"{path} is not a regular file; give a config.json file")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is {size} bytes, far too large for a model config "
                              f"(limit {MAX_CONFIG_BYTES}); give the model's config.json")
        with path.open("rb") as handle:
            return path, handle.read(MAX_CONFIG_BYTES + 1)
    except ConfigError:
        raise
    except OSError as exc:  # unreadable, or a name too long for the file system
        raise ConfigError(f"cannot read {str(path)[:200]!r}: {exc.strerror or exc}") from None
    except ValueError as exc:  # e.g. an embedded NUL in the path
        raise ConfigError(f"{str(path)[:200]!r} is not a usable file name ({exc})") from None


def _reject_constant(token: str) -> float:
    raise ConfigError(f"config holds {token}, which is not a valid size")


def hf_config(spec: ModelSpec) -> dict[str, Any]:
    """The Hugging Face config of a ModelSpec (the inverse of :func:`spec_from_config`)."""
    if spec.approximation:
        raise ConfigError(f"{spec.name} is an approximation ({spec.approximation}); memplan "
                          "builds only the model a config really describes: drop --as")
    return arch.profile_of(spec).to_hf(spec)
