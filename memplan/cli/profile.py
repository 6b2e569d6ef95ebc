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
    regime: Annotated[str, typer.Option("--regime", help="The regime to run.")] = "lora",
    rank: o.Rank = 8, alpha: o.Alpha = 16.0, targets: o.Targets = "all",
    train_embeddings: o.TrainEmb = False, batch: o.Batch = 1, seq: o.Seq = 128,
    classes: o.Classes = 2, prompt_tokens: o.Prompt = 20,
    optimizer: o.Optim = "adamw", optimizer_impl: o.Impl = "fused",
    checkpointing: o.Ckpt = False, attention: o.Attention = "sdpa",
    impl: o.ModelImpl = "memplan", lora_backend: o.LoraBackend = "memplan",
    device: Device = "auto",
    steps: Annotated[int, typer.Option("--steps", help="Steady-state steps after warm-up.")] = 2,
    capacity: Annotated[str | None, typer.Option(
        "--capacity", help="Simulate a device of this size, e.g. 24GiB: a run whose live "
        "tensors outgrow it stops and reports 'does not fit' (exit 1).")] = None,
    json_out: o.Json = False,
) -> None:
    """Build the model, apply the regime, run real steps, and compare the peak with the plan."""
    from memplan.errors import MemplanError
    from memplan.units import parse_bytes

    job = o.make_job(None, model, config, regime=regime, rank=rank, alpha=alpha,
                     targets=targets, train_embeddings=train_embeddings, batch=batch, seq=seq,
                     classes=classes, prompt_tokens=prompt_tokens, optimizer=optimizer,
                     optimizer_impl=optimizer_impl, checkpointing=checkpointing,
                     attention=attention, impl=impl,
                     lora_backend=lora_backend)
    if not 1 <= steps <= MAX_STEPS:
        raise MemplanError(f"--steps must be 1 to {MAX_STEPS}, got {steps}; the peak is "
                           "steady after one step")
    capacity_bytes = None if capacity is None else parse_bytes(capacity, "--capacity")
    need_torch()
    from memplan.profile.compare import profile as run
    from memplan.report import console, print_json, profile_table

    result = run(job.spec, job.train, device=device, steps=steps, capacity_bytes=capacity_bytes)
    if json_out:
        print_json(result.to_dict())
    else:
        console().print(profile_table(result))
    if not result.measured.fits:
        raise typer.Exit(1)
