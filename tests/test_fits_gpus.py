"""`fits` says "fits" only of a planned step; the GPU catalogue holds what cards report, with a
source for each figure, and takes names as users write them; messages print literally."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memplan.cli.app import load_commands
from memplan.planner import DEFAULT_RESERVE_BYTES, max_batch, plan
from memplan.presets import get_gpu, get_model, gpu_key, gpus
from memplan.spec import TrainSpec

APP = load_commands()
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str):
    runner = CliRunner(env={"COLUMNS": "200", "MEMPLAN_DEBUG": "", "NO_COLOR": "1"})
    return runner.invoke(APP, list(args))


def stderr_of(result) -> str:
    try:
        return result.stderr
    except (ValueError, AttributeError):  # older click: stderr mixed into output
        return result.output


def first_line(result) -> str:
    return result.stdout.splitlines()[0]


# ---- fits: "fits" only of a planned step ------------------------------------------------------

def test_without_seq_the_answer_is_model_states_only() -> None:
    result = run("fits", "--model", "llama-3-8b", "--regime", "lora-bf16", "--gpu", "rtx-4090")
    assert result.exit_code == 0  # exit 0: the model states fit...
    line = first_line(result)
    assert "model states fit" in line and "activations not planned" in line
    assert not re.search(r":\s*fits\b", line)  # ...never a bare "fits"
    data = json.loads(run("fits", "--model", "llama-3-8b", "--regime", "lora-bf16", "--gpu",
                          "rtx-4090", "--json").stdout)
    assert data["planned"] == "model_states" and data["verdict"] == "model states fit"
    assert data["fits"] is None and data["model_states_fit"] is True
    assert data["activations_included"] is False


def test_model_states_that_do_not_fit_are_a_no() -> None:
    result = run("fits", "--model", "llama-2-70b", "--regime", "full", "--gpu", "t4", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["fits"] is False and data["model_states_fit"] is False
    text = run("fits", "--model", "llama-2-70b", "--regime", "full", "--gpu", "t4")
    assert "model states do not fit" in first_line(text)


def test_seq_alone_answers_with_the_largest_batch() -> None:
    """The issue's example: llama-3-8b, LoRA on a bf16 base, seq 1024 on the RTX 4090's real
    24,564 MiB: batch 1 fits (vendor GB × 10⁹ said batch 0)."""
    args = ("fits", "--model", "llama-3-8b", "--regime", "lora-bf16", "--gpu", "rtx-4090",
            "--seq", "1024")
    result = run(*args)
    assert result.exit_code == 0
    assert "fits up to batch 1 at seq 1024" in first_line(result)
    data = json.loads(run(*args, "--json").stdout)
    spec, train = get_model("llama-3-8b"), TrainSpec(regime="lora-bf16", batch=1, seq=1024)
    capacity = get_gpu("rtx-4090").capacity_bytes
    assert data["max_batch"] == data["batch"] == max_batch(spec, train, capacity) == 1
    assert data["planned"] == "largest_batch" and data["fits"] is True
    # the numbers are those of the largest batch, and the next batch does not fit
    assert data["required_bytes"] == plan(spec, train).total_bytes + DEFAULT_RESERVE_BYTES
    assert plan(spec, replace(train, batch=2)).total_bytes + DEFAULT_RESERVE_BYTES > capacity
    assert max_batch(spec, train, 24_000_000_000) == 0  # the old vendor-GB capacity


def test_seq_alone_reports_the_batch_it_found() -> None:
    data = json.loads(run("fits", "--model", "gpt2", "--gpu", "t4", "--seq", "512",
                          "--json").stdout)
    best = data["max_batch"]
    assert best > 1 and data["batch"] == best
    spec, train = get_model("gpt2"), TrainSpec(regime="lora", batch=best, seq=512)
    assert data["required_bytes"] == plan(spec, train).total_bytes + DEFAULT_RESERVE_BYTES
    assert data["headroom_bytes"] == data["capacity_bytes"] - data["required_bytes"] >= 0


def test_seq_alone_when_not_even_one_sequence_fits() -> None:
    result = run("fits", "--model", "llama-2-70b", "--regime", "lora", "--gpu", "t4", "--seq",
                 "4096")
    assert result.exit_code == 1
    assert "not even batch 1" in first_line(result)


def test_a_planned_step_says_fits_with_its_shape() -> None:
    result = run("fits", "--model", "gpt2", "--gpu", "t4", "--batch", "2", "--seq", "256")
    assert result.exit_code == 0
    assert first_line(result).endswith("batch 2 × seq 256 on NVIDIA T4 16GB: fits")
    data = json.loads(run("fits", "--model", "gpt2", "--gpu", "t4", "--batch", "2", "--seq",
                          "256", "--json").stdout)
    assert data["planned"] == "full" and data["fits"] is True
    assert data["activations_included"] is True


# ---- the GPU catalogue ---------------------------------------------------------------------

REQUIRED = ("t4", "l4", "a10", "a10g", "l40s", "rtx-3090", "rtx-4090", "rtx-5090", "rtx-a6000",
            "a100-40gb", "a100-80gb", "h100-pcie", "h100-80gb", "h100-nvl", "h200", "b200",
            "mi250x", "mi300x")


def test_the_catalogue_covers_the_cards_people_train_on() -> None:
    assert set(REQUIRED) <= set(gpus())
    # the names the tests, README and notebook use stay
    assert {"h100-80gb", "a100-80gb", "a100-40gb", "rtx-4090", "a10", "t4", "h200"} <= set(gpus())


@pytest.mark.parametrize("name", sorted(gpus()))
def test_every_capacity_has_a_source(name: str) -> None:
    g = gpus()[name]
    assert g.source and (not g.source_url or g.source_url.startswith("https://"))
    if g.bound:  # the vendor's figure, a lower bound
        assert g.reported_mib is None and g.capacity_bytes % 10**9 == 0
        assert "bound" in g.source
    else:
        assert g.capacity_bytes == g.reported_mib * 2**20
        assert g.source_url or "lent to this project" in g.source
    assert g.flops_source
    assert g.bf16_tflops is None or (g.bf16_tflops > 0 and g.flops_url.startswith("https://"))


@pytest.mark.parametrize(("name", "mib"), [
    ("h100-80gb", 81_559), ("h200", 143_771),  # seen on machines lent to this project
    ("rtx-4090", 24_564), ("rtx-3090", 24_576), ("a100-80gb", 81_920), ("t4", 15_360),
])
def test_reported_totals(name: str, mib: int) -> None:
    assert get_gpu(name).capacity_bytes == mib * 2**20


@pytest.mark.parametrize(("given", "name"), [
    ("h100", "h100-80gb"), ("H100", "h100-80gb"), ("NVIDIA H100 80GB HBM3", "h100-80gb"),
    ("h100 sxm", "h100-80gb"), ("H100_PCIe", "h100-pcie"), ("h100 nvl", "h100-nvl"),
    ("4090", "rtx-4090"), ("RTX 4090", "rtx-4090"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("a100", "a100-80gb"), ("A100-SXM4-40GB", "a100-40gb"), ("nvidia a100 80gb pcie", "a100-80gb"),
    ("Tesla T4", "t4"), ("  T4 ", "t4"), ("a6000", "rtx-a6000"), ("AMD Instinct MI300X", "mi300x"),
    ("MI250X", "mi250x"), ("l40s", "l40s"), ("A10G", "a10g"), ("a10", "a10"),
])
def test_gpu_names_match_forgivingly(given: str, name: str) -> None:
    assert get_gpu(given).name == name


def test_every_alias_names_one_gpu() -> None:
    keys: dict[str, str] = {}
    for g in gpus().values():
        for alias in (g.name, *g.aliases, *g.device_names):
            assert keys.setdefault(gpu_key(alias), g.name) == g.name, alias


def test_an_unknown_gpu_gets_one_line_with_the_closest_names() -> None:
    result = run("fits", "--model", "gpt2", "--gpu", "h1000")
    assert result.exit_code == 2
    err = [line for line in stderr_of(result).splitlines() if line.strip()]
    assert len(err) == 1 and "'h1000'" in err[0] and "closest: h100-80gb" in err[0]


def test_gpus_shows_sources_and_bounds() -> None:
    result = run("gpus")
    assert result.exit_code == 0
    assert "bound" in result.stdout and "24,564 MiB" in result.stdout
    assert "https://github.com/RLinf/RLinf/issues/255" in result.stdout
    data = json.loads(run("gpus", "--json").stdout)
    row = next(g for g in data["gpus"] if g["name"] == "h100-80gb")
    assert row["reported_mib"] == 81_559 and row["bound"] is False and "h100" in row["aliases"]
    assert row["bf16_tflops"] == 989.5 and row["flops_url"]


# ---- messages and output -------------------------------------------------------------------

def test_version() -> None:
    from memplan import __version__

    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"memplan {__version__}"
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared and declared.group(1) == __version__


def test_brackets_in_a_path_survive(tmp_path: Path) -> None:
    folder = tmp_path / "[red]run [bold]x"
    folder.mkdir()
    config = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 2,
              "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    result = run("estimate", "--config", str(folder / "config.json"))
    assert result.exit_code == 0, stderr_of(result)
    assert "[red]run [bold]x" in result.stdout
    missing = run("estimate", "--config", str(folder / "nope.json"))
    assert missing.exit_code == 2 and "[red]run [bold]x" in stderr_of(missing)


def test_a_seq_beyond_the_rotary_positions_is_planned_with_a_warning() -> None:
    result = run("estimate", "--model", "llama-2-7b", "--regime", "lora", "--batch", "1",
                 "--seq", "16000000", "--json")
    assert result.exit_code == 0
    err = stderr_of(result)
    assert "warning:" in err and "4,096" in err and "max_position_embeddings" in err
    data = json.loads(result.stdout)
    assert "max_position_embeddings" in data["assumed"]
    assert data["regimes"]["lora"]["activations_included"] is True
    quiet = run("estimate", "--model", "llama-2-7b", "--regime", "lora", "--batch", "1",
                "--seq", "4096")
    assert "warning" not in stderr_of(quiet)


def test_estimate_says_what_g_and_m_are() -> None:
    result = run("estimate", "--model", "gpt2", "--gpus", "8")
    assert "M: LoRA parameters" in result.stdout and "G: GPUs" in result.stdout
    assert "over G = 8 GPUs" in result.stdout
    assert "M the LoRA parameters, G the GPUs" in " ".join(run("estimate", "--help")
                                                          .stdout.split())
    data = json.loads(run("estimate", "--model", "gpt2", "--regime", "zero3", "--gpus", "8",
                          "--json").stdout)
    zero3 = data["regimes"]["zero3"]
    assert zero3["formula"] == "16N/G"
    assert zero3["symbols"]["G"] == zero3["symbols"]["M"] == 8  # the old key kept beside


def test_scale_marks_fits_without_colour() -> None:
    result = run("scale", "--model", "llama-2-7b", "--gpu", "a10", "--regime", "zero",
                 "--max-gpus", "8")
    assert result.exit_code == 0, stderr_of(result)
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines()
            if line.startswith("│")}
    assert "over" in rows["1"] and "fits" in rows["8"]
    assert "16N/G" in result.stdout


def test_plot_says_where_it_wrote(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "regimes.svg"
    result = run("plot", "regimes", "--out", str(out))
    assert result.exit_code == 0, stderr_of(result)
    assert out.is_file() and result.stdout.strip() == f"wrote {out}"
