"""Multi-adapter LoRA training (issue 16): K adapters on one frozen base, planned and measured.

The planner counts K · M trainable elements, plans the mixed-adapter batch of
:class:`memplan.nn.lora.LoRALinear` (PEFT's ``_mixed_batch_forward``) over K × batch samples,
and compares the shared base with K separate jobs; the profiler runs the same step.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from memplan import params as P
from memplan.cli.app import load_commands
from memplan.errors import MemplanError
from memplan.optimizer import trainable_tensors
from memplan.planner import plan
from memplan.presets import get_model
from memplan.regimes import model_state
from memplan.sharing import sharing
from memplan.spec import LoraSpec, TrainSpec

APP = load_commands()


def run(*args: str):
    return CliRunner(env={"COLUMNS": "200", "MEMPLAN_DEBUG": ""}).invoke(APP, list(args))


@pytest.mark.parametrize("regime", ["lora", "lora-bf16"])
def test_model_states_are_k_adapters_with_their_own_states(regime: str) -> None:
    spec = get_model("llama-2-7b")
    m = P.lora_params(spec, LoraSpec())
    one = model_state(spec, TrainSpec(regime=regime))
    four = model_state(spec, TrainSpec(regime=regime, adapters=4))
    assert four.trainable == 4 * m
    assert four.weights_bytes - one.weights_bytes == 3 * 4 * m      # fp32 adapters
    assert four.gradients_bytes == 4 * one.gradients_bytes
    assert four.optimizer_states_bytes == 4 * one.optimizer_states_bytes == 4 * 8 * m
    assert four.formula.endswith("16·K·M") and one.formula.endswith("16M")
    assert four.symbols["M"] == m and four.symbols["K"] == 4


def test_optimizer_steps_k_times_the_tensors() -> None:
    spec = get_model("gpt2-tiny")
    one = trainable_tensors(spec, TrainSpec(regime="lora"))
    assert sorted(trainable_tensors(spec, TrainSpec(regime="lora", adapters=3))) \
        == sorted(3 * one)


def test_k_adapters_plan_more_activations_than_one_adapter_on_the_same_samples() -> None:
    # The same 4 samples: one adapter, or 4 adapters of one sample each. The mixed batch keeps
    # a gathered copy of every adapted layer's input that the single adapter shares with x.
    spec = get_model("llama-2-7b")
    one = plan(spec, TrainSpec(regime="lora", batch=4, seq=512))
    four = plan(spec, TrainSpec(regime="lora", batch=1, seq=512, adapters=4))
    assert four.components["activations"] > one.components["activations"]


def test_one_adapter_is_the_plan_of_before() -> None:
    spec = get_model("llama-tiny")
    train = TrainSpec(regime="lora", batch=2, seq=64)
    assert plan(spec, train) == plan(spec, replace(train, adapters=1))


def test_sharing_is_k_times_the_single_adapter_plan() -> None:
    spec = get_model("llama-2-7b")
    train = TrainSpec(regime="lora-bf16", batch=1, seq=512, adapters=4)
    shared = plan(spec, train).total_bytes
    single = plan(spec, replace(train, adapters=1)).total_bytes
    s = sharing(spec, train, shared)
    assert s.separate_bytes == 4 * single
    assert s.saved_bytes == 4 * single - shared > 3 * 2 * P.count_params(spec) // 2
    assert sharing(spec, replace(train, adapters=1), single) is None


@pytest.mark.parametrize("kw, needle", [
    (dict(regime="full", adapters=2), "--regime lora"),
    (dict(regime="lora", adapters=0), "--adapters"),
    (dict(regime="lora", adapters=True), "--adapters"),
    (dict(regime="lora", adapters=2, impl="hf", lora_backend="peft"), "--lora-backend peft"),
    (dict(regime="lora", adapters=2, lora=LoraSpec(train_embeddings=True)),
     "--train-embeddings"),
    (dict(regime="lora", adapters=2, gpus=2, shard="full-shard"), "--shard"),
])
def test_bad_adapters_are_refused(kw: dict, needle: str) -> None:
    with pytest.raises(MemplanError, match=needle.replace("-", r"\-")):
        TrainSpec(**kw)


def test_estimate_json_has_the_sharing_and_step_batch() -> None:
    result = run("estimate", "--model", "llama-tiny", "--adapters", "2", "--batch", "2",
                 "--seq", "64", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out["regimes"]) == {"lora", "lora-bf16"}
    lora = out["regimes"]["lora"]
    assert lora["sharing"]["shared_bytes"] == lora["total_bytes"]
    assert lora["sharing"]["separate_jobs_bytes"] == 2 * lora["sharing"]["single_adapter_bytes"]
    assert out["train"]["adapters"] == 2
    plain = json.loads(run("estimate", "--model", "llama-tiny", "--json").stdout)
    assert "adapters" not in plain["train"]


def test_estimate_text_says_what_sharing_saves() -> None:
    result = run("estimate", "--model", "llama-2-7b", "--adapters", "4", "--regime", "lora")
    assert result.exit_code == 0, result.output
    assert "4 separate jobs: 4 ×" in result.output and "sharing the base saves" in result.output
    assert "4N + 16·K·M" in result.output


@pytest.mark.parametrize("args, needle", [
    (("estimate", "--model", "llama-tiny", "--adapters", "2", "--regime", "full"),
     "--regime lora"),
    (("fits", "--model", "llama-tiny", "--adapters", "0", "--gpu", "t4"), "--adapters"),
    (("profile", "--model", "llama-tiny", "--adapters", "2", "--impl", "hf",
      "--lora-backend", "peft"), "--lora-backend peft"),
])
def test_cli_bad_adapters_is_one_line(args: tuple, needle: str) -> None:
    result = run(*args)
    assert result.exit_code == 2, (result.output, result.exception)
    err = getattr(result, "stderr", result.output)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output


@pytest.mark.parametrize("model, regime", [("llama-tiny", "lora"), ("gpt2-tiny", "lora-bf16")])
def test_measured_step_matches_the_plan(model: str, regime: str) -> None:
    pytest.importorskip("torch")
    from memplan.profile.compare import profile

    train = TrainSpec(regime=regime, batch=1, seq=32, adapters=3,
                      lora=LoraSpec(rank=4, targets="attention"))
    result = profile(get_model(model), train, device="cpu", steps=1)
    assert result.measured.trainable == 3 * P.lora_params(get_model(model), train.lora)
    assert abs(result.relative_error) < 0.01
