"""``memplan fits``: does one regime fit one GPU? Exit 0 yes, 1 no, 2 bad input."""

from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli import options as o
from memplan.cli.app import command


@command("fits")
def fits(
    params: o.Params = None, model: o.Model = None, config: o.Config = None,
    as_family: o.AsFamily = None,
    regime: Annotated[str, typer.Option("--regime", help="The regime to check.")] = "lora",
    gpu: Annotated[str | None, typer.Option("--gpu", help="A GPU of `memplan gpus`.")] = None,
    memory: Annotated[str | None, typer.Option(
        "--memory", help="Capacity instead of --gpu, e.g. 24GiB or 80GB.")] = None,
    rank: o.Rank = 8, alpha: o.Alpha = 16.0, targets: o.Targets = "all",
    train_embeddings: o.TrainEmb = False, batch: o.Batch = None, seq: o.Seq = None,
    gpus: o.Gpus = 1, shard: o.Shard = "none", param_dtype: o.ParamDtype = "fp32",
    classes: o.Classes = 2,
    prompt_tokens: o.Prompt = 20,
    optimizer: o.Optim = "adamw", optimizer_impl: o.Impl = "fused",
    checkpointing: o.Ckpt = False, attention: o.Attention = "auto",
    impl: o.ModelImpl = "auto", lora_backend: o.LoraBackend = "auto",
    reserve: o.Reserve = None, json_out: o.Json = False,
) -> None:
    """Answer yes (exit 0) or no (exit 1): does the job fit on one GPU, with what headroom.

    With --seq, also the largest batch that fits (give --seq alone to search it). With
    --gpus M and --shard (or regime zero), the GPU is one rank of FSDP over M: rank 0, the
    fullest.
    """
    from memplan.errors import MemplanError, UnprofiledModel
    from memplan.planner import fits as check
    from memplan.presets import get_gpu
    from memplan.report import console, print_json
    from memplan.units import format_bytes, parse_bytes

    if (gpu is None) == (memory is None):
        raise MemplanError("give exactly one of --gpu NAME or --memory SIZE (e.g. --gpu "
                           "a100-80gb or --memory 24GiB)")
    if gpu is not None:
        device = get_gpu(gpu)
        capacity, label = device.capacity_bytes, device.label
    else:
        capacity, label = parse_bytes(memory, "--memory"), f"{memory} of memory"
    search_only = seq is not None and batch is None
    try:
        job = o.make_job(params, model, config, as_family=as_family,
                         regime=regime, rank=rank, alpha=alpha,
                         targets=targets, train_embeddings=train_embeddings,
                         batch=1 if search_only else batch, seq=seq, gpus=gpus, classes=classes,
                         prompt_tokens=prompt_tokens, optimizer=optimizer,
                         optimizer_impl=optimizer_impl, checkpointing=checkpointing,
                         attention=attention, impl=impl,
                         lora_backend=lora_backend, shard=shard, param_dtype=param_dtype)
    except UnprofiledModel as exc:  # no profile: measured with the [hf] extra, else refused
        from memplan.cli import measured

        raise typer.Exit(measured.fits(exc, json_out, capacity, o.parse_reserve(reserve),
                                       label)) from None
    result = check(job.spec, job.train, capacity, o.parse_reserve(reserve), job.params)
    if json_out:
        print_json(result.to_dict() | {"gpu": label, "assumed": job.assumed})
    else:
        out = console()
        verdict = "[green]fits[/green]" if result.fits else "[red]does not fit[/red]"
        from memplan.fsdp import is_sharded, strategy

        how = ""
        if is_sharded(job.train):
            how = f" (one of {gpus} GPUs: rank 0 of FSDP {strategy(job.train)}" + \
                (", bf16 policy)" if job.train.param_dtype == "bf16" else ")")
        out.print(f"{job.spec.name} · {regime}{how} on {label}: {verdict}")
        out.print(f"required {format_bytes(result.required_bytes)} (plan "
                  f"{format_bytes(result.breakdown.total_bytes)} + reserve "
                  f"{format_bytes(result.reserve_bytes)}) of {format_bytes(capacity)}; "
                  f"headroom {format_bytes(result.headroom_bytes)}")
        if result.max_batch is not None:
            out.print(f"largest batch that fits at seq {seq}: {result.max_batch}")
    raise typer.Exit(0 if result.fits else 1)
