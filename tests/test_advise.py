"""`memplan advise`: the options that fit, each with a `memplan fits` line that exits 0 and plans
the same bytes; the FLOPs model (PaLM appendix B, nanoGPT's estimate_mfu) term by term; the
search's pruning (fewest changes, the smallest step along each, nothing dominated)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from memplan import params as P
from memplan.advise import (
    NOT_SEARCHED,
    advise_options,
    fits_command,
    gpu_counts,
    job_option,
    sequences,
)
from memplan.cli.app import load_commands
from memplan.errors import MemplanError
from memplan.flops import flops_per_token
from memplan.planner import plan
from memplan.presets import get_model
from memplan.spec import LoraSpec, TrainSpec

APP = load_commands()
QUESTION = ("advise", "--model", "llama-3-8b", "--regime", "lora", "--rank", "16", "--batch",
            "4", "--seq", "2048", "--gpu", "rtx-4090")
TINY = get_model("llama-tiny")
MiB = 2**20


def run(*args: str):
    return CliRunner(env={"COLUMNS": "200", "MEMPLAN_DEBUG": ""}).invoke(APP, list(args))


def stderr_of(result) -> str:
    try:
        return result.stderr
    except (ValueError, AttributeError):  # older click: stderr mixed into output
        return result.output


def run_json(*args: str, code: int = 0) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == code, (result.output, result.exception)
    return json.loads(result.stdout)


def check_commands(options: list[dict]) -> None:
    """Each option's command exits 0 through the CLI and plans the option's bytes."""
    for option in options:
        args = shlex.split(option["command"])
        assert args[:2] == ["memplan", "fits"]
        data = run_json(*args[1:])
        assert data["fits"] is True
        assert data["required_bytes"] == option["required_bytes"], option["command"]


def dominates(y, x, tolerance: float) -> bool:
    return y is not x and all(a <= b for a, b in zip(y.levels, x.levels, strict=True)) \
        and y.flops.total <= x.flops.total + tolerance


# ---- the question ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def answer() -> dict:
    return run_json(*QUESTION)


def test_the_4090_question_lists_options_that_fit(answer) -> None:
    assert answer["fits"] is False and answer["job"]["headroom_bytes"] < 0
    assert answer["options"], "the issue's question must get options"
    capacity, reserve = answer["capacity_bytes"], answer["reserve_bytes"]
    for option in answer["options"]:
        assert option["peak_bytes"] + reserve == option["required_bytes"] <= capacity
        assert option["headroom_bytes"] == capacity - option["required_bytes"] >= 0
        assert isinstance(option["relative_compute"], float) and option["changes"]
        assert option["command"].startswith("memplan fits --model llama-3-8b --gpu rtx-4090 ")
    regimes = {o["regime"] for o in answer["options"]}
    assert regimes & {"qlora", "lora-bf16"}
    assert answer["not_searched"] == list(NOT_SEARCHED)


def test_every_command_of_the_4090_answer_exits_0_and_plans_the_same_bytes(answer) -> None:
    check_commands(answer["options"])


def test_options_are_ranked_by_compute(answer) -> None:
    computes = [o["relative_compute"] for o in answer["options"]]
    assert all(b >= a - 0.02 for a, b in zip(computes, computes[1:], strict=False))
    # checkpointing recomputes the blocks' forward: ~1.45x a LoRA step on a frozen base
    ckpt = [o for o in answer["options"] if o["checkpointing"]]
    assert ckpt and all(1.3 < o["relative_compute"] < 1.6 for o in ckpt)


def test_step_times_at_the_stated_mfu_with_the_gpus_peak(answer) -> None:
    peak = answer["peak_flops"]["bf16"]
    assert peak["flops"] > 1e14 and peak["source"]
    for option in answer["options"] + [answer["job"]]:
        if option["compute_dtype"] == "bf16":
            expected = option["step_flops"] / (option["gpus"] * answer["mfu"] * peak["flops"])
            assert option["step_seconds"] == pytest.approx(expected, rel=1e-3)
        else:  # fp32 compute: no fp32 peak in the catalogue, so no time
            assert option["step_seconds"] is None
    assert answer["job"]["compute_dtype"] == "fp32"  # LoRA on an fp32 base


def test_accumulation_keeps_the_effective_batch_and_is_planned(answer) -> None:
    for option in answer["options"]:
        assert option["batch"] * option["accumulation_steps"] * option["gpus"] \
            == option["effective_batch"] == 4
        assert option["accumulation_bound_bytes"] is None  # planned, not bounded
        if option["accumulation_steps"] > 1:
            assert f"--grad-accum {option['accumulation_steps']}" in option["command"]
            assert any(c["kind"] == "micro-batch" for c in option["changes"])
            assert option["shard"] == "none"  # memplan plans no accumulation under FSDP
        else:
            assert "--grad-accum" not in option["command"]


def test_the_text_answer_has_each_command_and_what_was_not_searched(answer) -> None:
    result = run(*QUESTION)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "does not fit" in text.splitlines()[0]
    for option in answer["options"][:10]:
        assert f"   {option['command']}\n" in text  # whole, on one line: copy and paste
    assert "plan of one micro-batch" not in text and "bound" not in text
    assert "not searched yet: Adafactor and SGD" in text
    assert "40% MFU" in text


# ---- the FLOPs model --------------------------------------------------------------------------

def llama_2_7b_matmuls() -> int:
    h, i, v, layers = 4096, 11008, 32000, 32
    return layers * (4 * h * h + 3 * h * i) + v * h  # blocks' linears and the untied head


def test_full_fine_tuning_is_nanogpts_6n_plus_12lhqt() -> None:
    spec = get_model("llama-2-7b")
    f = flops_per_token(spec, TrainSpec(regime="full", batch=1, seq=2048))
    n, attention = llama_2_7b_matmuls(), 32 * 32 * 128 * 2048
    assert f.symbols["N_mm"] == n
    assert f.total == 6 * n + 12 * attention
    assert (f.forward, f.backward_inputs, f.backward_weights, f.recompute) == \
        (2 * n + 4 * attention, 2 * n + 8 * attention, 2 * n, 0)


def test_a_frozen_base_backward_is_one_forward_and_checkpointing_adds_the_blocks() -> None:
    spec = get_model("llama-2-7b")
    lora = LoraSpec(rank=16)
    m = P.lora_params(spec, lora)
    n, attention, head = llama_2_7b_matmuls(), 32 * 32 * 128 * 2048, 32000 * 4096
    f = flops_per_token(spec, TrainSpec(regime="lora", batch=1, seq=2048, lora=lora))
    assert f.total == 4 * n + 6 * m + 12 * attention
    g = flops_per_token(spec, TrainSpec(regime="lora", batch=1, seq=2048, lora=lora,
                                        checkpointing=True))
    assert g.recompute == 2 * (n - head + m) + 4 * attention
    assert g.total - f.total == g.recompute
    # the base's dtype changes the rate, not the count
    assert flops_per_token(spec, TrainSpec(regime="qlora", batch=1, seq=2048, lora=lora)) == f


def test_a_classifier_runs_no_backward_through_its_frozen_backbone() -> None:
    spec = get_model("bert-base-uncased")
    f = flops_per_token(spec, TrainSpec(regime="classifier", batch=1, seq=128,
                                        checkpointing=True))
    assert f.backward_inputs == 0 and f.recompute == 0
    assert f.backward_weights == 2 * 768 * 2  # the new head's weight


def test_a_mixture_of_experts_counts_the_routed_experts_only() -> None:
    spec = get_model("mixtral-8x7b")
    h, i, layers, v = 4096, 14336, 32, 32000
    active = layers * (2 * h * h + 2 * h * 1024 + h * 8 + 2 * 3 * h * i) + v * h
    f = flops_per_token(spec, TrainSpec(regime="full", batch=1, seq=1))
    assert f.symbols["N_mm"] == active


def test_flops_scale_with_params_given() -> None:
    spec = get_model("llama-2-7b")
    job = TrainSpec(regime="full", batch=1, seq=1)
    one = flops_per_token(spec, job).symbols["N_mm"]
    two = flops_per_token(spec, job, params=2 * P.count_params(spec)).symbols["N_mm"]
    assert abs(two - 2 * one) <= 2


def test_prompt_tuning_attends_over_the_prompt_too() -> None:
    f = flops_per_token(TINY, TrainSpec(regime="prompt-tuning", batch=1, seq=64,
                                        prompt_tokens=20))
    assert f.symbols["T"] == 84 and f.backward_weights == 0


# ---- the search -------------------------------------------------------------------------------

def tiny(**kw) -> TrainSpec:
    return TrainSpec(**{"regime": "lora", "batch": 4, "seq": 256} | kw)


def test_a_job_that_fits_is_an_option_as_it_is() -> None:
    options = advise_options(TINY, tiny(), 4 * 2**30, 0)
    plain = [o for o in options if not o.changes]
    assert len(plain) == 1 and plain[0].relative_compute == 1.0
    assert plain[0].train == tiny()
    # anything else listed is cheaper: a change that saves memory only is not advice here
    assert all(o.relative_compute < 1 - 0.01 for o in options if o.changes)


def test_checkpointing_off_is_offered_when_memory_allows() -> None:
    options = advise_options(TINY, tiny(checkpointing=True), 4 * 2**30, 0)
    off = [o for o in options if [c.kind for c in o.changes] == ["checkpointing"]]
    assert off and off[0].relative_compute < 0.8 and not off[0].train.checkpointing
    assert options[0].relative_compute < 1  # cheaper first


def test_no_option_is_dominated_and_every_one_fits() -> None:
    job = tiny(batch=8, seq=512)
    need = plan(TINY, job).total_bytes
    for capacity in (need // 2, need // 3, need // 5):
        options = advise_options(TINY, job, capacity, 0, max_gpus=4)
        assert options
        tol = 0.01 * flops_per_token(TINY, job).total
        for x in options:
            assert x.required_bytes <= capacity and x.headroom_bytes >= 0
            assert x.breakdown == plan(TINY, x.train)
            assert not any(dominates(y, x, tol) for y in options)


def test_the_micro_batch_is_the_largest_divisor_that_fits() -> None:
    job = tiny(batch=8, seq=512)
    options = advise_options(TINY, job, plan(TINY, job).total_bytes * 2 // 3, 0, max_gpus=1)
    for o in options:
        if o.train.batch < 8 and o.train.gpus == 1:
            assert 8 % o.train.batch == 0 and o.accumulation_steps * o.train.batch == 8
            bigger = [b for b in range(o.train.batch + 1, 9) if 8 % b == 0]
            assert all(plan(TINY, replace(o.train, batch=b)).total_bytes > o.capacity_bytes
                       for b in bigger)


def test_qlora_is_never_sharded_and_max_gpus_bounds_the_search() -> None:
    job = tiny(batch=8, seq=512)
    capacity = plan(TINY, job).total_bytes // 3
    for max_gpus in (1, 4):
        options = advise_options(TINY, job, capacity, 0, max_gpus=max_gpus)
        assert all(o.train.gpus <= max_gpus for o in options)
        assert all(o.train.gpus == 1 for o in options if o.train.regime == "qlora")
    assert gpu_counts(1, 8) == [1, 2, 4, 8] and gpu_counts(3, 8) == [3, 4, 8]


def test_a_shorter_sequence_only_when_nothing_fits_at_yours() -> None:
    job = tiny(batch=1, seq=1024)
    frugal = replace(job, regime="qlora", checkpointing=True,
                     lora=LoraSpec(rank=4, targets="attention"))
    at_half = plan(TINY, replace(frugal, seq=512)).total_bytes
    at_full = plan(TINY, frugal).total_bytes
    assert at_half < at_full
    options = advise_options(TINY, job, (at_half + at_full) // 2, 0, max_gpus=1)
    assert options and {o.train.seq for o in options} == {512}
    assert all(any(c.kind == "seq" for c in o.changes) for o in options)
    assert advise_options(TINY, job, 4 * 2**30, 0)[0].train.seq == 1024
    assert sequences(2048, 128) == [2048, 1024, 512, 256, 128] and sequences(100) == [100]


def test_full_fine_tuning_changes_method_only_when_nothing_full_fits() -> None:
    job = TrainSpec(regime="full", batch=2, seq=256)
    need = plan(TINY, job).total_bytes
    roomy = advise_options(TINY, job, need * 3 // 4, 0, max_gpus=1)
    assert roomy and {o.train.regime for o in roomy} <= {"full", "mixed"}
    frugal = dict(checkpointing=True, batch=1, grad_accum=2, loop="trainer")
    lora_base = plan(TINY, replace(job, regime="qlora", **frugal))
    # the leanest full fine-tuning searched: pure bf16 with 8-bit AdamW
    full_low = plan(TINY, replace(job, dtype="bf16", optimizer="adamw-8bit", **frugal))
    assert full_low.total_bytes < plan(TINY, replace(job, regime="mixed", **frugal)).total_bytes
    assert lora_base.total_bytes < full_low.total_bytes
    tight = advise_options(TINY, job, (lora_base.total_bytes + full_low.total_bytes) // 2, 0,
                           max_gpus=1)
    assert tight and {o.train.regime for o in tight} <= {"lora-bf16", "qlora"}
    assert all("a change of method" in o.changes[0].text for o in tight)


def test_fsdp_over_more_gpus_when_one_micro_batch_does_not_fit() -> None:
    spec = get_model("llama-2-7b")
    job = TrainSpec(regime="full", batch=8, seq=1024)
    options = advise_options(spec, job, 40 * 2**30, 2**30)
    assert options and all(o.train.gpus > 1 for o in options)
    for o in options:
        assert o.train.shard == "full-shard"
        assert o.effective_batch == 8 and o.train.batch * o.train.gpus \
            * o.accumulation_steps == 8


def test_nothing_fits_is_an_empty_answer_and_exit_1() -> None:
    assert advise_options(get_model("llama-2-70b"), tiny(batch=1, seq=4096), 2**30, 2**30) == []
    data = run_json("advise", "--model", "llama-2-70b", "--batch", "1", "--seq", "4096",
                    "--memory", "1GiB", code=1)
    assert data["options"] == [] and data["fits"] is False
    text = run("advise", "--model", "llama-2-70b", "--batch", "1", "--seq", "4096",
               "--memory", "1GiB")
    assert text.exit_code == 1 and "no option found" in text.stdout


def test_progress_is_reported() -> None:
    calls = []
    advise_options(TINY, tiny(), 2**27, 0, on_progress=lambda d, t: calls.append((d, t)))
    assert calls and all(0 < d <= t for d, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_the_core_refuses_a_job_without_activations() -> None:
    with pytest.raises(MemplanError, match="--batch and --seq"):
        advise_options(TINY, TrainSpec(regime="lora"), 2**30, 0)
    with pytest.raises(MemplanError, match="--max-gpus"):
        advise_options(TINY, tiny(), 2**30, 0, max_gpus=0)


# ---- commands that check each option ----------------------------------------------------------

def test_commands_carry_every_non_default_option() -> None:
    args = ("advise", "--model", "llama-tiny", "--regime", "lora", "--rank", "6", "--alpha",
            "32", "--targets", "q_proj,v_proj", "--batch", "6", "--seq", "128",
            "--optimizer", "sgd-momentum", "--optimizer-impl", "foreach", "--attention",
            "eager", "--impl", "hf", "--lora-backend", "memplan", "--memory", "40MiB",
            "--reserve", "0")
    data = run_json(*args)
    assert data["options"]
    for flags in ("--alpha 32", "--targets q_proj,v_proj", "--optimizer sgd-momentum",
                  "--optimizer-impl foreach", "--attention eager", "--impl hf",
                  "--lora-backend memplan", "--memory 40MiB --reserve 0"):
        assert all(flags in o["command"] for o in data["options"]), flags
    check_commands(data["options"])


def test_commands_with_params_and_a_config_path_with_brackets(tmp_path) -> None:
    folder = tmp_path / "my [model]"
    folder.mkdir()
    config = folder / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 256, "num_attention_heads": 8,
        "num_hidden_layers": 4, "num_key_value_heads": 4, "intermediate_size": 688,
        "vocab_size": 4096}))
    data = run_json("advise", "--config", str(config), "--batch", "8", "--seq", "512",
                    "--memory", "50MiB", "--reserve", "0")
    assert data["options"]
    check_commands(data["options"])
    text = run("advise", "--config", str(config), "--batch", "8", "--seq", "512", "--memory",
               "50MiB", "--reserve", "0").stdout
    assert shlex.quote(str(config)) in text  # brackets survive, quoted for the shell
    data = run_json("advise", "--params", "125M", "--regime", "full", "--batch", "4", "--seq",
                    "512", "--gpu", "t4")
    assert data["options"] and all("--params 125M" in o["command"] for o in data["options"])
    check_commands(data["options"][:3])


def test_fits_command_quotes_and_spells_the_job() -> None:
    train = tiny(checkpointing=True, gpus=2, shard="full-shard")
    line = fits_command(TINY, train, ["--config", "a b/c.json", "--memory", "1GiB"])
    assert line == ("memplan fits --config 'a b/c.json' --memory 1GiB --regime lora --rank 8 "
                    "--batch 4 --seq 256 --gpus 2 --shard full-shard --checkpointing")


def test_job_option_is_the_users_plan() -> None:
    user = job_option(TINY, tiny(), 2**30, 0)
    assert user.changes == () and user.breakdown == plan(TINY, tiny())
    assert user.relative_compute == 1.0 and user.accumulation_steps == 1


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "word"), [
    (("--model", "gpt2", "--gpu", "t4"), "--batch"),
    (("--model", "gpt2", "--batch", "1", "--seq", "64"), "--gpu"),
    (("--model", "gpt2", "--batch", "1", "--seq", "64", "--gpu", "t4", "--memory", "1GiB"),
     "--gpu"),
    (("--model", "gpt2", "--batch", "1", "--seq", "64", "--gpu", "t4", "--mfu", "0"), "--mfu"),
    (("--model", "gpt2", "--batch", "1", "--seq", "64", "--gpu", "t4", "--mfu", "nan"), "--mfu"),
    (("--model", "gpt2", "--batch", "1", "--seq", "64", "--gpu", "t4", "--max-gpus", "0"),
     "--max-gpus"),
    (("--model", "gpt2", "--batch", "1", "--seq", "64", "--gpu", "t4", "--regime", "lorra"),
     "lorra"),
])
def test_bad_input_is_one_line_and_exit_2(args, word) -> None:
    result = run("advise", *args)
    assert result.exit_code == 2, result.output
    err = stderr_of(result).strip()
    assert len(err.splitlines()) == 1 and word in err and "Traceback" not in err


def test_advise_never_loads_torch() -> None:
    probe = ("import json, sys; from typer.testing import CliRunner; "
             "from memplan.cli.app import load_commands; "
             "r = CliRunner().invoke(load_commands(), ['advise', '--model', 'gpt2', '--batch', "
             "'2', '--seq', '256', '--gpu', 't4', '--json']); "
             "print(json.dumps([r.exit_code, sorted({m.split('.')[0] for m in sys.modules} & "
             "{'torch', 'transformers', 'matplotlib'})]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [0, []]


def test_fits_that_does_not_fit_says_what_to_change() -> None:
    """`fits` on a job that does not fit shows advise's cheapest options, each a `memplan
    fits` line that exits 0."""
    import json
    import shlex

    from typer.testing import CliRunner

    from memplan.cli.app import load_commands

    app, runner = load_commands(), CliRunner()
    args = ["fits", "--model", "llama-tiny", "--regime", "full", "--batch", "8", "--seq", "512",
            "--memory", "150MiB", "--reserve", "0"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["fits"] is False and 1 <= len(data["options"]) <= 3
    for option in data["options"]:
        assert option["headroom_bytes"] >= 0
        again = runner.invoke(app, shlex.split(option["command"])[1:])
        assert again.exit_code == 0, (option["command"], again.output)
    text = runner.invoke(app, args)
    assert "what to change" in text.stdout and data["options"][0]["command"] in text.stdout
    fitting = runner.invoke(app, [*args[:-4], "--memory", "40GiB", "--json"])
    assert fitting.exit_code == 0 and "options" not in json.loads(fitting.stdout)


def test_options_of_k_adapters_keep_k_and_their_commands_run() -> None:
    """K adapters train on an fp32 or bf16 base and without FSDP: advise searches only what
    memplan plans for them, and every command it prints keeps --adapters K and exits 0."""
    from memplan.cli.app import load_commands

    app, runner = load_commands(), CliRunner()
    result = runner.invoke(app, ["advise", "--model", "llama-tiny", "--regime", "lora",
                                 "--adapters", "4", "--batch", "2", "--seq", "64",
                                 "--memory", "1GiB", "--reserve", "950MiB", "--json"])
    assert result.exit_code == 0, result.output
    options = json.loads(result.stdout)["options"]
    assert options and all(o["regime"] in ("lora", "lora-bf16") and o["gpus"] == 1
                           for o in options)
    for option in options:
        assert "--adapters 4" in option["command"]
        again = runner.invoke(app, shlex.split(option["command"])[1:])
        assert again.exit_code == 0, (option["command"], again.output)
