"""The notes' model-state formulas, exactly, and the properties every plan must have."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memplan import params as P
from memplan.errors import MemplanError
from memplan.planner import COMPONENTS, plan
from memplan.presets import get_model
from memplan.regimes import model_state, nf4_bytes, qlora_base_bytes
from memplan.spec import REGIMES, LoraSpec, TrainSpec

MODELS = ("llama-2-7b", "gpt2")


def _state(name: str, regime: str, **kw):
    spec = get_model(name)
    train = TrainSpec(regime=regime, **kw)
    state = model_state(spec, train)
    # plan() reports the same model states (activations excluded without batch and seq)
    breakdown = plan(spec, train)
    assert breakdown.model_state_bytes == state.total_bytes
    assert not breakdown.activations_included
    return spec, state


def _n(spec) -> int:
    return P.count_params(spec)


# ---- the notes' six regimes ------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_full_is_16n(name: str) -> None:
    spec, s = _state(name, "full")
    n = _n(spec)
    assert s.total_bytes == 16 * n
    assert (s.weights_bytes, s.gradients_bytes, s.optimizer_states_bytes,
            s.master_weights_bytes) == (4 * n, 4 * n, 8 * n, 0)
    assert s.formula == "16N"
    assert s.trainable == n


@pytest.mark.parametrize("name", MODELS)
def test_mixed_is_12n(name: str) -> None:
    spec, s = _state(name, "mixed")
    n = _n(spec)
    assert s.total_bytes == 12 * n
    assert s.weights_bytes == 4 * n           # fp32 weights
    assert s.gradients_bytes == 2 * n         # bf16 grads
    assert s.optimizer_states_bytes == 6 * n  # bf16 momentum + fp32 second moment
    assert s.master_weights_bytes == 0
    assert s.formula == "12N"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("gpus", [1, 8, 3])
def test_zero_is_16n_over_m(name: str, gpus: int) -> None:
    spec, s = _state(name, "zero", gpus=gpus)
    n = _n(spec)
    assert (s.weights_bytes, s.gradients_bytes, s.optimizer_states_bytes) == \
        (4 * n // gpus, 4 * n // gpus, 8 * n // gpus)
    assert s.total_bytes == 4 * n // gpus + 4 * n // gpus + 8 * n // gpus
    assert abs(s.total_bytes - 16 * n / gpus) < 3
    assert s.formula == "16N/G"


def test_zero_8_gpus_llama_exact() -> None:
    spec, s = _state("llama-2-7b", "zero", gpus=8)
    assert s.total_bytes == 16 * 6_738_415_616 // 8 == 13_476_831_232
    assert s.symbols["G"] == s.symbols["M"] == 8  # G: GPUs; "M" kept for old readers


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("rank", [8, 64])
def test_lora_is_4n_plus_16m(name: str, rank: int) -> None:
    spec, s = _state(name, "lora", lora=LoraSpec(rank=rank))
    n, m = _n(spec), P.lora_params(spec, LoraSpec(rank=rank))
    assert s.total_bytes == 4 * n + 16 * m
    assert (s.weights_bytes, s.gradients_bytes, s.optimizer_states_bytes) == \
        (4 * n + 4 * m, 4 * m, 8 * m)
    assert s.formula == "4N + 16M"
    assert s.symbols == {"N": n, "M": m}


def test_lora_llama_exact() -> None:
    _, s = _state("llama-2-7b", "lora", lora=LoraSpec(rank=8, targets="q_proj,v_proj"))
    assert s.total_bytes == 4 * 6_738_415_616 + 16 * 4_194_304


@pytest.mark.parametrize("name", MODELS)
def test_lora_bf16_is_2n_plus_16m(name: str) -> None:
    spec, s = _state(name, "lora-bf16")
    n, m = _n(spec), P.lora_params(spec, LoraSpec())
    assert s.total_bytes == 2 * n + 16 * m
    assert s.formula == "2N + 16M"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("classes", [2, 10])
def test_classifier_is_4n_plus_16c(name: str, classes: int) -> None:
    spec, s = _state(name, "classifier", num_classes=classes)
    n, c = _n(spec), spec.hidden_size * classes + classes
    assert s.total_bytes == 4 * n + 16 * c
    assert s.formula == "4N + 16C"
    assert not s.backprop_backbone


@pytest.mark.parametrize("name", MODELS)
def test_input_adapter_is_4n_plus_16e(name: str) -> None:
    spec, s = _state(name, "input-adapter")
    n, e = _n(spec), spec.vocab_size * spec.hidden_size
    assert s.total_bytes == 4 * n + 16 * e
    assert s.formula == "4N + 16E"
    assert s.backprop_backbone


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("tokens", [20, 100])
def test_prompt_tuning_is_4n_plus_16p(name: str, tokens: int) -> None:
    spec, s = _state(name, "prompt-tuning", prompt_tokens=tokens)
    n, p = _n(spec), tokens * spec.hidden_size
    assert s.total_bytes == 4 * n + 16 * p
    assert s.formula == "4N + 16P"


def test_bitfit_gpt2_is_4n_plus_12b() -> None:
    spec, s = _state("gpt2", "bitfit")
    n, b = _n(spec), P.bias_params(spec)
    assert s.total_bytes == 4 * n + 12 * b
    assert (s.weights_bytes, s.gradients_bytes, s.optimizer_states_bytes) == (4 * n, 4 * b, 8 * b)
    assert s.formula == "4N + 12B"


def test_bitfit_llama_raises() -> None:
    with pytest.raises(MemplanError, match="no bias"):
        model_state(get_model("llama-2-7b"), TrainSpec(regime="bitfit"))
    with pytest.raises(MemplanError, match="no bias"):
        plan(get_model("llama-2-7b"), TrainSpec(regime="bitfit"))


# ---- ZeRO stages (Rajbhandari et al. 2020: (2 + 2 + 12)Ψ) -------------------------------------

@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_zero_stages(name: str, gpus: int) -> None:
    spec = get_model(name)
    n = _n(spec)
    s1 = model_state(spec, TrainSpec(regime="zero1", gpus=gpus))
    s2 = model_state(spec, TrainSpec(regime="zero2", gpus=gpus))
    s3 = model_state(spec, TrainSpec(regime="zero3", gpus=gpus))
    master, states = 4 * n // gpus, 8 * n // gpus
    # stage 1: 4Ψ + 12Ψ/M
    assert (s1.weights_bytes, s1.gradients_bytes, s1.master_weights_bytes,
            s1.optimizer_states_bytes) == (2 * n, 2 * n, master, states)
    assert s1.total_bytes == 4 * n + master + states
    # stage 2: 2Ψ + 14Ψ/M
    assert (s2.weights_bytes, s2.gradients_bytes) == (2 * n, 2 * n // gpus)
    assert s2.total_bytes == 2 * n + 2 * n // gpus + master + states
    # stage 3: 16Ψ/M
    assert (s3.weights_bytes, s3.gradients_bytes) == (2 * n // gpus, 2 * n // gpus)
    assert s3.total_bytes == 2 * (2 * n // gpus) + master + states
    for s in (s1, s2, s3):
        assert abs(s.total_bytes - {"zero1": 4 * n + 12 * n / gpus, "zero2": 2 * n + 14 * n / gpus,
                                    "zero3": 16 * n / gpus}[s.regime]) < 4
    if gpus == 1:  # unsharded, all three are the paper's baseline 16Ψ
        assert s1.total_bytes == s2.total_bytes == s3.total_bytes == 16 * n
    else:
        assert s1.total_bytes > s2.total_bytes > s3.total_bytes


@pytest.mark.parametrize(("regime", "expected"), [
    ("zero1", 31_406_250_000),   # 4Ψ + 12Ψ/64: the paper's 31.4 GB
    ("zero2", 16_640_625_000),   # 2Ψ + 14Ψ/64: 16.6 GB
    ("zero3", 1_875_000_000),    # 16Ψ/64: 1.9 GB
])
def test_zero_paper_example_7_5b_on_64_gpus(regime: str, expected: int) -> None:
    spec = get_model("llama-2-7b")
    train = TrainSpec(regime=regime, gpus=64)
    breakdown = plan(spec, train, params=7_500_000_000)
    assert breakdown.model_state_bytes == expected
    assert model_state(spec, train, params=7_500_000_000).total_bytes == expected
    if regime == "zero3":
        assert expected == 16 * 7_500_000_000 // 64


def test_zero_paper_baseline_120gb() -> None:
    spec = get_model("llama-2-7b")
    for regime in ("zero1", "zero2", "zero3"):
        assert plan(spec, TrainSpec(regime=regime), params=7_500_000_000).model_state_bytes \
            == 120_000_000_000


@pytest.mark.parametrize("regime", ["zero1", "zero2", "zero3"])
@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum"])
def test_zero_stages_need_adam(regime: str, optimizer: str) -> None:
    with pytest.raises(MemplanError, match="--optimizer adamw"):
        model_state(get_model("gpt2"), TrainSpec(regime=regime, optimizer=optimizer))


# ---- optimizers ------------------------------------------------------------------------------

@pytest.mark.parametrize(("regime", "optimizer", "n_coef", "t_coef", "formula"), [
    ("full", "adamw", 16, 0, "16N"),
    ("full", "sgd", 8, 0, "8N"),
    ("full", "sgd-momentum", 12, 0, "12N"),
    ("mixed", "sgd", 6, 0, "6N"),              # fp32 W + bf16 G
    ("mixed", "sgd-momentum", 8, 0, "8N"),     # + bf16 momentum
    ("lora", "sgd", 4, 8, "4N + 8M"),
    ("lora", "sgd-momentum", 4, 12, "4N + 12M"),
    ("lora-bf16", "sgd", 2, 8, "2N + 8M"),
    ("classifier", "sgd-momentum", 4, 12, "4N + 12C"),
    ("input-adapter", "sgd", 4, 8, "4N + 8E"),
    ("prompt-tuning", "sgd-momentum", 4, 12, "4N + 12P"),
])
def test_optimizer_variants(regime, optimizer, n_coef, t_coef, formula) -> None:
    spec = get_model("llama-2-7b")
    s = model_state(spec, TrainSpec(regime=regime, optimizer=optimizer))
    assert s.total_bytes == n_coef * _n(spec) + t_coef * s.trainable
    assert s.formula == formula


def test_zero_sgd() -> None:
    spec = get_model("gpt2")
    n = _n(spec)
    s = model_state(spec, TrainSpec(regime="zero", optimizer="sgd", gpus=4))
    assert s.total_bytes == 4 * n // 4 + 4 * n // 4
    assert s.formula == "8N/G"


def test_bitfit_sgd_momentum() -> None:
    spec = get_model("gpt2")
    s = model_state(spec, TrainSpec(regime="bitfit", optimizer="sgd-momentum"))
    assert s.total_bytes == 4 * _n(spec) + 8 * P.bias_params(spec)
    assert s.formula == "4N + 8B"


# ---- QLoRA's NF4 -----------------------------------------------------------------------------

@pytest.mark.parametrize(("elements", "expected"), [
    (64 * 256, 64 * 256 // 2 + 256 + 4),     # 4-bit codes + 1 byte/64 + 4 bytes/256 blocks
    (64, 32 + 1 + 4),
    (64 * 257, 64 * 257 // 2 + 257 + 8),     # a 257th block starts a second 256-group
    (4096 * 4096, 8_388_608 + 262_144 + 4_096),
])
def test_nf4_bytes(elements: int, expected: int) -> None:
    assert nf4_bytes(elements) == expected


def test_nf4_bits_per_weight() -> None:
    bits = 8 * nf4_bytes(4096 * 4096) / (4096 * 4096)
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert round(bits, 3) == 4.127


@pytest.mark.parametrize("name", MODELS)
def test_qlora_model_state(name: str) -> None:
    spec = get_model(name)
    s = model_state(spec, TrainSpec(regime="qlora"))
    m = P.lora_params(spec, LoraSpec())
    base = qlora_base_bytes(spec)
    assert s.total_bytes == base + 16 * m
    assert s.formula.endswith(" + 16M")
    linear = spec.num_layers * sum(l.in_features * l.out_features for l in P.block_linears(spec))
    assert base == spec.num_layers * sum(nf4_bytes(l.in_features * l.out_features)
                                         for l in P.block_linears(spec)) \
        + 2 * (_n(spec) - linear)
    assert base < 2 * _n(spec)  # smaller than a bf16 base


# ---- the formula strings ---------------------------------------------------------------------

@pytest.mark.parametrize(("regime", "formula"), [
    ("full", "16N"), ("mixed", "12N"), ("zero", "16N/G"), ("lora", "4N + 16M"),
    ("classifier", "4N + 16C"), ("input-adapter", "4N + 16E"), ("lora-bf16", "2N + 16M"),
    ("prompt-tuning", "4N + 16P"), ("bitfit", "4N + 12B"), ("zero1", "2N + 2N + 12N/G"),
    ("zero2", "2N + 14N/G"), ("zero3", "16N/G"),
])
def test_formula_strings(regime: str, formula: str) -> None:
    assert plan(get_model("gpt2"), TrainSpec(regime=regime, gpus=8)).formula == formula


def test_every_regime_has_a_formula() -> None:
    spec = get_model("gpt2")
    for regime in REGIMES:
        assert "N" in plan(spec, TrainSpec(regime=regime)).formula


# ---- plan() properties -----------------------------------------------------------------------

JOBS = [
    ("llama-tiny", {}), ("gpt2-tiny", {}),
    ("llama-tiny", {"batch": 2, "seq": 64}), ("gpt2-tiny", {"batch": 2, "seq": 64}),
    ("llama-tiny", {"batch": 3, "seq": 32, "checkpointing": True}),
    ("gpt2-tiny", {"batch": 2, "seq": 32, "attention": "eager", "optimizer_impl": "foreach"}),
    ("llama-tiny", {"batch": 1, "seq": 16, "optimizer_impl": "forloop", "gpus": 4}),
    ("gpt2", {"batch": 1, "seq": 128}),
]


def _regimes(name: str) -> list[str]:
    return [r for r in REGIMES if r != "bitfit" or P.bias_params(get_model(name))]


@pytest.mark.parametrize(("name", "kw"), JOBS)
def test_components_sum_to_total_and_are_non_negative(name: str, kw: dict) -> None:
    spec = get_model(name)
    for regime in _regimes(name):
        b = plan(spec, TrainSpec(regime=regime, **kw))
        assert set(b.components) == set(COMPONENTS)
        assert sum(b.components.values()) == b.total_bytes
        assert b.components == b.phases[b.peak_phase]
        assert b.total_bytes == max(sum(p.values()) for p in b.phases.values())
        for phase in b.phases.values():
            assert all(isinstance(v, int) and v >= 0 for v in phase.values())
        assert b.total_bytes >= b.model_state_bytes > 0
        assert b.activations_included == ("batch" in kw)
        if "batch" in kw and regime != "classifier":
            assert b.phases["forward"]["activations"] > 0


@pytest.mark.parametrize("regime", ["full", "lora", "mixed", "input-adapter", "classifier",
                                    "qlora", "zero3"])
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_total_grows_with_batch_and_seq(name: str, regime: str) -> None:
    spec = get_model(name)
    train = TrainSpec(regime=regime, batch=1, seq=32)
    totals = [plan(spec, replace(train, batch=b)).total_bytes for b in (1, 2, 4, 8)]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    totals = [plan(spec, replace(train, seq=s)).total_bytes for s in (16, 32, 128, 512)]
    assert totals == sorted(totals) and totals[0] < totals[-1]
    base = plan(spec, replace(train, batch=None, seq=None)).total_bytes
    assert base <= totals[0]


@pytest.mark.parametrize("kw", [{}, {"batch": 2, "seq": 64}])
@pytest.mark.parametrize("regime", ["lora", "lora-bf16", "qlora"])
def test_total_grows_with_rank(regime: str, kw: dict) -> None:
    spec = get_model("llama-tiny")
    totals = [plan(spec, TrainSpec(regime=regime, lora=LoraSpec(rank=r), **kw)).total_bytes
              for r in (1, 4, 16, 64)]
    assert totals == sorted(set(totals))


@pytest.mark.parametrize("regime", [r for r in REGIMES if r != "bitfit"])
def test_total_grows_with_n(regime: str) -> None:
    spec = get_model("llama-2-7b")
    train = TrainSpec(regime=regime, gpus=8)
    totals = [plan(spec, train, params=n).total_bytes for n in (10**9, 7 * 10**9, 7 * 10**10)]
    states = [plan(spec, train, params=n).model_state_bytes for n in (10**9, 7 * 10**9,
                                                                      7 * 10**10)]
    assert totals == sorted(set(totals))
    assert states == sorted(set(states))


def test_params_none_means_the_shape() -> None:
    spec = get_model("gpt2")
    assert plan(spec, TrainSpec(), params=P.count_params(spec)) == plan(spec, TrainSpec())


@pytest.mark.parametrize("regime", ["full", "lora", "mixed", "input-adapter", "lora-bf16",
                                    "prompt-tuning"])
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "llama-2-7b"])
def test_checkpointing_lowers_activations(name: str, regime: str) -> None:
    spec = get_model(name)
    train = TrainSpec(regime=regime, batch=2, seq=128)
    plain = plan(spec, train)
    ckpt = plan(spec, replace(train, checkpointing=True))
    assert ckpt.phases["forward"]["activations"] < plain.phases["forward"]["activations"]
    assert ckpt.total_bytes <= plain.total_bytes
    assert ckpt.model_state_bytes == plain.model_state_bytes


@pytest.mark.parametrize("regime", ["full", "lora", "mixed", "classifier", "lora-bf16"])
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "llama-2-7b"])
def test_eager_at_least_sdpa(name: str, regime: str) -> None:
    spec = get_model(name)
    train = TrainSpec(regime=regime, batch=2, seq=256)
    sdpa = plan(spec, train)
    eager = plan(spec, replace(train, attention="eager"))
    assert eager.total_bytes >= sdpa.total_bytes
    assert eager.phases["forward"]["activations"] >= sdpa.phases["forward"]["activations"]
    if regime != "classifier":  # eager keeps the s² scores
        assert eager.phases["forward"]["activations"] > \
            sdpa.phases["forward"]["activations"] + 2 * spec.num_heads * 256 * 256


def _trainable_fp32_bytes(spec, train) -> int:
    s = model_state(spec, train)
    if train.regime in ("full", "zero"):
        return 4 * s.trainable // train.gpus
    return 4 * s.trainable


@pytest.mark.parametrize(("name", "regime", "gpus"), [
    ("llama-tiny", "full", 1), ("llama-tiny", "zero", 4), ("llama-tiny", "lora", 1),
    ("llama-tiny", "lora-bf16", 1), ("llama-tiny", "qlora", 1), ("llama-tiny", "classifier", 1),
    ("llama-tiny", "input-adapter", 1), ("llama-tiny", "prompt-tuning", 1),
    ("gpt2-tiny", "full", 1), ("gpt2-tiny", "bitfit", 1), ("gpt2-tiny", "lora", 1),
    ("llama-2-7b", "lora", 1), ("llama-2-7b", "full", 1),
])
@pytest.mark.parametrize("kw", [{}, {"batch": 1, "seq": 32}])
def test_foreach_adds_one_copy_of_trainable_fp32(name: str, regime: str, gpus: int,
                                                 kw: dict) -> None:
    spec = get_model(name)
    fused = TrainSpec(regime=regime, gpus=gpus, optimizer_impl="fused", **kw)
    foreach = replace(fused, optimizer_impl="foreach")
    extra = plan(spec, foreach).phases["step"]["temporaries"] \
        - plan(spec, fused).phases["step"]["temporaries"]
    assert plan(spec, fused).phases["step"]["temporaries"] == 0
    assert extra == _trainable_fp32_bytes(spec, fused) > 0
    assert plan(spec, foreach).total_bytes >= plan(spec, fused).total_bytes


@pytest.mark.parametrize("regime", ["zero1", "zero2", "zero3"])
def test_foreach_zero_stages_copy_the_fp32_master_shard(regime: str) -> None:
    spec = get_model("llama-tiny")
    fused = TrainSpec(regime=regime, gpus=8)
    foreach = replace(fused, optimizer_impl="foreach")
    extra = plan(spec, foreach).phases["step"]["temporaries"] \
        - plan(spec, fused).phases["step"]["temporaries"]
    assert extra == model_state(spec, fused).master_weights_bytes


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum"])
def test_sgd_has_no_step_temporaries(optimizer: str) -> None:
    spec = get_model("llama-tiny")
    for impl in ("fused", "foreach", "forloop"):
        b = plan(spec, TrainSpec(regime="full", optimizer=optimizer, optimizer_impl=impl))
        assert b.phases["step"]["temporaries"] == 0


def test_full_plan_without_activations_is_model_states_plus_bookkeeping() -> None:
    spec = get_model("llama-2-7b")
    b = plan(spec, TrainSpec(regime="full"))
    n = _n(spec)
    assert b.model_state_bytes == 16 * n
    assert b.peak_phase == "step"
    # rotary inv_freq (head_dim/2 fp32) and AdamW's 0-d fp32 step counter per tensor
    assert b.total_bytes - 16 * n == 128 // 2 * 4 + 4 * len(P.param_tensor_sizes(spec))
    assert any("activations excluded" in note for note in b.notes)
