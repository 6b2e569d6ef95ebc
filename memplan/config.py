"""Read a Hugging Face model config (config.json) into a ModelSpec, without transformers.

Supported model types: llama, mistral, qwen2 (the Llama-style family) and gpt2. The defaults
for missing keys are those of the transformers config classes of the same names.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from memplan.errors import ConfigError
from memplan.spec import ModelSpec

# A real config.json is a few KiB; anything far larger is not one (and must not fill memory).
MAX_CONFIG_BYTES = 4 * 2**20
# Bounds that no real transformer comes near, so that 1e308 fails fast and clearly.
_MAX_DIM = 2**22
_MAX_VOCAB = 2**26
_MAX_LAYERS = 10_000

# Values quoted in error messages stay short and shallow, whatever the file holds.
_REPR = reprlib.Repr()  # Python 3.10 and 3.11 take no keyword arguments here
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 2


def _show(value: Any) -> str:
    return _REPR.repr(value)


LLAMA_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_TYPES = (*LLAMA_TYPES, "gpt2")


def _int(cfg: dict[str, Any], key: str, where: str, default: Any = None,
         upper: int = _MAX_DIM) -> int:
    value = cfg.get(key)
    if value is None:  # absent or null: transformers uses the default
        value = default
    if value is None:
        raise ConfigError(f"{where}: missing {key!r}; a {cfg.get('model_type')} config needs it")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {key} must be an integer, got {_show(value)}")
    if not 0 < value <= upper:
        raise ConfigError(f"{where}: {key} = {value} is out of range (1 to {upper})")
    return value


def _bool(cfg: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {_show(value)}")
    return value


def _name(cfg: dict[str, Any], key: str, where: str, default: str) -> str:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise ConfigError(f"{where}: {key} must be the name of an activation, got "
                          f"{_show(value)}")
    return value


def _prob(cfg: dict[str, Any], key: str, where: str) -> float:
    value = cfg.get(key, 0.0) or 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"{where}: {key} must be a probability in [0, 1), got {_show(value)}")
    return float(value)


def closest_family(cfg: dict[str, Any]) -> str | None:
    """The supported model type whose config keys a config of another type uses: gpt2's
    (n_embd, n_layer, n_head) or Llama's (hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size); None when it has neither."""
    if all(k in cfg for k in ("n_embd", "n_layer", "n_head")):
        return "gpt2"
    if all(k in cfg for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                              "intermediate_size")):
        return "llama"
    return None


def family_warning(spec: ModelSpec) -> str | None:
    """The warning for a spec planned with another family's profile, or None."""
    if spec.model_type and spec.model_type not in SUPPORTED_TYPES:
        return (f"model_type {spec.model_type!r} has no implementation profile; planned as the "
                f"closest family, {'gpt2' if spec.family == 'gpt2' else 'llama'}")
    return None


def spec_from_config(cfg: Any, name: str = "config", where: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a parsed Hugging Face config dictionary."""
    where = where or name
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: a model config must be a JSON object, got "
                          f"{type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type is not None and (not isinstance(model_type, str) or len(model_type) > 64):
        raise ConfigError(f"{where}: model_type must be a name such as 'llama', got "
                          f"{_show(model_type)}")
    if model_type not in SUPPORTED_TYPES and closest_family(cfg):
        # No implementation profile: plan the closest family (the CLI warns, naming it).
        spec = spec_from_config(cfg | {"model_type": closest_family(cfg)}, name, where)
        return replace(spec, model_type=str(model_type))
    if model_type not in SUPPORTED_TYPES:
        raise ConfigError(f"{where}: model_type {_show(model_type)} is not supported; supported: "
                          f"{', '.join(SUPPORTED_TYPES)}")
    if model_type == "gpt2":
        hidden = _int(cfg, "n_embd", where)
        heads = _int(cfg, "n_head", where)
        if hidden % heads:
            raise ConfigError(f"{where}: n_embd {hidden} is not a multiple of n_head {heads}")
        return ModelSpec(
            name=name, family="gpt2", model_type=model_type,
            vocab_size=_int(cfg, "vocab_size", where, upper=_MAX_VOCAB),
            hidden_size=hidden,
            num_layers=_int(cfg, "n_layer", where, upper=_MAX_LAYERS),
            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
            intermediate_size=_int(cfg, "n_inner", where, default=4 * hidden),
            gated_mlp=False, activation=_name(cfg, "activation_function", where, "gelu_new"),
            qkv_bias=True, out_bias=True, mlp_bias=True, norm="layernorm",
            tie_embeddings=_bool(cfg, "tie_word_embeddings", where, True),
            learned_positions=True,
            max_positions=_int(cfg, "n_positions", where, default=1024, upper=2**24),
            dropout=_prob(cfg, "resid_pdrop", where),
        )
    hidden = _int(cfg, "hidden_size", where)
    heads = _int(cfg, "num_attention_heads", where)
    kv_heads = _int(cfg, "num_key_value_heads", where, default=heads)
    if cfg.get("head_dim") is None and hidden % heads:
        raise ConfigError(f"{where}: hidden_size {hidden} is not a multiple of "
                          f"num_attention_heads {heads}; give head_dim")
    head_dim = _int(cfg, "head_dim", where, default=hidden // heads)
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of "
                          f"num_key_value_heads {kv_heads}")
    # transformers: Llama's attention_bias covers q, k, v and o; Qwen2 always biases q, k, v
    # and never o; Mistral has no biases.
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False
    elif model_type == "llama":
        qkv_bias = out_bias = _bool(cfg, "attention_bias", where, False)
    else:
        qkv_bias = out_bias = False
    act = _name(cfg, "hidden_act", where, "silu")
    return ModelSpec(
        name=name, family="llama", model_type=model_type,
        vocab_size=_int(cfg, "vocab_size", where, upper=_MAX_VOCAB),
        hidden_size=hidden,
        num_layers=_int(cfg, "num_hidden_layers", where, upper=_MAX_LAYERS),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=_int(cfg, "intermediate_size", where),
        gated_mlp=True, activation=act,
        qkv_bias=qkv_bias, out_bias=out_bias,
        mlp_bias=model_type == "llama" and _bool(cfg, "mlp_bias", where, False),
        norm="rmsnorm",
        tie_embeddings=_bool(cfg, "tie_word_embeddings", where, False),
        learned_positions=False,
        max_positions=_int(cfg, "max_position_embeddings", where, default=4096, upper=2**24),
        dropout=_prob(cfg, "attention_dropout", where),
    )


def load_config(path: str | Path) -> ModelSpec:
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
    return spec_from_config(cfg, name=name or "config", where=str(path))


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
    model_type = spec.model_type if spec.model_type in SUPPORTED_TYPES else (
        "gpt2" if spec.family == "gpt2" else "llama")
    if model_type == "gpt2":
        return {"model_type": "gpt2", "vocab_size": spec.vocab_size, "n_embd": spec.hidden_size,
                "n_layer": spec.num_layers, "n_head": spec.num_heads,
                "n_inner": spec.intermediate_size, "n_positions": spec.max_positions,
                "activation_function": spec.activation,
                "resid_pdrop": spec.dropout, "embd_pdrop": spec.dropout,
                "attn_pdrop": spec.dropout, "tie_word_embeddings": spec.tie_embeddings}
    cfg = {"model_type": model_type, "vocab_size": spec.vocab_size,
           "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
           "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
           "head_dim": spec.head_dim, "intermediate_size": spec.intermediate_size,
           "hidden_act": spec.activation, "max_position_embeddings": spec.max_positions,
           "attention_dropout": spec.dropout, "tie_word_embeddings": spec.tie_embeddings}
    if model_type == "llama":
        cfg |= {"attention_bias": spec.qkv_bias, "mlp_bias": spec.mlp_bias}
    return cfg
