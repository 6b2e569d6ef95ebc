"""BERT and RoBERTa sequence classifiers: config defaults, counts against transformers and
PEFT, plan against a fake-mode measurement, and bad configs."""

from dataclasses import replace

import pytest

from memplan.arch import profile_of
from memplan.config import spec_from_config
from memplan.errors import ConfigError, MemplanError
from memplan.params import count_params, lora_params
from memplan.presets import get_model
from memplan.spec import LoraSpec, TrainSpec

TINY = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
        "num_hidden_layers": 2, "vocab_size": 512}


def test_bert_defaults() -> None:
    spec = spec_from_config({"model_type": "bert"})
    assert (spec.vocab_size, spec.hidden_size, spec.num_layers, spec.num_heads,
            spec.intermediate_size, spec.max_positions) == (30522, 768, 12, 12, 3072, 512)
    assert spec.activation == "gelu" and spec.dropout == 0.1 and spec.norm == "layernorm"
    assert spec.extra("attention_dropout") == 0.1 and spec.extra("classifier_dropout") is None
    assert spec.extra("type_vocab_size") == 2 and spec.extra("pad_token_id") == 0
    assert spec.extra("num_labels") == 2 and spec.extra("layer_norm_eps") == 1e-12


def test_roberta_defaults_and_labels() -> None:
    spec = spec_from_config({"model_type": "roberta", "id2label": {"0": "a", "1": "b",
                                                                   "2": "c"}})
    assert spec.vocab_size == 50265 and spec.extra("pad_token_id") == 1
    assert spec.extra("num_labels") == 3
    assert profile_of(spec).to_hf(spec)["pad_token_id"] == 1


def test_published_counts() -> None:
    assert count_params(get_model("bert-base-uncased")) == 109_483_778
    assert count_params(get_model("roberta-large")) == 355_361_794


@pytest.mark.parametrize("cfg, words", [
    (TINY | {"model_type": "bert", "num_attention_heads": 5}, "num_attention_heads"),
    (TINY | {"model_type": "bert", "num_labels": 2, "id2label": {"0": "a", "1": "b", "2": "c"}},
     "id2label"),
    (TINY | {"model_type": "roberta", "pad_token_id": 600}, "pad_token_id"),
    (TINY | {"model_type": "bert", "is_decoder": True}, "is_decoder"),
])
def test_bad_configs(cfg: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        spec_from_config(cfg)


def test_bad_jobs() -> None:
    from memplan.planner import plan

    spec = spec_from_config(TINY | {"model_type": "roberta", "max_position_embeddings": 130})
    with pytest.raises(MemplanError, match="--seq 129"):
        plan(spec, TrainSpec(batch=1, seq=129, impl="hf"))
    with pytest.raises(MemplanError, match="num_labels"):
        plan(spec, TrainSpec(batch=1, seq=64, num_classes=3, impl="hf"))


transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from memplan.nn.hf import build_hf_model  # noqa: E402


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_counts_equal_transformers_and_peft(kind: str) -> None:
    spec = spec_from_config(TINY | {"model_type": kind, "num_labels": 3})
    model = build_hf_model(spec, device="meta").hf
    assert type(model).__name__.endswith("ForSequenceClassification")
    assert count_params(spec) == sum(p.numel() for p in model.parameters())
    profile = profile_of(spec)
    for targets in ("all", "attention", "mlp", "query,value"):
        lora = LoraSpec(rank=4, targets=targets)
        names = sorted({l.name for l in profile.linears(spec)
                        if targets in ("all", l.group) or l.short_name in targets})
        names += [l.name for l in profile.root_lora_linears(spec, lora)]
        wrapped = peft.get_peft_model(build_hf_model(spec, device="meta").hf, peft.LoraConfig(
            r=4, target_modules="all-linear" if targets == "all" else
            profile.peft_targets(names), lora_dropout=0.0))
        assert lora_params(spec, lora) == sum(p.numel() for p in wrapped.parameters()
                                              if p.requires_grad), targets


@pytest.mark.parametrize("kind, regime, extra", [
    ("bert", "full", {}),
    ("roberta", "full", {"attention": "eager"}),
    ("bert", "classifier", {}),
    ("roberta", "lora-bf16", {"lora_backend": "peft"}),
])
def test_plan_equals_fake_measurement(kind: str, regime: str, extra: dict) -> None:
    from memplan.profile.compare import profile

    spec = spec_from_config(TINY | {"model_type": kind})
    spec = replace(spec, name=f"{kind}-test")
    train = TrainSpec(regime=regime, batch=2, seq=64, impl="hf", **extra)
    result = profile(spec, train, device="fake", steps=1)
    assert abs(result.relative_error) < 1e-5
