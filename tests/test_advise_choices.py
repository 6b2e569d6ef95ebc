"""`memplan advise` over the job's orthogonal choices: gradient accumulation planned exactly,
8-bit AdamW, the loop, bf16 autocast and pure bf16; every option's command reproduces its plan.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import replace

import pytest
from typer.testing import CliRunner

import memplan.advise as A
from memplan.advise import advise_options, fits_args
from memplan.cli.app import load_commands
from memplan.cli.options import make_job
from memplan.fsdp import is_sharded
from memplan.planner import plan
from memplan.presets import get_model
from memplan.recipe import choices_text
from memplan.spec import LoraSpec, TrainSpec

APP = load_commands()
TINY = get_model("llama-tiny")


def full(**kw) -> TrainSpec:
    return TrainSpec(**{"regime": "full", "batch": 8, "seq": 512} | kw)


def need(train: TrainSpec) -> int:
    return plan(TINY, train).total_bytes


def kinds(option) -> list[str]:
    return [c.kind for c in option.changes]


def fits_json(*args: str) -> dict:
    result = CliRunner(env={"COLUMNS": "200", "MEMPLAN_DEBUG": ""}).invoke(
        APP, ["fits", *args, "--json"])
    assert result.exit_code in (0, 1), (args, result.output)
    return json.loads(result.stdout)


# ---- gradient accumulation, planned ----------------------------------------------------------

def test_an_option_with_k_accumulation_steps_is_the_plan_of_grad_accum_k() -> None:
    job = full()
    options = advise_options(TINY, job, need(job) * 2 // 3, 0, max_gpus=1)
    accumulating = [o for o in options if o.accumulation_steps > 1]
    assert accumulating
    for o in accumulating:
        k = job.batch // o.train.batch
        assert o.train.grad_accum == o.accumulation_steps == k
        assert o.effective_batch == job.batch
        assert o.breakdown == plan(TINY, replace(o.train, grad_accum=k))
        # the gradients of the earlier micro-batches are in the plan: more than one alone
        assert o.peak_bytes >= need(replace(o.train, grad_accum=1))
    assert any(o.peak_bytes > need(replace(o.train, grad_accum=1)) for o in accumulating)


def test_a_user_who_accumulates_already_keeps_the_effective_batch() -> None:
    job = full(batch=4, grad_accum=3)
    options = advise_options(TINY, job, need(job) * 2 // 3, 0, max_gpus=1)
    assert options
    for o in options:
        assert o.effective_batch == 12
        assert o.train.grad_accum == 3 * (4 // o.train.batch)
        assert o.breakdown == plan(TINY, o.train)
    assert any(o.train.grad_accum > 3 for o in options)


def test_sharded_options_never_accumulate_and_keep_the_effective_batch() -> None:
    job = full(optimizer="sgd")  # no 8-bit dimension: more GPUs are the way out
    frugal = replace(job, regime="mixed", checkpointing=True, loop="trainer", batch=1,
                     grad_accum=8)
    options = advise_options(TINY, job, need(frugal) * 9 // 10, 0, max_gpus=8)
    sharded = [o for o in options if is_sharded(o.train)]
    assert sharded
    for o in sharded:
        assert o.train.grad_accum == 1 and o.effective_batch == 8
        assert o.train.batch * o.train.gpus == 8


# ---- 8-bit AdamW ------------------------------------------------------------------------------

def test_adamw_8bit_is_offered_for_full_fine_tuning_on_one_gpu() -> None:
    job = full()
    eight = replace(job, optimizer="adamw-8bit")
    assert need(eight) < need(job)
    options = advise_options(TINY, job, need(eight), 0, max_gpus=1)
    alone = [o for o in options if kinds(o) == ["optimizer"]]
    assert alone and alone[0].train == eight and alone[0].relative_compute == 1.0
    assert not any(o.train.recipe.eight_bit and is_sharded(o.train) for o in options)


@pytest.mark.parametrize("job", [
    full(optimizer="sgd"),
    full(regime="mixed"),
    full(regime="zero", gpus=2),
    full(gpus=2, shard="full-shard"),
    full(regime="zero2", gpus=2),
    TrainSpec(regime="lora", batch=8, seq=512),
    TrainSpec(regime="lora", batch=8, seq=512, lora=LoraSpec(targets="attention")),
], ids=["sgd", "mixed", "zero", "fsdp", "zero2", "lora", "lora-attention"])
def test_adamw_8bit_is_never_offered_where_it_does_not_apply(job) -> None:
    for divide in (2, 3, 5):
        options = advise_options(TINY, job, need(job) * 2 // divide, 0, max_gpus=4)
        assert not any(o.train.optimizer != job.optimizer for o in options), divide


# ---- the loop ---------------------------------------------------------------------------------

def test_the_trainer_loop_is_offered_to_a_manual_loop_at_no_compute() -> None:
    job = full(optimizer="sgd")
    trainer = replace(job, loop="trainer")
    assert need(trainer) < need(job)
    options = advise_options(TINY, job, need(trainer), 0, max_gpus=1)
    alone = [o for o in options if kinds(o) == ["loop"]]
    assert alone and alone[0].train == trainer and alone[0].relative_compute == 1.0
    assert alone[0].changes[0].after == "trainer"


def test_a_trainer_loop_gets_no_loop_change() -> None:
    job = full(loop="trainer")
    for divide in (2, 3):
        options = advise_options(TINY, job, need(job) * 2 // divide, 0, max_gpus=2)
        assert options and all(o.train.loop == "trainer" for o in options)
        assert not any("loop" in kinds(o) for o in options)


# ---- precision --------------------------------------------------------------------------------

def test_full_fp32_gets_bf16_autocast_and_pure_bf16() -> None:
    job = full()
    auto = replace(job, autocast="bf16")
    pure = replace(job, dtype="bf16")
    assert need(pure) < need(auto) < need(job)
    roomy = advise_options(TINY, job, need(auto), 0, max_gpus=1)
    alone = [o for o in roomy if kinds(o) == ["autocast"]]
    assert alone and alone[0].train == auto
    assert alone[0].compute_dtype == "bf16" and alone[0].compute_bytes == 2
    # pure bf16 only where autocast does not do: dominated at the user's batch otherwise
    assert not any(o.train == pure for o in roomy)
    tight = advise_options(TINY, job, need(pure), 0, max_gpus=1)
    assert any(o.train == pure and kinds(o) == ["dtype"] for o in tight)


@pytest.mark.parametrize("job", [
    full(autocast="bf16"), full(autocast="fp16"), full(dtype="bf16"), full(dtype="fp32"),
    full(regime="mixed"), full(regime="zero", gpus=2, autocast="bf16"),
    full(regime="zero", gpus=2, param_dtype="bf16"), full(regime="zero3", gpus=2),
    full(optimizer_impl="foreach"), full(grad_accum=2),
    TrainSpec(regime="lora", batch=8, seq=512, dtype="fp32"),
    TrainSpec(regime="lora", batch=8, seq=512, autocast="bf16"),
    TrainSpec(regime="lora", batch=8, seq=512, autocast="fp16", loop="trainer"),
    TrainSpec(regime="lora-bf16", batch=8, seq=512, adapters=2),
    TrainSpec(regime="qlora", batch=8, seq=512),
    TrainSpec(regime="classifier", batch=8, seq=512),
    TrainSpec(regime="prompt-tuning", batch=8, seq=512),
], ids=lambda t: f"{t.regime} ({choices_text(t)}) {t.gpus}gpu {t.loop}")
def test_every_recipe_is_searched_and_every_option_plans_what_its_flags_say(job) -> None:
    for divide in (3, 5):
        options = advise_options(TINY, job, need(job) * 2 // divide, 0, max_gpus=4)
        for o in options:
            assert o.breakdown == plan(TINY, o.train) and o.headroom_bytes >= 0
            assert same(make_train_of(fits_args(TINY, o.train)), o.train)
            if job.recipe.lora:  # LoRA moves by its presets, never by --dtype or --autocast
                assert not {"dtype", "autocast"} & set(kinds(o))


def test_a_full_job_under_autocast_goes_pure_bf16() -> None:
    job = full(autocast="bf16")
    pure = replace(job, dtype="bf16", autocast="none")
    options = advise_options(TINY, job, need(pure), 0, max_gpus=1)
    alone = [o for o in options if kinds(o) == ["dtype"]]
    assert alone and alone[0].train == pure


# ---- the commands -----------------------------------------------------------------------------

def parse(args: list[str]) -> dict:
    """`memplan fits` job flags → make_job's keyword arguments."""
    names = {"--regime": "regime", "--rank": "rank", "--alpha": "alpha", "--targets": "targets",
             "--batch": "batch", "--seq": "seq", "--gpus": "gpus", "--shard": "shard",
             "--param-dtype": "param_dtype", "--classes": "classes",
             "--prompt-tokens": "prompt_tokens", "--optimizer": "optimizer",
             "--optimizer-impl": "optimizer_impl", "--attention": "attention",
             "--impl": "impl", "--lora-backend": "lora_backend", "--adapters": "adapters",
             "--dtype": "dtype", "--autocast": "autocast", "--grad-accum": "grad_accum",
             "--loop": "loop"}
    ints = {"rank", "batch", "seq", "gpus", "classes", "prompt_tokens", "adapters",
            "grad_accum"}
    out: dict = {}
    i = 0
    while i < len(args):
        flag = args[i]
        if flag in ("--checkpointing", "--train-embeddings"):
            out[flag[2:].replace("-", "_")] = True
            i += 1
            continue
        name = names[flag]
        value = args[i + 1]
        out[name] = int(value) if name in ints else float(value) if name == "alpha" else value
        i += 2
    return out


def same(a: TrainSpec, b: TrainSpec) -> bool:
    """The same job (--dtype spelled out or left to the regime is one recipe)."""
    return replace(a, dtype=a.recipe.dtype) == replace(b, dtype=b.recipe.dtype)


def make_train_of(args: list[str]) -> TrainSpec:
    return make_job(None, "llama-tiny", None, **parse(args)).train


@pytest.mark.parametrize("train", [
    full(dtype="bf16", optimizer="adamw-8bit", grad_accum=4, batch=2, loop="trainer"),
    full(autocast="bf16", checkpointing=True),
    full(autocast="fp16", optimizer="paged-adamw-8bit"),
    full(regime="zero", gpus=4, autocast="bf16", loop="trainer"),
    full(regime="mixed", grad_accum=2, batch=4),
    TrainSpec(regime="lora", batch=2, seq=128, dtype="bf16", loop="trainer", grad_accum=3),
    TrainSpec(regime="qlora", batch=2, seq=128, lora=LoraSpec(rank=4, targets="attention")),
])
def test_fits_args_reproduce_the_job_and_its_bytes(train) -> None:
    args = fits_args(TINY, train)
    assert same(make_train_of(args), train)
    data = fits_json("--model", "llama-tiny", "--memory", "64GiB", "--reserve", "0", *args)
    assert data["required_bytes"] == plan(TINY, train).total_bytes
    for flag, value in (("--dtype", train.dtype if train.dtype != "fp32" else None),
                        ("--autocast", None if train.autocast == "none" else train.autocast),
                        ("--grad-accum", None if train.grad_accum == 1 else train.grad_accum),
                        ("--loop", None if train.loop == "manual" else train.loop)):
        assert (f"{flag} {value}" in shlex.join(args)) == (value is not None), flag


def test_each_advised_command_runs_through_the_cli_to_the_same_bytes() -> None:
    result = CliRunner(env={"COLUMNS": "200", "MEMPLAN_DEBUG": ""}).invoke(
        APP, ["advise", "--model", "llama-tiny", "--regime", "full", "--batch", "8", "--seq",
              "512", "--memory", "300MiB", "--reserve", "0", "--max-gpus", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    flags = " ".join(o["command"] for o in data["options"])
    for flag in ("--dtype bf16", "--autocast bf16", "--grad-accum", "--optimizer adamw-8bit",
                 "--loop trainer"):
        assert flag in flags, flag
    for option in data["options"]:
        assert {"dtype", "autocast", "optimizer", "loop"} <= set(option)
        assert option["accumulation_bound_bytes"] is option["accumulation_bound_fits"] is None
        args = shlex.split(option["command"])
        again = fits_json(*args[2:])
        assert again["fits"] is True
        assert again["required_bytes"] == option["required_bytes"], option["command"]


# ---- the search's pruning ---------------------------------------------------------------------

@pytest.mark.parametrize(("job", "divide"), [
    (full(), 2), (full(), 3), (full(), 6), (full(checkpointing=True), 3),
    (TrainSpec(regime="lora", batch=8, seq=512), 4), (full(regime="zero", gpus=2), 3),
])
def test_the_frugal_precheck_changes_nothing(job, divide, monkeypatch) -> None:
    """`may_fit` skips plans whose base cannot fit at that point; without it, the same."""
    capacity = need(job) * 2 // divide
    pruned = [(o.train, o.changes) for o in advise_options(TINY, job, capacity, 0, max_gpus=4)]
    monkeypatch.setattr(A._Search, "may_fit", lambda self, job, combo: True)
    assert pruned == [(o.train, o.changes)
                      for o in advise_options(TINY, job, capacity, 0, max_gpus=4)]
