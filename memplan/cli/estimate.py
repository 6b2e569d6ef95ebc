"""``memplan estimate``: every regime's plan for one model and job, instantly, without torch."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

import typer

from memplan.cli import options as o
from memplan.cli.app import command


@command("estimate")
def estimate(
    params: o.Params = None, model: o.Model = None, config: o.Config = None,
    as_family: o.AsFamily = None,
    rank: o.Rank = 8, alpha: o.Alpha = 16.0, targets: o.Targets = "all",
    train_embeddings: o.TrainEmb = False, batch: o.Batch = None, seq: o.Seq = None,
    gpus: o.Gpus = 1, classes: o.Classes = 2, prompt_tokens: o.Prompt = 20,
    optimizer: o.Optim = "adamw", optimizer_impl: o.Impl = "fused",
    checkpointing: o.Ckpt = False, attention: o.Attention = "auto",
    impl: o.ModelImpl = "auto", lora_backend: o.LoraBackend = "auto",
    regime: Annotated[list[str] | None, typer.Option(
        "--regime", help="Only these regimes (repeatable); default: all of them.")] = None,
    shard: o.Shard = "none", param_dtype: o.ParamDtype = "fp32",
    adapters: o.Adapters = 1,
    dtype: o.Dtype = None, autocast: o.Autocast = "none", grad_accum: o.GradAccum = 1,
    loop: o.Loop = "manual",
    reserve: o.Reserve = None, json_out: o.Json = False,
) -> None:
    """Plan every training regime: the notes' formula, the peak, its breakdown, the GPUs it fits.

    Notation: N is the model's parameters, M the LoRA parameters, G the GPUs (--gpus). Without
    --batch and --seq the plan holds model states only (activations excluded). With --gpus G > 1,
    zero is FSDP per GPU (gather buffers included) and the mixed recipe and LoRA are shown
    sharded too; --shard shards every regime that FSDP can.
    """
    from rich.markup import escape

    from memplan.errors import MemplanError, UnprofiledModel
    from memplan.params import bias_params, count_params, lora_params
    from memplan.planner import plan
    from memplan.presets import gpus as gpu_catalogue
    from memplan.recipe import choices_text, preset
    from memplan.report import architecture_dict, console, estimate_table, print_json, symbols_line
    from memplan.sharing import sharing
    from memplan.spec import REGIMES

    try:
        job = o.make_job(params, model, config, as_family=as_family,
                         rank=rank, alpha=alpha, targets=targets,
                         train_embeddings=train_embeddings, batch=batch, seq=seq, gpus=gpus,
                         classes=classes, prompt_tokens=prompt_tokens, optimizer=optimizer,
                         optimizer_impl=optimizer_impl, checkpointing=checkpointing,
                         attention=attention, impl=impl,
                         lora_backend=lora_backend, adapters=adapters,
                         dtype=None, autocast="none",
                         grad_accum=grad_accum, loop=loop,
                         regime="full" if adapters == 1 else "lora")
    except UnprofiledModel as exc:  # no profile: measured with the [hf] extra, else refused
        from memplan.cli import measured

        measured.estimate(exc, json_out, regime)
        return
    reserve_bytes = o.parse_reserve(reserve)
    # By default, every regime that makes sense for the model and optimizer: BitFit needs
    # biases, and the ZeRO stages follow the paper's Adam accounting.
    wanted = regime or [r for r in REGIMES
                        if (adapters == 1 or r in ("lora", "lora-bf16"))
                        and (r != "bitfit" or bias_params(job.spec))
                        and (r not in ("zero1", "zero2", "zero3") or optimizer == "adamw")]
    for name in wanted:
        preset(name)  # validates the name
    n = job.params or count_params(job.spec)
    m = lora_params(job.spec, job.train.lora)
    catalogue = gpu_catalogue()
    rows, results = [], {}
    if param_dtype != "fp32" and gpus < 2:
        raise MemplanError(f"--param-dtype {param_dtype} is FSDP's mixed-precision policy: add "
                           "--gpus 2 or more")
    skipped: dict[str, str] = {}
    shared_lines: list[str] = []
    for label, train in _variants(job.train, wanted, shard, param_dtype, dtype, autocast):
        try:
            if isinstance(train, MemplanError):  # the choices do not combine with it
                raise train
            breakdown = plan(job.spec, train, job.params)
        except MemplanError as exc:  # a regime this model cannot run: say why, plan the rest
            if regime:
                raise
            skipped[label] = str(exc)
            continue
        fits_on = [g.name for g in catalogue.values()
                   if breakdown.total_bytes + reserve_bytes <= g.capacity_bytes]
        rows.append((label, breakdown, fits_on))
        results[label] = breakdown.to_dict() | {"fits_on": fits_on}
        shared = sharing(job.spec, train, breakdown.total_bytes, job.params)
        if shared is not None:  # --adapters K: K separate jobs = K × the single-adapter plan
            results[label]["sharing"] = shared.to_dict()
            shared_lines.append(f"{label}: {shared.line()}")
    if not rows:  # nothing this model can run: the first reason is the answer
        raise MemplanError(next(iter(skipped.values())))
    if json_out:
        print_json({"params": n, "lora_params": m, "assumed": job.assumed,
                    "architecture": architecture_dict(job.spec),
                    "train": _train_dict(job.train), "reserve_bytes": reserve_bytes,
                    "regimes": results, "skipped": skipped})
        return
    out = console()
    out.print(f"[bold]{escape(job.spec.name)}[/bold]: {escape(job.assumed)}")
    out.print(symbols_line({"N": n, "M": m}) + f"  (LoRA rank {rank} on {targets}; "
              "N: model parameters, M: LoRA parameters, G: GPUs)", markup=False)
    if job.train.has_activations:
        per = f" per adapter, {adapters} adapters: {batch * adapters} samples" \
            if adapters > 1 else ""
        out.print(f"activations for batch {batch}{per} × seq {seq}, {job.train.attention} "
                  "attention"
                  + (", checkpointing" if checkpointing else ""))
    else:
        out.print("[yellow]activations excluded[/yellow]: model states only, the notes' "
                  "formulas; add --batch and --seq to plan activations")
    if gpus > 1:
        out.print(f"over G = {gpus} GPUs: zero and the "
                  f"'· {shard if shard != 'none' else 'full-shard'}'"
                  " rows are FSDP per GPU (rank 0, the fullest); the others replicate the "
                  "model on every GPU")
    title = choices_text(job.train, dtype=dtype, autocast=autocast)
    out.print(estimate_table(f"peak memory per GPU ({title})", rows))
    for line in shared_lines:
        out.print(line, markup=False)
    for label, breakdown, _ in rows:  # what a plan labels an approximation
        for note in breakdown.notes:
            if note.startswith("approximation:"):
                out.print(f"{label}: {note}", markup=False)
    for label, why in skipped.items():
        out.print(f"not planned: {label}: {why}", markup=False)
    out.print(f"fits on: after a runtime reserve of {reserve_bytes / 2**30:.2f} GiB per GPU "
              "(--reserve); see `memplan gpus` for capacities")


def _variants(train, wanted: list[str], shard: str, param_dtype: str = "fp32",
              dtype: str | None = None, autocast: str = "none") -> list[tuple[str, object]]:
    """(label, TrainSpec) of each row: every wanted regime; over several GPUs, FSDP variants
    of the mixed recipe and LoRA beside them (or, with --shard, every shardable regime
    sharded in place). FSDP's bf16 policy applies to the sharded rows (not to mixed, the
    notes' own bf16 recipe). A row whose choices do not combine holds the error instead."""
    from memplan.errors import MemplanError
    from memplan.fsdp import SHARDABLE_REGIMES

    def made(label: str, base, **changes):
        try:
            return label, replace(base, **changes)
        except MemplanError as exc:
            return label, exc

    def sharded(plain, how: str, name: str):
        policy = param_dtype if name != "mixed" else "fp32"
        label = f"{name} · {how}" + (" · bf16" if policy != "fp32" else "")
        return made(label if name != "zero" or policy != "fp32" else name, plain, shard=how,
                    param_dtype=policy)

    rows = []
    for name in wanted:
        label, plain = made(name, train, regime=name, param_dtype="fp32", dtype=dtype,
                            autocast=autocast)
        if isinstance(plain, MemplanError):
            rows.append((label, plain))
            continue
        if shard != "none" and name in SHARDABLE_REGIMES:
            rows.append(sharded(plain, shard, name))
            continue
        if name == "zero" and train.gpus > 1:
            rows.append(sharded(plain, "full-shard", name))
            continue
        rows.append(made(name, plain, shard="none"))
        if train.gpus > 1 and shard == "none" and name in ("mixed", "lora"):
            rows.append(sharded(plain, "full-shard", name))
    return rows


def _train_dict(train) -> dict:
    from dataclasses import asdict

    d = asdict(train)
    if d["adapters"] == 1:  # one adapter: the JSON as before multi-adapter training
        del d["adapters"]
    d["lora"]["targets"] = train.lora.targets if isinstance(train.lora.targets, str) \
        else list(train.lora.targets)
    return d
