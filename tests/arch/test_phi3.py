"""Phi-3: config defaults, counts against transformers and PEFT (fused qkv_proj and
gate_up_proj), plans against fake-mode measurements, and bad configs."""

from dataclasses import replace

import pytest

from memplan.arch import profile_of
from memplan.config import spec_from_config
from memplan.errors import ConfigError, MemplanError
from memplan.params import count_params, lora_params, resolve_targets
from memplan.presets import get_model
from memplan.spec import LoraSpec, TrainSpec

TINY = {"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "num_hidden_layers": 2,
        "vocab_size": 256}


def test_defaults() -> None:
    spec = spec_from_config({"model_type": "phi3"})
    assert (spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.num_layers,
            spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.max_positions) == \
        (32064, 3072, 8192, 32, 32, 32, 96, 4096)
    assert not spec.tie_embeddings and not (spec.qkv_bias or spec.out_bias or spec.mlp_bias)
    assert spec.extra("resid_pdrop") == 0.0 and spec.extra("sliding_window") is None
    assert spec.extra("partial_rotary_factor") == 1.0
    hf = profile_of(spec).to_hf(spec)
    assert "head_dim" not in hf and "attention_bias" not in hf


def test_published_count() -> None:
    spec = get_model("phi-3-mini")
    assert count_params(spec) == 3_821_079_552
    assert spec.extra("sliding_window") == 2047


def test_partial_rotary_factor() -> None:
    spec = spec_from_config(TINY | {"rope_parameters": {"partial_rotary_factor": 0.5}})
    assert profile_of(spec).rotary_dim(spec) == 8
    top = spec_from_config(TINY | {"partial_rotary_factor": 0.75})
    assert profile_of(top).rotary_dim(top) == 12


def test_llama_names_are_refused_with_phi3_names() -> None:
    spec = spec_from_config(TINY)
    with pytest.raises(MemplanError, match="qkv_proj"):
        resolve_targets(spec, "q_proj,v_proj")
    assert [l.short_name for l in resolve_targets(spec, "all")] == \
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.mark.parametrize("cfg, words", [
    (TINY | {"num_attention_heads": 5}, "hidden_size 64 is not a multiple of "
     "num_attention_heads"),
    (TINY | {"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of "
     "num_key_value_heads"),
    (TINY | {"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    (TINY | {"rope_scaling": [1, 2]}, "rope_parameters"),
    (TINY | {"resid_pdrop": 1.0}, "resid_pdrop"),
])
def test_bad_configs(cfg: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        spec_from_config(cfg)


transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from memplan.nn.hf import build_hf_model  # noqa: E402


@pytest.mark.parametrize("extra", [{}, {"partial_rotary_factor": 0.5, "sliding_window": 32,
                                        "tie_word_embeddings": True}])
def test_counts_equal_transformers_and_peft(extra: dict) -> None:
    spec = spec_from_config(TINY | extra)
    model = build_hf_model(spec, device="meta").hf
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.numel() == profile_of(spec).rotary_dim(spec) // 2
    assert model.config.sliding_window == spec.extra("sliding_window")
    ours = [(w.name, w.shape) for w in profile_of(spec).block_weights(spec)]
    assert ours == [(n.split(".0.", 1)[1], tuple(p.shape))
                    for n, p in model.named_parameters() if ".0." in n]
    for targets in ("all", "attention", "mlp", "qkv_proj", "gate_up_proj,o_proj"):
        lora = LoraSpec(rank=4, targets=targets)
        names = [l.name for l in resolve_targets(spec, targets)]
        wrapped = peft.get_peft_model(build_hf_model(spec, device="meta").hf, peft.LoraConfig(
            r=4, target_modules="all-linear" if targets == "all" else names,
            lora_dropout=0.0))
        assert lora_params(spec, lora) == sum(p.numel() for p in wrapped.parameters()
                                              if p.requires_grad), targets


@pytest.mark.parametrize("regime, extra, cfg", [
    ("full", {}, {"num_key_value_heads": 4}),  # MHA: the saved v keeps all of qkv
    ("lora-bf16", {"lora_backend": "peft"}, {}),
    ("full", {"attention": "eager"}, {"partial_rotary_factor": 0.5}),
])
def test_plan_equals_fake_measurement(regime: str, extra: dict, cfg: dict) -> None:
    from memplan.profile.compare import profile

    spec = replace(spec_from_config(TINY | cfg), name="phi3-test")
    train = TrainSpec(regime=regime, batch=2, seq=64, impl="hf", **extra)
    result = profile(spec, train, device="fake", steps=1)
    # byte-exact but for the rotary original_inv_freq copy (fp32, counted once as Llama does)
    # and 8 bytes of the tracker's own
    assert abs(result.predicted.total_bytes - result.measured.peak_bytes) <= 128
