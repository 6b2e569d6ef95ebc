"""Plots, built as matplotlib Figures (Agg canvas, matplotlib imported only when plotting).

Each ``*_figure`` function returns a :class:`matplotlib.figure.Figure` made without pyplot
(no global state, nothing to close, no backend switched); the CLI only saves it with
:func:`save_figure`. Each is two steps: ``*_data`` plans the numbers (a frozen dataclass of
integer bytes and labels, no matplotlib) and ``draw_*`` draws only those, so a test can
recompute a figure's numbers without drawing it (the gallery's ``gallery.json``).
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from memplan.errors import MemplanError
from memplan.planner import COMPONENTS, DEFAULT_RESERVE_BYTES, max_batch, plan
from memplan.presets import GpuSpec, get_gpu, gpus
from memplan.recipe import preset
from memplan.spec import NOTES_REGIMES, REGIMES, LoraSpec, ModelSpec, TrainSpec
from memplan.units import format_count, gib

FORMATS = (".png", ".svg")
# The notes' six regimes, then the two LoRA variants users reach for on small cards.
PLOT_REGIMES = (*NOTES_REGIMES, "lora-bf16", "qlora")
LORA_REGIMES = tuple(name for name in REGIMES if preset(name).lora)
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
    if train.autocast != "none":
        extra += f", autocast {train.autocast}"
    if train.grad_accum > 1:
        extra += f", {train.grad_accum} micro-batches"
    return f"batch {train.batch} × seq {train.seq}, {train.attention}{extra}, {train.loop} loop"


def _regime_label(regime: str, formula: str, train: TrainSpec) -> str:
    """The legend entry: the regime, the notes' formula, and what its symbols were."""
    r = preset(regime)
    if r.fsdp:
        return f"zero: {formula}, G = {train.gpus} GPUs"
    if r.lora:
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


# ---- the data each figure draws: plain integers of bytes and the labels, no matplotlib ----


@dataclass(frozen=True)
class Line:
    """One plotted line: its legend label and its points (bytes or counts, never GiB)."""

    label: str
    xs: tuple[int, ...]
    ys: tuple[int, ...]


@dataclass(frozen=True)
class Capacity:
    """A GPU drawn as a horizontal line at its capacity; ``same`` are the cards of equal size."""

    name: str
    capacity_bytes: int
    same: tuple[str, ...] = ()


@dataclass(frozen=True)
class RegimesData:
    """What :func:`regimes_figure` draws: a line of peak bytes per regime over ``ns``."""

    title: str
    ns: tuple[int, ...]
    lines: tuple[Line, ...]
    gpus: tuple[Capacity, ...]
    mark: tuple[str, int] | None = None


@dataclass(frozen=True)
class Bar:
    """One bar of :func:`breakdown_figure`: a regime's plan at its peak, by component."""

    regime: str
    formula: str
    total_bytes: int
    components: dict[str, int]


@dataclass(frozen=True)
class BreakdownData:
    """What :func:`breakdown_figure` draws."""

    title: str
    bars: tuple[Bar, ...]
    gpu: Capacity | None = None


@dataclass(frozen=True)
class RankData:
    """What :func:`rank_figure` draws: M (parameters) and peak bytes against the rank."""

    title: str
    memory_title: str
    ranks: tuple[int, ...]
    params: tuple[Line, ...]
    memory: tuple[Line, ...]


@dataclass(frozen=True)
class BatchLine:
    """A regime's line of :func:`batch_figure` and its largest fitting value (0: none)."""

    line: Line
    best: int
    best_bytes: int


@dataclass(frozen=True)
class BatchData:
    """What :func:`batch_figure` draws; ``usable_bytes`` is the capacity less the reserve."""

    axis: str
    title: str
    lines: tuple[BatchLine, ...]
    gpu: Capacity
    reserve_bytes: int
    usable_bytes: int


@dataclass(frozen=True)
class Point:
    """A finished row of a validation report: the planned and the measured peak."""

    model: str
    regime: str
    options: str
    predicted_bytes: int
    measured_bytes: int


@dataclass(frozen=True)
class ValidationData:
    """What :func:`validation_figure` draws."""

    title: str
    points: tuple[Point, ...]


FigureData = RegimesData | BreakdownData | RankData | BatchData | ValidationData


def as_json(data: FigureData) -> dict[str, Any]:
    """The data of a figure as JSON types (lists, not tuples), as ``gallery.json`` holds it."""
    return json.loads(json.dumps(asdict(data)))


def regimes_data(train: TrainSpec | None = None, regimes: Sequence[str] = PLOT_REGIMES,
                 n_min: float = 1e8, n_max: float = 2e11, points: int = 21,
                 gpu_names: Sequence[str] = COMMON_GPUS,
                 mark: tuple[str, int] | None = None) -> RegimesData:
    """The data of :func:`regimes_figure` (the same arguments), planned but not drawn."""
    from memplan.shapes import shape_for_params

    train = train or TrainSpec()
    if not 1 <= n_min < n_max or points < 2:
        raise MemplanError(f"need 1 <= n_min < n_max and points >= 2, got {n_min}, {n_max}, "
                           f"{points}")
    ratio = (n_max / n_min) ** (1 / (points - 1))
    ns = tuple(int(round(n_min * ratio**i)) for i in range(points))
    shapes = {n: shape_for_params(n)[0] for n in ns}
    reference = min(ns, key=lambda n: abs(math.log(n / 7e9)))
    lines = []
    for regime in regimes:
        job = replace(train, regime=regime)
        plans = [plan(shapes[n], job, params=n) for n in ns]
        formula = next(b.formula for n, b in zip(ns, plans, strict=True) if n == reference)
        if len({b.formula for b in plans}) > 1:
            formula = "≈" + formula
        lines.append(Line(_regime_label(regime, formula, job), ns,
                          tuple(b.total_bytes for b in plans)))
    catalogue = gpus()
    caps = tuple(
        Capacity(gpu.name, gpu.capacity_bytes,
                 tuple(g.name for g in catalogue.values()
                       if g.capacity_bytes == gpu.capacity_bytes and g.name != gpu.name))
        for gpu in {get_gpu(name).name: get_gpu(name) for name in gpu_names}.values())
    title = f"The memory wall: peak memory against N ({_job_text(train)})"
    return RegimesData(title, ns, tuple(lines), caps, None if mark is None else tuple(mark))


def draw_regimes(data: RegimesData) -> Any:
    """Draw :class:`RegimesData` (see :func:`regimes_figure`)."""
    ns = data.ns
    fig, ax = _figure(width=9.0, height=6.0)
    top, bottom = 0.0, math.inf
    for line in data.lines:
        ys = [gib(b) for b in line.ys]
        ax.plot(line.xs, ys, lw=1.8, label=line.label)
        top, bottom = max(top, *ys), min(bottom, *ys)
    for gpu in data.gpus:
        cap = gib(gpu.capacity_bytes)
        ax.axhline(cap, color="0.45", lw=0.9, ls="--", zorder=1)
        ax.text(0.01, cap, f" {gpu.name}" + (f" (= {', '.join(gpu.same)})" if gpu.same else "")
                + f": {cap:.1f} GiB", transform=ax.get_yaxis_transform(), fontsize=7.5,
                color="0.3", va="bottom", ha="left")
        top, bottom = max(top, cap), min(bottom, cap)
    if data.mark is not None:
        ax.axvline(data.mark[1], color="0.2", lw=1, ls=":")
        ax.text(data.mark[1], 0.02, f" {data.mark[0]}", transform=ax.get_xaxis_transform(),
                fontsize=8, rotation=90, va="bottom")
    ax.set(xscale="log", yscale="log", xlim=(ns[0], ns[-1]), ylim=(bottom / 1.6, top * 1.6),
           xlabel="parameters N (Llama-2-style shapes)", ylabel="peak memory per GPU (GiB)",
           title=data.title)
    _count_axis(ax.xaxis)
    _log_axis(ax.yaxis)
    ax.grid(True, which="major", color="0.92")
    ax.legend(fontsize=8, loc="lower right", title="regime: formula of the model states",
              title_fontsize=8)
    return fig


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
    return draw_regimes(regimes_data(train, regimes, n_min, n_max, points, gpu_names, mark))


def breakdown_data(spec: ModelSpec, train: TrainSpec, regimes: Sequence[str] = PLOT_REGIMES,
                   params: int | None = None,
                   gpu: str | GpuSpec | None = None) -> BreakdownData:
    """The data of :func:`breakdown_figure` (the same arguments), planned but not drawn."""
    plans = [plan(spec, replace(train, regime=r), params) for r in regimes]
    bars = tuple(Bar(b.regime, b.formula, b.total_bytes, dict(b.components)) for b in plans)
    device = None if gpu is None else _gpu(gpu)
    return BreakdownData(f"{spec.name}: the peak by component ({_job_text(train)})", bars,
                         None if device is None else Capacity(device.name,
                                                              device.capacity_bytes))


def draw_breakdown(data: BreakdownData) -> Any:
    """Draw :class:`BreakdownData` (see :func:`breakdown_figure`)."""
    bars = data.bars
    fig, ax = _figure(width=max(6.0, 1.1 * len(bars) + 2.5), height=5.6)
    xs = list(range(len(bars)))
    bottoms = [0.0] * len(bars)
    for name in COMPONENTS:
        heights = [gib(b.components.get(name, 0)) for b in bars]
        if not any(heights):
            continue
        ax.bar(xs, heights, bottom=bottoms, width=0.65, color=COLORS[name],
               label=name.replace("_", " "))
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for x, b in zip(xs, bars, strict=True):
        ax.annotate(f"{gib(b.total_bytes):.1f}", (x, gib(b.total_bytes)), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    if data.gpu is not None:
        ax.axhline(gib(data.gpu.capacity_bytes), color="0.3", ls="--", lw=1,
                   label=f"{data.gpu.name} capacity")
    ax.set_xticks(xs, [f"{b.regime}\n{b.formula}" for b in bars], fontsize=8)
    ax.set(ylabel="peak memory per GPU (GiB)", title=data.title)
    ax.margins(y=0.12)
    ax.legend(fontsize=8)
    return fig


def breakdown_figure(spec: ModelSpec, train: TrainSpec, regimes: Sequence[str] = PLOT_REGIMES,
                     params: int | None = None, gpu: str | GpuSpec | None = None) -> Any:
    """Stacked bars, one per regime: the components of its planned peak, in GiB.

    Each bar is :attr:`Breakdown.components` at the plan's peak moment, so bars sum to the
    peak; a container per component is labelled with the component's name. ``gpu`` adds its
    capacity as a horizontal line.
    """
    return draw_breakdown(breakdown_data(spec, train, regimes, params, gpu))


def rank_data(spec: ModelSpec, train: TrainSpec, ranks: Sequence[int] = DEFAULT_RANKS,
              target_sets: Sequence[str] | None = None, regime: str = "lora",
              params: int | None = None) -> RankData:
    """The data of :func:`rank_figure` (the same arguments), planned but not drawn."""
    from memplan.params import lora_params, resolve_targets

    if not preset(regime).lora:
        raise MemplanError(f"a rank plot needs a LoRA regime ({', '.join(LORA_REGIMES)}), "
                           f"got {regime!r}")
    sets = list(target_sets or DEFAULT_TARGET_SETS)
    own = _targets(train.lora)
    if target_sets is None and own not in sets:
        resolve_targets(spec, own)  # the job's own targets must exist: say so if not
        sets.append(own)
    counts, memory = [], []
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
            ms.append(m)
            job = replace(train, regime=regime, lora=lora)
            mem.append(plan(spec, job, params).total_bytes)
        if xs:
            counts.append(Line(targets, tuple(xs), tuple(ms)))
            memory.append(Line(targets, tuple(xs), tuple(mem)))
    if not counts:
        raise MemplanError(f"no target set of {', '.join(sets)} has LoRA layers in {spec.name} "
                           f"at ranks {', '.join(map(str, ranks))}")
    return RankData(f"{spec.name}: choosing a LoRA rank", f"{regime} ({_job_text(train)})",
                    tuple(ranks), tuple(counts), tuple(memory))


def draw_rank(data: RankData) -> Any:
    """Draw :class:`RankData` (see :func:`rank_figure`)."""
    fig, (left, right) = _figure(ncols=2, width=11.0, height=5.0)
    for count, mem in zip(data.params, data.memory, strict=True):
        left.plot(count.xs, [m / 1e6 for m in count.ys], marker="o", ms=3, label=count.label)
        right.plot(mem.xs, [gib(b) for b in mem.ys], marker="o", ms=3, label=mem.label)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(data.ranks), [str(r) for r in data.ranks])
        ax.set_xlabel("LoRA rank R")
        ax.grid(True, color="0.92")
        ax.legend(fontsize=8, title="targets", title_fontsize=8)
    left.set(ylabel="trainable parameters M (millions)", title="M = R·(in + out) per matrix")
    right.set(ylabel="peak memory per GPU (GiB)", title=data.memory_title)
    fig.suptitle(data.title)
    return fig


def rank_figure(spec: ModelSpec, train: TrainSpec, ranks: Sequence[int] = DEFAULT_RANKS,
                target_sets: Sequence[str] | None = None, regime: str = "lora",
                params: int | None = None) -> Any:
    """LoRA parameters M (millions, left) and peak memory (GiB, right) against the rank.

    One line per target set: ``all``, ``mlp``, ``attention``, ``q_proj,v_proj`` and the job's
    own targets, each where the model has such layers; ranks larger than a targeted layer
    are left out. ``regime`` is lora, lora-bf16 or qlora.
    """
    return draw_rank(rank_data(spec, train, ranks, target_sets, regime, params))


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


def batch_data(spec: ModelSpec, train: TrainSpec, gpu: str | GpuSpec, axis: str = "batch",
               regimes: Sequence[str] = ("lora",), values: Sequence[int] | None = None,
               reserve_bytes: int = DEFAULT_RESERVE_BYTES,
               params: int | None = None) -> BatchData:
    """The data of :func:`batch_figure` (the same arguments), planned but not drawn."""
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
    what = "batch" if axis == "batch" else "sequence"
    lines = []
    for regime in regimes:
        run = replace(job, regime=regime)
        ys = tuple(plan(spec, replace(run, **{axis: x}), params).total_bytes for x in xs)
        b = best[regime]
        label = f"{regime}: largest {what} that fits {b}" if b else \
            f"{regime}: not even {axis} 1 fits"
        if axis == "seq" and spec.learned_positions and b == spec.max_positions:
            label += f" (all {b} learned positions)"
        at_best = plan(spec, replace(run, **{axis: b}), params).total_bytes if b else 0
        lines.append(BatchLine(Line(label, tuple(xs), ys), b, at_best))
    fixed = (f"seq {job.seq}" if axis == "batch" else f"batch {job.batch}") \
        + (", checkpointing" if job.checkpointing else "")
    return BatchData(axis, f"{spec.name} on {device.name}: memory against {what} ({fixed})",
                     tuple(lines), Capacity(device.name, device.capacity_bytes), reserve_bytes,
                     usable)


def draw_batch(data: BatchData) -> Any:
    """Draw :class:`BatchData` (see :func:`batch_figure`)."""
    axis = data.axis
    fig, ax = _figure(width=8.5, height=5.4)
    for regime in data.lines:
        ys = [gib(y) for y in regime.line.ys]
        (line,) = ax.plot(list(regime.line.xs), ys, marker="o", ms=2.5, label=regime.line.label)
        b = regime.best
        if b:
            y = gib(regime.best_bytes)
            ax.plot([b], [y], marker="*", ms=13, color=line.get_color(), mec="k", mew=0.6,
                    ls="none")
            ax.annotate(f"{axis} {b}", (b, y), xytext=(4, -12), textcoords="offset points",
                        fontsize=8)
    ax.axhline(gib(data.usable_bytes), color="0.2", ls="--", lw=1,
               label=f"{data.gpu.name}: {gib(data.gpu.capacity_bytes):.2f} GiB − "
                     f"{gib(data.reserve_bytes):.2f} GiB reserve")
    if axis == "seq":
        xs = list(data.lines[0].line.xs) if data.lines else []
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs], fontsize=8)
    ax.set(xlabel="micro-batch per GPU" if axis == "batch" else "sequence length (tokens)",
           ylabel="peak memory per GPU (GiB)", title=data.title)
    ax.grid(True, color="0.92")
    ax.legend(fontsize=8)
    return fig


def batch_figure(spec: ModelSpec, train: TrainSpec, gpu: str | GpuSpec, axis: str = "batch",
                 regimes: Sequence[str] = ("lora",), values: Sequence[int] | None = None,
                 reserve_bytes: int = DEFAULT_RESERVE_BYTES, params: int | None = None) -> Any:
    """Peak memory against the batch size (``axis="batch"``) or sequence length (``"seq"``).

    The other side is fixed at the job's (seq 512, batch 1 when the job gives none). The GPU's
    capacity less the runtime reserve is drawn as a line, and for each regime the largest
    batch (:func:`memplan.planner.max_batch`) or sequence that fits is marked.
    """
    return draw_batch(batch_data(spec, train, gpu, axis, regimes, values, reserve_bytes,
                                 params))


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


def validation_data(rows: list[dict] | str | Path, title: str | None = None) -> ValidationData:
    """The data of :func:`validation_figure`: the finished rows and the title."""
    rows, default_title = load_rows(rows)
    done = [r for r in rows if r.get("relative_error") is not None]
    if not done:
        raise MemplanError("no finished rows to plot")
    return ValidationData(title or default_title, tuple(
        Point(str(r.get("model", "")), r["regime"], str(r.get("options", "")),
              r["predicted_bytes"], r["measured_bytes"]) for r in done))


def draw_validation(data: ValidationData) -> Any:
    """Draw :class:`ValidationData` (see :func:`validation_figure`)."""
    fig, ax = _figure(width=6.4, height=5.6)
    done = data.points
    measured = [gib(r.measured_bytes) for r in done]
    predicted = [gib(r.predicted_bytes) for r in done]
    lo, hi = min(measured + predicted) * 0.8, max(measured + predicted) * 1.25
    xs = [lo, hi]
    ax.fill_between(xs, [x * 0.97 for x in xs], [x * 1.03 for x in xs], color="0.85",
                    label="±3%")
    ax.plot(xs, xs, color="0.3", lw=1, label="y = x")
    for regime in sorted({r.regime for r in done}):
        pts = [(m, p) for m, p, r in zip(measured, predicted, done, strict=True)
               if r.regime == regime]
        ax.scatter([m for m, _ in pts], [p for _, p in pts], s=22, label=regime, zorder=3)
    ax.set(xscale="log", yscale="log", xlim=xs, ylim=xs, xlabel="measured peak (GiB)",
           ylabel="planned peak (GiB)", title=data.title)
    ax.title.set_fontsize(9)
    for axis in (ax.xaxis, ax.yaxis):
        _log_axis(axis, subs=(1.0, 2.0, 5.0))
    ax.legend(fontsize=8, loc="upper left")
    return fig


def validation_figure(rows: list[dict] | str | Path, title: str | None = None) -> Any:
    """Predicted against measured peak per row, log-log, with y = x and a ±3% band.

    ``rows`` are the records of a validation report, or the path of its JSON file.
    """
    return draw_validation(validation_data(rows, title))


DRAW = {RegimesData: draw_regimes, BreakdownData: draw_breakdown, RankData: draw_rank,
        BatchData: draw_batch, ValidationData: draw_validation}


def draw(data: FigureData) -> Any:
    """The Figure of any figure's data."""
    return DRAW[type(data)](data)


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
    return write_staged([(path, lambda tmp: fig.savefig(tmp, dpi=120))])[0]


def write_staged(files: Sequence[tuple[Path, Callable[[Path], None]]]) -> list[Path]:
    """Write each file to a temporary beside it, then rename them all; on error, none is left.

    Nothing is renamed until every file is written, so a failure leaves the old files as they
    were and no temporary behind.
    """
    temps: list[Path] = []
    try:
        for path, write in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            temps.append(path.with_name(f".{path.stem}.tmp{path.suffix}"))
            write(temps[-1])
        for (path, _), tmp in zip(files, temps, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return [path for path, _ in files]


# ---- the gallery: figures and the numbers they draw, written together ----------------------

GALLERY_JSON = "gallery.json"


def gallery_doc(entries: Sequence[tuple[str, str, FigureData]], made_by: str) -> dict[str, Any]:
    """The ``gallery.json`` document: per figure, the command that draws it and its data."""
    return {"made_by": made_by,
            "figures": {name: {"command": command, "data": as_json(data)}
                        for name, command, data in entries}}


def save_gallery(folder: str | Path, entries: Sequence[tuple[str, str, FigureData]],
                 made_by: str) -> list[Path]:
    """Draw each ``(name, command, data)`` to ``folder/name.png`` and write ``gallery.json``.

    All files are written whole or not at all (:func:`write_staged`).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MemplanError(f"gallery folder {str(folder)!r} is a file; give a folder")
    doc = gallery_doc(entries, made_by)
    files: list[tuple[Path, Callable[[Path], None]]] = [
        (folder / f"{name}.png", _saver(draw(data))) for name, _, data in entries]
    files.append((folder / GALLERY_JSON,
                  lambda tmp: tmp.write_text(json.dumps(doc, indent=1) + "\n")))
    return write_staged(files)


def _saver(fig: Any) -> Callable[[Path], None]:
    return lambda tmp: fig.savefig(tmp, dpi=120)


def gallery_differences(committed: dict[str, Any],
                        entries: Sequence[tuple[str, str, FigureData]]) -> list[str]:
    """What differs between a ``gallery.json`` and the figures' data recomputed now.

    One line per stale figure, naming it, the first value that changed, and the command
    that drew it; an empty list when every number is current.
    """
    figures = committed.get("figures", {})
    lines = [f"figure {name!r} is not in the gallery any more" for name in figures
             if name not in {e[0] for e in entries}]
    for name, command, data in entries:
        if name not in figures:
            lines.append(f"figure {name!r} is missing (drawn by `{command}`)")
            continue
        where = _first_difference(figures[name].get("data"), as_json(data), "")
        if where is not None:
            lines.append(f"figure {name!r} is stale at {where} (drawn by `{command}`)")
    return lines


def _first_difference(old: Any, new: Any, path: str) -> str | None:
    """The path of the first differing value and both values, or None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}")
            if found is not None:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            found = _first_difference(a, b, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return None if old == new else f"{path or '.'}: committed {_short(old)}, now {_short(new)}"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---- serving with LoRA adapters: concurrency against context, memory against adapters ------
# (memplan.serve plans the KV cache and the prefill; memplan.serve_adapters the adapters.)

DEFAULT_ADAPTER_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ConcurrencyData:
    """What :func:`draw_concurrency` draws: concurrent sequences (counts) against context
    length, one line without adapters and one with vLLM's adapter slots."""

    title: str
    seqs: tuple[int, ...]
    lines: tuple[Line, ...]
    gpu: Capacity
    reserve_bytes: int
    weights_bytes: int
    activations_bytes: int
    adapter_slot_bytes: int
    kv_bytes_per_token: int


@dataclass(frozen=True)
class AdaptersData:
    """What :func:`draw_adapters` draws: bytes the adapters take against their number K;
    merged, resident and slotted on the GPU, and host RAM, as separate lines."""

    title: str
    counts: tuple[int, ...]
    lines: tuple[Line, ...]
    host: Line
    adapter_bytes: int
    gpu_left_bytes: int | None = None  # capacity − reserve − weights − prefill, if a GPU


def _lora_dtype(dtype: str) -> str:
    """The adapters' dtype when serving weights in ``dtype``: vLLM's ``lora_dtype="auto"`` is
    the compute dtype (fp16 under int8 weights, bf16 under NF4, as :mod:`memplan.serve`)."""
    from memplan.serve import SERVE_DTYPES

    if dtype not in SERVE_DTYPES:
        raise MemplanError(f"--dtype {dtype!r} is not one of {', '.join(SERVE_DTYPES)}")
    return {"int8": "fp16", "nf4": "bf16"}.get(dtype, dtype)


def _context_values(spec: ModelSpec, seqs: Sequence[int] | None) -> list[int]:
    """Powers of two from 256 to the model's positions, and the positions themselves."""
    if seqs:
        xs = sorted(set(seqs))
        if xs[0] < 1:
            raise MemplanError(f"context lengths must be positive, got {xs[0]}")
        return xs
    xs = [2**k for k in range(8, 21) if 2**k <= spec.max_positions]
    return xs if xs and xs[-1] == spec.max_positions else [*xs, spec.max_positions]


def concurrency_data(spec: ModelSpec, gpu: str | GpuSpec, dtype: str = "bf16",
                     rank: int = 8, max_loras: int = 8, max_lora_rank: int | None = None,
                     seqs: Sequence[int] | None = None,
                     reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> ConcurrencyData:
    """Concurrent sequences of each context length that the KV cache of ``gpu`` holds, serving
    ``spec`` in ``dtype`` (:func:`memplan.serve.plan_serve`: weights, one prefill chunk,
    reserve, paged KV), without adapters and with ``max_loras`` vLLM slots of
    ``max_lora_rank`` (default: ``rank``) for every LoRA-capable module (adapters in the
    compute dtype, vLLM's ``lora_dtype="auto"``)."""
    from memplan.serve import plan_serve
    from memplan.serve_adapters import adapter_plan

    device = _gpu(gpu)
    slot_rank = max_lora_rank or rank
    if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1:
        raise MemplanError(f"--max-loras must be a positive integer, got {max_loras!r}; e.g. "
                           "--max-loras 8")
    lora = adapter_plan(spec, max_loras, rank, "all", max_loras, slot_rank,
                        dtype=_lora_dtype(dtype))
    slots = lora.adapter_slot_bytes + lora.embedding_slot_bytes  # what `memplan serve` takes
    xs = _context_values(spec, seqs)
    if xs[-1] > spec.max_positions:
        raise MemplanError(f"context {xs[-1]} is beyond {spec.name}'s {spec.max_positions:,} "
                           f"positions; use {spec.max_positions} or less")
    plans = {extra: [plan_serve(spec, dtype, device.capacity_bytes, reserve_bytes, seq=x,
                                adapter_gpu_bytes=extra) for x in xs] for extra in (0, slots)}
    lines = (Line("no adapters", tuple(xs),
                  tuple(p.max_concurrent_sequences or 0 for p in plans[0])),
             Line(f"{max_loras} adapter slots of rank {slot_rank} "
                  f"({gib(slots):.2f} GiB, vLLM's layout, planned)", tuple(xs),
                  tuple(p.max_concurrent_sequences or 0 for p in plans[slots])))
    first = plans[0][0]
    return ConcurrencyData(
        f"{spec.name} in {dtype} on {device.name}: concurrent sequences against context",
        tuple(xs), lines, Capacity(device.name, device.capacity_bytes), reserve_bytes,
        first.weights_bytes, first.activations_bytes, slots, first.kv_bytes_per_token)


def draw_concurrency(data: ConcurrencyData) -> Any:
    """Draw :class:`ConcurrencyData`: log-log, a marker per context length."""
    fig, ax = _figure(width=8.5, height=5.4)
    for line, style in zip(data.lines, ("-", "--"), strict=False):
        pts = [(x, y) for x, y in zip(line.xs, line.ys, strict=True) if y > 0]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], ls=style, marker="o", ms=3,
                    label=line.label)
    xs = list(data.seqs)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs], fontsize=8)
    _log_axis(ax.yaxis, subs=(1.0, 2.0, 5.0))
    ax.set(xlabel="context length per sequence (tokens)",
           ylabel="concurrent sequences whose KV cache fits", title=data.title)
    ax.title.set_fontsize(10)
    note = (f"{data.gpu.name} {gib(data.gpu.capacity_bytes):.2f} GiB − weights "
            f"{gib(data.weights_bytes):.2f} − prefill {gib(data.activations_bytes):.2f} − "
            f"reserve {gib(data.reserve_bytes):.2f} GiB; KV {data.kv_bytes_per_token:,} B/token")
    ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=7, color="0.3")
    ax.grid(True, color="0.92")
    ax.legend(fontsize=8)
    return fig


def adapters_data(spec: ModelSpec, rank: int = 8, targets: str = "all",
                  max_loras: int = 8, max_lora_rank: int | None = None,
                  max_cpu_loras: int | None = None, dtype: str = "bf16",
                  counts: Sequence[int] | None = None, gpu: str | GpuSpec | None = None,
                  reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> AdaptersData:
    """Bytes of K adapters (:func:`memplan.serve_adapters.adapter_plan`) for each K of
    ``counts``: merged (0), resident (K on the GPU), slotted (vLLM's ``min(K, max_loras)``
    slots of ``max_lora_rank``, default ``rank``) and host RAM (vLLM's CPU cache of up to
    ``max_cpu_loras``, default K). With ``gpu``, what is left of it for adapters and KV cache
    after the weights (``dtype``), one prefill chunk and the reserve."""
    from memplan.serve_adapters import adapter_plan

    ks = sorted(set(counts or DEFAULT_ADAPTER_COUNTS))
    if ks[0] < 1:
        raise MemplanError(f"adapter counts must be positive, got {ks[0]}")
    slot_rank = max_lora_rank or rank
    adapter_plan(spec, ks[-1], rank, targets, max_loras, slot_rank, max_cpu_loras,
                 _lora_dtype(dtype))  # the options as given, at the largest K: bad input
    plans = [adapter_plan(spec, k, rank, targets, min(max_loras, k), slot_rank,
                          None if max_cpu_loras is None else max(max_cpu_loras,
                                                                 min(max_loras, k)),
                          _lora_dtype(dtype)) for k in ks]
    xs = tuple(ks)
    lines = (Line("merged into W (one adapter at a time): 0", xs, tuple(p.merged_bytes
                                                                          for p in plans)),
             Line("resident, unmerged: K adapters on the GPU", xs,
                  tuple(p.resident_bytes for p in plans)),
             Line(f"slotted (vLLM, planned): min(K, {max_loras}) slots of rank {slot_rank}, "
                  f"every LoRA-capable module and the embeddings", xs,
                  tuple(p.adapter_slot_bytes + p.embedding_slot_bytes for p in plans)))
    cpu = "K" if max_cpu_loras is None else f"min(K, {max_cpu_loras})"
    host = Line(f"host RAM (vLLM's CPU cache): {cpu} adapters", xs,
                tuple(p.host_adapter_bytes for p in plans))
    left = None
    title = (f"{spec.name}: adapters of rank {rank} on {plans[0].targets}, "
             f"{_lora_dtype(dtype)}")
    if gpu is not None:
        from memplan.serve import plan_serve

        device = _gpu(gpu)
        served = plan_serve(spec, dtype, device.capacity_bytes, reserve_bytes)
        left = device.capacity_bytes - reserve_bytes - served.weights_bytes \
            - served.activations_bytes
        title += f", on {device.name}"
    return AdaptersData(title, xs, lines, host, plans[0].adapter_bytes, left)


def draw_adapters(data: AdaptersData) -> Any:
    """Draw :class:`AdaptersData`: GPU bytes (left) and host RAM (right) against K."""
    fig, (gpu_ax, host_ax) = _figure(ncols=2, width=11.0, height=5.0)
    for line, style in zip(data.lines, (":", "-", "--"), strict=True):
        gpu_ax.plot(list(line.xs), [gib(y) for y in line.ys], ls=style, marker="o", ms=3,
                    label=line.label)
    if data.gpu_left_bytes is not None:
        gpu_ax.axhline(gib(data.gpu_left_bytes), color="0.2", ls="-.", lw=1,
                       label=f"GPU left after weights, prefill and reserve: "
                             f"{gib(data.gpu_left_bytes):.2f} GiB")
    host_ax.plot(list(data.host.xs), [gib(y) for y in data.host.ys], marker="o", ms=3,
                 color="#55a868", label=data.host.label)
    for ax, ylabel in ((gpu_ax, "GPU memory for adapters (GiB)"),
                       (host_ax, "host RAM for adapters (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(data.counts), [str(k) for k in data.counts], fontsize=8)
        ax.set(xlabel="adapters K", ylabel=ylabel)
        ax.grid(True, color="0.92")
        ax.legend(fontsize=7)
    fig.suptitle(f"{data.title}; one adapter {data.adapter_bytes / 2**20:.1f} MiB",
                 fontsize=10)
    return fig


DRAW[ConcurrencyData] = draw_concurrency
DRAW[AdaptersData] = draw_adapters
