"""FSDP2 measured on real gloo ranks and on the fake process group."""

import pytest

torch = pytest.importorskip("torch")

import multiprocessing  # noqa: E402
import time  # noqa: E402

from memplan.errors import MemplanError  # noqa: E402
from memplan.params import count_params  # noqa: E402
from memplan.presets import get_model  # noqa: E402
from memplan.profile.distributed import (  # noqa: E402
    INJECT_ENV,
    measure_fake_sharded,
    measure_sharded,
)
from memplan.profile.trackers import StorageTracker  # noqa: E402
from memplan.spec import TrainSpec  # noqa: E402

FP32 = 4
JOB = TrainSpec(regime="full", batch=2, seq=64)


@pytest.fixture(scope="module")
def gloo_full():
    """Two real gloo ranks of gpt2-tiny, full fine-tuning (one launch for several tests)."""
    return measure_sharded(get_model("gpt2-tiny"), JOB, nproc=2, timeout_s=60, deadline_s=300)


def test_two_gloo_ranks_return_one_measurement_each(gloo_full):
    assert [m.extra["rank"] for m in gloo_full] == [0, 1]
    for m in gloo_full:
        assert m.device == "cpu" and m.fits and m.peak_bytes > 0
        assert sum(m.components.values()) == m.peak_bytes
        assert sum(m.extra["terms"].values()) == m.peak_bytes
    # Same shapes on every rank (only the data differs), so the same bytes.
    assert gloo_full[0].peak_bytes == gloo_full[1].peak_bytes
    assert gloo_full[0].extra["loss"] != gloo_full[1].extra["loss"]


def test_gloo_rank_holds_a_shard_plus_the_gathered_units(gloo_full):
    spec = get_model("gpt2-tiny")
    n = count_params(spec)
    m = gloo_full[0]
    terms, units = m.extra["terms"], m.extra["unit_bytes"]
    block = units["transformer.h.0"]
    assert terms["sharded_params"] == FP32 * n // 2
    assert m.extra["sharded_param_bytes"] == FP32 * n // 2
    # The root (embeddings, final norm; lm_head tied) stays gathered; one block is gathered.
    assert terms["unsharded_params"] == units["<root>"] + block
    assert terms["all_gather_buffers"] == block  # the next block, prefetched
    assert terms["reduce_scatter_input"] == block  # the previous block's, kept one step
    # Adam m and v of the shard, plus one fp32 step scalar per parameter tensor (fused).
    tensors = len(list(_gpt2_param_shapes(spec)))
    assert terms["optimizer_states"] == 2 * FP32 * n // 2 + FP32 * tensors


def _gpt2_param_shapes(spec):
    from memplan.nn.models import build_model

    return [p.shape for p in build_model(spec, device="meta").parameters()]


def test_fake_process_group_matches_the_gloo_ranks(gloo_full):
    fake = measure_fake_sharded(get_model("gpt2-tiny"), JOB, nproc=2, steps=2)
    assert fake.device == "fake"
    assert fake.peak_bytes == gloo_full[0].peak_bytes
    assert fake.extra["terms"] == gloo_full[0].extra["terms"]


def test_fake_dry_run_at_eight_ranks():
    spec = get_model("llama-tiny")
    m = measure_fake_sharded(spec, TrainSpec(regime="lora", batch=2, seq=64), nproc=8)
    assert m.device == "fake" and m.extra["nproc"] == 8 and m.peak_bytes > 0
    assert sum(m.extra["terms"].values()) == m.peak_bytes
    assert m.extra["terms"]["unsharded_params"] >= m.extra["unit_bytes"]["<root>"]


def test_fake_shards_are_padded_to_whole_rows():
    """FSDP2 shards dim 0 in ⌈d0/M⌉ rows on every rank: LoRA's A (R × in) with R = 8 over
    16 ranks takes one padded row per rank, twice its size once gathered."""
    from memplan.nn.lora import apply_lora
    from memplan.nn.models import build_model

    spec, nproc = get_model("llama-tiny"), 16
    model = build_model(spec, device="meta")
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(model, 8, 16.0, "all")
    padded = sum(-(-p.shape[0] // nproc) * p[0].numel() * FP32 for p in model.parameters())
    m = measure_fake_sharded(spec, TrainSpec(regime="lora", batch=1, seq=16), nproc=nproc)
    assert m.extra["sharded_param_bytes"] == padded
    exact = sum(p.numel() for p in model.parameters()) * FP32 // nproc
    assert padded > exact


@pytest.mark.parametrize("rows, nproc", [(8, 16), (10, 4), (1024, 1024), (11008, 1024), (7, 3),
                                         (5, 1)])
def test_lazy_chunks_are_torch_chunk_padded_with_empties(rows, nproc):
    from memplan.profile.sharding import _Chunks

    t = torch.randn(rows, 2)
    ref = list(torch.chunk(t, nproc, 0))
    ref += [ref[0].new_empty(0)] * (nproc - len(ref))
    got = _Chunks(t, nproc, 0)
    assert len(got) == nproc
    for i in (0, 1 % nproc, nproc // 2, nproc - 1, -1):
        assert got[i].shape == ref[i].shape and torch.equal(got[i], ref[i])


def test_storage_refilled_inside_the_tracker_is_counted():
    """FSDP2 frees unsharded parameters with resize_(0) and refills the same storages."""
    t = torch.empty(1024)
    t.untyped_storage().resize_(0)
    with StorageTracker() as tr:
        t.untyped_storage().resize_(4096)
        assert tr.current_bytes == 4096
        t.untyped_storage().resize_(0)
        assert tr.current_bytes == 0
    assert tr.peak_bytes == 4096


@pytest.mark.parametrize("nproc, regime, match", [
    (0, "full", "--nproc"),
    (2, "classifier", "cannot be measured sharded"),
    (2, "prompt-tuning", "cannot be measured sharded"),
])
def test_bad_input_fails_before_launching(nproc, regime, match):
    with pytest.raises(MemplanError, match=match):
        measure_sharded(get_model("llama-tiny"), TrainSpec(regime=regime, batch=1, seq=8), nproc)


@pytest.mark.parametrize("how, match", [
    ("raise", r"rank 1 of 2 failed: RuntimeError: failure injected on rank 1"),
    ("exit", r"rank 1 of 2 died \(exit code 3\) without a Python error"),
])
def test_a_dying_rank_stops_the_others(monkeypatch, how, match):
    monkeypatch.setenv(INJECT_ENV, f"1:{how}")
    start = time.perf_counter()
    with pytest.raises(MemplanError, match=match) as info:
        measure_sharded(get_model("llama-tiny"), TrainSpec(regime="full", batch=1, seq=16),
                        nproc=2, timeout_s=30, deadline_s=120)
    assert time.perf_counter() - start < 90
    assert str(info.value).endswith("no rank is left running")
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_a_hanging_rank_times_out(monkeypatch):
    monkeypatch.setenv(INJECT_ENV, "1:hang")
    start = time.perf_counter()
    with pytest.raises(MemplanError, match=r"rank 0 of 2 failed.*rank\(s\) 1 still running"):
        measure_sharded(get_model("llama-tiny"), TrainSpec(regime="full", batch=1, seq=16),
                        nproc=2, timeout_s=5, deadline_s=120)
    assert time.perf_counter() - start < 90
    assert not multiprocessing.active_children()


def test_gloo_ranks_match_their_plans(gloo_full):
    """Every real rank against the plan of that rank (memplan/fsdp.py), to a few bytes."""
    from dataclasses import replace

    from memplan.planner import plan

    spec = get_model("gpt2-tiny")
    job = replace(JOB, gpus=2, shard="full-shard")
    for m in gloo_full:
        planned = plan(spec, job, runtime="cpu", rank=m.extra["rank"])
        assert abs(planned.total_bytes - m.peak_bytes) <= 1e-5 * m.peak_bytes
