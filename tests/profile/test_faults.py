"""Profiler faults: out of memory is a result, an interrupted validate keeps its rows, a failing
disk leaves the previous report whole, and a CPU-only build never reports a CUDA 0."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from memplan.cli.app import load_commands  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.presets import get_model  # noqa: E402
from memplan.profile import compare  # noqa: E402
from memplan.profile import validate as V  # noqa: E402
from memplan.profile.step import measure  # noqa: E402
from memplan.spec import TrainSpec  # noqa: E402

KiB, MiB = 2**10, 2**20
APP = load_commands()
# A one-layer Llama of ~70K parameters: real steps in milliseconds.
SMALL = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "num_hidden_layers": 1, "intermediate_size": 128,
         "vocab_size": 256}
JOB = ("--regime", "lora", "--batch", "1", "--seq", "16")
TINY = ("--model", "llama-tiny", *JOB)  # for inputs refused before anything runs


@pytest.fixture
def small(tmp_path: Path) -> tuple[str, ...]:
    path = tmp_path / "small" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(SMALL))
    return ("--config", str(path), *JOB)


def small_spec():
    from memplan.config import spec_from_config

    return spec_from_config(SMALL, name="small")


def cli(*args: str):
    return CliRunner(env={"COLUMNS": "200", "MEMPLAN_DEBUG": ""}).invoke(APP, list(args))


def one_error_line(result) -> str:
    assert "Traceback" not in result.output + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def flat(text: str) -> str:
    return " ".join(text.split())


# ---- (a) out of memory, simulated through the tracker's capacity --------------------------------

@pytest.mark.parametrize("device", ["cpu", "fake"])
@pytest.mark.parametrize("regime", ["lora", "full"])
def test_capacity_makes_a_does_not_fit_measurement(device: str, regime: str) -> None:
    spec, train = small_spec(), TrainSpec(regime=regime, batch=1, seq=16)
    full = measure(spec, train, device=device, steps=1)
    assert full.fits and full.peak_bytes > 0
    short = measure(spec, train, device=device, steps=1, capacity_bytes=full.peak_bytes - 1)
    assert short.fits is False
    assert short.peak_bytes == full.peak_bytes  # stopped at the very allocation of the peak
    assert "over the capacity" in short.extra["error"]
    tiny = measure(spec, train, device=device, steps=1, capacity_bytes=KiB)
    assert tiny.fits is False and KiB < tiny.peak_bytes < full.peak_bytes
    exact = measure(spec, train, device=device, steps=1, capacity_bytes=full.peak_bytes)
    assert exact.fits and exact.peak_bytes == full.peak_bytes  # exactly enough fits


def test_capacity_result_has_no_error_and_serialises() -> None:
    result = compare.profile(small_spec(), TrainSpec(regime="full", batch=1, seq=16),
                             device="cpu", steps=1, capacity_bytes=100 * KiB)
    assert result.relative_error is None
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["measured"]["fits"] is False and doc["measured"]["peak_bytes"] > 100 * KiB


def test_cli_capacity_prints_does_not_fit_and_exits_1(small) -> None:
    result = cli("profile", *small, "--device", "cpu", "--steps", "1", "--capacity", "100KiB")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    text = flat(result.stdout)
    assert "does not fit; measured up to" in text and "KiB" in text
    assert "error +" not in text and "error -" not in text  # no relative error is claimed

    result = cli("profile", *small, "--device", "fake", "--steps", "1", "--capacity", "100KiB",
                 "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["measured"]["fits"] is False and doc["relative_error"] is None
    assert doc["measured"]["peak_bytes"] > 100 * KiB


@pytest.mark.parametrize("value", ["8", "-1MiB", "0.5B", "nanGiB", "lots"])
def test_cli_bad_capacity_is_exit_2(value: str) -> None:
    result = cli("profile", *TINY, "--device", "fake", "--capacity", value)
    assert result.exit_code == 2
    assert "--capacity" in one_error_line(result)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 8000000000000 bytes."),
])
def test_a_real_allocation_failure_outside_the_tracker_is_a_result(monkeypatch, error) -> None:
    """E.g. a GPU out of memory in the warm-up step, before any tracker runs."""
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(compare, "measure", fail)
    result = cli("profile", *TINY, "--device", "cpu")  # nothing runs: measure is replaced
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "does not fit: " in flat(result.stdout)


def test_other_runtime_errors_are_not_swallowed(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr(compare, "measure", fail)
    with pytest.raises(RuntimeError, match="genuine"):
        compare.profile(get_model("llama-tiny"), TrainSpec(regime="lora", batch=1, seq=16),
                        device="cpu")


def test_a_cpu_run_larger_than_the_host_is_refused(monkeypatch, small) -> None:
    monkeypatch.setattr(compare, "host_memory_bytes", lambda: 100 * KiB)
    line = one_error_line(cli("profile", *small, "--device", "cpu"))
    assert "more than this machine's 100.00 KiB" in line and "--device fake" in line
    assert cli("profile", *small, "--device", "fake", "--steps", "1").exit_code == 0


def test_a_plan_beyond_int64_is_refused_even_under_fake() -> None:
    result = cli("profile", "--model", "llama-tiny", "--batch", "16777216", "--seq", "16777216",
                 "--device", "fake")
    assert result.exit_code == 2
    # the sequence is beyond llama-tiny's 1,024 rotary positions: said in a warning, then the
    # one error line
    warning, error = [line for line in result.stderr.splitlines() if line.strip()]
    assert warning.startswith("warning:") and "1,024 positions" in warning
    assert error.startswith("error:") and "more than torch can address" in error


# ---- (b) KeyboardInterrupt in the middle of validate ------------------------------------------

ROWS = [("llama-tiny", {"regime": "lora", "batch": 1, "seq": 16})] * 5


def fake_record(i: int) -> dict:
    return {"model": "llama-tiny", "regime": "lora", "options": f"row {i}",
            "predicted_bytes": 1000 * MiB + i, "measured_bytes": 1000 * MiB,
            "relative_error": i / (1000 * MiB), "predicted_components": {"weights": 1},
            "measured_components": {"weights": 1}, "peak_phase": "backward",
            "wall_seconds": 0.01}


def interrupt_after(monkeypatch, n: int) -> None:
    calls = []

    def run_row(model, kw, device, **kwargs):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(model)
        return fake_record(len(calls))

    monkeypatch.setattr(V, "run_row", run_row)


def check_interrupted_report(out: Path, rows: int, of: int) -> None:
    doc = json.loads((out / "validation-cpu.json").read_text())  # whole JSON
    assert doc["status"] == f"INTERRUPTED after {rows} of {of} rows"
    assert doc["meta"]["complete"] is False
    assert [r["options"] for r in doc["rows"]] == [f"row {i + 1}" for i in range(rows)]
    md = (out / "validation-cpu.md").read_text()
    assert f"INTERRUPTED after {rows} of {of} rows" in md and md.endswith("\n")
    assert sum(line.startswith("| llama-tiny |") for line in md.splitlines()) == rows
    partial = (out / ".validation-cpu.partial.jsonl").read_text().splitlines()
    assert [json.loads(line)["options"] for line in partial] == [f"row {i + 1}"
                                                                 for i in range(rows)]
    assert not [p for p in out.iterdir() if ".tmp" in p.name or ".new." in p.name]


def test_interrupt_keeps_the_finished_rows(monkeypatch, tmp_path: Path) -> None:
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        V.validate("cpu", out_dir=tmp_path, rows=ROWS)
    check_interrupted_report(tmp_path, 2, 5)


def test_interrupt_through_the_cli(monkeypatch, tmp_path: Path) -> None:
    interrupt_after(monkeypatch, 2)
    monkeypatch.setattr(V, "matrix_for", lambda *args, **kwargs: ROWS)
    result = cli("validate", "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 130  # the shell's code for Ctrl-C
    assert "Traceback" not in result.output
    assert "interrupted: the finished rows are in the report" in result.stderr
    check_interrupted_report(tmp_path, 2, 5)


def test_interrupt_before_any_row_leaves_the_previous_report(monkeypatch, tmp_path) -> None:
    interrupt_after(monkeypatch, 5)
    V.validate("cpu", out_dir=tmp_path, rows=ROWS)
    before = snapshot(tmp_path)
    interrupt_after(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        V.validate("cpu", out_dir=tmp_path, rows=ROWS)
    assert snapshot(tmp_path) == before


# ---- (c) a failing disk leaves the previous report intact --------------------------------------

def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("validation-*")}


def complete_report(out: Path) -> dict[str, bytes]:
    meta = {"command": "memplan validate --device cpu", "date": "2026-01-01",
            "platform": "test", "torch": torch.__version__, "complete": True,
            "status": "complete", "elapsed_seconds": 1.0, "extra": {}}
    V.write_report([fake_record(1), fake_record(2)], "cpu", out, meta)
    files = snapshot(out)
    assert set(files) >= {"validation-cpu.json", "validation-cpu.md"}
    return files


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["replace", "write_bytes"])
def test_failing_write_leaves_the_previous_report(monkeypatch, tmp_path: Path, where) -> None:
    before = complete_report(tmp_path)
    if where == "replace":
        monkeypatch.setattr(os, "replace", enospc)
    else:
        monkeypatch.setattr(Path, "write_bytes", enospc)
    meta = {"command": "x", "date": "2026-01-02", "platform": "test", "torch": "x",
            "complete": True, "elapsed_seconds": 2.0, "extra": {}}
    with pytest.raises(MemplanError, match="No space left on device.*previous report"):
        V.write_report([fake_record(i) for i in range(9)], "cpu", tmp_path, meta)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no temporaries left


def test_failing_disk_through_the_cli_is_one_line_exit_2(monkeypatch, tmp_path: Path) -> None:
    before = complete_report(tmp_path)
    interrupt_after(monkeypatch, 99)
    monkeypatch.setattr(V, "matrix_for", lambda *args, **kwargs: ROWS[:2])
    monkeypatch.setattr(os, "replace", enospc)
    result = cli("validate", "--device", "cpu", "--out", str(tmp_path))
    monkeypatch.undo()
    assert result.exit_code == 2
    assert "No space left on device" in one_error_line(result)
    assert snapshot(tmp_path) == before


def test_unwritable_out_folder_is_one_line_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli("validate", "--device", "cpu", "--out", str(blocker / "sub"))
    assert result.exit_code == 2
    assert "cannot write" in one_error_line(result)


# ---- (d) CUDA on a CPU-only build --------------------------------------------------------------

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="this build has CUDA")


@cpu_only
def test_cpu_only_build_reports_zero_and_memplan_refuses_it() -> None:
    assert torch.cuda.max_memory_allocated() == 0  # the silent 0 memplan must never report
    from memplan.profile.trackers import make_tracker

    with pytest.raises(MemplanError, match="CUDA is not available"):
        make_tracker("cuda")
    with pytest.raises(MemplanError, match="no CUDA GPU"):
        measure(get_model("llama-tiny"), TrainSpec(regime="lora", batch=1, seq=16),
                device="cuda")


@cpu_only
@pytest.mark.parametrize("command", [("profile", *TINY), ("validate", "--quick")])
def test_cpu_only_build_cli_cuda_is_exit_2(command, tmp_path: Path) -> None:
    result = cli(*command, "--device", "cuda", *(("--out", str(tmp_path))
                                                 if command[0] == "validate" else ()))
    assert result.exit_code == 2
    assert "CUDA" in one_error_line(result)
    assert not list(tmp_path.iterdir())


def test_cuda_tracker_never_reports_a_zero_peak() -> None:
    """An API that claims a GPU but counts nothing (a broken build) is refused too."""
    from memplan.profile.cuda import CudaTracker

    class Zero:
        def is_available(self):
            return True

        def synchronize(self):
            pass

        def reset_peak_memory_stats(self):
            pass

        def max_memory_allocated(self):
            return 0

        memory_allocated = memory_reserved = max_memory_reserved = max_memory_allocated

        def mem_get_info(self):
            return (80 * 2**30, 80 * 2**30)

    with CudaTracker(api=Zero()) as tracker:
        pass
    with pytest.raises(MemplanError, match="0 bytes"):
        _ = tracker.peak_bytes
