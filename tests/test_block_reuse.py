"""Planning walks one copy of identical blocks (memplan.autograd.Tape.repeat) and gives the
same bytes as walking every block: every family, regime, runtime, checkpointing, FSDP; where
the walked copies disagree it walks every block."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from memplan import activations as A
from memplan import arch
from memplan import fsdp as F
from memplan.autograd import Layout, Moment, _backward_moment, _repeated_peak, _Segment, layout
from memplan.config import spec_from_config
from memplan.errors import MemplanError
from memplan.planner import plan
from memplan.presets import get_model
from memplan.regimes import model_state
from memplan.spec import LoraSpec, TrainSpec

LAYERS = 9  # blocks 0, 1 (a), 6 (b), 7 and 8 walk; 2 to 5 are stood for


def _walked(monkeypatch: pytest.MonkeyPatch, spec) -> list[int]:  # noqa: ANN001
    """The layers the profile's block() is called for, from now on."""
    profile = arch.profile_of(spec)
    cls, calls = type(profile), []
    original = cls.block

    def block(self, tape, job, x, rope, layer):  # noqa: ANN001, ANN202
        calls.append(layer)
        return original(self, tape, job, x, rope, layer)

    monkeypatch.setattr(cls, "block", block)
    return calls


def _both(spec, train: TrainSpec, runtime: str = "cuda"):  # noqa: ANN001, ANN202
    """The activation plan with blocks reused, and walking every block."""
    state = model_state(spec, train)

    def sched():  # noqa: ANN202
        return F.schedule(spec, train, train.gpus) if F.is_sharded(train) else None

    return (A.plan_activations(spec, train, state, runtime, fsdp=sched()),
            A.plan_activations(spec, train, state, runtime, fsdp=sched(), reuse=False))


# ---- which blocks walk ------------------------------------------------------------------------

def test_layout_of_identical_blocks() -> None:
    assert layout([0] * LAYERS) == Layout(period=1, first=1, last=6)
    assert layout([0] * 32) == Layout(period=1, first=1, last=29)
    assert layout([0] * 32).copies == 27
    assert layout([0] * 6) == Layout(1, 1, 3)  # the fewest: one block stood for
    assert layout([0] * 5) is None


def test_layout_of_alternating_and_patterned_blocks() -> None:
    gemma2 = ["full" if (i + 1) % 2 == 0 else "sliding" for i in range(42)]
    assert layout(gemma2) == Layout(period=2, first=2, last=38)  # the first "full" is block 1
    gemma3 = ["full" if (i + 1) % 6 == 0 else "sliding" for i in range(26)]
    assert layout(gemma3) == Layout(period=6, first=6, last=18)


def test_layout_walks_past_the_first_reader_of_each_shared_storage() -> None:
    shared = [(100, 101)] * 5 + [(100, 102)] + [(100, 101)] * 20  # 102: read from block 5 on
    assert layout([0] * 26, shared) == Layout(period=1, first=6, last=23)
    assert layout([0] * 26, [(100,)] * 26) == Layout(period=1, first=1, last=23)
    shared[-2] = (100, 103)  # first read by block 24: nothing left to stand for
    assert layout([0] * 26, shared) is None


def test_layout_walks_every_block_when_unsure() -> None:
    assert layout(list(range(40))) is None  # no period
    odd = [0] * 40
    odd[20] = 1
    assert layout(odd) is None  # one block unlike the rest
    assert layout([7] + [0] * 31) == Layout(1, 2, 29)  # block 0 alone differs: it walks


def _segment(moments: list[tuple], exit_live: int, exit_params: int) -> _Segment:
    """A backward copy starting at 100 live bytes, 10 of parameter gradients."""
    entry = (100, 10, 0, 5, 0, 0)
    return _Segment(entry, moments, (exit_live, exit_params, 0, 5, 0, 0), [], _backward_moment)


def test_repeated_peak_is_in_the_last_copy_when_each_grows_the_total() -> None:
    seg = _segment([(100, 10, 5, 0), (130, 10, 9, 0), (130, 10, 9, 0), (90, 14, 5, 0)], 90, 30)
    # each copy: −10 live, +20 gradients; the first largest moment is +30 live, +4 temporary
    assert _repeated_peak(seg, 3) == Moment(100 - 30 + 30, 10 + 60, 9, 0)


def test_repeated_peak_is_in_the_first_copy_when_each_shrinks_the_total() -> None:
    seg = _segment([(100, 10, 5, 0), (120, 10, 5, 0)], 60, 15)  # each copy: −40, +5
    assert _repeated_peak(seg, 5) == Moment(100 - 40 + 20, 10 + 5, 5, 0)
    assert _repeated_peak(_segment([], 60, 15), 5) is None


# ---- the same plan --------------------------------------------------------------------------

def _tiny(preset: str, layers: int = LAYERS):  # noqa: ANN202
    return replace(get_model(preset), num_layers=layers, dropout=0.0)


JOBS = [
    dict(regime="full"), dict(regime="full", checkpointing=True), dict(regime="mixed"),
    dict(regime="lora"), dict(regime="lora", checkpointing=True), dict(regime="lora-bf16"),
    dict(regime="lora", impl="hf", lora_backend="peft", checkpointing=True),
    dict(regime="lora", impl="hf", attention="eager"), dict(regime="qlora", checkpointing=True),
    dict(regime="bitfit"), dict(regime="input-adapter"), dict(regime="prompt-tuning"),
    dict(regime="classifier"), dict(regime="zero2", gpus=8), dict(regime="zero3", gpus=8),
    dict(regime="lora", lora=LoraSpec(rank=4, targets="attention", train_embeddings=True)),
    dict(regime="zero", gpus=4), dict(regime="zero", gpus=4, checkpointing=True),
    dict(regime="lora", gpus=4, shard="full-shard", param_dtype="bf16"),
    dict(regime="full", gpus=4, shard="shard-grad-op"),
    dict(regime="lora-bf16", gpus=4, shard="shard-grad-op", checkpointing=True),
    dict(regime="full", optimizer="sgd-momentum", optimizer_impl="foreach"),
]
FAMILIES = ["llama-tiny", "gpt2-tiny", "qwen3-tiny", "gemma2-tiny", "phi3-tiny", "olmo2-tiny",
            "mixtral-tiny", "qwen2_moe-tiny", "olmoe-tiny", "gpt_neox-tiny", "bert-tiny"]


@pytest.mark.parametrize("preset", FAMILIES)
def test_every_family_regime_and_runtime_plans_the_same(
        preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Gemma 2 alternates sliding and global layers, alike but for their masks: blocks 0 and
    # 1 (the first of each mask), 2 (a), 9 (b), 10 and 11 walk
    layers, walks = (12, 6) if preset.startswith("gemma2") else (LAYERS, 5)
    spec = _tiny(preset, layers)
    walked = _walked(monkeypatch, spec)
    ran = 0
    for i, kw in enumerate(JOBS):
        for runtime in ("cuda", "cpu", "fake") if i % 4 == 0 else ("cuda",):
            train = replace(TrainSpec(batch=2, seq=64), **kw)
            if preset.startswith("gemma2"):
                train = replace(train, attention="eager")
            try:
                model_state(spec, train)
            except MemplanError:  # a job this family refuses (QLoRA on experts, ...)
                continue
            walked.clear()
            reused, whole = _both(spec, train, runtime)
            assert reused == whole, (kw, runtime)
            assert len(walked) == walks + layers, (kw, runtime)  # reused, then all
            ran += 1
    assert ran >= 15


def test_gemma3_sliding_and_global_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five sliding layers, then a global one, each kind with its own rotary tables. Within
    the window they differ only in which tables they read: blocks 0 to 5 walk (the first
    global layer is 5), then 6 (a), 23 (b), 24 and 25. Past it, sliding layers read a mask
    and global ones none: period 6, blocks 12 to 17 are stood for."""
    spec = spec_from_config({"model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 64,
                             "intermediate_size": 96, "num_hidden_layers": 26,
                             "num_attention_heads": 4, "num_key_value_heads": 2,
                             "head_dim": 16, "sliding_window": 32}, name="gemma3")
    walked = _walked(monkeypatch, spec)
    for kw in (dict(regime="full"), dict(regime="full", checkpointing=True),
               dict(regime="lora", checkpointing=True, lora_backend="peft"),
               dict(regime="zero", gpus=4, checkpointing=True)):
        for seq in (16, 64):  # within the window, and past it (the sliding mask is made)
            train = replace(TrainSpec(batch=2, seq=seq, impl="hf"), **kw)
            walked.clear()
            reused, whole = _both(spec, train)
            assert reused == whole, (kw, seq)
            assert len(walked) == (10 if seq < 32 else 20) + 26, (kw, seq)


@pytest.mark.parametrize("preset, kw", [
    ("llama-2-70b", dict(regime="lora", batch=8, seq=8192)),
    ("llama-2-70b", dict(regime="zero", gpus=8, batch=1, seq=4096, checkpointing=True)),
    ("gemma-2-9b", dict(regime="lora-bf16", batch=1, seq=8192, attention="eager")),
    ("gpt3-175b", dict(regime="full", batch=1, seq=2048, checkpointing=True)),
])
def test_presets_plan_the_same_breakdown(preset: str, kw: dict,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_model(preset)
    train = TrainSpec(**kw)
    walked = _walked(monkeypatch, spec)
    reused = plan(spec, train)
    assert len(walked) < spec.num_layers // 4
    original = A.plan_activations
    monkeypatch.setattr(A, "plan_activations",
                        lambda *a, **k: original(*a, **{**k, "reuse": False}))
    assert reused == plan(spec, train)
    assert len(walked) > spec.num_layers


def test_other_ranks_plan_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    spec, train = _tiny("llama-tiny"), TrainSpec(regime="zero", gpus=8, batch=2, seq=64)
    reused = [plan(spec, train, rank=r) for r in (0, 7)]
    original = A.plan_activations
    monkeypatch.setattr(A, "plan_activations",
                        lambda *a, **k: original(*a, **{**k, "reuse": False}))
    assert reused == [plan(spec, train, rank=r) for r in (0, 7)]


# ---- falling back to every block --------------------------------------------------------------

def _patched(monkeypatch: pytest.MonkeyPatch, spec, at: int, change):  # noqa: ANN001, ANN202
    """Make block ``at`` unlike the others with ``change(tape)`` after it runs; return the
    list of blocks walked."""
    profile = arch.profile_of(spec)
    cls, calls = type(profile), []
    original = cls.block

    def block(self, tape, job, x, rope, layer):  # noqa: ANN001, ANN202
        calls.append(layer)
        out = original(self, tape, job, x, rope, layer)
        if layer == at:
            change(tape)
        return out

    monkeypatch.setattr(cls, "block", block)
    return calls


@pytest.mark.parametrize("kw", [dict(regime="lora"),
                                dict(regime="zero", gpus=4, checkpointing=True)])
def test_a_walked_copy_unlike_in_the_forward_walks_every_block(
        kw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _tiny("llama-tiny")
    last = layout([0] * LAYERS).last  # b: walked after the copies

    def leak(tape) -> None:  # noqa: ANN001
        tape.free(tape.alloc(tape.new(12345, 4, False)))

    walked = _patched(monkeypatch, spec, last, leak)
    reused, whole = _both(spec, replace(TrainSpec(batch=2, seq=64), **kw))
    assert reused == whole
    assert walked == [0, 1, 6] + list(range(LAYERS)) * 2  # tried, then every block, twice


def test_a_walked_copy_unlike_in_the_backward_walks_every_block(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _tiny("gpt2-tiny")
    first = layout([0] * LAYERS).first  # a: walked before the copies in the forward

    def scratch(tape) -> None:  # noqa: ANN001
        tape.nodes[-1].scratch += 2**20  # a backward that allocates more: the forward is alike

    walked = _patched(monkeypatch, spec, first, scratch)
    reused, whole = _both(spec, TrainSpec(regime="full", batch=2, seq=64))
    assert reused == whole
    assert walked == [0, 1, 6, 7, 8] + list(range(LAYERS)) * 2
    assert reused.backward.temporaries > 0


def test_a_profile_key_that_differs_walks_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile says which blocks differ (``layer_key``); one unlike the rest, and its
    neighbours alike, leave no period: every block walks."""
    spec = _tiny("llama-tiny")
    monkeypatch.setattr(type(arch.profile_of(spec)), "layer_key",
                        lambda self, spec, layer: layer == 4, raising=False)
    walked = _walked(monkeypatch, spec)
    reused, whole = _both(spec, TrainSpec(regime="lora", batch=2, seq=64))
    assert reused == whole
    assert walked == list(range(LAYERS)) * 2


# ---- the benchmark (run by hand: python -m memplan.profile.bench) -----------------------------

def test_benchmark_rows_and_report(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """The benchmark's plans and report, on a tiny model; no time is asserted."""
    from memplan.profile import bench

    monkeypatch.setattr(bench, "MODELS", ("llama-tiny", "gemma2-tiny"))
    monkeypatch.setattr(bench, "SHAPES", ((1, 64),))
    rows = bench.plans(quick=True)
    assert len(rows) == 2 * len(bench.JOBS)
    assert all(r["identical"] and r["plan"]["repeats"] == 5 for r in rows)
    doc = {"plans": rows, "quick": True, "wall_s": 1.0,
           "scale": [{"model": "llama-2-70b", "job": "model states", "regimes": ["zero"],
                      "time": {"median_s": 0.07, "min_s": 0.06}}],
           "commands": [{"command": "memplan scale --model llama-2-70b", "exit_code": 0,
                         "median_s": 0.4, "min_s": 0.3, "repeats": 2}],
           "accelerate": [{"model": "llama-2-7b", "available": False}],
           "machine": {"cpu": "a CPU", "cpus": 2, "python": "3.11", "load_average_1m": 1.5,
                       "accelerate": None, "transformers": None, "torch": None},
           "targets": {"plan_s": {"target": 0.01, "worst_median": 0.02, "met": False},
                       "scale_s": {"target": 0.5, "median": 0.4, "met": True},
                       "advise_s": {"target": 2.0, "median": 1.0, "met": True},
                       "identical": True}}
    text = bench.markdown(doc)
    assert "| llama-tiny | 4 of 4 | 1 × 64 | lora |" in text
    assert "**missed**" in text and "accelerate not installed" in text
    written = bench.write(doc, tmp_path / "reports")
    assert sorted(p.name for p in written) == ["benchmark.json", "benchmark.md"]
    assert json.loads((tmp_path / "reports" / "benchmark.json").read_text())["quick"] is True
