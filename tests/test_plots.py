"""Plots: the data each Figure draws is the planner's, and `memplan plot` saves it whole."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("matplotlib")

from memplan import plots  # noqa: E402
from memplan.cli.app import load_commands  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.params import lora_params  # noqa: E402
from memplan.planner import DEFAULT_RESERVE_BYTES, max_batch, plan  # noqa: E402
from memplan.presets import get_gpu, get_model  # noqa: E402
from memplan.shapes import shape_for_params  # noqa: E402
from memplan.spec import LoraSpec, TrainSpec  # noqa: E402

GIB = 2**30
APP = load_commands()
REPORT = Path(__file__).resolve().parents[1] / "reports" / "validation-cpu.json"
ROWS = [
    {"model": "a", "regime": "lora", "measured_bytes": 2 * GIB, "predicted_bytes": 2 * GIB + 9,
     "relative_error": 1e-9},
    {"model": "b", "regime": "full", "measured_bytes": GIB, "predicted_bytes": GIB // 2 * 3,
     "relative_error": 0.5},
    {"model": "c", "regime": "full", "measured_bytes": 3 * GIB, "predicted_bytes": 3 * GIB,
     "relative_error": None},  # did not finish: not drawn
]


def labelled(ax) -> list:
    """The lines of an Axes that carry a legend label (not axhline/axvline/markers)."""
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def approx_gib(n_bytes: int) -> object:
    return pytest.approx(n_bytes / GIB, rel=1e-12)


# ---- regimes ---------------------------------------------------------------------------------

def test_regimes_lines_are_the_plans() -> None:
    train = TrainSpec(gpus=8, lora=LoraSpec(rank=16))
    fig = plots.regimes_figure(train, n_min=1e8, n_max=1e11, points=4)
    (ax,) = fig.axes
    lines = labelled(ax)
    assert len(lines) == len(plots.PLOT_REGIMES)
    for regime, line in zip(plots.PLOT_REGIMES, lines, strict=True):
        assert line.get_label().startswith(f"{regime}: ")
        for n, y in zip(line.get_xdata(), line.get_ydata(), strict=True):
            spec = shape_for_params(int(n))[0]
            assert y == approx_gib(plan(spec, replace(train, regime=regime), int(n)).total_bytes)
    labels = [line.get_label() for line in lines]
    assert "full: 16N" in labels and "mixed: 12N" in labels
    assert "zero: 16N/G, G = 8 GPUs" in labels
    assert "lora: 4N + 16M, rank 16 on all" in labels
    assert ax.get_xscale() == ax.get_yscale() == "log"
    assert "GiB" in ax.get_ylabel()


def test_regimes_depend_on_the_input() -> None:
    def lora_y(rank: int, gpus: tuple[str, ...]) -> tuple[list[float], int]:
        fig = plots.regimes_figure(TrainSpec(lora=LoraSpec(rank=rank)), regimes=("lora",),
                                   points=3, gpu_names=gpus)
        (ax,) = fig.axes
        caps = [line for line in ax.get_lines() if line.get_label().startswith("_")]
        return list(labelled(ax)[0].get_ydata()), len(caps)

    small, n_caps = lora_y(4, ("t4",))
    large, n_caps2 = lora_y(256, ("t4", "h200", "a100-80gb"))
    assert all(b > a for a, b in zip(small, large, strict=True))
    assert (n_caps, n_caps2) == (1, 3)


def test_regimes_gpu_lines_at_capacities_and_a_marked_model() -> None:
    fig = plots.regimes_figure(regimes=("full",), points=2, gpu_names=("rtx-4090", "h200"),
                               mark=("llama-2-7b", 6_738_415_616))
    (ax,) = fig.axes
    ys = sorted(line.get_ydata()[0] for line in ax.get_lines()
                if line.get_label().startswith("_") and line.get_xdata()[0] == 0)
    assert ys == [approx_gib(get_gpu("rtx-4090").capacity_bytes),
                  approx_gib(get_gpu("h200").capacity_bytes)]
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "rtx-4090" in texts and "h200" in texts and "llama-2-7b" in texts


# ---- breakdown -------------------------------------------------------------------------------

def test_breakdown_bars_are_the_components() -> None:
    spec, train = get_model("llama-2-7b"), TrainSpec(batch=2, seq=1024, gpus=8)
    regimes = ("full", "zero", "lora", "qlora")
    (ax,) = plots.breakdown_figure(spec, train, regimes=regimes).axes
    plans = [plan(spec, replace(train, regime=r)) for r in regimes]
    drawn = {c.get_label().replace(" ", "_"): [bar.get_height() for bar in c]
             for c in ax.containers}
    assert set(drawn) == {n for n in plans[0].components if any(p.components[n] for p in plans)}
    for name, heights in drawn.items():
        assert heights == [approx_gib(p.components[name]) for p in plans]
    tops = [sum(drawn[n][i] for n in drawn) for i in range(len(regimes))]
    assert tops == [approx_gib(p.total_bytes) for p in plans]
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == list(regimes)


def test_breakdown_depends_on_the_job() -> None:
    spec = get_model("gpt2")

    def heights(train: TrainSpec) -> list[float]:
        (ax,) = plots.breakdown_figure(spec, train, regimes=("lora",)).axes
        return [c[0].get_height() for c in ax.containers if c.get_label() == "activations"]

    assert heights(TrainSpec(batch=1, seq=128))[0] < heights(TrainSpec(batch=4, seq=128))[0]
    (ax,) = plots.breakdown_figure(spec, TrainSpec(), regimes=("full", "lora")).axes
    assert "activations" not in [c.get_label() for c in ax.containers]
    assert len(ax.containers[0]) == 2


# ---- rank ------------------------------------------------------------------------------------

def test_rank_lines_are_lora_params_and_plans() -> None:
    spec, train = get_model("llama-2-7b"), TrainSpec(batch=1, seq=512)
    fig = plots.rank_figure(spec, train, ranks=(1, 8, 64))
    left, right = fig.axes
    assert [line.get_label() for line in left.get_lines()] == list(plots.DEFAULT_TARGET_SETS)
    for line, mem in zip(left.get_lines(), right.get_lines(), strict=True):
        targets = line.get_label()
        assert list(line.get_xdata()) == [1, 8, 64]
        for rank, m, y in zip(line.get_xdata(), line.get_ydata(), mem.get_ydata(), strict=True):
            lora = LoraSpec(rank=int(rank), targets=targets)
            assert m == pytest.approx(lora_params(spec, lora) / 1e6)
            assert y == approx_gib(plan(spec, replace(train, regime="lora", lora=lora))
                                   .total_bytes)


def test_rank_target_sets_where_valid_and_regime() -> None:
    gpt2 = get_model("gpt2")
    left, _ = plots.rank_figure(gpt2, TrainSpec(lora=LoraSpec(targets="c_attn"))).axes
    assert [line.get_label() for line in left.get_lines()] == ["all", "mlp", "attention",
                                                               "c_attn"]
    spec = get_model("llama-tiny")  # kv width 128: larger ranks are left out
    left, right = plots.rank_figure(spec, TrainSpec(), ranks=(64, 128, 512),
                                    regime="qlora").axes
    assert list(left.get_lines()[0].get_xdata()) == [64, 128]
    q = plan(spec, TrainSpec(regime="qlora", lora=LoraSpec(rank=64))).total_bytes
    assert right.get_lines()[0].get_ydata()[0] == approx_gib(q)
    with pytest.raises(MemplanError, match="LoRA regime"):
        plots.rank_figure(spec, TrainSpec(), regime="full")
    with pytest.raises(MemplanError, match="matches no linear layer"):
        plots.rank_figure(spec, TrainSpec(lora=LoraSpec(targets="c_fc")))


# ---- batch -----------------------------------------------------------------------------------

def test_batch_lines_capacity_and_largest_batch() -> None:
    spec, train = get_model("gpt2"), TrainSpec(batch=1, seq=1024)
    gpu = get_gpu("rtx-4090")
    (ax,) = plots.batch_figure(spec, train, gpu.name, regimes=("full", "lora")).axes
    lines = labelled(ax)
    assert len(lines) == 3  # two regimes and the GPU
    for regime, line in zip(("full", "lora"), lines[:2], strict=True):
        job = replace(train, regime=regime)
        best = max_batch(spec, job, gpu.capacity_bytes)
        assert str(best) in line.get_label()
        for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True):
            assert y == approx_gib(plan(spec, replace(job, batch=int(x))).total_bytes)
        assert max(line.get_xdata()) >= best
        stars = [m for m in ax.get_lines() if m.get_marker() == "*"
                 and m.get_color() == line.get_color()]
        assert [s.get_xdata()[0] for s in stars] == [best]
    usable = gpu.capacity_bytes - DEFAULT_RESERVE_BYTES
    assert list(lines[2].get_ydata()) == [approx_gib(usable)] * 2
    assert "rtx-4090" in lines[2].get_label()


def test_batch_depends_on_the_gpu_and_reserve() -> None:
    spec, train = get_model("gpt2"), TrainSpec(batch=1, seq=512)

    def star(gpu: str, reserve: int = DEFAULT_RESERVE_BYTES) -> float:
        (ax,) = plots.batch_figure(spec, train, gpu, reserve_bytes=reserve).axes
        return next(m.get_xdata()[0] for m in ax.get_lines() if m.get_marker() == "*")

    assert star("t4") < star("h200")
    assert star("t4", 0) > star("t4")


def test_seq_axis_marks_the_longest_sequence_that_fits() -> None:
    spec, train = get_model("llama-2-7b"), TrainSpec(regime="lora", batch=1, seq=1)
    gpu = get_gpu("rtx-4090")
    (ax,) = plots.batch_figure(spec, train, gpu, axis="seq", regimes=("qlora",)).axes
    seq = next(m.get_xdata()[0] for m in ax.get_lines() if m.get_marker() == "*")
    usable = gpu.capacity_bytes - DEFAULT_RESERVE_BYTES
    job = replace(train, regime="qlora", batch=1)
    assert plan(spec, replace(job, seq=int(seq))).total_bytes <= usable
    assert plan(spec, replace(job, seq=int(seq) + 1)).total_bytes > usable
    line = labelled(ax)[0]
    assert all(int(x) & (int(x) - 1) == 0 for x in line.get_xdata())  # powers of two
    with pytest.raises(MemplanError, match="axis"):
        plots.batch_figure(spec, train, gpu, axis="depth")


# ---- validation ------------------------------------------------------------------------------

def test_validation_points_from_rows_and_from_a_report(tmp_path: Path) -> None:
    (ax,) = plots.validation_figure(ROWS).axes
    points = {c.get_label(): c.get_offsets().tolist() for c in ax.collections
              if c.get_label() in ("lora", "full")}
    assert points == {"lora": [[2.0, pytest.approx(2.0)]], "full": [[1.0, 1.5]]}
    path = tmp_path / "validation-x.json"
    path.write_text(json.dumps({"device": "x", "summary": {"median_abs_error": 0.01,
                                                         "max_abs_error": 0.5}, "rows": ROWS}))
    (ax2,) = plots.validation_figure(path).axes
    assert "--device x: 3 jobs, median |error| 1%, max 50%" in ax2.get_title()
    assert len(ax2.collections) == len(ax.collections)
    with pytest.raises(MemplanError, match="not found"):
        plots.validation_figure(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MemplanError, match="not a validation report"):
        plots.validation_figure(tmp_path / "bad.json")


@pytest.mark.skipif(not REPORT.exists(), reason="no CPU validation report")
def test_validation_of_the_committed_report() -> None:
    rows = json.loads(REPORT.read_text())["rows"]
    (ax,) = plots.validation_figure(REPORT).axes
    drawn = sum(len(c.get_offsets()) for c in ax.collections[1:])  # after the ±3% band
    assert drawn == sum(r["relative_error"] is not None for r in rows)


# ---- saving ----------------------------------------------------------------------------------

def test_save_png_svg_and_refuse_other_formats(tmp_path: Path) -> None:
    fig = plots.validation_figure(ROWS)
    png = plots.save_figure(fig, tmp_path / "sub" / "v.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = plots.save_figure(fig, tmp_path / "v.svg")
    assert "<svg" in svg.read_text()
    with pytest.raises(MemplanError, match=r"\.png or \.svg"):
        plots.save_figure(fig, tmp_path / "v.pdf")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["v.png", "v.svg"]


def test_save_is_whole_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fig = plots.validation_figure(ROWS)

    def broken(path, **kw) -> None:
        Path(path).write_bytes(b"half a pic")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError):
        plots.save_figure(fig, tmp_path / "v.png")
    assert list(tmp_path.iterdir()) == []


# ---- the command -----------------------------------------------------------------------------

def run(*args: str):
    return CliRunner(env={"COLUMNS": "200", "MEMPLAN_DEBUG": ""}).invoke(APP, ["plot", *args])


def stderr_of(result) -> str:
    try:
        return result.stderr
    except (ValueError, AttributeError):  # older click: stderr mixed into output
        return result.output


@pytest.mark.parametrize(("kind", "args"), [
    ("regimes", ["--rank", "64", "--gpu", "b200"]),
    ("breakdown", ["--model", "gpt2", "--batch", "2", "--seq", "128"]),
    ("rank", ["--model", "llama-tiny", "--regime", "lora-bf16"]),
    ("batch", ["--model", "gpt2", "--gpu", "t4", "--seq", "256"]),
    ("batch", ["--model", "gpt2", "--memory", "8GiB", "--axis", "seq", "--regime", "full"]),
    ("validation", ["--report", str(REPORT)]),
])
@pytest.mark.parametrize("ext", ["png", "svg"])
def test_cli_writes_png_and_svg(tmp_path: Path, kind: str, args: list[str], ext: str) -> None:
    if kind == "validation" and not REPORT.exists():
        pytest.skip("no CPU validation report")
    out = tmp_path / "gallery" / f"{kind}.{ext}"
    result = run(kind, *args, "--out", str(out))
    assert result.exit_code == 0, (result.output, result.exception)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") if ext == "png" else b"<svg" in data[:2000]
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left


@pytest.mark.parametrize(("args", "words"), [
    (["pie", "--out", "x.png"], "unknown plot kind 'pie'"),
    (["regimes", "--out", "x.pdf"], ".png or .svg"),
    (["regimes"], "--out"),
    (["breakdown", "--out", "x.png"], "exactly one of --params"),
    (["breakdown", "--model", "nope", "--out", "x.png"], "unknown model preset"),
    (["breakdown", "--model", "gpt2", "--regime", "lora", "--regime", "zorro", "--out",
      "x.png"], "unknown regime"),
    (["breakdown", "--model", "gpt2", "--batch", "2", "--out", "x.png"], "give both"),
    (["rank", "--model", "gpt2", "--regime", "full", "--out", "x.png"], "LoRA regime"),
    (["rank", "--model", "gpt2", "--regime", "lora", "--regime", "qlora", "--out", "x.png"],
     "one --regime"),
    (["rank", "--model", "gpt2", "--rank", "0", "--out", "x.png"], "rank"),
    (["batch", "--model", "gpt2", "--out", "x.png"], "--gpu"),
    (["batch", "--model", "gpt2", "--gpu", "nope", "--out", "x.png"], "unknown GPU"),
    (["batch", "--model", "gpt2", "--gpu", "t4", "--axis", "depth", "--out", "x.png"], "axis"),
    (["batch", "--model", "gpt2", "--gpu", "t4", "--batch", "0", "--out", "x.png"], "--batch"),
    (["batch", "--model", "gpt2", "--memory", "24", "--out", "x.png"], "unit"),
    (["regimes", "--gpus", "0", "--out", "x.png"], "--gpus"),
    (["validation", "--report", "missing.json", "--out", "x.png"], "not found"),
    (["validation", "--model", "gpt2", "--out", "x.png"], "--report"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              args: list[str], words: str) -> None:
    monkeypatch.chdir(tmp_path)
    result = run(*args)
    assert result.exit_code == 2, (result.output, result.exception)
    err = stderr_of(result).strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_help_lists_plot() -> None:
    result = CliRunner().invoke(APP, ["--help"])
    assert "plot" in result.output
