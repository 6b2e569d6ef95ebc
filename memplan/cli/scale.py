"""``memplan scale``: the fewest GPUs that fit each regime, and the per-GPU plan for each G."""

from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli import options as o
from memplan.cli.app import command


@command("scale")
def scale(
    params: o.Params = None, model: o.Model = None, config: o.Config = None,
    as_family: o.AsFamily = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="A GPU of `memplan gpus`.")] = None,
    memory: Annotated[str | None, typer.Option(
        "--memory", help="Capacity per GPU instead of --gpu, e.g. 80GB.")] = None,
    regime: Annotated[list[str] | None, typer.Option(
        "--regime", help="Regimes to scale (repeatable): zero, full, mixed, lora, lora-bf16, "
        "bitfit (FSDP), zero1, zero2, zero3 (the ZeRO paper). Default: zero, mixed, lora.")
        ] = None,
    shard: Annotated[str, typer.Option(
        "--shard", help="FSDP strategy: full-shard or shard-grad-op.")] = "full-shard",
    param_dtype: o.ParamDtype = "fp32",
    max_gpus: Annotated[int, typer.Option(
        "--max-gpus", help="Search up to this many GPUs.")] = 1024,
    per_node: Annotated[int, typer.Option(
        "--gpus-per-node", help="GPUs per node: counts beyond one node are whole nodes.")] = 8,
    rank: o.Rank = 8, alpha: o.Alpha = 16.0, targets: o.Targets = "all",
    train_embeddings: o.TrainEmb = False, batch: o.Batch = None, seq: o.Seq = None,
    optimizer: o.Optim = "adamw", optimizer_impl: o.Impl = "fused",
    checkpointing: o.Ckpt = False, attention: o.Attention = "auto",
    reserve: o.Reserve = None, json_out: o.Json = False,
) -> None:
    """The fewest GPUs that fit each regime, and the per-GPU memory for each GPU count.

    Per GPU is rank 0's plan (the fullest): padded FSDP shards and the gathered units;
    with --batch and --seq, also the activations of each GPU's micro-batch.
    """
    from rich.markup import escape

    from memplan.errors import MemplanError, unknown
    from memplan.report import console, print_json, scale_table
    from memplan.scaling import DEFAULT_REGIMES, check_scalable
    from memplan.scaling import scale as run
    from memplan.spec import PARAM_DTYPES
    from memplan.units import format_bytes

    capacity, label, _ = o.resolve_device(gpu, memory, "h100-80gb")
    if memory is not None:
        label = f"{memory} GPUs"
    if shard not in ("full-shard", "shard-grad-op"):
        raise MemplanError(f"--shard must be full-shard or shard-grad-op, got {shard!r}")
    regimes = regime or list(DEFAULT_REGIMES)
    for name in regimes:
        check_scalable(name)
    job = o.make_job(params, model, config, as_family=as_family,
                     rank=rank, alpha=alpha, targets=targets,
                     train_embeddings=train_embeddings, batch=batch, seq=seq,
                     optimizer=optimizer, optimizer_impl=optimizer_impl,
                     checkpointing=checkpointing, attention=attention)
    if param_dtype not in PARAM_DTYPES:  # TrainSpec's own check, before any plan
        raise unknown("FSDP parameter dtype", param_dtype, PARAM_DTYPES)
    reserve_bytes = o.parse_reserve(reserve)
    results = [run(job.spec, job.train, name, capacity, reserve_bytes, max_gpus, per_node, shard,
                   param_dtype) for name in regimes]
    if json_out:
        print_json({"model": job.spec.name, "gpu": label, "capacity_bytes": capacity,
                    "reserve_bytes": reserve_bytes, "shard": shard, "max_gpus": max_gpus,
                    "gpus_per_node": per_node, "activations_included": job.train.has_activations,
                    "regimes": {r.regime: r.to_dict(capacity, reserve_bytes) for r in results}})
        return
    out = console()
    out.print(f"[bold]{escape(job.spec.name)}[/bold] on {escape(label)} "
              f"({format_bytes(capacity)} each, "
              f"{format_bytes(reserve_bytes)} reserve): FSDP {shard}, {per_node} GPUs per node")
    if not job.train.has_activations:
        out.print("[yellow]activations excluded[/yellow]: add --batch and --seq (per GPU)")
    out.print(scale_table(results, capacity, reserve_bytes))
    for r in results:
        if r.fewest is None:
            out.print(f"{r.regime}: does not fit on {max_gpus} GPUs or fewer")
            continue
        nodes = "" if r.fewest <= per_node else f" ({r.fewest // per_node} nodes)"
        out.print(f"{r.regime}: fewest GPUs [bold]{r.fewest}[/bold]{nodes}, "
                  f"{format_bytes(r.fewest_plan.total_bytes)} per GPU")
