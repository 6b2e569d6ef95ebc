"""Plots, built as matplotlib Figures (Agg canvas, matplotlib imported only when plotting).

Each function returns a :class:`matplotlib.figure.Figure` made without pyplot (no global
state, nothing to close, no backend switched); the CLI only saves it with :func:`save_figure`.
Every number drawn comes from the planner (:func:`memplan.planner.plan`); sizes are shown in
GiB (2**30 bytes), parameter counts in millions or with a short suffix.

- :func:`regimes_figure`: memory against N on log-log axes, a line per regime, GPU lines;
- :func:`breakdown_figure`: stacked bars per regime for one model and job;
- :func:`rank_figure`: LoRA parameters M and memory against the rank, a line per target set;
- :func:`batch_figure`: memory against batch or sequence length, a GPU's usable memory and
  the largest batch (or sequence) that fits;
- :func:`validation_figure`: planned against measured peaks from a validation report.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from memplan.errors import MemplanError
from memplan.planner import COMPONENTS, DEFAULT_RESERVE_BYTES, max_batch, plan
from memplan.presets import GpuSpec, get_gpu, gpus
from memplan.spec import NOTES_REGIMES, LoraSpec, ModelSpec, TrainSpec
from memplan.units import format_count, gib

FORMATS = (".png", ".svg")
# The notes' six regimes, then the two LoRA variants users reach for on small cards.
PLOT_REGIMES = (*NOTES_REGIMES, "lora-bf16", "qlora")
LORA_REGIMES = ("lora", "lora-bf16", "qlora")
# One line per common capacity class: 16 GB, 24 GB, 40 GB, 80 GB, 141 GB.
COMMON_GPUS = ("t4", "rtx-4090", "a100-40gb", "h100-80gb", "h200")
DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_TARGET_SETS = ("all", "mlp", "attention", "q_proj,v_proj")
# The fixed side of a batch plot when the job does not give it.
DEFAULT_SEQ, DEFAULT_BATCH = 512, 1
SEQ_LIMIT = 2**17  # the longest sequence a seq plot searches for a rotary model
COLORS = {"weights": "#4c72b0", "gradients": "#dd8452", "optimizer_states": "#55a868",
          "master_weights": "#8172b3", "activations": "#c44e52", "temporaries": "#937860"}


def _figure(ncols: int = 1, width: float = 8.0, height: float = 5.4) -> tuple[Any, Any]:
    """A Figure on an Agg canvas and its axes, without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _job_text(train: TrainSpec) -> str:
    """'batch 4 × seq 2048, sdpa' or 'model states only'."""
    if not train.has_activations:
        return "model states only, activations excluded"
    extra = ", checkpointing" if train.checkpointing else ""
    return f"batch {train.batch} × seq {train.seq}, {train.attention}{extra}"


def _regime_label(regime: str, formula: str, train: TrainSpec) -> str:
    """The legend entry: the regime, the notes' formula, and what its symbols were."""
    if regime == "zero":
        return f"zero: {formula}, M = {train.gpus} GPUs"
    if regime in LORA_REGIMES:
        return f"{regime}: {formula}, rank {train.lora.rank} on {_targets(train.lora)}"
    return f"{regime}: {formula}"


def _targets(lora: LoraSpec) -> str:
    return lora.targets if isinstance(lora.targets, str) else ",".join(lora.targets)


def _gpu(gpu: str | GpuSpec) -> GpuSpec:
    return get_gpu(gpu) if isinstance(gpu, str) else gpu


def _count_axis(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda x, _: format_count(int(round(x)))))


def _log_axis(axis: Any, subs: tuple[float, ...] = (1.0,)) -> None:
    """Plain numbers on a log axis (0.02, 0.05, 0.1 ... or 1, 10, 100), no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def regimes_figure(train: TrainSpec | None = None, regimes: Sequence[str] = PLOT_REGIMES,
                   n_min: float = 1e8, n_max: float = 2e11, points: int = 21,
                   gpu_names: Sequence[str] = COMMON_GPUS,
                   mark: tuple[str, int] | None = None) -> Any:
    """Peak memory per GPU against N on log-log axes, one line per regime.

    Each N is planned with ``params=N`` on the shape :func:`memplan.shapes.shape_for_params`
    assumes for it; ``train`` gives the rest of the job (rank, targets, ``gpus`` for zero,
    batch and seq for activations). The legend shows each regime's formula (at the N nearest
    7e9 in the range; "≈" where it drifts with the shape, as QLoRA's does). ``gpu_names``
    become labelled horizontal lines at their capacities; ``mark`` = (name, N) draws a model.
    """
    from memplan.shapes import shape_for_params

    train = train or TrainSpec()
    if not 1 <= n_min < n_max or points < 2:
        raise MemplanError(f"need 1 <= n_min < n_max and points >= 2, got {n_min}, {n_max}, "
                           f"{points}")
    ratio = (n_max / n_min) ** (1 / (points - 1))
    ns = [int(round(n_min * ratio**i)) for i in range(points)]
    shapes = {n: shape_for_params(n)[0] for n in ns}
    reference = min(ns, key=lambda n: abs(math.log(n / 7e9)))
    fig, ax = _figure(width=9.0, height=6.0)
    top, bottom = 0.0, math.inf
    for regime in regimes:
        job = replace(train, regime=regime)
        plans = [plan(shapes[n], job, params=n) for n in ns]
        ys = [gib(b.total_bytes) for b in plans]
        formula = next(b.formula for n, b in zip(ns, plans, strict=True) if n == reference)
        if len({b.formula for b in plans}) > 1:
            formula = "≈" + formula
        ax.plot(ns, ys, lw=1.8, label=_regime_label(regime, formula, job))
        top, bottom = max(top, *ys), min(bottom, *ys)
    catalogue = gpus()
    for gpu in {get_gpu(name).name: get_gpu(name) for name in gpu_names}.values():
        same = [g.name for g in catalogue.values()
                if g.capacity_bytes == gpu.capacity_bytes and g.name != gpu.name]
        cap = gib(gpu.capacity_bytes)
        ax.axhline(cap, color="0.45", lw=0.9, ls="--", zorder=1)
        ax.text(0.01, cap, f" {gpu.name}" + (f" (= {', '.join(same)})" if same else "")
                + f": {cap:.1f} GiB", transform=ax.get_yaxis_transform(), fontsize=7.5,
                color="0.3", va="bottom", ha="left")
        top, bottom = max(top, cap), min(bottom, cap)
    if mark is not None:
        ax.axvline(mark[1], color="0.2", lw=1, ls=":")
        ax.text(mark[1], 0.02, f" {mark[0]}", transform=ax.get_xaxis_transform(), fontsize=8,
                rotation=90, va="bottom")
    ax.set(xscale="log", yscale="log", xlim=(ns[0], ns[-1]), ylim=(bottom / 1.6, top * 1.6),
           xlabel="parameters N (Llama-2-style shapes)", ylabel="peak memory per GPU (GiB)",
           title=f"The memory wall: peak memory against N ({_job_text(train)})")
    _count_axis(ax.xaxis)
    _log_axis(ax.yaxis)
    ax.grid(True, which="major", color="0.92")
    ax.legend(fontsize=8, loc="lower right", title="regime: formula of the model states",
              title_fontsize=8)
    return fig


def breakdown_figure(spec: ModelSpec, train: TrainSpec, regimes: Sequence[str] = PLOT_REGIMES,
                     params: int | None = None, gpu: str | GpuSpec | None = None) -> Any:
    """Stacked bars, one per regime: the components of its planned peak, in GiB.

    Each bar is :attr:`Breakdown.components` at the plan's peak moment, so bars sum to the
    peak; a container per component is labelled with the component's name. ``gpu`` adds its
    capacity as a horizontal line.
    """
    plans = [plan(spec, replace(train, regime=r), params) for r in regimes]
    fig, ax = _figure(width=max(6.0, 1.1 * len(plans) + 2.5), height=5.6)
    xs = list(range(len(plans)))
    bottoms = [0.0] * len(plans)
    for name in COMPONENTS:
        heights = [gib(b.components.get(name, 0)) for b in plans]
        if not any(heights):
            continue
        ax.bar(xs, heights, bottom=bottoms, width=0.65, color=COLORS[name],
               label=name.replace("_", " "))
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for x, b in zip(xs, plans, strict=True):
        ax.annotate(f"{gib(b.total_bytes):.1f}", (x, gib(b.total_bytes)), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    if gpu is not None:
        device = _gpu(gpu)
        ax.axhline(gib(device.capacity_bytes), color="0.3", ls="--", lw=1,
                   label=f"{device.name} capacity")
    ax.set_xticks(xs, [f"{b.regime}\n{b.formula}" for b in plans], fontsize=8)
    ax.set(ylabel="peak memory per GPU (GiB)",
           title=f"{spec.name}: the peak by component ({_job_text(train)})")
    ax.margins(y=0.12)
    ax.legend(fontsize=8)
    return fig


def rank_figure(spec: ModelSpec, train: TrainSpec, ranks: Sequence[int] = DEFAULT_RANKS,
                target_sets: Sequence[str] | None = None, regime: str = "lora",
                params: int | None = None) -> Any:
    """LoRA parameters M (millions, left) and peak memory (GiB, right) against the rank.

    One line per target set: ``all``, ``mlp``, ``attention``, ``q_proj,v_proj`` and the job's
    own targets, each where the model has such layers; ranks larger than a targeted layer
    are left out. ``regime`` is lora, lora-bf16 or qlora.
    """
    from memplan.params import lora_params, resolve_targets

    if regime not in LORA_REGIMES:
        raise MemplanError(f"a rank plot needs a LoRA regime ({', '.join(LORA_REGIMES)}), "
                           f"got {regime!r}")
    sets = list(target_sets or DEFAULT_TARGET_SETS)
    own = _targets(train.lora)
    if target_sets is None and own not in sets:
        resolve_targets(spec, own)  # the job's own targets must exist: say so if not
        sets.append(own)
    fig, (left, right) = _figure(ncols=2, width=11.0, height=5.0)
    drawn = 0
    for targets in sets:
        try:
            resolve_targets(spec, targets)
        except MemplanError:
            continue  # no such layers in this model (q_proj in GPT-2)
        xs, ms, mem = [], [], []
        for rank in ranks:
            lora = replace(train.lora, rank=rank, targets=targets)
            try:
                m = lora_params(spec, lora)
            except MemplanError:
                continue  # the rank exceeds a targeted layer
            xs.append(rank)
            ms.append(m / 1e6)
            job = replace(train, regime=regime, lora=lora)
            mem.append(gib(plan(spec, job, params).total_bytes))
        if xs:
            left.plot(xs, ms, marker="o", ms=3, label=targets)
            right.plot(xs, mem, marker="o", ms=3, label=targets)
            drawn += 1
    if not drawn:
        raise MemplanError(f"no target set of {', '.join(sets)} has LoRA layers in {spec.name} "
                           f"at ranks {', '.join(map(str, ranks))}")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(ranks), [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank R")
        ax.grid(True, color="0.92")
        ax.legend(fontsize=8, title="targets", title_fontsize=8)
    left.set(ylabel="trainable parameters M (millions)", title="M = R·(in + out) per matrix")
    right.set(ylabel="peak memory per GPU (GiB)", title=f"{regime} ({_job_text(train)})")
    fig.suptitle(f"{spec.name}: choosing a LoRA rank")
    return fig


def _largest_seq(spec: ModelSpec, job: TrainSpec, usable: int, params: int | None) -> int:
    """The longest sequence at ``job.batch`` whose plan fits in ``usable`` bytes (0: none)."""
    def ok(seq: int) -> bool:
        return plan(spec, replace(job, seq=seq), params).total_bytes <= usable

    limit = spec.max_positions if spec.learned_positions else SEQ_LIMIT
    if not ok(1):
        return 0
    low, high = 1, limit + 1
    if ok(limit):
        return limit
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ok(mid) else (low, mid)
    return low


def batch_figure(spec: ModelSpec, train: TrainSpec, gpu: str | GpuSpec, axis: str = "batch",
                 regimes: Sequence[str] = ("lora",), values: Sequence[int] | None = None,
                 reserve_bytes: int = DEFAULT_RESERVE_BYTES, params: int | None = None) -> Any:
    """Peak memory against the batch size (``axis="batch"``) or sequence length (``"seq"``).

    The other side is fixed at the job's (seq 512, batch 1 when the job gives none). The GPU's
    capacity less the runtime reserve is drawn as a line, and for each regime the largest
    batch (:func:`memplan.planner.max_batch`) or sequence that fits is marked.
    """
    if axis not in ("batch", "seq"):
        raise MemplanError(f"axis must be batch or seq, got {axis!r}")
    device = _gpu(gpu)
    usable = device.capacity_bytes - reserve_bytes
    if usable <= 0:
        raise MemplanError(f"the reserve {gib(reserve_bytes):.2f} GiB leaves nothing of "
                           f"{device.name}'s {gib(device.capacity_bytes):.2f} GiB")
    job = replace(train, batch=train.batch or DEFAULT_BATCH, seq=train.seq or DEFAULT_SEQ)
    best = {}
    for regime in regimes:
        run = replace(job, regime=regime)
        best[regime] = (max_batch(spec, run, device.capacity_bytes, reserve_bytes, params=params)
                        if axis == "batch" else _largest_seq(spec, run, usable, params))
    xs = sorted(set(values)) if values else _axis_values(spec, axis, max(best.values()))
    if values and min(xs) < 1:
        raise MemplanError(f"{axis} values must be positive, got {min(xs)}")
    fig, ax = _figure(width=8.5, height=5.4)
    what = "batch" if axis == "batch" else "sequence"
    for regime in regimes:
        run = replace(job, regime=regime)
        ys = [gib(plan(spec, replace(run, **{axis: x}), params).total_bytes) for x in xs]
        b = best[regime]
        label = f"{regime}: largest {what} that fits {b}" if b else \
            f"{regime}: not even {axis} 1 fits"
        if axis == "seq" and spec.learned_positions and b == spec.max_positions:
            label += f" (all {b} learned positions)"
        (line,) = ax.plot(xs, ys, marker="o", ms=2.5, label=label)
        if b:
            y = gib(plan(spec, replace(run, **{axis: b}), params).total_bytes)
            ax.plot([b], [y], marker="*", ms=13, color=line.get_color(), mec="k", mew=0.6,
                    ls="none")
            ax.annotate(f"{axis} {b}", (b, y), xytext=(4, -12), textcoords="offset points",
                        fontsize=8)
    ax.axhline(gib(usable), color="0.2", ls="--", lw=1,
               label=f"{device.name}: {gib(device.capacity_bytes):.2f} GiB − "
                     f"{gib(reserve_bytes):.2f} GiB reserve")
    fixed = (f"seq {job.seq}" if axis == "batch" else f"batch {job.batch}") \
        + (", checkpointing" if job.checkpointing else "")
    if axis == "seq":
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs], fontsize=8)
    ax.set(xlabel="micro-batch per GPU" if axis == "batch" else "sequence length (tokens)",
           ylabel="peak memory per GPU (GiB)",
           title=f"{spec.name} on {device.name}: memory against {what} ({fixed})")
    ax.grid(True, color="0.92")
    ax.legend(fontsize=8)
    return fig


def _axis_values(spec: ModelSpec, axis: str, best: int) -> list[int]:
    """Default x values: batches 1 to twice the best (at least 8); powers of two for seq."""
    if axis == "batch":
        high = min(max(8, 2 * best), 4096)
        return sorted({max(1, round(1 + i * (high - 1) / 23)) for i in range(24)})
    limit = spec.max_positions if spec.learned_positions else SEQ_LIMIT
    high = min(limit, max(8192, 2 * best))
    xs = [2**k for k in range(6, 18) if 2**k <= high]
    return xs if not spec.learned_positions or xs[-1] == limit else [*xs, limit]


def load_rows(source: list[dict] | str | Path) -> tuple[list[dict], str]:
    """Rows of a validation report and a title, from the rows themselves or a JSON path."""
    if not isinstance(source, str | Path):
        return list(source), "predicted vs measured"
    path = Path(source)
    try:
        doc = json.loads(path.read_text())
        rows = doc["rows"]
    except FileNotFoundError:
        raise MemplanError(f"validation report {str(path)!r} not found; write one with "
                           "`memplan validate --device cpu`") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MemplanError(f"{str(path)!r} is not a validation report of `memplan validate` "
                           f"({type(exc).__name__}: {exc})") from None
    summary = doc.get("summary", {})
    med, mx = summary.get("median_abs_error"), summary.get("max_abs_error")
    title = f"memplan validate --device {doc.get('device', '?')}"
    if med is not None and mx is not None:
        title += f": {len(rows)} jobs, median |error| {100 * med:.3g}%, max {100 * mx:.3g}%"
    return rows, title


def validation_figure(rows: list[dict] | str | Path, title: str | None = None) -> Any:
    """Predicted against measured peak per row, log-log, with y = x and a ±3% band.

    ``rows`` are the records of a validation report, or the path of its JSON file.
    """
    rows, default_title = load_rows(rows)
    fig, ax = _figure(width=6.4, height=5.6)
    done = [r for r in rows if r.get("relative_error") is not None]
    if not done:
        raise MemplanError("no finished rows to plot")
    measured = [gib(r["measured_bytes"]) for r in done]
    predicted = [gib(r["predicted_bytes"]) for r in done]
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
           ylabel="planned peak (GiB)", title=title or default_title)
    ax.title.set_fontsize(9)
    for axis in (ax.xaxis, ax.yaxis):
        _log_axis(axis, subs=(1.0, 2.0, 5.0))
    ax.legend(fontsize=8, loc="upper left")
    return fig


def check_path(path: str | Path) -> Path:
    """The output path, refused unless it ends in .png or .svg and is not a folder."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise MemplanError(f"plot file {str(path)!r} must end in .png or .svg")
    if path.is_dir():
        raise MemplanError(f"plot file {str(path)!r} is a folder; give a file name")
    return path


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save PNG or SVG by extension, whole or not at all (a temporary file, then rename)."""
    path = check_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
