"""Rendering: rich tables for people, JSON for programs. Sizes become GiB only here."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from memplan.planner import COMPONENTS, Breakdown
from memplan.units import format_bytes, format_count


def console() -> Console:
    """The console on stdout (tables) — JSON goes through :func:`print_json`."""
    return Console(highlight=False, soft_wrap=False, width=max(Console().width, 120))


def print_json(obj: Any) -> None:
    """Print exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def error_line(message: str) -> None:
    """One red line on stderr."""
    Console(stderr=True, highlight=False).print(f"[red]error:[/red] {escape(message)}",
                                                markup=True, soft_wrap=True)


SHORT = {"weights": "W", "gradients": "G", "optimizer_states": "opt",
         "master_weights": "master", "activations": "act", "temporaries": "tmp"}


def warning_line(message: str) -> None:
    """One yellow line on stderr."""
    Console(stderr=True, highlight=False).print(f"[yellow]warning:[/yellow] {escape(message)}",
                                                markup=True, soft_wrap=True)


def progress() -> Any:
    """A transient progress bar on stderr, for work that takes seconds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress("[progress.description]{task.description}", BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def breakdown_text(b: Breakdown) -> str:
    """'W 12.55 GiB · opt 152.5 MiB · ...' with only the non-zero components."""
    parts = [f"{SHORT[name]} {format_bytes(b.components[name])}"
             for name in COMPONENTS if b.components.get(name)]
    return " · ".join(parts)


def fits_text(names: list[str]) -> str:
    """The smallest GPU that fits (the catalogue by capacity) and how many do."""
    if not names:
        return "[red]none listed[/red]"
    from memplan.presets import gpus

    table = gpus()
    smallest = min(names, key=lambda n: table[n].capacity_bytes)
    return f"{smallest} and up ({len(names)} of {len(table)})"


def architecture_dict(spec) -> dict:
    """The ModelSpec as JSON."""
    from dataclasses import asdict

    out = asdict(spec)
    out["extras"] = dict(spec.extras)
    return out


def estimate_table(title: str, rows: list[tuple[str, Breakdown, list[str]]]) -> Table:
    """One row per regime: formula, total, breakdown and the GPUs it fits on."""
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("regime", style="bold")
    table.add_column("formula")
    table.add_column("peak", justify="right")
    table.add_column("breakdown at the peak")
    table.add_column("fits on")
    for label, b, gpus in rows:
        table.add_row(label, b.formula, format_bytes(b.total_bytes), breakdown_text(b),
                      fits_text(gpus))
    return table


def symbols_line(symbols: dict[str, int]) -> str:
    """'N = 6.74B (6,738,415,616) · M = 20M (19,988,480)'."""
    return " · ".join(f"{k} = {format_count(v)} ({v:,})" for k, v in symbols.items())


def profile_table(result: Any) -> Table:
    """Plan beside measurement, component by component, with the relative error."""
    pred, meas = result.predicted, result.measured
    err = result.relative_error
    k = result.train.adapters
    per = f" per adapter, {k} adapters" if k > 1 else ""
    title = escape(f"{result.spec.name} · {result.train.regime} · batch {result.train.batch}{per}"
                   f" × seq {result.train.seq} on {meas.device}: "
                   + (f"error {100 * err:+.2f}%" if err is not None else
                      f"does not fit; measured up to {format_bytes(meas.peak_bytes)}"
                      if meas.peak_bytes > 0 else
                      f"does not fit: {meas.extra.get('error', 'the run could not allocate')}"))
    table = Table(title=title, title_justify="left")
    for col in ("component", "planned", "measured", "difference"):
        table.add_column(col, justify="left" if col == "component" else "right")
    for name in COMPONENTS:
        p, m = pred.components.get(name, 0), meas.components.get(name, 0)
        if p or m:  # a run that stopped short has no breakdown to compare
            table.add_row(name.replace("_", " "), format_bytes(p),
                          format_bytes(m) if meas.fits else "n/a",
                          format_bytes(p - m) if meas.fits else "n/a")
    table.add_row("[bold]peak[/bold]", format_bytes(pred.total_bytes),
                  format_bytes(meas.peak_bytes) if meas.fits else
                  f"≥ {format_bytes(meas.peak_bytes)}" if meas.peak_bytes else "n/a",
                  format_bytes(pred.total_bytes - meas.peak_bytes) if meas.fits else "n/a")
    table.caption = (f"plan peaks at {pred.peak_phase.replace('_', ' ')}; "
                     f"measured in {meas.wall_seconds:.1f} s")
    return table


def sharded_table(result: Any) -> Table:
    """Every measured rank of an FSDP run: plan, measurement, error, where each peaks."""
    train = result.train
    worst = result.worst_relative_error
    title = escape(f"{result.spec.name} · {train.regime} · FSDP {train.shard} over "
                   f"{result.nproc} ranks · batch {train.batch} × seq {train.seq} per rank on "
                   f"{result.ranks[0].measured.device}: "
                   + (f"worst error {100 * worst:+.2f}%" if worst is not None else
                      "does not fit"))
    table = Table(title=title, title_justify="left")
    for col in ("rank", "planned", "measured", "error", "plan peaks at", "measured peak at"):
        table.add_column(col, justify="right" if col in ("planned", "measured", "error")
                         else "left")
    for r in result.ranks:
        err, m = r.relative_error, r.measured
        table.add_row(str(m.extra.get("rank", "?")), format_bytes(r.predicted.total_bytes),
                      format_bytes(m.peak_bytes) if m.fits else f"≥ {format_bytes(m.peak_bytes)}",
                      "n/a" if err is None else f"{100 * err:+.3f}%", r.predicted.peak_phase,
                      Text(str(m.extra.get("peak_where", ""))))
    shown = len(result.ranks)
    table.caption = ("every rank measured" if shown == result.nproc else
                     f"ranks 0 (the fullest) and {result.nproc - 1} (the emptiest) measured; "
                     "every other rank's local shards lie between theirs")
    return table


def scale_table(results: list[Any], capacity_bytes: int, reserve_bytes: int) -> Table:
    """Per-GPU plan of each regime at each GPU count G, marked "fits" or "over" (and coloured)."""
    table = Table(title="per-GPU peak (rank 0) by number of GPUs G", title_justify="left")
    table.add_column("G", justify="right")
    for r in results:
        table.add_column(r.regime, justify="right")
    table.add_column("16N/G", justify="right")
    counts = list(results[0].plans) if results else []
    for m in counts:
        cells = []
        for r in results:
            b = r.plans[m]
            ok = b.total_bytes + reserve_bytes <= capacity_bytes
            cells.append(f"[{'green' if ok else 'red'}]{format_bytes(b.total_bytes)} "
                         f"{'fits' if ok else 'over'}[/]")
        n = results[0].plans[m].symbols.get("N", 0)
        table.add_row(str(m), *cells, format_bytes(16 * n // m))
    table.caption = "fits (green): fits with the reserve; over (red): does not"
    return table
