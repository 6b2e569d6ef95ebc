"""8-bit AdamW (bitsandbytes' layout, paged or not) and Adafactor (transformers, the Trainer's
kwargs): the planner's optimizer states and step temporaries against the optimizers that run,
measured by memplan's tracker on the CPU and under FakeTensorMode, then whole steps."""

from __future__ import annotations

import contextlib
import math
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from memplan import optimizer as O  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.nn import optim8bit  # noqa: E402
from memplan.nn.optim import build_optimizer, optimizer_backend, optimizer_state_tensors  # noqa: E402
from memplan.planner import plan  # noqa: E402
from memplan.presets import get_model  # noqa: E402
from memplan.profile.step import measure  # noqa: E402
from memplan.profile.trackers import make_tracker  # noqa: E402
from memplan.recipe import resolve  # noqa: E402
from memplan.spec import TrainSpec  # noqa: E402

NEW = ("adamw-8bit", "paged-adamw-8bit", "adafactor")
DTYPES = {4: torch.float32, 2: torch.bfloat16}
# (shape, itemsize, nn.Embedding weight): 8-bit and 32-bit sizes, a partial last block, a
# 3-D tensor, vectors, an embedding the Trainer keeps in 32 bits
TENSORS = [O.TrainTensor((1000, 64), 4, True), O.TrainTensor((64, 128), 4),
           O.TrainTensor((128,), 4), O.TrainTensor((300, 17), 4), O.TrainTensor((4095,), 4),
           O.TrainTensor((4, 16, 32), 4), O.TrainTensor((70000,), 4)]


def _measure_step(device: str, tensors: list[O.TrainTensor], optimizer: str,
                  fp32_embeddings: bool) -> tuple[int, int]:
    """(optimizer-state bytes, peak step temporaries) of a steady-state step, by the tracker."""
    fake = FakeTensorMode() if device == "fake" else contextlib.nullcontext()
    with fake, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = [torch.nn.Parameter(torch.randn(t.shape, dtype=DTYPES[t.itemsize]))
                  for t in tensors]
        fp32 = [p for p, t in zip(params, tensors, strict=True) if t.embedding] \
            if fp32_embeddings else []
        opt = build_optimizer(params, optimizer, lr=1e-3, fp32_state=fp32)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # the warm-up creates the states
        for p in params:
            p.grad = torch.randn_like(p)
        tracker = make_tracker(device)
        with tracker:
            tracker.register(params, "weights")
            states = tracker.register(optimizer_state_tensors(opt), "optimizer_states")
            tracker.watch_params(params)
            tracker.reset_peak()
            base = tracker.current_bytes
            opt.step()
        return states, tracker.peak_bytes - base


@pytest.mark.parametrize("device", ["cpu", "fake"])
@pytest.mark.parametrize("optimizer", NEW)
@pytest.mark.parametrize("itemsize", [4, 2])
def test_state_and_step_bytes_equal_the_running_optimizer(device: str, optimizer: str,
                                                          itemsize: int) -> None:
    tensors = [O.TrainTensor(t.shape, itemsize, t.embedding) for t in TENSORS]
    loops = ("manual",) if optimizer == "adafactor" else ("manual", "trainer")
    for loop in loops:  # the Trainer keeps the embedding's 8-bit states in fp32
        train = TrainSpec(regime="full", optimizer=optimizer, loop=loop)
        states, temps = _measure_step(device, tensors, optimizer, loop == "trainer")
        assert states == O.state_bytes(train, tensors)
        if optimizer == "adafactor":
            assert temps == O.adafactor_temporaries(tensors)
        else:
            assert temps == O.adamw_8bit_temporaries(train, tensors, device)
            assert O.adamw_8bit_temporaries(train, tensors, "cuda") == 0  # the fused kernel


def test_the_planner_repeats_the_reference_formulas() -> None:
    assert (O.BNB_BLOCK, O.BNB_MIN_8BIT_SIZE, O.BNB_PAGED_MIN_NUMEL, O.BNB_QMAP_BYTES,
            O.BNB_MIDS_BYTES) == (optim8bit.BLOCK_SIZE, optim8bit.MIN_8BIT_SIZE,
                                  optim8bit.PAGED_MIN_NUMEL, optim8bit.QMAP_BYTES,
                                  optim8bit.MIDS_BYTES)
    train = TrainSpec(regime="full", optimizer="adamw-8bit", loop="manual")
    for itemsize in (4, 2):
        tensors = [O.TrainTensor(t.shape, itemsize) for t in TENSORS]
        assert O.state_bytes(train, tensors) == O.BNB_QMAP_BYTES + sum(
            optim8bit.state_bytes(t.numel) for t in tensors)
        assert O.adamw_8bit_temporaries(train, tensors, "cpu") == optim8bit.step_temporary_bytes(
            [(t.numel, DTYPES[itemsize]) for t in tensors])
    # 32-bit states only: the maps stay on the host, as bitsandbytes leaves them
    small = [O.TrainTensor((64, 32), 4)]
    assert O.state_bytes(train, small) == 8 * 64 * 32
    # Adafactor: a row and a column per matrix, a vector in full, an RMS each, all fp32
    ada = TrainSpec(regime="full", optimizer="adafactor", loop="manual")
    assert O.state_bytes(ada, [O.TrainTensor((64, 128), 2), O.TrainTensor((128,), 2)]) \
        == 4 * (64 + 128) + 4 + 4 * 128 + 4


def _plan_and_measure(model: str, train: TrainSpec, device: str) -> tuple[int, int]:
    spec = get_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan(spec, train, runtime=device).total_bytes, measure(spec, train,
                                                                       device).peak_bytes


@pytest.mark.parametrize("model", ["llama-tiny", "gpt2-tiny"])
@pytest.mark.parametrize("regime", ["full", "lora"])
@pytest.mark.parametrize("optimizer", NEW)
def test_plan_matches_a_measured_step_fake(model: str, regime: str, optimizer: str) -> None:
    train = TrainSpec(regime=regime, optimizer=optimizer, batch=2, seq=32, loop="manual")
    planned, measured = _plan_and_measure(model, train, "fake")
    assert abs(planned - measured) <= 0.01 * measured


@pytest.mark.parametrize(("model", "optimizer"), [("llama-tiny", "adamw-8bit"),
                                                  ("gpt2-tiny", "paged-adamw-8bit")])
def test_plan_matches_the_trainer_loop_with_32_bit_embedding_states(model: str,
                                                                    optimizer: str) -> None:
    # gpt2-tiny: the tied token embedding and the positions; llama-tiny: the token embedding
    train = TrainSpec(regime="full", optimizer=optimizer, batch=2, seq=32, loop="trainer")
    planned, measured = _plan_and_measure(model, train, "fake")
    assert abs(planned - measured) <= 0.01 * measured


@pytest.mark.parametrize(("model", "regime", "optimizer"), [
    ("llama-tiny", "full", "adafactor"), ("gpt2-tiny", "full", "paged-adamw-8bit"),
    ("llama-tiny", "lora", "adamw-8bit"), ("gpt2-tiny", "lora", "adafactor")])
def test_plan_matches_a_measured_step_cpu(model: str, regime: str, optimizer: str) -> None:
    train = TrainSpec(regime=regime, optimizer=optimizer, batch=2, seq=32)
    planned, measured = _plan_and_measure(model, train, "cpu")
    assert abs(planned - measured) <= 0.01 * measured


def test_plans_on_cuda_assume_bitsandbytes_and_say_what_is_paged() -> None:
    spec = get_model("llama-tiny")
    for optimizer in ("adamw-8bit", "paged-adamw-8bit"):
        train = TrainSpec(regime="full", optimizer=optimizer, loop="manual")
        cuda = plan(spec, train)
        assert cuda.phases["step"]["temporaries"] == 0  # the fused kernel
        assert plan(spec, train, runtime="cpu").phases["step"]["temporaries"] > 0
        paged = [n for n in cuda.notes if n.startswith("paged-adamw-8bit")]
        assert bool(paged) == (optimizer == "paged-adamw-8bit")
        assert not any(n.startswith("paged") for n in plan(spec, train, runtime="fake").notes)
    big = [t for t in O.trainable_tensors(spec, train) if t.numel >= 100_000]
    assert f"the {len(big)} tensors" in paged[0] and len(big) > 2  # embedding, head, MLPs


def test_formulas_name_the_states() -> None:
    spec = get_model("llama-tiny")
    assert plan(spec, TrainSpec(regime="full", optimizer="adamw-8bit")).formula == "10.03N"
    assert plan(spec, TrainSpec(regime="full", optimizer="adafactor")).formula == "8N + factored"
    lora = plan(spec, TrainSpec(regime="lora", optimizer="adafactor")).formula
    assert lora.endswith("8M + factored")


def test_the_trainer_keeps_embedding_states_in_32_bits() -> None:
    spec = get_model("llama-tiny")  # untied: the head is an nn.Linear and stays 8-bit
    manual = plan(spec, TrainSpec(regime="full", optimizer="adamw-8bit", loop="manual"))
    trainer = plan(spec, TrainSpec(regime="full", optimizer="adamw-8bit", loop="trainer"))
    n = 4096 * 256
    assert trainer.components["optimizer_states"] - manual.components["optimizer_states"] \
        == 8 * n - (2 * n + 8 * n // 256)


def test_builds_and_refusals() -> None:
    p = [torch.nn.Parameter(torch.randn(8, 8))]
    ada = build_optimizer(p, "adafactor", lr=1e-3)
    assert optimizer_backend(ada) == "transformers"
    assert ada.defaults["scale_parameter"] is False and ada.defaults["relative_step"] is False
    assert ada.defaults["beta1"] is None
    eight = build_optimizer(p, "paged-adamw-8bit")
    assert optimizer_backend(eight) == "reference" and eight.is_paged  # no CUDA here
    for optimizer in NEW:
        for impl in ("foreach", "forloop"):
            with pytest.raises(MemplanError, match="one implementation"):
                resolve(TrainSpec(regime="full", optimizer=optimizer, optimizer_impl=impl))
            with pytest.raises(MemplanError, match="one implementation"):
                build_optimizer(p, optimizer, impl)
        with pytest.raises(MemplanError):
            resolve(TrainSpec(regime="mixed", optimizer=optimizer))


def test_adafactor_without_transformers_says_to_install_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers.optimization", None)
    with pytest.raises(MemplanError, match=r"memplan\[hf\]"):
        build_optimizer([torch.nn.Parameter(torch.randn(4))], "adafactor")


def test_state_tensors_list_each_shared_map_once() -> None:
    p = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(128))]
    opt = build_optimizer(p, "adamw-8bit")
    assert optimizer_state_tensors(opt) == []  # lazily, on the first step
    for x in p:
        x.grad = torch.randn_like(x)
    opt.step()
    tensors = optimizer_state_tensors(opt)
    assert len({id(t) for t in tensors}) == len(tensors) == 4 + 2 + 2  # 8-bit, 32-bit, maps
    assert sum(t.nbytes for t in tensors) == 2 * 8192 + 8 * 32 + 8 * 128 + 2048
    assert math.isclose(O.state_coefficient(TrainSpec(optimizer="adamw-8bit"), 4), 2.03)


def test_the_plan_chunks_the_reference_as_it_runs() -> None:
    """The planner's chunk (core, no torch) is the reference optimizer's."""
    from memplan.nn.optim8bit import BLOCK_SIZE, CHUNK_BLOCKS
    from memplan.optimizer import BNB_BLOCK, BNB_CHUNK_BLOCKS

    assert (BNB_CHUNK_BLOCKS, BNB_BLOCK) == (CHUNK_BLOCKS, BLOCK_SIZE)
