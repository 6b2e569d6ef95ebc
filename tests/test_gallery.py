"""The README's gallery: one command draws it, and its committed numbers are never stale.

``reports/gallery/gallery.json`` holds the numbers each figure of the gallery draws. The first
test recomputes them (planning only, no drawing) and fails, naming the figure and the command
to run, when one differs: a change to the planner that moves a plotted number must come with
a regenerated gallery.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memplan import plots
from memplan.cli.app import load_commands
from memplan.cli.plot import GALLERY, GALLERY_DIR, KINDS, gallery_data

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / GALLERY_DIR / plots.GALLERY_JSON
REGENERATE = f"memplan plot gallery --out {GALLERY_DIR}"
APP = load_commands()


@pytest.fixture(scope="module")
def entries() -> list:
    """The gallery's figures planned now, from the repository root (the report is relative)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        return gallery_data(GALLERY_DIR)


def committed() -> dict:
    return json.loads(COMMITTED.read_text())


def test_the_gallery_numbers_are_current(entries: list) -> None:
    stale = plots.gallery_differences(committed(), entries)
    assert not stale, "\n".join([f"{COMMITTED.relative_to(ROOT)}:", *stale,
                                 f"regenerate the gallery: {REGENERATE}"])
    for kind, _, _ in entries:
        assert (ROOT / GALLERY_DIR / f"{kind}.png").is_file(), f"run {REGENERATE}"


def test_the_gallery_is_each_kind_once_with_its_command(entries: list) -> None:
    assert [kind for kind, _, _ in entries] == list(KINDS)
    doc = committed()
    assert doc["made_by"] == REGENERATE
    for (kind, command, _), args in zip(entries, GALLERY, strict=True):
        assert command == f"memplan plot {args} --out {GALLERY_DIR / kind}.png"
        assert doc["figures"][kind]["command"] == command


def test_the_numbers_are_integer_bytes(entries: list) -> None:
    data = {kind: plots.as_json(d) for kind, _, d in entries}
    assert all(isinstance(y, int) for line in data["regimes"]["lines"] for y in line["ys"])
    assert all(isinstance(g["capacity_bytes"], int) for g in data["regimes"]["gpus"])
    bars = data["breakdown"]["bars"]
    assert all(b["total_bytes"] == sum(b["components"].values()) for b in bars)
    batch = data["batch"]
    assert batch["usable_bytes"] == batch["gpu"]["capacity_bytes"] - batch["reserve_bytes"]
    assert any(line["best"] for line in batch["lines"])
    for line in batch["lines"]:
        assert line["best_bytes"] <= batch["usable_bytes"]
        assert (line["best"] == 0) == (line["best_bytes"] == 0)
        assert all(isinstance(y, int) for y in line["line"]["ys"])
    report = json.loads((ROOT / "reports" / "validation-cpu.json").read_text())
    done = [r for r in report["rows"] if r.get("relative_error") is not None]
    assert [(p["predicted_bytes"], p["measured_bytes"]) for p in data["validation"]["points"]] \
        == [(r["predicted_bytes"], r["measured_bytes"]) for r in done]


@pytest.mark.parametrize(("figure", "edit", "where"), [
    ("batch", lambda d: d["lines"][1]["line"]["ys"].__setitem__(3, 1), ".lines[1].line.ys[3]"),
    ("regimes", lambda d: d["gpus"].pop(), ".gpus"),
    ("validation", lambda d: d.__setitem__("title", "old"), ".title"),
])
def test_a_stale_number_names_its_figure_and_command(entries: list, figure: str, edit,
                                                     where: str) -> None:
    doc = copy.deepcopy(committed())
    edit(doc["figures"][figure]["data"])
    (line,) = plots.gallery_differences(doc, entries)
    command = next(c for k, c, _ in entries if k == figure)
    assert line.startswith(f"figure {figure!r} is stale at {where}: committed ")
    assert f"`{command}`" in line
    del doc["figures"]["rank"]
    doc["figures"]["pie"] = {}
    assert len(plots.gallery_differences(doc, entries)) == 3


def run(*args: str):
    return CliRunner(env={"COLUMNS": "200", "MEMPLAN_DEBUG": ""}).invoke(APP, ["plot", *args])


def test_the_command_writes_the_figures_and_their_numbers(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "gallery"
    result = run("gallery", "--out", str(out))
    assert result.exit_code == 0, (result.output, result.exception)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([plots.GALLERY_JSON, *(f"{k}.png" for k in KINDS)])
    assert result.output.splitlines() == [f"wrote {out / name}" for name in
                                          [*(f"{k}.png" for k in KINDS), plots.GALLERY_JSON]]
    assert all((out / f"{k}.png").read_bytes()[:4] == b"\x89PNG" for k in KINDS)
    doc = json.loads((out / plots.GALLERY_JSON).read_text())
    assert doc["made_by"] == f"memplan plot gallery --out {out}"
    assert {k: f["data"] for k, f in doc["figures"].items()} == \
        {k: f["data"] for k, f in committed()["figures"].items()}


def test_the_gallery_is_written_whole_or_not_at_all(tmp_path: Path, entries: list,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "regimes.png").write_bytes(b"old")
    calls = []

    def failing(fig):
        def write(tmp: Path) -> None:
            calls.append(tmp)
            tmp.write_bytes(b"half a picture")
            if len(calls) == 3:
                raise OSError("disk full")
        return write

    monkeypatch.setattr(plots, "_saver", failing)
    with pytest.raises(OSError, match="disk full"):
        plots.save_gallery(tmp_path, entries, made_by="test")
    assert [p.name for p in tmp_path.iterdir()] == ["regimes.png"]
    assert (tmp_path / "regimes.png").read_bytes() == b"old"


@pytest.mark.parametrize(("args", "words"), [
    (["gallery"], "--out FOLDER"),
    (["gallery", "--out", "g.png"], "not the file 'g.png'"),
    (["gallery", "--out", "g", "--model", "gpt2", "--rank", "4"], "not --model, --rank"),
])
def test_bad_gallery_input_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  args: list[str], words: str) -> None:
    monkeypatch.chdir(tmp_path)
    result = run(*args)
    assert result.exit_code == 2, (result.output, result.exception)
    try:
        err = result.stderr.strip()
    except (ValueError, AttributeError):
        err = result.output.strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_the_readme_lists_the_gallery_commands() -> None:
    """The README's five single commands are GALLERY's, each with its --out."""
    from pathlib import Path

    from memplan.cli.plot import GALLERY

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "memplan plot gallery --out reports/gallery" in readme
    for args in GALLERY:
        kind = args.split()[0]
        line = f"memplan plot {args} --out reports/gallery/{kind}.png"
        assert line in readme, f"the README's gallery lacks: {line}"
