"""Properties of the planner on random small-but-valid models and jobs (hypothesis).

Monotone in N, LoRA rank, batch and sequence length; ZeRO over one GPU is full training;
components sum to the total and are never negative; LoRA's model states approach 4N as the
rank shrinks; ``fits`` agrees with the breakdown and the reserve; the JSON round-trips.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from memplan import params as P
from memplan.errors import MemplanError
from memplan.fsdp import SHARDABLE_REGIMES
from memplan.planner import COMPONENTS, DEFAULT_RESERVE_BYTES, fits, max_batch, plan
from memplan.spec import (
    ATTENTIONS,
    OPTIMIZER_IMPLS,
    OPTIMIZERS,
    REGIMES,
    SHARDS,
    LoraSpec,
    ModelSpec,
    TrainSpec,
)

# MEMPLAN_HYPOTHESIS_EXAMPLES=5000 searches harder (and at random, not from a fixed seed).
EXAMPLES = int(os.environ.get("MEMPLAN_HYPOTHESIS_EXAMPLES", "100"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
LORA_REGIMES = ("lora", "lora-bf16", "qlora")


# Presets whose plan takes a few milliseconds: real shapes beside the random ones.
PRESETS = ("llama-tiny", "gpt2-tiny", "gpt2", "qwen2.5-0.5b", "llama-2-7b", "mistral-7b")


def model_specs() -> st.SearchStrategy[ModelSpec]:
    """Mostly random small models, sometimes a real preset."""
    from memplan.presets import get_model

    return st.one_of(random_specs(), random_specs(), random_specs(),
                     st.sampled_from(PRESETS).map(get_model))


@st.composite
def random_specs(draw) -> ModelSpec:
    """A small decoder of either family: hidden a multiple of heads·head_dim, kv heads a
    divisor of the heads, any intermediate width and vocabulary, tied or not, with or
    without biases."""
    family = draw(st.sampled_from(("llama", "gpt2")))
    heads = draw(st.integers(1, 8))
    head_dim = draw(st.sampled_from((2, 4, 8, 16)))
    layers = draw(st.integers(1, 3))
    vocab = draw(st.integers(2, 2000))
    inter = draw(st.integers(1, 256))
    tie = draw(st.booleans())
    if family == "gpt2":
        hidden = heads * head_dim
        return ModelSpec(name="gpt2-prop", family="gpt2", model_type="gpt2", vocab_size=vocab,
                         hidden_size=hidden, num_layers=layers, num_heads=heads,
                         num_kv_heads=heads, head_dim=head_dim, intermediate_size=inter,
                         gated_mlp=False, activation="gelu_new", qkv_bias=True, out_bias=True,
                         mlp_bias=True, norm="layernorm", tie_embeddings=tie,
                         learned_positions=True, max_positions=draw(st.integers(256, 1024)),
                         dropout=draw(st.sampled_from((0.0, 0.1))))
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    hidden = heads * head_dim * draw(st.integers(1, 2))
    return ModelSpec(name="llama-prop", family="llama", model_type="llama", vocab_size=vocab,
                     hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                     head_dim=head_dim, intermediate_size=inter,
                     gated_mlp=draw(st.booleans()), qkv_bias=draw(st.booleans()),
                     out_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()),
                     norm="rmsnorm", tie_embeddings=tie, learned_positions=False,
                     max_positions=4096)


def smallest_dim(spec: ModelSpec, targets: str) -> int:
    layers = P.resolve_targets(spec, targets)
    return min(min(layer.in_features, layer.out_features) for layer in layers)


@st.composite
def jobs(draw, regimes=REGIMES, activations: bool | None = None):
    """(spec, train): a valid job on a random model; activations drawn unless forced."""
    spec = draw(model_specs())
    regime = draw(st.sampled_from(regimes))
    optimizer = draw(st.sampled_from(OPTIMIZERS))
    if regime in ("zero1", "zero2", "zero3"):
        optimizer = "adamw"  # the ZeRO paper's accounting is Adam's
    assume(regime != "bitfit" or P.bias_params(spec) > 0)
    targets = draw(st.sampled_from(("all", "mlp", "attention")))
    rank = draw(st.integers(1, smallest_dim(spec, targets)))
    with_act = draw(st.booleans()) if activations is None else activations
    batch = draw(st.integers(1, 4)) if with_act else None
    seq = draw(st.integers(1, 128)) if with_act else None
    preset = TrainSpec(regime=regime).recipe
    if preset.notes_mixed and optimizer not in ("adamw", "sgd", "sgd-momentum"):
        optimizer = "adamw"  # the notes' recipe has its own AdamW and SGD
    library = optimizer in ("adamw-8bit", "paged-adamw-8bit", "adafactor")  # one impl, no FSDP
    gpus = draw(st.integers(1, 8))
    shard = draw(st.sampled_from(SHARDS)) if regime in SHARDABLE_REGIMES and not library \
        else "none"
    if library and preset.fsdp:
        gpus = 1
    sharded = bool(preset.stage) or (gpus > 1 and (preset.fsdp or shard != "none"))
    # the weights' dtype where the regime leaves it open, and autocast where it combines
    dtype = draw(st.sampled_from((None, "fp32", "bf16"))) \
        if preset.trains in ("all", "lora", "biases") and preset.dtype == "fp32" \
        and not (preset.notes_mixed or preset.fsdp) else None
    weights = dtype or preset.dtype
    autocast = draw(st.sampled_from(("none", "bf16"))) \
        if not (preset.notes_mixed or preset.stage) and weights in ("fp32", "bf16") \
        and not (weights == "bf16" and preset.full) else "none"
    train = TrainSpec(
        regime=regime, batch=batch, seq=seq,
        lora=LoraSpec(rank=rank, targets=targets, train_embeddings=draw(st.booleans())),
        num_classes=draw(st.integers(1, 16)), prompt_tokens=draw(st.integers(1, 16)),
        gpus=gpus, optimizer=optimizer,
        optimizer_impl="fused" if library else draw(st.sampled_from(OPTIMIZER_IMPLS)),
        checkpointing=draw(st.booleans()), attention=draw(st.sampled_from(ATTENTIONS)),
        shard=shard, dtype=dtype, autocast=autocast,
        grad_accum=1 if sharded else draw(st.integers(1, 4)),
        loop=draw(st.sampled_from(("manual", "trainer"))),
    )
    return spec, train


RUNTIMES = st.sampled_from(("cuda", "cpu"))


def _check(b) -> None:
    """Components sum to the total, every phase's parts are non-negative."""
    assert set(b.components) == set(COMPONENTS)
    assert sum(b.components.values()) == b.total_bytes
    assert b.components == b.phases[b.peak_phase]
    for phase in b.phases.values():
        assert all(isinstance(v, int) and v >= 0 for v in phase.values()), phase
        assert sum(phase.values()) <= b.total_bytes
    assert b.model_state_bytes >= 0


# ---- monotonicity ----------------------------------------------------------------------------

@SETTINGS
@given(jobs(), st.integers(1, 10**12), st.integers(0, 10**12))
def test_monotone_in_n(job, n, more) -> None:
    spec, train = job
    small, large = plan(spec, train, params=n), plan(spec, train, params=n + more)
    assert small.total_bytes <= large.total_bytes
    assert small.model_state_bytes <= large.model_state_bytes


@SETTINGS
@given(jobs(), st.data(), RUNTIMES)
def test_monotone_in_rank(job, data, runtime) -> None:
    spec, train = job
    top = smallest_dim(spec, train.lora.targets)
    r1 = data.draw(st.integers(1, top), label="r1")
    r2 = data.draw(st.integers(r1, top), label="r2")
    low = plan(spec, replace(train, lora=replace(train.lora, rank=r1)), runtime=runtime)
    high = plan(spec, replace(train, lora=replace(train.lora, rank=r2)), runtime=runtime)
    assert low.total_bytes <= high.total_bytes
    assert low.model_state_bytes <= high.model_state_bytes


@SETTINGS
@given(jobs(activations=True), st.integers(0, 4), RUNTIMES)
def test_monotone_in_batch(job, more, runtime) -> None:
    spec, train = job
    small = plan(spec, train, runtime=runtime)
    large = plan(spec, replace(train, batch=train.batch + more), runtime=runtime)
    assert small.total_bytes <= large.total_bytes


@SETTINGS
@given(jobs(activations=True), st.integers(0, 128), RUNTIMES)
def test_monotone_in_seq(job, more, runtime) -> None:
    spec, train = job
    small = plan(spec, train, runtime=runtime)
    large = plan(spec, replace(train, seq=train.seq + more), runtime=runtime)
    assert small.total_bytes <= large.total_bytes


@SETTINGS
@given(jobs(activations=True), RUNTIMES)
def test_activations_only_add(job, runtime) -> None:
    """Planning activations never lowers the model-states-only plan."""
    spec, train = job
    assert plan(spec, replace(train, batch=None, seq=None)).total_bytes <= \
        plan(spec, train, runtime=runtime).total_bytes


# ---- ZeRO over one GPU -------------------------------------------------------------------------

@SETTINGS
@given(jobs(regimes=("zero",)), RUNTIMES)
def test_zero_on_one_gpu_is_full(job, runtime) -> None:
    spec, train = job
    one = plan(spec, replace(train, gpus=1), runtime=runtime)
    full = plan(spec, replace(train, regime="full", gpus=1), runtime=runtime)
    assert one.total_bytes == full.total_bytes
    assert one.components == full.components
    assert one.phases == full.phases
    assert one.model_state_bytes == full.model_state_bytes
    assert one.formula.replace("/G", "") == full.formula


@SETTINGS
@given(jobs(regimes=("zero1", "zero2", "zero3")), st.integers(1, 64))
def test_sharding_over_more_gpus_never_costs_more(job, gpus) -> None:
    spec, train = job
    few = plan(spec, replace(train, gpus=gpus))
    many = plan(spec, replace(train, gpus=gpus + 1))
    assert many.total_bytes <= few.total_bytes


@SETTINGS
@given(jobs(regimes=("zero", "mixed", "lora", "lora-bf16")), st.integers(1, 300))
def test_fsdp_shards_never_grow_with_more_gpus(job, gpus) -> None:
    """On rank 0 (the fullest), FSDP's step-long states (padded shards, optimizer states of
    the local shard, sharded gradients) never grow with M. Other ranks' local shards can (10
    rows: rank 3 owns 1 of 4 GPUs' 3-row chunks, 2 of 5 GPUs' 2-row chunks), and the gather
    buffers can (padding to M·⌈d0/M⌉ rows), so the per-rank peak is not monotone in M."""
    from memplan.fsdp import rank_states

    spec, train = job
    # FSDP steps torch.optim's optimizers (8-bit AdamW and Adafactor are refused sharded)
    assume(train.optimizer in ("adamw", "sgd", "sgd-momentum"))
    few = rank_states(spec, train, gpus, 0)
    many = rank_states(spec, train, gpus + 1, 0)
    for field in ("weights", "optimizer_states", "persistent_grads", "sharded_grads"):
        assert getattr(many, field) <= getattr(few, field), field


# ---- structure ---------------------------------------------------------------------------------

@SETTINGS
@given(jobs(), st.one_of(st.none(), st.integers(1, 10**13)), RUNTIMES)
def test_components_sum_to_total_and_none_negative(job, n, runtime) -> None:
    spec, train = job
    _check(plan(spec, train, params=n, runtime=runtime))


@SETTINGS
@given(jobs(), RUNTIMES)
def test_json_round_trips(job, runtime) -> None:
    spec, train = job
    b = plan(spec, train, runtime=runtime)
    doc = b.to_dict()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["total_bytes"] == b.total_bytes and doc["components"] == b.components
    result = fits(spec, train, 80 * 2**30)
    doc = result.to_dict()
    assert json.loads(json.dumps(doc)) == doc


# ---- LoRA approaches 4N -------------------------------------------------------------------------

BASE_BYTES = {"lora": 4.0, "lora-bf16": 2.0}


@SETTINGS
@given(jobs(regimes=LORA_REGIMES, activations=False), st.data())
def test_lora_model_states_approach_the_frozen_base(job, data) -> None:
    """Model states are base + 16M (Adam) with M linear in the rank: the excess over the frozen
    base, relative to N, grows with the rank and shrinks to 16·M(1)/N at rank 1 (and to 0 as
    the rank goes to 0)."""
    spec, train = job
    train = replace(train, optimizer="adamw", lora=replace(train.lora, train_embeddings=False),
                    shard="none")  # the notes' formula on one GPU
    n = P.count_params(spec)
    top = smallest_dim(spec, train.lora.targets)
    ranks = sorted(set(data.draw(st.lists(st.integers(1, top), min_size=2, max_size=5))))
    base = plan(spec, replace(train, lora=replace(train.lora, rank=1))).model_state_bytes - \
        16 * P.lora_params(spec, replace(train.lora, rank=1))
    if train.regime in BASE_BYTES:
        assert base == BASE_BYTES[train.regime] * n
    else:  # qlora: NF4 block weights, everything else bf16
        assert 0 < base < 2 * n
    excess = []
    for r in ranks:
        lora = replace(train.lora, rank=r)
        states = plan(spec, replace(train, lora=lora)).model_state_bytes
        m = P.lora_params(spec, lora)
        assert states - base == 16 * m  # exactly base + 16M
        excess.append((states - base) / n)
    assert excess == sorted(excess) and len(set(excess)) == len(excess)  # strictly increasing
    unit = excess[0] / ranks[0]
    assert all(e == pytest.approx(r * unit) for r, e in zip(ranks, excess, strict=True))


def test_lora_rank_one_on_a_real_model_is_close_to_4n() -> None:
    from memplan.presets import get_model

    spec = get_model("llama-2-7b")
    n = P.count_params(spec)
    gaps = [(plan(spec, TrainSpec(regime="lora", lora=LoraSpec(rank=r))).model_state_bytes
             - 4 * n) / n for r in (64, 16, 4, 1)]
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 0.01  # rank 1: within 1% of N of the frozen base's 4N


# ---- fits agrees with the breakdown -------------------------------------------------------------

@SETTINGS
@given(jobs(), st.floats(0.0, 2.0), st.sampled_from((0, 2**20, DEFAULT_RESERVE_BYTES)))
def test_fits_agrees_with_breakdown_and_reserve(job, scale, reserve) -> None:
    spec, train = job
    b = plan(spec, train)
    capacity = max(1, int((b.total_bytes + reserve) * scale))
    result = fits(spec, train, capacity, reserve)
    assert result.breakdown == b
    assert result.required_bytes == b.total_bytes + reserve
    assert result.fits == (b.total_bytes + reserve <= capacity)
    assert result.headroom_bytes == capacity - result.required_bytes
    assert result.fits == (result.headroom_bytes >= 0)
    if train.seq is None:
        assert result.max_batch is None
        return
    best = result.max_batch
    assert best is not None and best >= 0
    if best:
        assert plan(spec, replace(train, batch=best)).total_bytes + reserve <= capacity
    if best < 2**20:
        assert plan(spec, replace(train, batch=best + 1)).total_bytes + reserve > capacity
    assert result.fits == (best >= train.batch)


@SETTINGS
@given(jobs(activations=True))
def test_exact_capacity_fits_and_one_byte_less_does_not(job) -> None:
    spec, train = job
    need = plan(spec, train).total_bytes
    assert fits(spec, train, need, 0).fits
    assert not fits(spec, train, need - 1, 0).fits
    assert max_batch(spec, train, need, 0) >= train.batch


def test_bitfit_without_biases_is_refused() -> None:
    spec = ModelSpec(name="nobias", family="llama", vocab_size=10, hidden_size=8, num_layers=1,
                     num_heads=2, num_kv_heads=2, head_dim=4, intermediate_size=8)
    with pytest.raises(MemplanError, match="no bias"):
        plan(spec, TrainSpec(regime="bitfit"))
