"""``memplan advise``: what to change so that the job fits, ranked by compute per step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memplan.cli import options as o
from memplan.cli.app import command


def source_args(params: str | None, model: str | None, config: Path | None,
                as_family: str | None) -> list[str]:
    """The model flags as the user gave them, for the ``memplan fits`` lines."""
    if model is not None:
        out = ["--model", model]
    elif config is not None:
        out = ["--config", str(config)]
    else:
        out = ["--params", str(params)]
    return out + (["--as", as_family] if as_family is not None else [])


def device_args(gpu: str | None, memory: str | None, reserve: str | None) -> list[str]:
    """The GPU and reserve flags as the user gave them."""
    out = ["--gpu", gpu] if gpu is not None else ["--memory", str(memory)]
    return out + (["--reserve", reserve] if reserve is not None else [])


@command("advise")
def advise(
    params: o.Params = None, model: o.Model = None, config: o.Config = None,
    as_family: o.AsFamily = None,
    regime: Annotated[str, typer.Option("--regime", help="The regime you plan to run.")
                      ] = "lora",
    gpu: Annotated[str | None, typer.Option("--gpu", help="A GPU of `memplan gpus`.")] = None,
    memory: Annotated[str | None, typer.Option(
        "--memory", help="Capacity instead of --gpu, e.g. 24GiB or 80GB.")] = None,
    rank: o.Rank = 8, alpha: o.Alpha = 16.0, targets: o.Targets = "all",
    train_embeddings: o.TrainEmb = False, batch: o.Batch = None, seq: o.Seq = None,
    gpus: o.Gpus = 1, shard: o.Shard = "none", param_dtype: o.ParamDtype = "fp32",
    adapters: o.Adapters = 1,
    dtype: o.Dtype = None, autocast: o.Autocast = "none", grad_accum: o.GradAccum = 1,
    loop: o.Loop = "manual",
    classes: o.Classes = 2, prompt_tokens: o.Prompt = 20,
    optimizer: o.Optim = "adamw", optimizer_impl: o.Impl = "fused",
    checkpointing: o.Ckpt = False, attention: o.Attention = "auto",
    impl: o.ModelImpl = "auto", lora_backend: o.LoraBackend = "auto",
    reserve: o.Reserve = None,
    mfu: Annotated[float, typer.Option(
        "--mfu", help="Model FLOPs utilization for the step times, a fraction (0.4 = 40% of "
        "the GPU's peak).")] = 0.4,
    max_gpus: Annotated[int, typer.Option(
        "--max-gpus", help="Search FSDP over up to this many GPUs (powers of two).")] = 8,
    min_seq: Annotated[int, typer.Option(
        "--min-seq", help="Shorten the sequence (halving, only when nothing fits at yours) "
        "down to this many tokens.")] = 128,
    top: Annotated[int, typer.Option(
        "--top", help="Options shown in the text (the JSON has all of them).")] = 10,
    json_out: o.Json = False,
) -> None:
    """What to change so that the job fits: the options that fit, cheapest compute first.

    Searches a 16-bit or NF4 base (for full fine-tuning: bf16 autocast, the notes' mixed
    recipe, pure bf16), activation checkpointing, a lower LoRA rank and attention-only targets,
    8-bit AdamW, a loop that drops the outputs before backward, a smaller micro-batch with
    gradient accumulation (planned), FSDP over more GPUs and, when nothing else fits, a shorter
    sequence. Each option comes with the `memplan fits` line that plans the same bytes. Exit 0
    when some option fits, 1 when none does, 2 on bad input.
    """
    import math
    import sys
    from contextlib import nullcontext

    from memplan.advise import (
        NOT_SEARCHED,
        advise_options,
        fits_command,
        gpu_peak_flops,
        job_option,
    )
    from memplan.errors import MemplanError, UnprofiledModel
    from memplan.report import print_json, progress

    capacity, label, gpu_name = o.resolve_device(gpu, memory, "rtx-4090")
    if batch is None or seq is None:
        raise MemplanError("advise plans the whole step: give --batch and --seq (e.g. --batch "
                           "4 --seq 2048)")
    if not (math.isfinite(mfu) and 0 < mfu <= 1):
        raise MemplanError(f"--mfu must be a fraction in (0, 1], got {mfu!r}; e.g. --mfu 0.4")
    for flag, value in (("--max-gpus", max_gpus), ("--min-seq", min_seq), ("--top", top)):
        if value < 1:
            raise MemplanError(f"{flag} must be at least 1, got {value}")
    peaks = gpu_peak_flops(gpu_name) if gpu_name is not None else {}
    try:
        job = o.make_job(params, model, config, as_family=as_family, regime=regime, rank=rank,
                         alpha=alpha, targets=targets, train_embeddings=train_embeddings,
                         batch=batch, seq=seq, gpus=gpus, classes=classes,
                         prompt_tokens=prompt_tokens, optimizer=optimizer,
                         optimizer_impl=optimizer_impl, checkpointing=checkpointing,
                         attention=attention, impl=impl, lora_backend=lora_backend,
                         shard=shard, param_dtype=param_dtype, adapters=adapters,
                         dtype=dtype, autocast=autocast,
                         grad_accum=grad_accum, loop=loop)
    except UnprofiledModel as exc:
        raise MemplanError(f"advise searches planned jobs, and this model is measured, not "
                           f"planned: {exc}") from None
    reserve_bytes = o.parse_reserve(reserve)
    head = source_args(params, model, config, as_family) + device_args(gpu, memory, reserve)
    user = job_option(job.spec, job.train, capacity, reserve_bytes, job.params)
    with progress() if sys.stderr.isatty() else nullcontext() as bar:
        task = bar.add_task("searching", total=None) if bar is not None else None

        def tick(done: int, total: int) -> None:
            if task is not None:
                bar.update(task, completed=done, total=total)

        found = advise_options(job.spec, job.train, capacity, reserve_bytes, job.params,
                               max_gpus=max_gpus, min_seq=min_seq, on_progress=tick)

    def row(option) -> dict:
        peak = peaks.get("bf16" if option.compute_bytes == 2 else "fp32")
        seconds = option.step_seconds(peak[0] if peak else None, mfu)
        return {"command": fits_command(job.spec, option.train, head)} | option.to_dict() | {
            "step_seconds": None if seconds is None else round(seconds, 4)}

    if json_out:
        print_json({
            "model": job.spec.name, "assumed": job.assumed, "gpu": label,
            "capacity_bytes": capacity, "reserve_bytes": reserve_bytes,
            "fits": user.required_bytes <= capacity, "job": row(user),
            "options": [row(x) for x in found],
            "mfu": mfu, "peak_flops": {k: {"flops": v[0], "source": v[1]}
                                       for k, v in peaks.items()},
            "searched": {"max_gpus": max_gpus, "min_seq": min_seq},
            "not_searched": list(NOT_SEARCHED),
        })
        raise typer.Exit(0 if found else 1)
    _print(job, user, found, label, capacity, reserve_bytes, peaks, mfu, top, row)
    raise typer.Exit(0 if found else 1)


def _print(job, user, found, label, capacity, reserve_bytes, peaks, mfu, top, row) -> None:
    """The human answer: the verdict on the job, the options, what was not searched."""
    from memplan.advise import NOT_SEARCHED
    from memplan.report import console
    from memplan.units import format_bytes

    out = console()

    def say(text: str = "", style: str | None = None) -> None:
        out.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    t = job.train
    what = t.regime + (f" (rank {t.lora.rank}, targets {t.lora.targets})"
                       if t.recipe.lora else "")
    fits_now = user.required_bytes <= capacity
    say(f"{job.spec.name} · {what} · batch {t.batch} × seq {t.seq}"
        + (f" · {t.gpus} GPUs" if t.gpus > 1 else "") + f" on {label}: "
        + ("fits as it is" if fits_now else "does not fit"),
        "green" if fits_now else "red")
    say(f"required {format_bytes(user.required_bytes)} (plan {format_bytes(user.peak_bytes)} "
        f"+ reserve {format_bytes(reserve_bytes)}) of {format_bytes(capacity)}; headroom "
        f"{format_bytes(user.headroom_bytes)}")
    if not found:
        say("no option found: nothing searched fits (see --max-gpus and --min-seq)", "red")
    else:
        say(f"{len(found)} option{'s' * (len(found) != 1)} fit, cheapest compute per trained "
            f"token first (compute relative to your job; FLOPs: PaLM appendix B, nanoGPT's "
            f"estimate_mfu):")
    for i, option in enumerate(found[:top], 1):
        data = row(option)
        changes = "; ".join(c.text for c in option.changes) or "your job as it is"
        say()
        say(f"{i}. {changes}", "bold")
        step = data["step_seconds"]
        timing = f" · step {step:.2f} s at {100 * mfu:g}% MFU" if step is not None else ""
        say(f"   peak {format_bytes(option.peak_bytes)} · headroom "
            f"{format_bytes(option.headroom_bytes)} · compute {option.relative_compute:.2f}×"
            f"{timing} · {option.tokens_per_step:,} tokens per step")
        say(f"   {data['command']}", "cyan")
    if len(found) > top:
        say()
        say(f"… and {len(found) - top} more (--top {len(found)} or --json)")
    say()
    if peaks:
        for dtype, (flops, source) in peaks.items():
            say(f"step times: {100 * mfu:g}% of {flops / 1e12:g} TFLOPS dense {dtype} "
                f"({source})")
        if any(o.compute_bytes == 4 for o in found[:top]):
            say("no step times for fp32 compute (an fp32 base, memplan's mixed recipe): the "
                "catalogue has no fp32 peak")
    else:
        say("no step times: no peak FLOPS for this GPU in the catalogue")
    say("compute counts FLOPs: the lower utilization of a small micro-batch and FSDP's "
        "communication are not in it")
    if any(o.train.recipe.nf4 for o in found):
        say("QLoRA dequantises its NF4 weights on every use: slower than its FLOPs say")
    shown = [o.train.recipe for o in found[:top]]
    if any(r.eight_bit for r in shown):
        say("adamw-8bit is bitsandbytes' AdamW8bit (pip install bitsandbytes); --optimizer "
            "paged-adamw-8bit plans the same bytes on the GPU and lets its states page out to "
            "host memory under pressure")
    if any(r.loop == "trainer" and t.loop != "trainer" for r in shown):
        say("loop trainer: the Hugging Face Trainer frees the model's outputs before backward; "
            "a hand-written loop does the same with `loss = out.loss; del out` before "
            "`loss.backward()`")
    if "bf16" not in peaks and t.recipe.compute != "bf16" \
            and any(r.compute == "bf16" for r in shown):
        say("bf16 needs an Ampere or newer GPU (T4 and V100 have none: --autocast fp16 there)")
    say("not searched yet: " + "; ".join(NOT_SEARCHED))
