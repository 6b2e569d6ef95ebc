"""``memplan plot KIND --out FILE``: draw a comparison plot and save it as PNG or SVG.

The figures are built by :mod:`memplan.plots`; this command only resolves the options and
saves the file (whole or not at all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from memplan.cli import options as o
from memplan.cli.app import command
from memplan.errors import MemplanError

KINDS = ("regimes", "breakdown", "rank", "batch", "validation")
DEFAULT_REPORT = Path("reports/validation-cpu.json")

Kind = Annotated[str, typer.Argument(
    help="regimes (memory vs N), breakdown (stacked bars per regime), rank (LoRA M and memory "
    "vs rank), batch (memory vs batch or seq on a GPU) or validation (planned vs measured).",
    show_default=False)]
Out = Annotated[Path | None, typer.Option(
    "--out", "-o", help="The image to write; .png or .svg.", show_default=False)]
PlotGpus = Annotated[int, typer.Option(
    "--gpus", help="M, the GPUs that ZeRO/FSDP shard over (8 by default here, so that the "
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
Report = Annotated[Path | None, typer.Option(
    "--report", help=f"validation: a report of `memplan validate` (default {DEFAULT_REPORT}).")]


@command("plot")
def plot(
    kind: Kind, out: Out = None,
    params: o.Params = None, model: o.Model = None, config: o.Config = None,
    as_family: o.AsFamily = None,
    regime: Regimes = None, rank: o.Rank = 8, alpha: o.Alpha = 16.0, targets: o.Targets = "all",
    train_embeddings: o.TrainEmb = False, batch: o.Batch = None, seq: o.Seq = None,
    gpus: PlotGpus = 8, classes: o.Classes = 2, prompt_tokens: o.Prompt = 20,
    optimizer: o.Optim = "adamw", optimizer_impl: o.Impl = "fused",
    checkpointing: o.Ckpt = False, attention: o.Attention = "auto",
    gpu: Gpu = None, memory: Memory = None, axis: Axis = "batch", reserve: o.Reserve = None,
    report: Report = None,
) -> None:
    """Draw a plot of the plans (or of a validation report) and save it as PNG or SVG.

    Takes the model and job options of `estimate`. Examples:
    memplan plot regimes --out regimes.png;
    memplan plot batch --model llama-2-7b --regime qlora --seq 2048 --gpu rtx-4090 --out b.svg
    """
    from memplan import plots

    if kind not in KINDS:
        from memplan.errors import unknown

        raise unknown("plot kind", kind, KINDS)
    if out is None:
        raise MemplanError("give --out FILE ending in .png or .svg, e.g. --out regimes.png")
    path = plots.check_path(out)
    _need_matplotlib()
    model_given = any(v is not None for v in (params, model, config))
    if kind == "validation":
        if model_given:
            raise MemplanError("plot validation draws a report; give --report, not a model")
        fig = plots.validation_figure(report or DEFAULT_REPORT)
        plots.save_figure(fig, path)
        return
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
        fig = _regimes(plots, params, model, config, model_given, job_options, chosen,
                       as_family)
    else:
        job = o.make_job(params, model, config, as_family=as_family, **job_options)
        if kind == "breakdown":
            fig = plots.breakdown_figure(job.spec, job.train, params=job.params, gpu=gpu,
                                         **chosen)
        elif kind == "rank":
            if regime and len(regime) > 1:
                raise MemplanError("plot rank draws one regime; give one --regime (lora, "
                                   "lora-bf16 or qlora)")
            fig = plots.rank_figure(job.spec, job.train, params=job.params,
                                    regime=regime[0] if regime else "lora")
        else:
            fig = plots.batch_figure(job.spec, job.train, _device(gpu, memory), axis=axis,
                                     reserve_bytes=o.parse_reserve(reserve), params=job.params,
                                     **chosen)
    plots.save_figure(fig, path)


def _regimes(plots: Any, params: str | None, model: str | None, config: Path | None,
             model_given: bool, job_options: dict[str, Any], chosen: dict,
             as_family: str | None = None) -> Any:
    """The regimes plot: the model options are optional and only mark a model."""
    if not model_given:
        return plots.regimes_figure(o.make_train(**job_options), **chosen)
    from memplan.params import count_params

    job = o.make_job(params, model, config, as_family=as_family, **job_options)
    return plots.regimes_figure(job.train, mark=(job.spec.name,
                                                 job.params or count_params(job.spec)), **chosen)


def _device(gpu: str | None, memory: str | None) -> Any:
    """The GPU of a batch plot: a catalogue entry or a bare capacity."""
    from memplan.presets import GpuSpec, get_gpu
    from memplan.units import parse_bytes

    if (gpu is None) == (memory is None):
        raise MemplanError("plot batch needs exactly one of --gpu NAME or --memory SIZE (e.g. "
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
