"""Plots, built as matplotlib Figures (Agg backend, imported only when plotting).

Functions return a Figure; the CLI only saves it. Sizes are shown in GiB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GIB = 2**30


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def validation_figure(rows: list[dict], title: str = "predicted vs measured") -> Any:
    """Predicted against measured peak per row, log-log, with y = x and a ±3% band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6), layout="constrained")
    done = [r for r in rows if r.get("relative_error") is not None]
    if not done:
        raise ValueError("no finished rows to plot")
    measured = [r["measured_bytes"] / GIB for r in done]
    predicted = [r["predicted_bytes"] / GIB for r in done]
    lo, hi = min(measured + predicted) * 0.8, max(measured + predicted) * 1.25
    xs = [lo, hi]
    ax.fill_between(xs, [x * 0.97 for x in xs], [x * 1.03 for x in xs], color="0.85",
                    label="±3%")
    ax.plot(xs, xs, color="0.3", lw=1, label="y = x")
    for regime in sorted({r["regime"] for r in done}):
        pts = [(m, p) for m, p, r in zip(measured, predicted, done, strict=True)
               if r["regime"] == regime]
        ax.scatter([m for m, _ in pts], [p for _, p in pts], s=22, label=regime, zorder=3)
    ax.set(xscale="log", yscale="log", xlim=xs, ylim=xs, xlabel="measured peak (GiB)",
           ylabel="planned peak (GiB)", title=title)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save PNG or SVG by extension, whole or not at all."""
    import os

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        from memplan.errors import MemplanError

        raise MemplanError(f"plot file {str(path)!r} must end in .png or .svg")
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    _pyplot().close(fig)
    return path
