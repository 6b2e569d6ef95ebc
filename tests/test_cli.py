"""The command line: the contracts of DESIGN.md, exit codes, and one clear line per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memplan.cli.app import load_commands
from memplan.params import count_params, lora_params
from memplan.presets import get_model, model_names
from memplan.spec import REGIMES, LoraSpec

APP = load_commands()
GPUS = ("t4", "v100-16gb", "v100-32gb", "a10", "a10g", "l4", "rtx-3090", "rtx-4090", "rtx-5090",
        "a100-40gb", "a100-40gb-pcie", "l40s", "rtx-a6000", "a100-80gb", "h100-pcie", "h100-80gb",
        "h100-nvl", "h200", "b200", "mi250x", "mi300x")


def run(*args: str, env: dict | None = None):
    runner = CliRunner(env={"COLUMNS": "200", "MEMPLAN_DEBUG": "", **(env or {})})
    return runner.invoke(APP, list(args))


def stderr_of(result) -> str:
    try:
        return result.stderr
    except (ValueError, AttributeError):  # older click: stderr mixed into output
        return result.output


def run_json(*args: str, code: int = 0) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == code, (result.output, result.exception)
    return json.loads(result.stdout)


# ---- help ------------------------------------------------------------------------------------

def test_help_lists_commands() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for name in ("estimate", "fits", "gpus", "models"):
        assert name in result.output


def test_no_args_shows_help() -> None:
    result = run()
    assert "estimate" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["estimate", "fits", "gpus", "models"])
def test_command_help(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "--json" in result.output


# ---- estimate --------------------------------------------------------------------------------

def test_estimate_params_rank_mentions_every_regime() -> None:
    result = run("estimate", "--params", "7e9", "--rank", "8")
    assert result.exit_code == 0, result.output
    for regime in REGIMES:
        if regime == "bitfit":  # the llama-2-7b shape has no biases
            continue
        assert regime in result.stdout
    assert "16N" in result.stdout and "4N + 16M" in result.stdout
    assert "7,000,000,000" in result.stdout
    assert "Llama-2-style shape scaled to N (hidden 4096, 33 layers" in result.stdout  # said


def test_estimate_json_contract() -> None:
    n = 7_000_000_000
    data = run_json("estimate", "--params", "7e9", "--rank", "8")
    assert data["params"] == n
    assert data["lora_params"] == 20_613_120  # rank 8 on all 7 linears of 33 llama-2-7b blocks
    assert data["architecture"]["name"] == "llama-2-style-h4096-l33"
    assert data["architecture"]["hidden_size"] == 4096
    regimes = data["regimes"]
    for regime in ("full", "mixed", "zero", "lora", "classifier", "input-adapter"):
        entry = regimes[regime]
        assert isinstance(entry["total_bytes"], int)
        assert all(isinstance(v, int) and v >= 0 for v in entry["components"].values())
        assert sum(entry["components"].values()) == entry["total_bytes"]
        assert isinstance(entry["formula"], str)
    assert regimes["full"]["formula"] == "16N"
    assert regimes["mixed"]["formula"] == "12N"
    assert regimes["zero"]["formula"] == "16N/G"
    assert regimes["lora"]["formula"] == "4N + 16M"
    assert regimes["classifier"]["formula"] == "4N + 16C"
    assert regimes["input-adapter"]["formula"] == "4N + 16E"
    full = regimes["full"]
    assert full["model_state_bytes"] == 16 * n
    # beyond 16N only the documented bookkeeping: rotary buffer and AdamW step counters
    assert 0 <= full["total_bytes"] - full["model_state_bytes"] < 2**20
    assert regimes["mixed"]["model_state_bytes"] == 12 * n
    assert regimes["lora"]["model_state_bytes"] == 4 * n + 16 * 20_613_120
    assert "bitfit" not in regimes
    for entry in regimes.values():
        assert entry["activations_included"] is False
        assert entry["components"]["activations"] == 0


def test_estimate_json_is_only_json() -> None:
    result = run("estimate", "--model", "gpt2", "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)  # nothing else on stdout
    assert data["params"] == 124_439_808
    assert "bitfit" in data["regimes"]
    assert data["regimes"]["bitfit"]["formula"] == "4N + 12B"


def test_estimate_model_with_batch_and_seq_has_activations() -> None:
    data = run_json("estimate", "--model", "llama-2-7b", "--batch", "2", "--seq", "512")
    assert data["params"] == 6_738_415_616
    lora = data["regimes"]["lora"]
    assert lora["activations_included"] is True
    assert lora["phases"]["forward"]["activations"] > 0
    assert lora["total_bytes"] > lora["model_state_bytes"]
    assert data["train"]["batch"] == 2 and data["train"]["seq"] == 512


def test_estimate_regime_filter_and_gpus() -> None:
    data = run_json("estimate", "--model", "gpt2", "--regime", "zero3", "--regime", "full",
                    "--gpus", "8")
    assert list(data["regimes"]) == ["zero3", "full"]
    n = 124_439_808
    assert data["regimes"]["zero3"]["model_state_bytes"] == \
        2 * (2 * n // 8) + 4 * n // 8 + 8 * n // 8


def test_estimate_targets_change_m() -> None:
    data = run_json("estimate", "--model", "llama-2-7b", "--targets", "q_proj,v_proj")
    assert data["lora_params"] == 4_194_304


def test_estimate_fits_on_is_consistent() -> None:
    data = run_json("estimate", "--model", "llama-2-7b")
    for entry in data["regimes"].values():
        assert set(entry["fits_on"]) <= set(GPUS)
    assert "t4" not in data["regimes"]["full"]["fits_on"]
    assert "h200" in data["regimes"]["lora"]["fits_on"]


def test_estimate_config_file(tmp_path: Path) -> None:
    from importlib import resources

    src = Path(str(resources.files("memplan.presets") / "models" / "qwen2.5-0.5b.json"))
    (tmp_path / "config.json").write_text(src.read_text())
    data = run_json("estimate", "--config", str(tmp_path / "config.json"))
    assert data["params"] == 494_032_768
    data = run_json("estimate", "--config", str(tmp_path))
    assert data["params"] == 494_032_768


@pytest.mark.parametrize("name", ["gpt2", "llama-2-13b", "mistral-7b"])
def test_estimate_models_count(name: str) -> None:
    data = run_json("estimate", "--model", name)
    spec = get_model(name)
    assert data["params"] == count_params(spec)
    assert data["lora_params"] == lora_params(spec, LoraSpec())


# ---- fits ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "code"), [
    (("--model", "gpt2", "--regime", "lora", "--gpu", "h100-80gb"), 0),
    (("--model", "llama-2-70b", "--regime", "full", "--gpu", "t4"), 1),
    (("--model", "llama-2-7b", "--regime", "qlora", "--memory", "8GiB"), 0),
    (("--model", "llama-2-7b", "--regime", "full", "--memory", "80GB"), 1),
    (("--params", "7e9", "--regime", "lora", "--gpu", "a100-40gb"), 0),
    (("--model", "gpt2", "--gpu", "nope"), 2),
])
def test_fits_exit_codes(args, code: int) -> None:
    result = run("fits", *args)
    assert result.exit_code == code, result.output
    if code < 2:
        first = result.stdout.splitlines()[0]
        assert ("not fit" in first) == (code == 1)


def test_fits_json_keys() -> None:
    data = run_json("fits", "--model", "gpt2", "--regime", "lora", "--gpu", "h100-80gb")
    for key in ("fits", "required_bytes", "capacity_bytes", "headroom_bytes", "max_batch"):
        assert key in data
    assert data["fits"] is None  # no --seq: only the model states were planned
    assert data["model_states_fit"] is True and data["planned"] == "model_states"
    assert data["capacity_bytes"] == 85_520_809_984
    assert data["headroom_bytes"] == data["capacity_bytes"] - data["required_bytes"]
    assert data["max_batch"] is None


def test_fits_json_when_not_fitting() -> None:
    data = run_json("fits", "--model", "llama-2-70b", "--regime", "full", "--gpu", "t4", code=1)
    assert data["fits"] is False
    assert data["headroom_bytes"] < 0
    assert data["required_bytes"] > 16 * 68_976_648_192


def test_fits_seq_without_batch_reports_max_batch() -> None:
    data = run_json("fits", "--model", "gpt2", "--regime", "lora", "--gpu", "t4", "--seq", "512")
    assert isinstance(data["max_batch"], int) and data["max_batch"] >= 1
    text = run("fits", "--model", "gpt2", "--regime", "lora", "--gpu", "t4", "--seq", "512")
    assert text.exit_code == 0
    assert f"fits up to batch {data['max_batch']} at seq 512" in text.stdout.splitlines()[0]


def test_fits_max_batch_agrees_with_the_planner() -> None:
    from memplan.planner import max_batch
    from memplan.presets import get_gpu
    from memplan.spec import TrainSpec

    data = run_json("fits", "--model", "llama-2-7b", "--regime", "lora", "--gpu", "a100-80gb",
                    "--seq", "1024")
    expected = max_batch(get_model("llama-2-7b"), TrainSpec(regime="lora", batch=1, seq=1024),
                         get_gpu("a100-80gb").capacity_bytes)
    assert data["max_batch"] == expected


def test_fits_memory_and_reserve() -> None:
    data = run_json("fits", "--model", "gpt2", "--memory", "24GiB", "--reserve", "0")
    assert data["capacity_bytes"] == 24 * 2**30
    assert data["reserve_bytes"] == 0
    data = run_json("fits", "--model", "gpt2", "--memory", "80GB", "--reserve", "2GiB")
    assert data["capacity_bytes"] == 80 * 10**9
    assert data["reserve_bytes"] == 2 * 2**30


# ---- bad input: exit 2, one line on stderr naming the value, no traceback --------------------

BAD = [
    (("estimate", "--params", "abc"), "abc"),
    (("estimate", "--params", "-5"), "-5"),
    (("estimate", "--params", "0"), "0"),
    (("estimate", "--params", "nan"), "nan"),
    (("estimate", "--params", "7e9", "--rank", "0"), "0"),
    (("estimate", "--params", "7e9", "--rank", "100000"), "100000"),
    (("estimate", "--model", "nope"), "nope"),
    (("estimate", "--model", "llama-2-7"), "did you mean 'llama-2-7b'"),
    (("fits", "--model", "gpt2", "--gpu", "nope"), "nope"),
    (("fits", "--model", "gpt2", "--gpu", "h1000"), "closest: h100-80gb"),
    (("estimate", "--params", "7e9", "--gpus", "0"), "--gpus"),
    (("estimate", "--params", "7e9", "--targets", "nope"), "nope"),
    (("estimate", "--model", "gpt2", "--targets", "c_prj"), "did you mean 'c_proj'"),
    (("estimate", "--params", "7e9", "--batch", "0", "--seq", "512"), "--batch"),
    (("estimate", "--params", "7e9", "--batch", "2", "--seq", "0"), "--seq"),
    (("estimate", "--params", "7e9", "--batch", "2"), "--seq"),
    (("estimate", "--params", "7e9", "--seq", "512"), "--batch"),
    (("estimate", "--config", "missing.json"), "missing.json"),
    (("fits", "--model", "gpt2", "--memory", "24"), "24"),
    (("fits", "--model", "gpt2", "--memory", "-1GiB"), "-1GiB"),
    (("fits", "--model", "gpt2", "--gpu", "t4", "--memory", "24GiB"), "--gpu"),
    (("fits", "--model", "gpt2"), "--gpu"),
    (("estimate",), "--params"),
    (("estimate", "--params", "7e9", "--model", "gpt2"), "--model"),
    (("estimate", "--model", "gpt2", "--regime", "nope"), "nope"),
    (("fits", "--model", "gpt2", "--regime", "nope", "--gpu", "t4"), "nope"),
    (("fits", "--model", "llama-2-7b", "--regime", "bitfit", "--gpu", "t4"), "bitfit"),
    (("estimate", "--model", "gpt2", "--batch", "1", "--seq", "4096"), "4096"),
    (("estimate", "--model", "gpt2", "--optimizer", "adam"), "adam"),
    (("estimate", "--model", "gpt2", "--optimizer-impl", "turbo"), "turbo"),
    (("estimate", "--model", "gpt2", "--attention", "magic"), "magic"),
    (("estimate", "--model", "gpt2", "--classes", "0"), "--classes"),
    (("estimate", "--model", "gpt2", "--prompt-tokens", "0"), "--prompt-tokens"),
    (("estimate", "--model", "gpt2", "--alpha", "0"), "alpha"),
    (("estimate", "--model", "gpt2", "--reserve", "1"), "--reserve"),
    (("estimate", "--model", "gpt2", "--regime", "zero1", "--optimizer", "sgd"), "adamw"),
]


def _check_bad(result, needle: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    err = stderr_of(result)
    assert "Traceback" not in result.output and "Traceback" not in err
    assert result.stdout.strip() == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert needle in lines[0]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exit_2_one_line(args, needle: str) -> None:
    _check_bad(run(*args), needle)


@pytest.mark.parametrize("json_flag", [(), ("--json",)])
def test_bad_input_with_json_keeps_stdout_empty(json_flag) -> None:
    _check_bad(run("estimate", "--params", "abc", *json_flag), "abc")


@pytest.mark.parametrize(("text", "needle"), [
    ('{"model_type": "llama"', "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"model_type": "t5"}', "t5"),
    ('{"model_type": "llama", "hidden_size": NaN}', "NaN"),
    ('{"model_type": "gpt2", "n_embd": "768"}', "n_embd"),
    ("[" * 100_000, "config.json"),
])
def test_bad_config_file(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    for command in (("estimate",), ("fits", "--gpu", "t4")):
        result = run(*command, "--config", str(path))
        _check_bad(result, needle)


def test_config_directory_without_config_json(tmp_path: Path) -> None:
    _check_bad(run("estimate", "--config", str(tmp_path)), "config.json")


def test_bad_value_type_is_a_usage_error() -> None:
    # typer/click's own parsing of an int option: exit 2, no traceback
    result = run("estimate", "--model", "gpt2", "--rank", "eight")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_memplan_debug_shows_the_exception() -> None:
    result = run("estimate", "--params", "abc", env={"MEMPLAN_DEBUG": "1"})
    assert result.exit_code != 0
    from memplan.errors import MemplanError

    assert isinstance(result.exception, MemplanError)


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum"])
def test_estimate_all_regimes_with_sgd(optimizer: str) -> None:
    result = run("estimate", "--params", "7e9", "--optimizer", optimizer, "--json")
    assert result.exit_code == 0, stderr_of(result)
    data = json.loads(result.stdout)
    assert data["regimes"]["full"]["formula"] == {"sgd": "8N", "sgd-momentum": "12N"}[optimizer]


# ---- catalogues ------------------------------------------------------------------------------

def test_gpus_lists_catalogue() -> None:
    result = run("gpus")
    assert result.exit_code == 0
    for name in GPUS:
        assert name in result.stdout
    data = run_json("gpus")
    assert [g["name"] for g in data["gpus"]] == list(GPUS)
    assert all(isinstance(g["capacity_bytes"], int) and g["capacity_bytes"] > 10**10
               for g in data["gpus"])


def test_models_lists_presets() -> None:
    result = run("models")
    assert result.exit_code == 0
    for name in model_names():
        assert name in result.stdout
    assert "6,738,415,616" in result.stdout
    data = run_json("models")
    counts = {m["name"]: m["params"] for m in data["models"]}
    assert set(counts) == set(model_names())
    assert counts["llama-2-7b"] == 6_738_415_616
    assert counts["gpt2"] == 124_439_808
