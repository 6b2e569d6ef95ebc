"""The architecture registry and what every profile promises, whatever its family."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from memplan import arch
from memplan.config import spec_from_config
from memplan.errors import ConfigError, MemplanError
from memplan.params import count_params, resolve_targets
from memplan.planner import plan
from memplan.presets import get_model, model_names
from memplan.spec import LoraSpec, ModelSpec, TrainSpec

PRESETS = Path(__file__).resolve().parents[2] / "memplan" / "presets" / "models"


def test_every_model_type_has_one_profile_and_every_family_a_preset() -> None:
    types = arch.model_types()
    assert {"llama", "mistral", "qwen2", "gpt2", "qwen3"} <= set(types)
    families = {get_model(name).family for name in model_names()}
    assert set(arch.families()) <= families, "a family without a preset"


@pytest.mark.parametrize("name", model_names())
def test_a_preset_round_trips_through_its_profile(name: str) -> None:
    """read(to_hf(spec)) is spec again: the model memplan builds is the one it plans."""
    spec = get_model(name)
    again = spec_from_config(arch.profile_of(spec).to_hf(spec), name=name)
    assert again == spec


@pytest.mark.parametrize("name", model_names())
def test_every_preset_says_where_it_came_from(name: str) -> None:
    cfg = json.loads((PRESETS / f"{name}.json").read_text())
    assert cfg.get("_source") or name in {"llama-tiny", "gpt2-tiny"} or name in ORIGINAL


# The round-1 presets, from the public configs listed in the team's reference folder.
ORIGINAL = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt3-175b", "llama-2-7b",
            "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b",
            "qwen2.5-0.5b", "qwen2.5-7b", "tinyllama-1.1b"}


def test_gpt2_dropouts_default_to_gpt2config() -> None:
    cfg = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100}
    assert spec_from_config(cfg).dropout == 0.1
    assert spec_from_config(cfg | {"resid_pdrop": 0.0}).dropout == 0.0


def test_qwen3_head_dim_defaults_to_128_not_hidden_over_heads() -> None:
    cfg = {"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 2,
           "num_attention_heads": 16, "intermediate_size": 3072, "vocab_size": 1000}
    spec = spec_from_config(cfg)
    assert spec.head_dim == 128 and spec.num_kv_heads == 16


def test_targets_name_the_family_modules() -> None:
    qwen3 = get_model("qwen3-tiny")
    assert [l.name for l in resolve_targets(qwen3, "q_proj,v_proj")] == \
        ["self_attn.q_proj", "self_attn.v_proj"]
    with pytest.raises(MemplanError, match="c_attn.*known: all, mlp, attention, q_proj"):
        resolve_targets(qwen3, "c_attn")
    with pytest.raises(MemplanError, match="known: all, mlp, attention, c_attn"):
        resolve_targets(get_model("gpt2-tiny"), "q_proj")


def test_contradicting_heads_name_both_keys() -> None:
    cfg = {"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 2,
           "num_attention_heads": 16, "num_key_value_heads": 6, "intermediate_size": 3072,
           "vocab_size": 1000}
    with pytest.raises(ConfigError, match="num_attention_heads 16 is not a multiple of "
                                          "num_key_value_heads 6"):
        spec_from_config(cfg)


def test_a_family_without_a_reference_model_is_planned_as_hugging_face_runs_it() -> None:
    spec = get_model("qwen3-tiny")
    job = dict(regime="lora", batch=2, seq=64)
    assert plan(spec, TrainSpec(**job)) == plan(spec, TrainSpec(impl="hf", **job))


def test_an_unknown_family_is_refused() -> None:
    with pytest.raises(MemplanError, match="model family 'falcon'"):
        replace(get_model("llama-tiny"), family="falcon")


def test_extras_are_read_back() -> None:
    spec = get_model("llama-tiny").with_extras(a=1)
    assert spec.extra("a") == 1 and spec.extra("b", 2) == 2
    assert isinstance(spec, ModelSpec) and count_params(spec) == count_params(
        get_model("llama-tiny"))
    assert LoraSpec().targets == "all"
