"""``memplan plot KIND --out FILE``: draw a comparison plot and save it as PNG or SVG.

The figures are built by :mod:`memplan.plots`; this command only resolves the options and
saves the file (whole or not at all). ``memplan plot gallery --out FOLDER`` draws the README's
gallery: each command of :data:`GALLERY`, parsed as the command line would be, to
``FOLDER/KIND.png``, and the numbers each figure draws to ``FOLDER/gallery.json``
(``tests/test_gallery.py`` fails when those numbers are stale).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from memplan.cli import options as o
from memplan.cli.app import command
from memplan.errors import MemplanError

KINDS = ("regimes", "breakdown", "rank", "batch", "validation")  # the gallery's, one each
SERVE_KINDS = ("concurrency", "adapters")  # serving with adapters; not in the gallery
DEFAULT_REPORT = Path("reports/validation-cpu.json")
GALLERY_DIR = Path("reports/gallery")
# The README's gallery: the arguments of `memplan plot` for each figure, less --out (paths are
# relative to the repository root, where the command runs).
GALLERY = (
    "regimes",
    "breakdown --model llama-2-7b --batch 4 --seq 2048 --gpu h100-80gb",
    "rank --model llama-2-7b --batch 1 --seq 2048",
    "batch --model llama-2-7b --regime lora --regime lora-bf16 --regime qlora --seq 2048 "
    "--checkpointing --gpu rtx-4090",
    f"validation --report {DEFAULT_REPORT}",
)

Kind = Annotated[str, typer.Argument(
    help="regimes (memory vs N), breakdown (stacked bars per regime), rank (LoRA M and memory "
    "vs rank), batch (memory vs batch or seq on a GPU), validation (planned vs measured), "
    "concurrency (serving: concurrent sequences vs context on a GPU, with and without adapter "
    "slots), adapters (serving: adapter memory vs their number, merged, resident, slotted, "
    "host RAM), or "
    "gallery (the README's five figures and their numbers, gallery.json, into the --out "
    "folder).",
    show_default=False)]
Out = Annotated[Path | None, typer.Option(
    "--out", "-o", help="The image to write; .png or .svg (gallery: a folder).",
    show_default=False)]
PlotGpus = Annotated[int, typer.Option(
    "--gpus", help="G, the GPUs that ZeRO/FSDP shard over (8 by default here, so that the "
    "zero line differs from full).")]
Regimes = Annotated[list[str] | None, typer.Option(
    "--regime", help="Regimes to draw (repeatable). Default: the notes' six plus lora-bf16 and "
    "qlora; rank: lora; batch: lora.")]
Gpu = Annotated[str | None, typer.Option(
    "--gpu", help="batch: the GPU whose memory is drawn (see `memplan gpus`); breakdown and "
    "regimes: one more capacity line.")]
Memory = Annotated[str | None, typer.Option(
    "--memory", help="batch: a capacity instead of --gpu, e.g. 24GiB.")]
Axis = Annotated[str, typer.Option("--axis", help="batch: plot against batch or seq.")]
ServeDtype = Annotated[str, typer.Option(
    "--dtype", help="concurrency, adapters: the served weights' dtype (fp32, bf16, fp16, int8, "
    "nf4); the adapters are in its compute dtype.")]
PlotAdapters = Annotated[int | None, typer.Option(
    "--adapters", help="adapters: the largest K drawn (default 256).")]
MaxLoras = Annotated[int, typer.Option(
    "--max-loras", help="concurrency, adapters: vLLM's GPU adapter slots.")]
MaxLoraRank = Annotated[int | None, typer.Option(
    "--max-lora-rank", help="concurrency, adapters: vLLM's slot rank (default: --rank).")]
MaxCpuLoras = Annotated[int | None, typer.Option(
    "--max-cpu-loras", help="adapters: vLLM's host-RAM cache of adapters (default: all K).")]
Report = Annotated[Path | None, typer.Option(
    "--report", help=f"validation: a report of `memplan validate` (default {DEFAULT_REPORT}).")]


@command("plot")
def plot(
    ctx: typer.Context, kind: Kind, out: Out = None,
    params: o.Params = None, model: o.Model = None, config: o.Config = None,
    as_family: o.AsFamily = None,
    regime: Regimes = None, rank: o.Rank = 8, alpha: o.Alpha = 16.0, targets: o.Targets = "all",
    train_embeddings: o.TrainEmb = False, batch: o.Batch = None, seq: o.Seq = None,
    gpus: PlotGpus = 8, classes: o.Classes = 2, prompt_tokens: o.Prompt = 20,
    optimizer: o.Optim = "adamw", optimizer_impl: o.Impl = "fused",
    checkpointing: o.Ckpt = False, attention: o.Attention = "auto",
    gpu: Gpu = None, memory: Memory = None, axis: Axis = "batch", reserve: o.Reserve = None,
    report: Report = None, dtype: ServeDtype = "bf16", adapters: PlotAdapters = None,
    max_loras: MaxLoras = 8, max_lora_rank: MaxLoraRank = None,
    max_cpu_loras: MaxCpuLoras = None,
) -> None:
    """Draw a plot of the plans (or of a validation report) and save it as PNG or SVG.

    Takes the model and job options of `estimate`. Examples:
    memplan plot regimes --out regimes.png;
    memplan plot batch --model llama-2-7b --regime qlora --seq 2048 --gpu rtx-4090 --out b.svg;
    memplan plot gallery --out reports/gallery (the README's figures and gallery.json)
    """
    from memplan import plots

    options = {name: value for name, value in ctx.params.items() if name not in ("kind", "out")}
    if kind == "gallery":
        _gallery(ctx, out)
        return
    if kind not in KINDS + SERVE_KINDS:
        from memplan.errors import unknown

        raise unknown("plot kind", kind, (*KINDS, *SERVE_KINDS, "gallery"))
    if out is None:
        raise MemplanError("give --out FILE ending in .png or .svg, e.g. --out regimes.png")
    path = plots.check_path(out)
    _need_matplotlib()
    _save(plots, plots.draw(figure_data(kind, **options)), path)


def figure_data(
    kind: str, params: str | None = None, model: str | None = None, config: Path | None = None,
    as_family: str | None = None, regime: list[str] | tuple[str, ...] | None = None,
    rank: int = 8, alpha: float = 16.0, targets: str = "all", train_embeddings: bool = False,
    batch: int | None = None, seq: int | None = None, gpus: int = 8, classes: int = 2,
    prompt_tokens: int = 20, optimizer: str = "adamw", optimizer_impl: str = "fused",
    checkpointing: bool = False, attention: str = "auto", gpu: str | None = None,
    memory: str | None = None, axis: str = "batch", reserve: str | None = None,
    report: Path | None = None, dtype: str = "bf16", adapters: int | None = None,
    max_loras: int = 8, max_lora_rank: int | None = None, max_cpu_loras: int | None = None,
) -> Any:
    """The data of the figure `memplan plot KIND` draws with these options (no drawing)."""
    from memplan import plots

    regime = list(regime or ())
    model_given = any(v is not None for v in (params, model, config))
    if kind == "validation":
        if model_given:
            raise MemplanError("plot validation draws a report; give --report, not a model")
        return plots.validation_data(report or DEFAULT_REPORT)
    fill = kind == "batch"  # the plotted side of a batch plot needs no value
    job_options: dict[str, Any] = dict(
        rank=rank, alpha=alpha, targets=targets, train_embeddings=train_embeddings,
        batch=plots.DEFAULT_BATCH if fill and batch is None else batch,
        seq=plots.DEFAULT_SEQ if fill and seq is None else seq, gpus=gpus, classes=classes,
        prompt_tokens=prompt_tokens, optimizer=optimizer, optimizer_impl=optimizer_impl,
        checkpointing=checkpointing, attention=attention)
    chosen = {"regimes": tuple(regime)} if regime else {}
    if kind == "regimes":
        if gpu is not None:
            chosen["gpu_names"] = (*plots.COMMON_GPUS, gpu)
        return _regimes(plots, params, model, config, model_given, job_options, chosen,
                        as_family)
    job = o.make_job(params, model, config, as_family=as_family, **job_options)
    if kind == "concurrency":
        return plots.concurrency_data(job.spec, _device(gpu, memory, kind), dtype, rank,
                                      max_loras, max_lora_rank,
                                      reserve_bytes=o.parse_reserve(reserve))
    if kind == "adapters":
        if adapters is not None and adapters < 1:
            raise MemplanError(f"--adapters must be a positive integer, got {adapters}; e.g. "
                               "--adapters 100")
        top = adapters or plots.DEFAULT_ADAPTER_COUNTS[-1]
        counts = [k for k in plots.DEFAULT_ADAPTER_COUNTS if k < top] + [top]
        device = None if gpu is None and memory is None else _device(gpu, memory, kind)
        return plots.adapters_data(job.spec, rank, targets, max_loras, max_lora_rank,
                                   max_cpu_loras, dtype, counts, device,
                                   o.parse_reserve(reserve))
    if kind == "breakdown":
        return plots.breakdown_data(job.spec, job.train, params=job.params, gpu=gpu, **chosen)
    if kind == "rank":
        if len(regime) > 1:
            raise MemplanError("plot rank draws one regime; give one --regime (lora, "
                               "lora-bf16 or qlora)")
        return plots.rank_data(job.spec, job.train, params=job.params,
                               regime=regime[0] if regime else "lora")
    return plots.batch_data(job.spec, job.train, _device(gpu, memory), axis=axis,
                            reserve_bytes=o.parse_reserve(reserve), params=job.params, **chosen)


def gallery_data(folder: Path = GALLERY_DIR) -> list[tuple[str, str, Any]]:
    """``(kind, command, data)`` for each figure of :data:`GALLERY`, planned but not drawn.

    Each entry is parsed by the `memplan plot` command's own parser, so the data is exactly
    what that command line draws; ``command`` is the line, with ``--out folder/KIND.png``.
    """
    import shlex

    from memplan.cli.app import app

    command = typer.main.get_command(app).commands["plot"]  # type: ignore[attr-defined]
    entries = []
    for args in GALLERY:
        kind = args.split()[0]
        out = folder / f"{kind}.png"
        parsed = command.make_context("plot", [*shlex.split(args), "--out", str(out)]).params
        options = {k: v for k, v in parsed.items() if k not in ("kind", "out")}
        entries.append((kind, f"memplan plot {args} --out {out}", figure_data(kind, **options)))
    return entries


def _gallery(ctx: typer.Context, out: Path | None) -> None:
    """`memplan plot gallery --out FOLDER`: every figure of the gallery and gallery.json."""
    from memplan import plots

    given = [f"--{name.replace('_', '-')}" for name in ctx.params
             if name not in ("kind", "out")
             and getattr(ctx.get_parameter_source(name), "name", "") != "DEFAULT"]
    if given:
        raise MemplanError(f"plot gallery draws the README's figures with their own options; "
                           f"give only --out FOLDER, not {', '.join(given)}")
    if out is None:
        raise MemplanError(f"give --out FOLDER, e.g. --out {GALLERY_DIR}")
    if out.suffix.lower() in plots.FORMATS:
        raise MemplanError(f"plot gallery writes a folder of figures; give --out FOLDER, not "
                           f"the file {str(out)!r}")
    _need_matplotlib()
    entries = gallery_data(out)
    for path in plots.save_gallery(out, entries, made_by=f"memplan plot gallery --out {out}"):
        typer.echo(f"wrote {path} ({path.resolve()})" if not path.is_absolute() else
                   f"wrote {path}")


def _save(plots: Any, fig: Any, path: Path) -> None:
    """Save the figure and say where it went (the path as given, and in full)."""
    saved = plots.save_figure(fig, path)
    typer.echo(f"wrote {saved} ({saved.resolve()})" if not saved.is_absolute() else
               f"wrote {saved}")


def _regimes(plots: Any, params: str | None, model: str | None, config: Path | None,
             model_given: bool, job_options: dict[str, Any], chosen: dict,
             as_family: str | None = None) -> Any:
    """The regimes plot's data: the model options are optional and only mark a model."""
    if not model_given:
        return plots.regimes_data(o.make_train(**job_options), **chosen)
    from memplan.params import count_params

    job = o.make_job(params, model, config, as_family=as_family, **job_options)
    return plots.regimes_data(job.train, mark=(job.spec.name,
                                               job.params or count_params(job.spec)), **chosen)


def _device(gpu: str | None, memory: str | None, kind: str = "batch") -> Any:
    """The GPU of a batch plot: a catalogue entry or a bare capacity."""
    from memplan.presets import GpuSpec, get_gpu
    from memplan.units import parse_bytes

    if (gpu is None) == (memory is None):
        raise MemplanError(f"plot {kind} needs exactly one of --gpu NAME or --memory SIZE (e.g. "
                           "--gpu rtx-4090 or --memory 24GiB)")
    if gpu is not None:
        return get_gpu(gpu)
    return GpuSpec(name=memory, label=f"{memory} of memory",
                   capacity_bytes=parse_bytes(memory, "--memory"), source="--memory")


def _need_matplotlib() -> None:
    """Say what to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MemplanError("plotting needs matplotlib: pip install 'memplan[plot]'") from None
