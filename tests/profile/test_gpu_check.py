"""The prepared GPU check (issue 15): its dry run on the CPU, the reserve arithmetic on scripted
CUDA readings, the time budget, failed rows, whole-or-nothing reports and bad input."""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from memplan.errors import MemplanError  # noqa: E402
from memplan.profile import gpu_check as G  # noqa: E402
from memplan.profile.validate import report_name  # noqa: E402

MiB, GiB = 2**20, 2**30
# The fastest real rows of the CPU matrices (well under a second each here).
FAST = ("llama-tiny", dict(regime="classifier", batch=2, seq=32))
FAST_HF = ("llama-tiny", dict(regime="mixed", batch=1, seq=32, impl="hf"), {})


def suites(*keys: str, rows: tuple = (FAST,), guess: float = 0.0) -> list[G.Suite]:
    """Suites like the check's own, on the CPU, with the given rows."""
    reports = {"validate": report_name("cuda"), "hf": report_name("cuda", "hf"), "scale": None}
    return [G.Suite(k, rows, "cpu", f"cmd {k}", reports[k], first_row_guess_s=guess)
            for k in keys]


def fake_row(model: str, kw: dict, device: str, changes=None) -> dict:
    """A finished row without running anything (planned 100 MiB, measured 100 MiB)."""
    return {"model": model, "regime": kw["regime"], "options": "o", "predicted_bytes": 100 * MiB,
            "measured_bytes": 100 * MiB, "relative_error": 0.0, "predicted_components": {},
            "measured_components": {}, "peak_phase": "backward", "wall_seconds": 1.0}


class Clock:
    """A clock that advances ``step`` seconds on every other read (one row = one step)."""

    def __init__(self, step: float) -> None:
        self.now, self.step, self.reads = 0.0, step, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def tick(self, *args, **kwargs) -> dict:  # a runner that takes ``step`` seconds
        self.now += self.step
        return fake_row(*args, **kwargs)


class ScriptedAPI(G.ZeroCudaMemoryAPI):
    """A GPU of 80 GiB whose context takes 500 MiB and whose jobs allocate a 3 GiB peak inside
    a 3.25 GiB reserve, and leave 32 MiB (a cuBLAS workspace) allocated."""

    total, context = 80 * GiB, 500 * MiB

    def __init__(self) -> None:
        self.reserved = self.allocated = self.peak = self.peak_reserved = 0

    def init(self) -> None:
        pass

    def empty_cache(self) -> None:
        self.reserved = self.allocated

    def reset_peak_memory_stats(self) -> None:
        self.peak, self.peak_reserved = self.allocated, self.reserved

    def run_job(self) -> None:  # what a job does to the counters
        self.peak, self.peak_reserved = 3 * GiB, 3 * GiB + 256 * MiB
        self.allocated, self.reserved = 32 * MiB, self.peak_reserved

    def max_memory_allocated(self) -> int:
        return self.peak

    def max_memory_reserved(self) -> int:
        return self.peak_reserved

    def memory_allocated(self) -> int:
        return self.allocated

    def memory_reserved(self) -> int:
        return self.reserved

    def mem_get_info(self) -> tuple[int, int]:
        return self.total - self.context - self.reserved, self.total

    def memory_stats(self) -> dict[str, int]:
        return {"inactive_split_bytes.all.peak": 7 * MiB, "num_alloc_retries": 0}

    def describe(self) -> dict:
        return {"name": "Scripted GPU", "cuda": "13.0", "capability": "9.0",
                "properties_total_bytes": self.total, "alloc_conf": ""}


def test_reading_arithmetic() -> None:
    r = G.MemoryReading(allocated_before=0, reserved_before=0, free_before=79 * GiB,
                        max_allocated=3 * GiB, max_reserved=3 * GiB + 256 * MiB,
                        allocated_after=0, reserved_after=3 * GiB + 256 * MiB,
                        free_after=80 * GiB - 500 * MiB - (3 * GiB + 256 * MiB), total=80 * GiB)
    assert r.non_allocator_bytes == 500 * MiB
    assert r.peak_used_bytes == 500 * MiB + 3 * GiB + 256 * MiB
    assert r.allocator_overhead_bytes == 256 * MiB
    assert r.reserve_bytes == 756 * MiB  # context + the allocator's cache beyond the peak
    assert r.to_dict()["reserve_bytes"] == 756 * MiB


def test_scripted_gpu_reserve_reaches_every_report(tmp_path: Path) -> None:
    api = ScriptedAPI()

    def runner(*args, **kwargs):
        api.run_job()
        return fake_row(*args, **kwargs)

    result = G.run_check(tmp_path, suites=suites("validate", "hf", "scale"), api=api,
                         runner=runner, hard_stop=False)
    doc = result.doc
    assert result.complete and not doc["dry_run"]
    assert doc["context_bytes"] == 500 * MiB
    assert doc["reserve"]["measured_reserve_bytes"] == 756 * MiB
    assert doc["reserve"]["allocator_overhead_fraction_max_1gib"] == pytest.approx(1 / 12)
    second = doc["jobs"][1]["cuda_memory"]
    assert second["allocated_before"] == 32 * MiB  # what the previous job left allocated
    assert second["inactive_split_peak"] == 7 * MiB
    names = sorted(p.name for p in result.paths)
    assert names == sorted(["validation-cuda.json", "validation-cuda.md", "validation-cuda.png",
                            "validation-hf-cuda.json", "validation-hf-cuda.md",
                            "validation-hf-cuda.png", "gpu-check-cuda.json",
                            "gpu-check-cuda.md"])
    listed = json.loads((tmp_path / "gpu-check-cuda.json").read_text())["reports"]
    assert sorted(Path(f).name for f in listed) == names
    report = json.loads((tmp_path / "validation-cuda.json").read_text())
    assert report["status"] == "complete"
    assert report["rows"][0]["cuda_memory"]["reserve_bytes"] == 756 * MiB
    md = (tmp_path / "gpu-check-cuda.md").read_text()
    assert "756.00 MiB" in md and "Scripted GPU" in md and "DRY RUN" not in md
    assert "756.00 MiB" in (tmp_path / "validation-cuda.md").read_text()
    assert not (tmp_path / ".gpu-check-cuda.partial.jsonl").exists()


def test_dry_run_profiles_real_rows_on_the_cpu(tmp_path: Path) -> None:
    result = G.run_check(tmp_path, dry_run=True, suites=suites("validate", rows=(FAST, FAST_HF)),
                         hard_stop=False)
    doc = result.doc
    assert result.complete and doc["dry_run"] and doc["readings"] == G.DRY_LABEL
    assert [j["options"] for j in doc["jobs"]] == ["batch=2 seq=32", "batch=1 seq=32 impl=hf"]
    for job in doc["jobs"]:
        assert abs(job["relative_error"]) < 0.01  # the real profiler ran, on the CPU
        assert job["measured_bytes"] > 0
        assert set(job["cuda_memory"].values()) - {G.DRY_LABEL} == {0}  # zeros, labelled
    for name in ("gpu-check-cuda.md", "validation-cuda.md"):
        assert "DRY RUN" in (tmp_path / name).read_text()
    assert (tmp_path / "validation-cuda.png").is_file()
    assert json.loads((tmp_path / "validation-cuda.json").read_text())["meta"]["dry_run"]


def test_default_suites_are_validates_quick_rows() -> None:
    from memplan.profile.matrix import matrix_for

    real = {s.key: s for s in G.default_suites()}
    assert list(real["validate"].rows) == matrix_for("cuda", True)
    assert list(real["hf"].rows) == matrix_for("cuda", True, "hf")
    assert {s.device for s in real.values()} == {"cuda"}
    assert (real["validate"].report, real["hf"].report) == ("validation-cuda",
                                                            "validation-hf-cuda")
    dry = {s.key: s.device for s in G.default_suites(dry_run=True)}
    assert dry == {"validate": "cpu", "hf": "cpu", "scale": "fake"}


def test_budget_stops_adding_rows_and_marks_reports_partial(tmp_path: Path) -> None:
    clock = Clock(step=100.0)  # every row takes 100 s; 480 s less the 30 s write margin
    result = G.run_check(tmp_path, dry_run=True, suites=suites("validate", rows=(FAST,) * 6),
                         runner=clock.tick, clock=clock, budget_s=480.0, hard_stop=False)
    doc = result.doc
    assert len(doc["jobs"]) == 4  # a 5th would end at 400 + 100 > 450
    assert [s["reason"] for s in doc["skipped"]] == ["time budget"] * 2
    assert doc["status"].startswith("PARTIAL: 4 of 6 rows finished")
    report = json.loads((tmp_path / "validation-cuda.json").read_text())
    assert report["status"].startswith("PARTIAL") and not report["meta"]["complete"]
    assert "PARTIAL" in (tmp_path / "validation-cuda.md").read_text()
    assert "Rows not run" in (tmp_path / "gpu-check-cuda.md").read_text()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_row_still_running_at_the_deadline_is_stopped(tmp_path: Path) -> None:
    def slow(*args, **kwargs):
        time.sleep(30)  # interrupted by the alarm long before
        raise AssertionError("the alarm did not stop the row")

    result = G.run_check(tmp_path, dry_run=True, suites=suites("validate", rows=(FAST,) * 2),
                         runner=slow, budget_s=G.WRITE_MARGIN_SECONDS + 1.0,
                         start=time.monotonic())
    doc = result.doc
    assert doc["jobs"] == [] and len(doc["skipped"]) == 2
    assert doc["skipped"][0]["reason"] == "time budget (a row was stopped)"
    assert [p.name for p in result.paths] == ["gpu-check-cuda.json", "gpu-check-cuda.md"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_alarm_lost_in_a_finaliser_fires_again() -> None:
    import weakref

    class Thing:
        pass

    def callback(_):  # the first alarm lands here; Python prints and drops what it raises
        time.sleep(0.5)

    with pytest.raises(G._Deadline), G._alarm(0.05):
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing  # runs the callback through the first alarm
        assert ref() is None
        time.sleep(30)  # the re-armed alarm stops this


def test_a_failing_row_is_reported_and_the_rest_run(tmp_path: Path) -> None:
    def runner(model, kw, device, changes=None):
        if kw["regime"] == "full":
            raise RuntimeError("CUDA error: no kernel image is available\nmore lines")
        return fake_row(model, kw, device, changes)

    rows = (FAST, ("gpt2-tiny", dict(regime="full", batch=1, seq=16)), FAST)
    result = G.run_check(tmp_path, dry_run=True, suites=suites("validate", rows=rows),
                         runner=runner, hard_stop=False)
    doc = result.doc
    assert len(doc["jobs"]) == 2
    assert doc["failed"][0]["error"] == "RuntimeError: CUDA error: no kernel image is available"
    assert doc["status"] == "PARTIAL: 2 of 3 rows finished; 1 failed"
    assert "1 failed" in json.loads((tmp_path / "validation-cuda.json").read_text())["status"]


def test_reports_are_written_together_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    import memplan.plots

    def full_disk(fig, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(memplan.plots, "save_figure", full_disk)
    with pytest.raises(MemplanError, match="No space left"):
        G.run_check(tmp_path, dry_run=True, suites=suites("validate"), runner=fake_row,
                    hard_stop=False)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".gpu-check-cuda.partial.jsonl"]  # the finished rows, and no report


def test_without_a_gpu_it_says_to_dry_run(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(MemplanError, match="--dry-run"):
        G.run_check(tmp_path, suites=suites("validate"), runner=fake_row)


def test_a_dry_run_never_overwrites_a_real_check(tmp_path: Path, capsys) -> None:
    (tmp_path / "gpu-check-cuda.json").write_text(json.dumps({"dry_run": False}))
    assert G.main(["--dry-run", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "real GPU check" in err[0]


@pytest.mark.parametrize("args, says", [
    (["--budget", "-1"], "positive number of seconds"),
    (["--budget", "soon"], "not a number"),
    (["--rows", "0"], "at least 1"),
    (["--suites", "validate,nope"], "unknown suite 'nope'"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(args, says, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        G.main(["--dry-run", *args])
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and says in err[0], err


def test_command_line_dry_run(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(G, "default_suites", lambda dry_run, keys: suites(*keys))
    out = tmp_path / "check"
    assert G.main(["--dry-run", "--out", str(out), "--suites", "validate", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dry_run"] and printed["status"] == "complete"
    assert printed["reserve"]["measured_reserve_bytes"] == 0
    assert sorted(Path(f).name for f in printed["files"]) == [
        "gpu-check-cuda.json", "gpu-check-cuda.md", "validation-cuda.json",
        "validation-cuda.md", "validation-cuda.png"]


@pytest.mark.gpu
def test_on_a_gpu_the_readings_are_real(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    rows = (FAST,)
    result = G.run_check(tmp_path, suites=[G.Suite("validate", rows, "cuda", "c", "v")],
                         hard_stop=False)
    job = result.doc["jobs"][0]
    memory = job["cuda_memory"]
    assert memory["max_allocated"] == job["measured_bytes"]
    assert memory["total"] > 0 and memory["non_allocator_bytes"] > 0
    assert result.doc["reserve"]["measured_reserve_bytes"] >= memory["non_allocator_bytes"]
