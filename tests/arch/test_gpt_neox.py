"""GPT-NeoX (Pythia): config defaults, inventory against transformers and PEFT, the plan
against a FakeTensorMode measurement, and bad configs."""

from dataclasses import replace

import pytest

from memplan import arch
from memplan.config import spec_from_config
from memplan.errors import ConfigError
from memplan.params import buffer_bytes, count_params, lora_params
from memplan.presets import get_model
from memplan.spec import LoraSpec, TrainSpec

TINY = {"model_type": "gpt_neox", "vocab_size": 512, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def _spec(**keys):
    return spec_from_config(TINY | keys, name="neox")


def test_defaults_for_absent_keys() -> None:
    spec = spec_from_config({"model_type": "gpt_neox"})
    assert (spec.vocab_size, spec.hidden_size, spec.num_layers, spec.num_heads,
            spec.num_kv_heads, spec.head_dim, spec.intermediate_size) == \
        (50432, 6144, 44, 64, 64, 96, 24576)
    assert spec.activation == "gelu" and spec.max_positions == 2048
    assert not spec.tie_embeddings and spec.dropout == 0.0 and spec.norm == "layernorm"
    assert spec.qkv_bias and spec.out_bias and spec.mlp_bias and not spec.gated_mlp
    assert dict(spec.extras) == {"partial_rotary_factor": 0.25, "rope_theta": 10000.0,
                                 "use_parallel_residual": True, "hidden_dropout": 0.0}
    assert arch.profile_of(spec).rotary_dim(spec) == 24
    assert buffer_bytes(spec) == 2 * 12 * 4  # inv_freq and original_inv_freq


def test_rope_parameters_win_and_round_trip() -> None:
    spec = _spec(rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                  "partial_rotary_factor": 0.5},
                 use_parallel_residual=False, attention_bias=False, hidden_dropout=0.1)
    assert spec.extra("partial_rotary_factor") == 0.5 and spec.extra("rope_theta") == 500.0
    assert not spec.qkv_bias and spec.mlp_bias
    again = spec_from_config(arch.profile_of(spec).to_hf(spec), name=spec.name)
    assert again == spec


@pytest.mark.parametrize("name, total", [("pythia-160m", 162_322_944),
                                         ("pythia-6.9b", 6_857_302_016)])
def test_presets_have_the_published_counts(name: str, total: int) -> None:
    spec = get_model(name)
    assert count_params(spec) == total
    h, i = spec.hidden_size, spec.intermediate_size
    assert lora_params(spec, LoraSpec(rank=8)) == spec.num_layers * 8 * (8 * h + 2 * i)


@pytest.mark.parametrize("keys", [{}, {"tie_word_embeddings": True},
                                  {"attention_bias": False, "use_parallel_residual": False}])
def test_counts_equal_transformers_and_peft(keys: dict) -> None:
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from memplan.nn.hf import build_hf_model

    spec = _spec(**keys)
    model = build_hf_model(spec, device="meta").hf
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    ours = [(w.name, w.shape) for w in arch.profile_of(spec).block_weights(spec)]
    theirs = [(n.split(".0.", 1)[1], tuple(p.shape))
              for n, p in model.named_parameters() if ".0." in n]
    assert ours == theirs  # registration order too
    for targets, modules in (("all", "all-linear"),
                             ("attention", ["query_key_value", "dense"]),
                             ("mlp", ["dense_h_to_4h", "dense_4h_to_h"]),
                             (("query_key_value", "dense_4h_to_h"),
                              ["query_key_value", "dense_4h_to_h"])):
        fresh = build_hf_model(spec, device="meta").hf
        wrapped = peft.get_peft_model(fresh, peft.LoraConfig(r=4, target_modules=modules))
        expected = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        assert lora_params(spec, LoraSpec(rank=4, targets=targets)) == expected


@pytest.mark.parametrize("keys, kw", [
    ({}, dict(regime="full", batch=2, seq=64)),
    ({"use_parallel_residual": False, "rotary_pct": 1.0},
     dict(regime="lora-bf16", batch=2, seq=64, attention="eager", lora_backend="peft")),
])
def test_plan_equals_fake_measurement(keys: dict, kw: dict) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from memplan.profile.compare import profile

    result = profile(_spec(**keys), replace(TrainSpec(), impl="hf", **kw), device="fake",
                     steps=1)
    # within a few bytes: a 0-d scalar, and the rotary buffers cast to bf16 (planned in fp32)
    assert abs(result.predicted.total_bytes - result.measured.peak_bytes) <= 32


@pytest.mark.parametrize("keys, named", [
    ({"rotary_pct": 0.5, "rope_parameters": {"partial_rotary_factor": 0.25}},
     ("rotary_pct", "partial_rotary_factor")),
    ({"rotary_emb_base": 10000, "rope_parameters": {"rope_theta": 500}},
     ("rotary_emb_base", "rope_theta")),
    ({"head_dim": 32}, ("head_dim", "hidden_size")),
    ({"hidden_size": 66}, ("hidden_size", "num_attention_heads")),
    ({"rotary_pct": 1.5}, ("rotary_pct",)),
    ({"rotary_pct": 0.01}, ("rotary_pct",)),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, ("rope_type",)),
    ({"use_parallel_residual": "yes"}, ("use_parallel_residual",)),
    ({"hidden_dropout": 1.5}, ("hidden_dropout",)),
])
def test_bad_configs_name_their_keys(keys: dict, named: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as err:
        _spec(**keys)
    for key in named:
        assert key in str(err.value)
