"""fits() and max_batch() against the plan itself, and the shape assumed for a bare N."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memplan.planner import DEFAULT_RESERVE_BYTES, fits, max_batch, plan
from memplan.presets import get_gpu, get_model
from memplan.spec import TrainSpec

GiB = 2**30


def _required(spec, train, reserve=DEFAULT_RESERVE_BYTES, params=None) -> int:
    return plan(spec, train, params).total_bytes + reserve


@pytest.mark.parametrize(("model", "regime", "gpu", "kw", "expected"), [
    ("gpt2", "lora", "h100-80gb", {}, True),
    ("llama-2-70b", "full", "t4", {}, False),
    ("llama-2-7b", "full", "a100-80gb", {}, False),       # 16N = 107.8 GB
    ("llama-2-7b", "lora", "a100-40gb", {}, True),        # 4N + 16M = 27.3 GB
    ("llama-2-7b", "lora-bf16", "t4", {}, True),
    ("llama-2-7b", "qlora", "t4", {"batch": 1, "seq": 512}, True),
    ("llama-2-7b", "zero3", "a10", {"gpus": 8}, True),
    ("gpt2", "full", "t4", {"batch": 4, "seq": 1024}, True),
    ("llama-2-7b", "lora", "a10", {"batch": 64, "seq": 4096}, False),
])
def test_fits_agrees_with_breakdown_and_reserve(model, regime, gpu, kw, expected) -> None:
    spec = get_model(model)
    train = TrainSpec(regime=regime, **kw)
    capacity = get_gpu(gpu).capacity_bytes
    result = fits(spec, train, capacity)
    required = _required(spec, train)
    assert result.required_bytes == required
    assert result.breakdown == plan(spec, train)
    assert result.capacity_bytes == capacity
    assert result.reserve_bytes == DEFAULT_RESERVE_BYTES
    assert result.headroom_bytes == capacity - required
    assert result.fits == (required <= capacity) == expected
    if "seq" not in kw:
        assert result.max_batch is None


def test_fits_at_the_exact_boundary() -> None:
    spec, train = get_model("gpt2"), TrainSpec(regime="lora")
    need = _required(spec, train, reserve=123)
    assert fits(spec, train, need, reserve_bytes=123).fits
    assert fits(spec, train, need, reserve_bytes=123).headroom_bytes == 0
    assert not fits(spec, train, need - 1, reserve_bytes=123).fits
    assert fits(spec, train, need - 123, reserve_bytes=0).fits
    assert not fits(spec, train, need - 1 - 123, reserve_bytes=0).fits


def test_fits_with_params_override() -> None:
    spec, train = get_model("llama-2-7b"), TrainSpec(regime="full")
    result = fits(spec, train, 150 * 10**9, params=10**10)
    assert result.required_bytes == _required(spec, train, params=10**10)
    assert result.breakdown.model_state_bytes == 16 * 10**10
    assert result.fits is False  # 160 GB of model states
    assert fits(spec, train, 170 * 10**9, params=10**10).fits is True
    assert fits(spec, train, 170 * 10**9, params=2 * 10**10).fits is False


def test_to_dict_contract() -> None:
    spec = get_model("gpt2")
    d = fits(spec, TrainSpec(regime="lora", batch=1, seq=128), 16 * GiB).to_dict()
    assert {"fits", "required_bytes", "capacity_bytes", "headroom_bytes", "max_batch"} <= set(d)
    assert isinstance(d["fits"], bool) and isinstance(d["max_batch"], int)
    assert d["headroom_bytes"] == d["capacity_bytes"] - d["required_bytes"]
    assert d["plan"]["total_bytes"] + d["reserve_bytes"] == d["required_bytes"]


@pytest.mark.parametrize(("model", "regime", "seq", "gpu", "kw"), [
    ("gpt2", "lora", 512, "t4", {}),
    ("gpt2", "full", 1024, "a100-40gb", {}),
    ("llama-2-7b", "lora", 512, "a100-80gb", {}),
    ("llama-2-7b", "qlora", 2048, "l4", {}),
    ("llama-2-7b", "lora", 4096, "h100-80gb", {"checkpointing": True}),
    ("llama-2-7b", "zero3", 1024, "a100-40gb", {"gpus": 8}),
    ("llama-tiny", "mixed", 256, "t4", {"attention": "eager"}),
    ("qwen2.5-0.5b", "classifier", 512, "l4", {}),
])
def test_max_batch_is_the_largest_that_fits(model, regime, seq, gpu, kw) -> None:
    spec = get_model(model)
    capacity = get_gpu(gpu).capacity_bytes
    train = TrainSpec(regime=regime, batch=1, seq=seq, **kw)
    best = max_batch(spec, train, capacity)
    assert best >= 1

    def ok(b: int) -> bool:
        return _required(spec, replace(train, batch=b)) <= capacity

    assert ok(best)
    assert not ok(best + 1)
    assert fits(spec, train, capacity).max_batch == best
    # fits() at that batch says yes, at the next one no
    assert fits(spec, replace(train, batch=best), capacity).fits
    assert not fits(spec, replace(train, batch=best + 1), capacity).fits


def test_max_batch_zero_when_one_sequence_does_not_fit() -> None:
    spec = get_model("llama-2-70b")
    train = TrainSpec(regime="full", batch=1, seq=512)
    assert max_batch(spec, train, get_gpu("t4").capacity_bytes) == 0
    result = fits(spec, train, get_gpu("t4").capacity_bytes)
    assert result.max_batch == 0 and not result.fits


def test_max_batch_respects_the_limit() -> None:
    spec = get_model("llama-tiny")
    train = TrainSpec(regime="lora", batch=1, seq=16)
    assert max_batch(spec, train, get_gpu("h200").capacity_bytes, limit=64) == 64
    assert max_batch(spec, train, get_gpu("h200").capacity_bytes, limit=100) == 100


def test_max_batch_grows_with_capacity_and_shrinks_with_seq() -> None:
    spec, train = get_model("gpt2"), TrainSpec(regime="lora", batch=1, seq=512)
    by_gpu = [max_batch(spec, train, get_gpu(g).capacity_bytes)
              for g in ("t4", "a100-40gb", "h100-80gb")]
    assert by_gpu == sorted(by_gpu) and by_gpu[0] < by_gpu[-1]
    by_seq = [max_batch(spec, replace(train, seq=s), 16 * GiB) for s in (128, 256, 1024)]
    assert by_seq == sorted(by_seq, reverse=True) and by_seq[0] > by_seq[-1]


def test_larger_reserve_never_fits_more() -> None:
    spec, train = get_model("gpt2"), TrainSpec(regime="full", batch=1, seq=512)
    small = max_batch(spec, train, 16 * GiB, reserve_bytes=0)
    large = max_batch(spec, train, 16 * GiB, reserve_bytes=4 * GiB)
    assert small > large >= 1

