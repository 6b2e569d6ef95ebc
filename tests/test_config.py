"""Hugging Face config.json → ModelSpec: every preset, the edge cases, and hostile files."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from memplan.config import MAX_CONFIG_BYTES, load_config, spec_from_config
from memplan.errors import ConfigError, MemplanError
from memplan.params import bias_params, count_params
from memplan.presets import get_model, model_names

PRESET_DIR = Path(str(resources.files("memplan.presets") / "models"))


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, MemplanError)
    assert issubclass(ConfigError, ValueError)


def test_presets_are_listed() -> None:
    names = model_names()
    assert len(names) >= 14
    assert names == tuple(sorted(p.stem for p in PRESET_DIR.glob("*.json")))


@pytest.mark.parametrize("name", model_names())
def test_preset_file_loads_and_equals_get_model(name: str) -> None:
    spec = load_config(PRESET_DIR / f"{name}.json")
    assert spec.name == name
    assert spec == get_model(name)


@pytest.mark.parametrize("name", ["llama-2-7b", "gpt2", "qwen2.5-0.5b"])
def test_preset_folder_with_config_json(tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text((PRESET_DIR / f"{name}.json").read_text())
    from_dir = load_config(folder)
    from_file = load_config(folder / "config.json")
    assert from_dir == from_file == get_model(name)  # named after the folder


def test_get_model_is_case_insensitive() -> None:
    assert get_model(" Llama-2-7B ") == get_model("llama-2-7b")


def _write(tmp_path: Path, cfg, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    return path


LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
         "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 100}


# ---- edge cases of the transformers config classes ---------------------------------------------

def test_llama_defaults_kv_heads_and_head_dim() -> None:
    spec = spec_from_config(LLAMA)
    assert spec.num_kv_heads == 4          # num_key_value_heads defaults to the heads
    assert spec.head_dim == 16             # head_dim defaults to hidden / heads
    assert spec.max_positions == 2048      # LlamaConfig.max_position_embeddings
    assert not spec.qkv_bias and not spec.out_bias and not spec.mlp_bias
    assert not spec.tie_embeddings
    assert spec.family == "llama" and spec.norm == "rmsnorm"


def test_explicit_kv_heads_and_head_dim() -> None:
    spec = spec_from_config(LLAMA | {"num_key_value_heads": 2, "head_dim": 32})
    assert (spec.num_kv_heads, spec.head_dim) == (2, 32)
    assert spec.q_dim == 128 and spec.kv_dim == 64



@pytest.mark.parametrize("key", ["num_key_value_heads", "head_dim"])
def test_null_kv_heads_or_head_dim_means_default(key: str) -> None:
    spec = spec_from_config(LLAMA | {key: None})
    assert (spec.num_kv_heads, spec.head_dim) == (4, 16)


def test_gpt2_null_n_inner_means_four_times_hidden() -> None:
    # e.g. the GPT2Config printed by transformers 4.3-4.39: "n_inner": null
    assert spec_from_config(GPT2 | {"n_inner": None}).intermediate_size == 256


def test_head_dim_needed_when_hidden_not_divisible() -> None:
    with pytest.raises(ConfigError, match="head_dim"):
        spec_from_config(LLAMA | {"num_attention_heads": 5})
    spec = spec_from_config(LLAMA | {"num_attention_heads": 5, "num_key_value_heads": 5,
                                     "head_dim": 16})
    assert spec.q_dim == 80


def test_kv_heads_must_divide_heads() -> None:
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        spec_from_config(LLAMA | {"num_key_value_heads": 3})


def test_llama_attention_bias_covers_qkvo() -> None:
    plain = spec_from_config(LLAMA)
    biased = spec_from_config(LLAMA | {"attention_bias": True})
    assert biased.qkv_bias and biased.out_bias and not biased.mlp_bias
    # q (64) + k (64) + v (64) + o (64) biases per block
    assert count_params(biased) - count_params(plain) == 2 * 4 * 64
    assert bias_params(biased) == 2 * 4 * 64


def test_llama_mlp_bias() -> None:
    spec = spec_from_config(LLAMA | {"mlp_bias": True})
    assert spec.mlp_bias
    assert bias_params(spec) == 2 * (128 + 128 + 64)


def test_qwen2_always_has_qkv_bias_and_no_o_bias() -> None:
    cfg = LLAMA | {"model_type": "qwen2", "num_key_value_heads": 2}
    for extra in ({}, {"attention_bias": False}, {"attention_bias": True}):
        spec = spec_from_config(cfg | extra)
        assert spec.qkv_bias and not spec.out_bias and not spec.mlp_bias
        assert bias_params(spec) == 2 * (64 + 32 + 32)
    assert get_model("qwen2.5-0.5b").qkv_bias and not get_model("qwen2.5-0.5b").out_bias


def test_mistral_has_no_biases() -> None:
    spec = spec_from_config(LLAMA | {"model_type": "mistral", "attention_bias": True,
                                     "mlp_bias": True})
    assert not (spec.qkv_bias or spec.out_bias or spec.mlp_bias)


def test_gpt2_defaults() -> None:
    spec = spec_from_config(GPT2)
    assert spec.family == "gpt2" and spec.norm == "layernorm"
    assert spec.intermediate_size == 4 * 64          # n_inner default
    assert spec.max_positions == 1024                 # n_positions default
    assert spec.tie_embeddings and spec.learned_positions
    assert spec.qkv_bias and spec.out_bias and spec.mlp_bias
    assert spec.num_kv_heads == spec.num_heads == 4 and spec.head_dim == 16
    assert spec_from_config(GPT2 | {"n_inner": 100}).intermediate_size == 100


def test_integral_floats_are_accepted() -> None:
    assert spec_from_config(LLAMA | {"hidden_size": 64.0}).hidden_size == 64


def test_tie_word_embeddings() -> None:
    untied = spec_from_config(LLAMA)
    tied = spec_from_config(LLAMA | {"tie_word_embeddings": True})
    assert count_params(untied) - count_params(tied) == 100 * 64
    gpt2_untied = spec_from_config(GPT2 | {"tie_word_embeddings": False})
    assert count_params(gpt2_untied) - count_params(spec_from_config(GPT2)) == 100 * 64


# ---- hostile configs: each a ConfigError with a clear message ---------------------------------

@pytest.mark.parametrize(("cfg", "pattern"), [
    ([1, 2, 3], "JSON object"),
    ("[]", "JSON object"),
    ("null", "JSON object"),
    ("42", "JSON object"),
    ({"model_type": "t5", "hidden_size": 8}, "model_type 't5' is not supported"),
    ({"hidden_size": 8}, "model_type None is not supported"),
    (LLAMA | {"hidden_size": "4096"}, "hidden_size must be an integer"),
    (LLAMA | {"vocab_size": "lots"}, "vocab_size must be an integer"),
    (LLAMA | {"num_hidden_layers": [2]}, "num_hidden_layers must be an integer"),
    (LLAMA | {"hidden_size": 64.5}, "hidden_size must be an integer"),
    (LLAMA | {"hidden_size": 1e308}, "hidden_size .* out of range"),
    (LLAMA | {"vocab_size": 10**30}, "vocab_size .* out of range"),
    (LLAMA | {"num_hidden_layers": -2}, "num_hidden_layers .* out of range"),
    (LLAMA | {"hidden_size": 0}, "hidden_size .* out of range"),
    (LLAMA | {"intermediate_size": -1.0}, "intermediate_size .* out of range"),
    (LLAMA | {"hidden_size": True}, "hidden_size must be an integer"),
    (LLAMA | {"num_attention_heads": False}, "num_attention_heads must be an integer"),
    (LLAMA | {"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    (LLAMA | {"attention_bias": 1}, "attention_bias must be true or false"),
    (LLAMA | {"attention_dropout": 1.5}, "attention_dropout must be a probability"),
    (LLAMA | {"attention_dropout": "0.1"}, "attention_dropout must be a probability"),
    (LLAMA | {"attention_dropout": True}, "attention_dropout must be a probability"),
    ({k: v for k, v in LLAMA.items() if k != "vocab_size"}, "missing 'vocab_size'"),
    ({k: v for k, v in GPT2.items() if k != "n_embd"}, "missing 'n_embd'"),
    (GPT2 | {"n_head": 5}, "not a multiple of n_head"),
    (GPT2 | {"n_layer": "12"}, "n_layer must be an integer"),
    (GPT2 | {"resid_pdrop": -0.1}, "resid_pdrop must be a probability"),
])
def test_hostile_dict_raises_config_error(tmp_path: Path, cfg, pattern: str) -> None:
    path = _write(tmp_path, cfg)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message  # says which file


@pytest.mark.parametrize(("text", "pattern"), [
    ('{"model_type": "llama", "hidden_size": NaN}', "NaN"),
    ('{"model_type": "llama", "hidden_size": Infinity}', "Infinity"),
    ('{"model_type": "llama", "hidden_size": -Infinity}', "Infinity"),
    ('{"model_type": "llama", "hidden_size": 1e400}', "hidden_size must be an integer"),
    ('{"model_type": "llama", "hidden_size": 1e308}', "out of range"),
    ("not json at all", "not valid JSON"),
    ('{"model_type": "llama"', "not valid JSON"),
    ("", "not valid JSON"),
    ('{"model_type": "llama",}', "not valid JSON"),
])
def test_hostile_text_raises_config_error(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(_write(tmp_path, text))


def test_nan_in_an_ignored_key_still_rejected(tmp_path: Path) -> None:
    text = json.dumps(LLAMA)[:-1] + ', "rope_theta": NaN}'
    with pytest.raises(ConfigError, match="NaN"):
        load_config(_write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(path)
    assert "missing.json" in str(info.value)


def test_directory_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "other.json").write_text(json.dumps(LLAMA))
    with pytest.raises(ConfigError, match="directory without a config.json"):
        load_config(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'{"model_type": "\xff\xfe"}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)


def test_huge_file_rejected_without_parsing(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    # valid JSON, a real config plus 5 MiB of padding: refused for its size alone
    padding = "x" * (5 * 2**20)
    path.write_text(json.dumps(LLAMA | {"padding": padding}))
    assert path.stat().st_size > MAX_CONFIG_BYTES
    with pytest.raises(ConfigError, match="too large") as info:
        load_config(path)
    assert str(MAX_CONFIG_BYTES) in str(info.value)


def test_file_just_under_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    base = json.dumps(LLAMA | {"padding": ""})
    padding = "x" * (MAX_CONFIG_BYTES - len(base))
    path.write_text(json.dumps(LLAMA | {"padding": padding}))
    assert path.stat().st_size == MAX_CONFIG_BYTES
    assert load_config(path).hidden_size == 64


@pytest.mark.parametrize("text", [
    "[" * 100_000,
    "[" * 100_000 + "]" * 100_000,
    '{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"a":' * 50_000 + "1" + "}" * 50_000,
])
def test_deep_nesting(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert len(str(info.value)) < 500


def test_spec_from_config_name_and_where() -> None:
    with pytest.raises(ConfigError, match="^somewhere: "):
        spec_from_config({"model_type": "t5"}, name="x", where="somewhere")
    assert spec_from_config(LLAMA, name="mine").name == "mine"
