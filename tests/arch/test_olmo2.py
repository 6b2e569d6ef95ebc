"""OLMo 2: config defaults, counts against transformers and PEFT, plans against fake-mode
measurements (post-norms, fp32 weight multiply, fp32 rotary tables), and bad configs."""

from dataclasses import replace

import pytest

from memplan.arch import profile_of
from memplan.config import spec_from_config
from memplan.errors import ConfigError
from memplan.params import count_params, lora_params, resolve_targets
from memplan.presets import get_model
from memplan.spec import LoraSpec, TrainSpec

TINY = {"model_type": "olmo2", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "num_hidden_layers": 2,
        "vocab_size": 256}


def test_defaults() -> None:
    spec = spec_from_config({"model_type": "olmo2"})
    assert (spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.num_layers,
            spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.max_positions) == \
        (50304, 4096, 11008, 32, 32, 32, 128, 2048)
    assert not spec.tie_embeddings and not (spec.qkv_bias or spec.out_bias or spec.mlp_bias)
    hf = profile_of(spec).to_hf(spec)
    assert "head_dim" not in hf and "mlp_bias" not in hf
    biased = spec_from_config(TINY | {"attention_bias": True})
    assert biased.qkv_bias and biased.out_bias and not biased.mlp_bias


def test_published_count() -> None:
    assert count_params(get_model("olmo-2-7b")) == 7_298_617_344


@pytest.mark.parametrize("cfg, words", [
    (TINY | {"num_attention_heads": 5}, "hidden_size 64 is not a multiple of "
     "num_attention_heads"),
    (TINY | {"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of "
     "num_key_value_heads"),
    (TINY | {"attention_bias": "yes"}, "attention_bias"),
])
def test_bad_configs(cfg: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        spec_from_config(cfg)


transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from memplan.nn.hf import build_hf_model  # noqa: E402


@pytest.mark.parametrize("extra", [{}, {"head_dim": 8, "attention_bias": True}])
def test_counts_equal_transformers_and_peft(extra: dict) -> None:
    spec = spec_from_config(TINY | extra)
    model = build_hf_model(spec, device="meta").hf
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    ours = [(w.name, w.shape) for w in profile_of(spec).block_weights(spec)]
    assert ours == [(n.split(".0.", 1)[1], tuple(p.shape))
                    for n, p in model.named_parameters() if ".0." in n]
    for targets in ("all", "attention", "mlp", "q_proj,v_proj"):
        lora = LoraSpec(rank=4, targets=targets)
        names = [l.name for l in resolve_targets(spec, targets)]
        wrapped = peft.get_peft_model(build_hf_model(spec, device="meta").hf, peft.LoraConfig(
            r=4, target_modules="all-linear" if targets == "all" else names,
            lora_dropout=0.0))
        assert lora_params(spec, lora) == sum(p.numel() for p in wrapped.parameters()
                                              if p.requires_grad), targets


@pytest.mark.parametrize("regime, extra", [
    ("full", {}),
    ("lora-bf16", {"lora_backend": "peft"}),
    ("lora", {"attention": "eager", "lora_backend": "peft"}),
])
def test_plan_equals_fake_measurement(regime: str, extra: dict) -> None:
    from memplan.profile.compare import profile

    spec = replace(spec_from_config(TINY), name="olmo2-test")
    train = TrainSpec(regime=regime, batch=2, seq=64, impl="hf", **extra)
    result = profile(spec, train, device="fake", steps=1)
    # byte-exact but for the rotary original_inv_freq copy (fp32, counted once as Llama does)
    # and 8 bytes of the tracker's own
    assert abs(result.predicted.total_bytes - result.measured.peak_bytes) <= 128
