"""A job as choices: the presets, the one resolution, the combinations refused, the recipes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from memplan.cli.app import load_commands
from memplan.errors import MemplanError
from memplan.planner import plan
from memplan.presets import get_model
from memplan.recipe import NAMED_RECIPES, PRESETS, choices_text, resolve
from memplan.spec import REGIMES, TrainSpec

APP = load_commands()


def test_every_regime_is_a_preset_and_resolves_to_its_choices() -> None:
    assert REGIMES == tuple(PRESETS)
    r = TrainSpec(regime="lora-bf16").recipe
    assert (r.trains, r.dtype, r.autocast, r.compute, r.nf4) == ("lora", "bf16", "none",
                                                                 "bf16", False)
    assert TrainSpec(regime="qlora").recipe.nf4
    assert TrainSpec(regime="zero3").recipe.stage == 3
    assert TrainSpec(regime="mixed").recipe.notes_mixed
    trainer = TrainSpec(regime="full", autocast="bf16", loop="trainer").recipe
    assert (trainer.dtype, trainer.compute, trainer.keeps_outputs) == ("fp32", "bf16", False)
    assert TrainSpec().recipe.keeps_outputs  # the manual loop is the default


def test_lora_on_a_bf16_base_is_the_lora_bf16_preset() -> None:
    spec = get_model("llama-tiny")
    a = plan(spec, TrainSpec(regime="lora-bf16", batch=2, seq=64))
    b = plan(spec, TrainSpec(regime="lora", dtype="bf16", batch=2, seq=64))
    assert a.total_bytes == b.total_bytes and a.phases == b.phases


def test_pure_bf16_full_is_8_bytes_per_parameter() -> None:
    spec = get_model("llama-2-7b")
    p = plan(spec, TrainSpec(regime="full", dtype="bf16"))
    assert p.formula == "8N"
    n = p.symbols["N"]
    assert p.model_state_bytes == 8 * n  # bf16 weights, gradients, m and v
    assert p.phases["step"]["gradients"] == 2 * n


@pytest.mark.parametrize(("kw", "words"), [
    (dict(regime="full", dtype="bf16", autocast="fp16"), "--autocast bf16"),
    (dict(regime="lora", dtype="bf16", autocast="fp16"), "autocast casts fp32 only"),
    (dict(regime="mixed", autocast="bf16"), "--regime full --autocast bf16"),
    (dict(regime="full", autocast="bf16", dtype="bf16"), "pure bf16"),
    (dict(regime="zero", gpus=8, optimizer="adamw-8bit"), "FSDP"),
    (dict(regime="lora", gpus=4, shard="full-shard", optimizer="paged-adamw-8bit"), "FSDP"),
    (dict(regime="full", gpus=2, shard="full-shard", optimizer="adafactor"), "FSDP"),
    (dict(regime="full", grad_accum=0), "--grad-accum 4"),
    (dict(regime="zero", gpus=2, grad_accum=2), "--grad-accum 1"),
    (dict(regime="zero2", grad_accum=2), "--grad-accum 1"),
    (dict(regime="mixed", optimizer="adamw-8bit"), "--regime full"),
    (dict(regime="zero1", optimizer="adafactor"), "--optimizer adamw"),
    (dict(regime="lora-bf16", dtype="fp32"), "--regime lora --dtype fp32"),
    (dict(regime="input-adapter", dtype="bf16"), "--dtype fp32"),
    (dict(regime="prompt-tuning", dtype="fp16"), "--dtype fp32"),
    (dict(regime="full", optimizer="adamw-8bit", optimizer_impl="foreach"), "--optimizer-impl"),
    (dict(regime="full", loop="hf"), "manual"),
    (dict(regime="full", dtype="fp8"), "bf16"),
])
def test_combinations_that_do_not_exist_are_refused_with_the_fix(kw, words) -> None:
    with pytest.raises(MemplanError) as err:
        TrainSpec(**kw)
    assert words in str(err.value)


@pytest.mark.parametrize("args", [
    ["--autocast", "fp16", "--dtype", "bf16", "--regime", "lora"],
    ["--regime", "mixed", "--autocast", "bf16"],
    ["--regime", "zero", "--gpus", "8", "--optimizer", "paged-adamw-8bit"],
    ["--grad-accum", "0"],
    ["--loop", "keras"],
])
@pytest.mark.parametrize("command", ["estimate", "fits"])
def test_the_cli_says_one_line_and_exits_2(command, args) -> None:
    extra = ["--gpu", "a100-80gb"] if command == "fits" else []
    result = CliRunner().invoke(APP, [command, "--model", "llama-2-7b", *args, *extra])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_resolve_is_the_one_reading_of_a_regime() -> None:
    train = TrainSpec(regime="qlora", optimizer="paged-adamw-8bit", loop="trainer")
    assert resolve(train) == train.recipe
    assert "paged-adamw-8bit" in choices_text(train)


def test_every_plan_says_which_loop_it_assumed() -> None:
    spec = get_model("llama-tiny")
    for loop in ("manual", "trainer"):
        notes = plan(spec, TrainSpec(batch=1, seq=32, loop=loop)).notes
        assert any(n.startswith(f"loop: {loop}") for n in notes)


def test_the_manual_loop_adds_the_logits_to_every_phase() -> None:
    spec = get_model("qwen2.5-0.5b")
    kw = dict(regime="full", batch=8, seq=512, impl="hf")
    manual = plan(spec, TrainSpec(**kw))
    trainer = plan(spec, TrainSpec(**kw, loop="trainer"))
    logits = 8 * 512 * spec.vocab_size * 4  # fp32 logits
    assert manual.phases["step"]["activations"] - trainer.phases["step"]["activations"] == logits
    assert manual.total_bytes - trainer.total_bytes == logits


def test_accumulation_keeps_every_gradient_through_the_later_micro_batches() -> None:
    spec = get_model("llama-tiny")
    one = plan(spec, TrainSpec(batch=2, seq=64))
    four = plan(spec, TrainSpec(batch=2, seq=64, grad_accum=4))
    grads = one.phases["step"]["gradients"]
    assert four.phases["forward"]["gradients"] == grads
    assert one.phases["forward"]["gradients"] == 0
    assert four.total_bytes > one.total_bytes


def test_the_recipes_command_plans_each_recipe_by_its_flags() -> None:
    result = CliRunner().invoke(APP, ["recipes", "--model", "llama-tiny", "--batch", "1",
                                      "--seq", "32", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["name"] for r in doc["recipes"]] == [n.name for n in NAMED_RECIPES]
    spec = get_model("llama-tiny")
    base = TrainSpec(batch=1, seq=32)
    for row in doc["recipes"]:
        assert row["plan"]["total_bytes"] == plan(spec, replace(base, **row["choices"])).total_bytes
    torchtune = next(r for r in doc["recipes"] if r["name"] == "torchtune full bf16")
    assert torchtune["plan"]["formula"] == "8N"


def test_the_classifier_says_approximation_where_its_no_grad_forward_was_measured_above() -> None:
    """The classifier regime's backbone runs without grad in training mode; on the families
    (and with dropout) where the profiler measured more than the plan, the plan says so."""
    from memplan.profile.step import measure

    gpt2 = get_model("gpt2-tiny")
    train = TrainSpec(regime="classifier", batch=4, seq=64, impl="hf")
    planned = plan(gpt2, train, runtime="cpu")
    assert measure(gpt2, train, "cpu").peak_bytes > planned.total_bytes  # the gap labelled
    assert any(n.startswith("approximation:") for n in planned.notes)
    llama = plan(get_model("llama-tiny"), TrainSpec(regime="classifier", batch=4, seq=64))
    assert not any(n.startswith("approximation:") for n in llama.notes)
    dropped = plan(replace(get_model("llama-tiny"), dropout=0.1),
                   TrainSpec(regime="classifier", batch=4, seq=64))
    assert any("with dropout" in n for n in dropped.notes)


@pytest.mark.parametrize("model", ["llama-tiny", "gpt2-tiny"])
def test_a_classifier_on_a_bf16_backbone_is_measured_as_planned(model) -> None:
    from memplan.profile.step import measure

    spec = get_model(model)
    train = TrainSpec(regime="classifier", dtype="bf16", batch=4, seq=64)
    planned = plan(spec, train, runtime="cpu").total_bytes
    measured = measure(spec, train, "cpu").peak_bytes
    assert abs(planned - measured) <= 64  # the fp32 head on a bf16 backbone, to the bytes
