"""``memplan fits``: does one regime fit one GPU? Exit 0 yes, 1 no, 2 bad input.

"Fits" is said only of a job whose step was planned (--batch and --seq). With --seq alone the
answer is the largest batch that fits; without --seq, that the model states fit (or do not).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Any

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
    adapters: o.Adapters = 1,
    dtype: o.Dtype = None, autocast: o.Autocast = "none", grad_accum: o.GradAccum = 1,
    loop: o.Loop = "manual", classes: o.Classes = 2,
    prompt_tokens: o.Prompt = 20,
    optimizer: o.Optim = "adamw", optimizer_impl: o.Impl = "fused",
    checkpointing: o.Ckpt = False, attention: o.Attention = "auto",
    impl: o.ModelImpl = "auto", lora_backend: o.LoraBackend = "auto",
    reserve: o.Reserve = None, json_out: o.Json = False,
) -> None:
    """Answer yes (exit 0) or no (exit 1): does the job fit on one GPU, with what headroom.

    With --batch and --seq the whole step is planned. With --seq alone the answer is the largest
    batch that fits at that sequence length (exit 0 when at least one sequence fits). Without
    --seq only the model states are planned, and the answer says so: exit 0 then means "the
    model states fit", not that the job does. With --gpus G and --shard (or regime zero), the
    GPU is one rank of FSDP over G: rank 0, the fullest.
    """
    from memplan.errors import UnprofiledModel
    from memplan.planner import fits as check
    from memplan.report import print_json

    capacity, label, _ = o.resolve_device(gpu, memory)
    search_only = seq is not None and batch is None
    try:
        job = o.make_job(params, model, config, as_family=as_family,
                         regime=regime, rank=rank, alpha=alpha,
                         targets=targets, train_embeddings=train_embeddings,
                         batch=1 if search_only else batch, seq=seq, gpus=gpus, classes=classes,
                         prompt_tokens=prompt_tokens, optimizer=optimizer,
                         optimizer_impl=optimizer_impl, checkpointing=checkpointing,
                         attention=attention, impl=impl,
                         lora_backend=lora_backend, shard=shard, param_dtype=param_dtype,
                         adapters=adapters, dtype=dtype, autocast=autocast,
                         grad_accum=grad_accum, loop=loop)
    except UnprofiledModel as exc:  # no profile: measured with the [hf] extra, else refused
        from memplan.cli import measured

        raise typer.Exit(measured.fits(exc, json_out, capacity, o.parse_reserve(reserve),
                                       label, search_only=search_only)) from None
    reserve_bytes = o.parse_reserve(reserve)
    result = check(job.spec, job.train, capacity, reserve_bytes, job.params)
    answer = _answer(job, result, search_only, capacity, reserve_bytes)
    options = []
    if answer.mode == "full" and not answer.ok:  # what to change: advise's search, its best
        from memplan.advise import advise_options, fits_command
        from memplan.cli.advise import device_args, source_args

        head = source_args(params, model, config, as_family) + device_args(gpu, memory, reserve)
        options = [{"command": fits_command(job.spec, x.train, head)} | x.to_dict()
                   for x in advise_options(job.spec, job.train, capacity, reserve_bytes,
                                           job.params)[:ADVICE_SHOWN]]
    if json_out:
        print_json(answer.result.to_dict() | answer.json | {"gpu": label,
                                                            "assumed": job.assumed}
                   | ({"options": options} if answer.mode == "full" and not answer.ok else {}))
    else:
        _print(job, answer, regime, gpus, label, capacity)
        _print_options(options)
    raise typer.Exit(0 if answer.ok else 1)


ADVICE_SHOWN = 3  # `memplan advise` lists them all


def _print_options(options: list[dict]) -> None:
    """The best few changes that fit, each with the command that checks it."""
    if not options:
        return
    from memplan.report import console
    from memplan.units import format_bytes

    out = console()
    out.print(f"what to change (the {len(options)} cheapest in compute; `memplan advise` with "
              "the same options lists every one):", markup=False)
    for i, x in enumerate(options, 1):
        what = "; ".join(c["text"] for c in x["changes"])
        out.print(f"{i}. {what}: peak {format_bytes(x['peak_bytes'])}, headroom "
                  f"{format_bytes(x['headroom_bytes'])}, compute {x['relative_compute']:.2f}×",
                  markup=False)
        out.print(f"   {x['command']}", markup=False, soft_wrap=True)


@dataclass(frozen=True)
class _Answer:
    """What ``fits`` answers: the mode, the verdict said on the first line, and its exit."""

    mode: str  # "full", "largest_batch" or "model_states"
    ok: bool  # exit 0
    verdict: str
    result: Any  # the FitResult shown: the job, or the largest batch that fits
    json: dict


def _answer(job, result, search_only: bool, capacity: int, reserve: int) -> _Answer:
    """The verdict of one fits run. A job is said to fit only when its step was planned."""
    train = job.train
    if search_only:
        best = result.max_batch or 0
        shown = result
        if best >= 1:
            from memplan.planner import FitResult, plan

            breakdown = plan(job.spec, replace(train, batch=best), job.params)
            required = breakdown.total_bytes + reserve
            shown = FitResult(True, required, capacity, reserve, capacity - required, best,
                              breakdown)
        per = f" per adapter ({train.adapters} adapters)" if train.adapters > 1 else ""
        verdict = (f"fits up to batch {best}{per} at seq {train.seq}" if best else
                   f"does not fit at seq {train.seq}, not even batch 1")
        return _Answer("largest_batch", best >= 1, verdict, shown, {
            "planned": "largest_batch", "verdict": verdict, "fits": best >= 1,
            "batch": max(best, 1), "seq": train.seq, "activations_included": True})
    if train.has_activations:
        verdict = "fits" if result.fits else "does not fit"
        return _Answer("full", result.fits, verdict, result, {
            "planned": "full", "verdict": verdict, "batch": train.batch, "seq": train.seq,
            "activations_included": True})
    verdict = "model states fit" if result.fits else "model states do not fit"
    # Unplanned activations: a job whose model states fit may still not fit, so "fits" is
    # unknown (null); whose model states do not fit, does not.
    return _Answer("model_states", result.fits, verdict, result, {
        "planned": "model_states", "verdict": verdict,
        "fits": None if result.fits else False, "model_states_fit": result.fits,
        "batch": train.batch, "seq": train.seq, "activations_included": False})


def _print(job, answer: _Answer, regime: str, gpus: int, label: str, capacity: int) -> None:
    """The text answer: the verdict on the first line, in words, then the numbers."""
    from rich.markup import escape

    from memplan.fsdp import is_sharded, strategy
    from memplan.report import console
    from memplan.units import format_bytes

    out = console()
    result, train = answer.result, job.train
    how = ""
    if is_sharded(train):
        how = f" (one of {gpus} GPUs: rank 0 of FSDP {strategy(train)}" + \
            (", bf16 policy)" if train.param_dtype == "bf16" else ")")
    per = f" per adapter, {train.adapters} adapters" if train.adapters > 1 else ""
    shape = f" · batch {train.batch}{per} × seq {train.seq}" if answer.mode == "full" else ""
    colour = "green" if answer.ok else "red"
    verdict = f"[{colour}]{escape(answer.verdict)}[/{colour}]"
    if answer.mode == "model_states":
        verdict += " (activations not planned)"
    out.print(f"{escape(job.spec.name)} · {escape(regime)}{how}{shape} on {escape(label)}: "
              f"{verdict}")
    at = f"at batch {result.max_batch}: " if answer.mode == "largest_batch" and answer.ok else \
        "at batch 1: " if answer.mode == "largest_batch" else ""
    out.print(f"{at}required {format_bytes(result.required_bytes)} (plan "
              f"{format_bytes(result.breakdown.total_bytes)} + reserve "
              f"{format_bytes(result.reserve_bytes)}) of {format_bytes(capacity)}; "
              f"headroom {format_bytes(result.headroom_bytes)}", markup=False)
    for note in result.breakdown.notes:  # what the plan labels an approximation
        if note.startswith("approximation:"):
            out.print(f"[yellow]{escape(note)}[/yellow]")
    if answer.mode == "model_states":
        out.print("give --batch and --seq to plan the whole step, or --seq alone for the "
                  "largest batch that fits", markup=False)
