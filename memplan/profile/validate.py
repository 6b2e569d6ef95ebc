"""``memplan validate``: profile a matrix of jobs and write the report of plan against measure.

Each finished row is appended to ``reports/.validation-<device>.partial.jsonl`` at once, so an
interrupted run keeps its rows; the report (Markdown, JSON, PNG) is then written whole or not
at all (temporary file, then rename), and says whether the run was complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from memplan.errors import MemplanError, unknown
from memplan.presets import get_model
from memplan.profile.matrix import Row, matrix_for, train_of
from memplan.spec import IMPLS
from memplan.units import format_bytes


def _options(kw: dict) -> str:
    parts = []
    for key, value in kw.items():
        if key in ("regime", "gpus", "shard"):
            continue
        if key == "lora":
            parts.append(f"r={value.rank} {value.targets}")
        elif value is True:
            parts.append(key)
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def run_row(model: str, kw: dict, device: str, steps: int = 2,
            changes: dict | None = None) -> dict:
    """Profile one row; returns its JSON record."""
    import dataclasses

    from memplan.profile.compare import profile

    # Rows run without dropout unless they ask for it (``changes``): the presets' configs
    # carry GPT-2's pre-training dropout, and fine-tuning recipes usually switch it off.
    spec = dataclasses.replace(get_model(model), **({"dropout": 0.0} | (changes or {})))
    if kw.get("gpus", 1) > 1:
        return _sharded_row(model, spec, kw, device, steps)
    result = profile(spec, train_of(kw), device=device, steps=steps)
    label = model + "".join(f" {k}={v}" for k, v in (changes or {}).items()
                            if k != "model_type") if changes else model
    extra = {}
    if result.train.impl == "hf":  # what the notes and Accelerate say of the same job
        from memplan.profile.baselines import accelerate_training_bytes

        extra = {"notes_bytes": result.predicted.model_state_bytes,
                 "accelerate_bytes": accelerate_training_bytes(spec, result.train)}
    return extra | {"model": label, "regime": kw["regime"], "options": _options(kw)} \
        | _compared(result) | {"wall_seconds": round(result.measured.wall_seconds, 2)}


def _compared(result) -> dict:
    """A ProfileResult's plan beside its measurement, as the report's record holds them."""
    return {"predicted_bytes": result.predicted.total_bytes,
            "measured_bytes": result.measured.peak_bytes,
            "relative_error": result.relative_error,
            "predicted_components": result.predicted.components,
            "measured_components": result.measured.components,
            "peak_phase": result.predicted.peak_phase}


def _sharded_row(model: str, spec, kw: dict, device: str, steps: int) -> dict:
    """An FSDP row: every measured rank against its plan; the worst rank stands for the row."""
    from memplan.profile.compare import profile_sharded

    nproc = kw["gpus"]
    train = train_of({k: v for k, v in kw.items() if k != "gpus"})
    result = profile_sharded(spec, train, nproc, device=device, steps=steps)
    worst = result.worst
    return {"model": model, "regime": kw["regime"], "nproc": nproc,
            "shard": result.train.shard,
            "options": _options(kw) + f" ×{nproc} {result.train.shard}"} | _compared(worst) | {
            "ranks": [{"rank": r.measured.extra.get("rank"),
                       "predicted_bytes": r.predicted.total_bytes,
                       "measured_bytes": r.measured.peak_bytes,
                       "relative_error": r.relative_error,
                       "measured_peak_at": r.measured.extra.get("peak_where", "")}
                      for r in result.ranks],
            "notes_bytes": worst.predicted.model_state_bytes,  # the notes' formula over M
            "wall_seconds": round(max(r.measured.wall_seconds for r in result.ranks), 2)}


def summarise(rows: list[dict]) -> dict:
    """Median and maximum |error|, and how many rows are within 1% and 3%."""
    errors = [abs(r["relative_error"]) for r in rows if r.get("relative_error") is not None]
    if not errors:
        return {"rows": len(rows), "median_abs_error": None, "max_abs_error": None}
    return {"rows": len(rows), "median_abs_error": statistics.median(errors),
            "max_abs_error": max(errors),
            "within_1pct": sum(e <= 0.01 for e in errors),
            "within_3pct": sum(e <= 0.03 for e in errors)}


def _write_error(path: Path, exc: OSError) -> MemplanError:
    return MemplanError(f"cannot write {path}: {exc.strerror or exc}; the previous report, if "
                        "any, is unchanged")


def report_name(device: str, impl: str = "memplan", sharded: bool = False) -> str:
    """validation-<device>, validation-hf-<device> for Hugging Face models, or
    validation-fsdp-<device> for the sharded rows."""
    prefix = "fsdp-" if sharded else "hf-" if impl == "hf" else ""
    return f"validation-{prefix}{device}"


def write_report(rows: list[dict], device: str, out_dir: Path, meta: dict,
                 name: str | None = None) -> list[Path]:
    """Write <name>.{json,md,png} (default validation-<device>): each whole or not at all.

    Every file is written to a temporary name beside its target first, and renamed into place
    only once all are written: a disk that fails (full, read-only) leaves the previous report
    as it was and raises :class:`MemplanError`.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(out_dir, exc) from None
    return write_staged(report_files(rows, device, out_dir, meta, name))


def report_files(rows: list[dict], device: str, out_dir: Path, meta: dict,
                 name: str | None = None) -> list[tuple[Path, Callable[[Path], None]]]:
    """The files of :func:`write_report`, each with the function that writes it, for
    :func:`write_staged` (so that a caller can stage them together with its own)."""
    stem = out_dir / (name or report_name(device))
    doc = {"device": device, "name": stem.name, "status": meta.get("status", "complete"),
           "summary": summarise(rows), "meta": meta, "rows": rows}
    files = [(stem.with_suffix(".json"), _text(json.dumps(doc, indent=1) + "\n")),
             (stem.with_suffix(".md"), _text(markdown(doc)))]
    try:
        from memplan.plots import save_figure, validation_figure
    except ImportError:  # matplotlib missing: the tables still stand
        pass
    else:
        title = meta.get("command", f"memplan validate --device {device}")
        files.append((stem.with_suffix(".png"),
                      lambda tmp: save_figure(validation_figure(rows, title=title), tmp)))
    return files


def _text(text: str) -> Callable[[Path], None]:
    return lambda tmp: tmp.write_bytes(text.encode())


def write_staged(files: list[tuple[Path, Callable[[Path], None]]]) -> list[Path]:
    """Write each ``(target, write)`` (``write(tmp)`` makes the file) to a temporary name
    beside its target, and rename them all into place only once all are written: each whole
    or not at all. A disk that fails (full, read-only) leaves every previous file as it was
    and raises :class:`MemplanError`."""
    staged: list[tuple[Path, Path]] = []  # (temporary, target)
    target = files[0][0] if files else Path()
    try:
        for target, write in files:
            tmp = target.with_name(f".{target.stem}.new.png" if target.suffix == ".png"
                                   else f".{target.name}.tmp")
            staged.append((tmp, target))
            write(tmp)
        for tmp, target in staged:
            os.replace(tmp, target)
    except OSError as exc:
        raise _write_error(target, exc) from None
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):  # a folder that is a file cannot hold it
                tmp.unlink(missing_ok=True)
    return [target for _, target in staged]


def markdown(doc: dict) -> str:
    """The Markdown report."""
    s, meta = doc["summary"], doc["meta"]
    def pct(x):
        return ("n/a" if x is None else f"{100 * x:.3f}%")
    lines = [
        f"# memplan validation — device `{doc['device']}`", "",
        f"Produced by `{meta['command']}` on {meta['date']} ({meta['platform']}, torch "
        f"{meta['torch']}, {meta['elapsed_seconds']:.0f} s)"
        + ("." if meta["complete"] else f" — **{meta.get('status', 'INTERRUPTED')}**: this "
           "report holds only the rows that finished."),
        "", "The plan is `memplan.planner.plan` (pure formulas of the spec, no tensors); the "
        "measurement is the peak of live tensor storage over the steady-state steps after a "
        "warm-up step (`memplan.profile.step.measure`).", "",
        f"**{s['rows']} rows · median |error| {pct(s['median_abs_error'])} · max |error| "
        f"{pct(s['max_abs_error'])}**"
        + (f" · within 1%: {s['within_1pct']}/{s['rows']} · within 3%: {s['within_3pct']}/"
           f"{s['rows']}" if s.get("within_1pct") is not None else ""), "",
    ]
    for key, value in meta.get("extra", {}).items():
        lines.append(f"- {key}: {value}")
    lines += ["", f"![predicted vs measured]({doc.get('name', 'validation-' + doc['device'])}"
              ".png)"]
    if any("notes_bytes" in r for r in doc["rows"]):
        accelerate = any("accelerate_bytes" in r for r in doc["rows"])
        keys = ("notes_bytes", "accelerate_bytes", "predicted_bytes") if accelerate else \
            ("notes_bytes", "predicted_bytes")
        lines += ["", "## The same jobs, as other estimates see them", "",
                  "Each against the measured peak: the notes' model-state formula (no "
                  "activations" + (", and over M GPUs simply divided by M: no gather buffers)"
                                   if not accelerate else ")")
                  + (", Accelerate's training estimate (its own `estimate_training_usage` on "
                     "the same model: no batch, sequence, LoRA or checkpointing)"
                     if accelerate else "") + ", and memplan's plan.", "",
                  "| model | regime | options | measured | notes' formula | "
                  + ("Accelerate | " if accelerate else "") + "memplan |",
                  "|---|---|---|---:|---:|" + ("---:|" if accelerate else "") + "---:|"]
        for r in doc["rows"]:
            m = r["measured_bytes"]
            cells = [_versus(r.get(k), m) for k in keys]
            lines.append(f"| {r['model']} | {r['regime']} | {r['options']} | {format_bytes(m)} | "
                         + " | ".join(cells) + " |")
        lines += ["", "## Rows"]
    lines += ["", "| model | regime | options | predicted | measured | error | peak at | time |",
              "|---|---|---|---:|---:|---:|---|---:|"]
    for r in doc["rows"]:
        err = r["relative_error"]
        lines.append(f"| {r['model']} | {r['regime']} | {r['options']} | "
                     f"{format_bytes(r['predicted_bytes'])} | {format_bytes(r['measured_bytes'])}"
                     f" | {'n/a' if err is None else f'{100 * err:+.3f}%'} | {r['peak_phase']} | "
                     f"{r['wall_seconds']:.1f} s |")
    if any("ranks" in r for r in doc["rows"]):
        lines += ["", "## Every measured rank", "",
                  "Each rank's peak against the plan of that rank (rank 0 owns the most rows of "
                  "every parameter; the last rank the fewest). Fake-process-group rows measure "
                  "ranks 0 and M−1.", "",
                  "| model | regime | options | rank | predicted | measured | error | "
                  "measured peak at |", "|---|---|---|---:|---:|---:|---:|---|"]
        for r in doc["rows"]:
            for k in r.get("ranks", []):
                err = k["relative_error"]
                lines.append(f"| {r['model']} | {r['regime']} | {r['options']} | {k['rank']} | "
                             f"{format_bytes(k['predicted_bytes'])} | "
                             f"{format_bytes(k['measured_bytes'])} | "
                             f"{'n/a' if err is None else f'{100 * err:+.4f}%'} | "
                             f"{k['measured_peak_at']} |")
    return "\n".join(lines) + "\n"


def _versus(estimate: int | None, measured: int) -> str:
    """'12.3 GiB (−45%)': an estimate and its error against the measured peak."""
    if estimate is None or measured <= 0:
        return "n/a"
    return f"{format_bytes(estimate)} ({100 * (estimate - measured) / measured:+.0f}%)"


def validate(device: str, quick: bool = False, out_dir: Path = Path("reports"),
             rows: list[Row] | None = None,
             on_row: Callable[[int, int, dict], None] | None = None,
             impl: str = "memplan", sharded: bool = False) -> tuple[list[Path], dict]:
    """Run the matrix for ``device`` (of Hugging Face models with ``impl="hf"``, of FSDP
    jobs with ``sharded``) and write the report; returns (paths, summary)."""
    import torch

    from memplan.profile.step import resolve_device

    if impl not in IMPLS:
        raise unknown("implementation", impl, IMPLS)
    device = resolve_device(device)
    if sharded and impl != "memplan":
        raise MemplanError("sharded rows run memplan's reference models; drop --impl hf")
    matrix = rows if rows is not None else matrix_for(device, quick, impl, sharded)
    name = report_name(device, impl, sharded)
    partial = out_dir / f".{name}.partial.jsonl"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        partial.write_text("")
    except OSError as exc:
        raise _write_error(partial, exc) from None
    done: list[dict] = []
    start = time.perf_counter()
    complete = False
    try:
        for i, (model, kw, *changes) in enumerate(matrix):
            record = run_row(model, kw, device, changes=changes[0] if changes else None)
            done.append(record)
            try:
                with partial.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise _write_error(partial, exc) from None
            if on_row:
                on_row(i + 1, len(matrix), record)
        complete = True
    finally:
        status = "complete" if complete else f"INTERRUPTED after {len(done)} of {len(matrix)} rows"
        meta = {"command": "memplan validate --device " + device + (" --quick" if quick else "")
                + (" --impl hf" if impl == "hf" else "") + (" --sharded" if sharded else ""),
                "date": time.strftime("%Y-%m-%d"), "platform": platform.platform(terse=True),
                "torch": torch.__version__, "complete": complete, "status": status,
                "elapsed_seconds": time.perf_counter() - start,
                "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "extra": {}}
        if device == "fake":
            meta["extra"]["peak RSS of the whole run"] = format_bytes(meta["max_rss_bytes"])
        if done:
            paths = write_report(done, device, out_dir, meta, name)
            if sharded and device == "fake":
                from memplan.profile.scaling_report import write_scaling_report

                paths += write_scaling_report(done, out_dir, meta)
        else:
            paths = []
        if complete:
            partial.unlink(missing_ok=True)
    return paths, summarise(done)


def _main() -> None:  # pragma: no cover - a debugging aid: python -m memplan.profile.validate
    paths, summary = validate(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print(json.dumps(summary), *paths)


if __name__ == "__main__":  # pragma: no cover
    _main()

__all__ = ["validate", "run_row", "summarise", "write_report", "report_files", "markdown"]
