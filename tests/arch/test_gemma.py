"""Gemma, Gemma 2 and Gemma 3 text: config defaults, inventory against transformers and PEFT,
the plan against a FakeTensorMode measurement, and bad configs."""

from dataclasses import replace

import pytest

from memplan import arch
from memplan.config import spec_from_config
from memplan.errors import ConfigError, MemplanError
from memplan.params import count_params, lora_params
from memplan.spec import LoraSpec, TrainSpec

TINY = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16}


def _spec(model_type: str, **keys):
    return spec_from_config({"model_type": model_type} | TINY | keys, name=model_type)


def test_gemma_defaults_for_absent_keys() -> None:
    spec = spec_from_config({"model_type": "gemma", "hidden_act": "gelu"})
    assert (spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.num_layers,
            spec.num_heads, spec.num_kv_heads, spec.head_dim) == \
        (256000, 3072, 24576, 28, 16, 16, 256)
    assert spec.tie_embeddings and spec.max_positions == 8192
    assert spec.activation == "gelu_pytorch_tanh"  # the legacy "gelu" is rewritten
    assert not (spec.qkv_bias or spec.out_bias or spec.mlp_bias)


def test_gemma2_and_gemma3_defaults() -> None:
    g2 = spec_from_config({"model_type": "gemma2"})
    assert (g2.vocab_size, g2.hidden_size, g2.num_layers, g2.num_kv_heads) == \
        (256000, 2304, 26, 4)
    assert g2.tie_embeddings and g2.max_positions == 8192
    assert g2.extra("attn_logit_softcapping") == 50.0
    assert g2.extra("final_logit_softcapping") == 30.0
    assert g2.extra("sliding_window") == 4096
    types = arch.profile_of(g2).layer_types(g2)
    assert types[:2] == ("sliding_attention", "full_attention") and len(types) == 26
    off = spec_from_config({"model_type": "gemma2", "final_logit_softcapping": None})
    assert off.extra("final_logit_softcapping") is None  # null disables it, as in transformers
    g3 = spec_from_config({"model_type": "gemma3_text"})
    assert g3.vocab_size == 262208 and g3.max_positions == 131072 and g3.tie_embeddings
    assert g3.extra("final_logit_softcapping") is None
    types = arch.profile_of(g3).layer_types(g3)
    assert [i for i, t in enumerate(types) if t == "full_attention"] == [5, 11, 17, 23]
    assert arch.profile_of(g3).rope_types(g3) == 2
    short = replace(g3, num_layers=4)  # no full layer: one rotary table pair
    assert arch.profile_of(short).rope_types(short) == 1


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text"])
def test_round_trip(model_type: str) -> None:
    spec = _spec(model_type, sliding_window_pattern=3)
    profile = arch.profile_of(spec)
    again = spec_from_config(profile.to_hf(spec), name=spec.name)
    assert again == spec
    changed = replace(spec, num_layers=7)  # fewer or more layers: the pattern's types
    again = spec_from_config(profile.to_hf(changed), name=spec.name)
    if model_type != "gemma":
        assert profile.layer_types(again) == profile.layer_types(changed)
        assert len(profile.layer_types(again)) == 7


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text"])
def test_counts_equal_transformers_and_peft(model_type: str) -> None:
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from memplan.nn.hf import build_hf_model

    spec = _spec(model_type, tie_word_embeddings=model_type == "gemma2")
    model = build_hf_model(spec, device="meta").hf
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    ours = sorted((w.name, w.shape) for w in arch.profile_of(spec).block_weights(spec))
    theirs = sorted((n.split(".0.", 1)[1], tuple(p.shape))
                    for n, p in model.named_parameters() if ".0." in n)
    assert ours == theirs
    for targets, modules in (("all", "all-linear"),
                             ("attention", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                             ("mlp", ["gate_proj", "up_proj", "down_proj"]),
                             (("q_proj", "down_proj"), ["q_proj", "down_proj"])):
        fresh = build_hf_model(spec, device="meta").hf
        wrapped = peft.get_peft_model(fresh, peft.LoraConfig(r=4, target_modules=modules))
        expected = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        assert lora_params(spec, LoraSpec(rank=4, targets=targets)) == expected


@pytest.mark.parametrize("model_type, kw", [
    ("gemma2", dict(regime="full", batch=2, seq=64, attention="eager")),
    ("gemma3_text", dict(regime="lora-bf16", batch=2, seq=64, lora_backend="peft")),
])
def test_plan_equals_fake_measurement(model_type: str, kw: dict) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from memplan.profile.compare import profile

    spec = _spec(model_type, sliding_window=32, num_hidden_layers=6, layer_types=None)
    result = profile(spec, replace(TrainSpec(), impl="hf", **kw), device="fake", steps=1)
    assert abs(result.relative_error) < 1e-4


def test_gemma2_refuses_sdpa() -> None:
    from memplan.activations import plan_activations
    from memplan.regimes import model_state

    spec = _spec("gemma2")
    train = TrainSpec(regime="full", batch=1, seq=64)
    with pytest.raises(MemplanError, match="eager"):
        plan_activations(spec, train, model_state(spec, train))


@pytest.mark.parametrize("keys, named", [
    ({"model_type": "gemma2", "layer_types": ["full_attention"]},
     ("layer_types", "num_hidden_layers")),
    ({"model_type": "gemma3_text", "layer_types": ["global"] * 3}, ("layer_types",)),
    ({"model_type": "gemma2", "hidden_size": 66}, ("hidden_size", "num_attention_heads")),
    ({"model_type": "gemma", "num_key_value_heads": 3}, ("num_key_value_heads",)),
    ({"model_type": "gemma2", "attn_logit_softcapping": -1}, ("attn_logit_softcapping",)),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True},
     ("use_bidirectional_attention",)),
])
def test_bad_configs_name_their_keys(keys: dict, named: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as err:
        spec_from_config(TINY | keys)
    for key in named:
        assert key in str(err.value)
