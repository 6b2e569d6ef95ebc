"""``memplan profile``: run real training steps and hold the measured peak against the plan."""

from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli import options as o
from memplan.cli.app import command

Device = Annotated[str, typer.Option(
    "--device", help="auto (cuda if present), cuda, cpu (tensor-storage tracker) or fake "
    "(the same tracker under FakeTensorMode: any size, no memory used).")]

MAX_STEPS = 100  # steady-state steps: the peak repeats from the first; more only takes longer


def need_torch() -> None:
    """Say what to install when the [torch] extra is missing."""
    try:
        import torch  # noqa: F401
    except ImportError:
        from memplan.errors import MemplanError

        raise MemplanError("profiling needs PyTorch: pip install 'memplan[torch]'") from None


@command("profile")
def profile(
    model: o.Model = None, config: o.Config = None,
    as_family: o.AsFamily = None,
    regime: Annotated[str, typer.Option("--regime", help="The regime to run.")] = "lora",
    rank: o.Rank = 8, alpha: o.Alpha = 16.0, targets: o.Targets = "all",
    train_embeddings: o.TrainEmb = False, batch: o.Batch = 1, seq: o.Seq = 128,
    classes: o.Classes = 2, prompt_tokens: o.Prompt = 20,
    optimizer: o.Optim = "adamw", optimizer_impl: o.Impl = "fused",
    checkpointing: o.Ckpt = False, attention: o.Attention = "auto",
    impl: o.ModelImpl = "auto", lora_backend: o.LoraBackend = "auto",
    device: Device = "auto",
    steps: Annotated[int, typer.Option("--steps", help="Steady-state steps after warm-up.")] = 2,
    capacity: Annotated[str | None, typer.Option(
        "--capacity", help="Simulate a device of this size, e.g. 24GiB: a run whose live "
        "tensors outgrow it stops and reports 'does not fit' (exit 1).")] = None,
    nproc: Annotated[int | None, typer.Option(
        "--nproc", help="Shard with FSDP2 over this many ranks: processes on gloo (cpu), one "
        "per GPU on NCCL (cuda), or the fake process group in one process (fake, any number)."
        )] = None,
    shard: o.Shard = "none", param_dtype: o.ParamDtype = "fp32", adapters: o.Adapters = 1,
    dtype: o.Dtype = None, autocast: o.Autocast = "none", grad_accum: o.GradAccum = 1,
    loop: o.Loop = "manual",
    gpus: Annotated[int | None, typer.Option(
        "--gpus", help="The GPUs planned; with --nproc it must be the same number.")] = None,
    json_out: o.Json = False,
) -> None:
    """Build the model, apply the regime, run real steps, and compare the peak with the plan.

    With --nproc N, the model is sharded with FSDP2 (fully_shard per block, then the root)
    over N ranks and every rank's peak is held against that rank's plan.
    """
    from memplan.errors import MemplanError, UnprofiledModel
    from memplan.units import parse_bytes

    try:
        job = o.make_job(None, model, config, as_family=as_family,
                         regime=regime, rank=rank, alpha=alpha,
                         targets=targets, train_embeddings=train_embeddings, batch=batch, seq=seq,
                         classes=classes, prompt_tokens=prompt_tokens, optimizer=optimizer,
                         optimizer_impl=optimizer_impl, checkpointing=checkpointing,
                         attention=attention, impl=impl,
                         lora_backend=lora_backend, shard=shard, param_dtype=param_dtype,
                         adapters=adapters, dtype=dtype, autocast=autocast,
                         grad_accum=grad_accum, loop=loop)
    except UnprofiledModel as exc:  # no profile: the dry run is the measurement, fake only
        if device not in ("fake", "auto") or nproc not in (None, 1):
            raise MemplanError(f"model_type {exc.cfg.get('model_type')!r} has no profile: "
                               "memplan measures it in fake mode only; use --device fake "
                               "without --nproc") from None
        from memplan.cli import measured

        measured.profile(exc, json_out)
        return
    if gpus is not None and gpus != (nproc or 1):
        raise MemplanError(f"--gpus {gpus} does not match --nproc {nproc or 1}: a profile plans "
                           "the ranks it runs; give the same number (or only --nproc)")
    if nproc is not None and nproc < 1:
        raise MemplanError(f"--nproc must be at least 1, got {nproc}")
    sharded = nproc is not None and nproc > 1
    if (shard != "none" or param_dtype != "fp32") and not sharded:
        flag = f"--shard {shard}" if shard != "none" else f"--param-dtype {param_dtype}"
        raise MemplanError(f"{flag} needs ranks to shard over: add --nproc 2 or more")
    if not 1 <= steps <= MAX_STEPS:
        raise MemplanError(f"--steps must be 1 to {MAX_STEPS}, got {steps}; the peak is "
                           "steady after one step")
    capacity_bytes = None if capacity is None else parse_bytes(capacity, "--capacity")
    need_torch()
    if sharded:
        _profile_sharded(job, nproc, device, steps, capacity_bytes, json_out)
        return
    from memplan.profile.compare import profile as run
    from memplan.report import console, print_json, profile_table

    result = run(job.spec, job.train, device=device, steps=steps, capacity_bytes=capacity_bytes)
    if json_out:
        print_json(result.to_dict())
    else:
        console().print(profile_table(result))
    if not result.measured.fits:
        raise typer.Exit(1)


def _profile_sharded(job, nproc: int, device: str, steps: int, capacity_bytes: int | None,
                     json_out: bool) -> None:
    from memplan.profile.compare import profile_sharded
    from memplan.report import console, print_json, sharded_table

    result = profile_sharded(job.spec, job.train, nproc, device=device, steps=steps,
                             capacity_bytes=capacity_bytes)
    if json_out:
        print_json(result.to_dict())
    else:
        console().print(sharded_table(result))
    if not result.fits:
        raise typer.Exit(1)
