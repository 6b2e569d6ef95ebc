"""Options shared by the commands, and turning them into a ModelSpec and a TrainSpec."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from memplan.errors import MemplanError, UnprofiledModel
from memplan.spec import LoraSpec, ModelSpec, TrainSpec

Params = Annotated[str | None, typer.Option(
    "--params", help="Parameter count N, e.g. 7e9, 7B or 350M; assumes a Llama-2-style shape.")]
Model = Annotated[str | None, typer.Option(
    "--model", "-m", help="A preset architecture (see `memplan models`), e.g. llama-2-7b.")]
Config = Annotated[Path | None, typer.Option(
    "--config", help="A Hugging Face config.json of a supported model_type (`memplan models` "
    "lists them).")]
AsFamily = Annotated[str | None, typer.Option(
    "--as", help="Plan a config whose model_type has no profile as this one (e.g. llama); "
    "the answer is labelled an approximation.")]
Rank = Annotated[int, typer.Option("--rank", "-r", help="LoRA rank R.")]
Alpha = Annotated[float, typer.Option("--alpha", help="LoRA alpha (scaling alpha/R).")]
Targets = Annotated[str, typer.Option(
    "--targets", help="LoRA targets: all, mlp, attention, or module names (q_proj,v_proj).")]
TrainEmb = Annotated[bool, typer.Option(
    "--train-embeddings", help="With LoRA, also train the full input and output embeddings.")]
Batch = Annotated[int | None, typer.Option("--batch", "-b", help="Micro-batch per GPU.")]
Seq = Annotated[int | None, typer.Option("--seq", "-s", help="Sequence length in tokens.")]
Gpus = Annotated[int, typer.Option("--gpus", help="G, the GPUs that ZeRO/FSDP shard over.")]
Shard = Annotated[str, typer.Option(
    "--shard", help="FSDP over --gpus for this regime: none, full-shard (FULL_SHARD, "
    "ZeRO-3-like) or shard-grad-op (SHARD_GRAD_OP: blocks stay gathered from forward to "
    "backward). Regime zero is full-shard already.")]
ParamDtype = Annotated[str, typer.Option(
    "--param-dtype", help="FSDP's MixedPrecisionPolicy: fp32 (none) or bf16 (parameters "
    "gathered, computed with and differentiated in bf16; gradients reduced in fp32).")]
Classes = Annotated[int, typer.Option("--classes", help="Classes of the classifier head.")]
Prompt = Annotated[int, typer.Option("--prompt-tokens", help="Soft-prompt tokens P.")]
Optim = Annotated[str, typer.Option(
    "--optimizer", help="adamw (torch.optim), adamw-8bit or paged-adamw-8bit (bitsandbytes: "
    "uint8 states, blockwise absmax), adafactor (transformers: factored second moments), sgd "
    "or sgd-momentum.")]
Dtype = Annotated[str | None, typer.Option(
    "--dtype", help="The dtype the weights are stored in: fp32, bf16 or fp16 (default: the "
    "regime's own; LoRA adapters and new heads stay fp32 on a 16-bit base). --regime full "
    "--dtype bf16 is pure bf16 training.")]
Autocast = Annotated[str, typer.Option(
    "--autocast", help="none, bf16 or fp16: torch.autocast over the forward and loss, as the "
    "Hugging Face Trainer's bf16=True / fp16=True runs it (fp16 adds a gradient scaler).")]
GradAccum = Annotated[int, typer.Option(
    "--grad-accum", help="Gradient accumulation steps K: the step follows K micro-batches of "
    "--batch, whose gradients add up.")]
Loop = Annotated[str, typer.Option(
    "--loop", help="manual (a hand-written loop: the model's outputs, its logits, stay alive "
    "through backward and the step) or trainer (the Trainer drops them before backward).")]
Impl = Annotated[str, typer.Option(
    "--optimizer-impl", help="fused (no temporaries), foreach (+ a copy of the trainable "
    "params during step) or forloop.")]
Ckpt = Annotated[bool, typer.Option(
    "--checkpointing", help="Activation checkpointing: keep block inputs, recompute the rest.")]
Attention = Annotated[str, typer.Option(
    "--attention", help="sdpa (flash kernels, no s² scores), eager (stores s² scores), or "
    "auto: the family's first (sdpa; eager for Gemma 2, which trains with eager only).")]
ModelImpl = Annotated[str, typer.Option(
    "--impl", help="Whose model code: memplan (the reference models of llama and gpt2), hf "
    "(Hugging Face transformers: its loss, masks and activations), or auto (memplan's where "
    "the family has one, else hf).")]
LoraBackend = Annotated[str, typer.Option(
    "--lora-backend", help="memplan (LoRALinear), peft (Hugging Face PEFT; needs --impl hf) or "
    "auto (memplan's with memplan's models, PEFT with Hugging Face's).")]
Adapters = Annotated[int, typer.Option(
    "--adapters", help="K LoRA adapters trained at once on one frozen base (--regime lora or "
    "lora-bf16): --batch samples each, so a step runs K × --batch samples.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")]
Reserve = Annotated[str | None, typer.Option(
    "--reserve", help="Per-GPU runtime reserve (CUDA context, allocator), e.g. 1GiB.")]


@dataclass(frozen=True)
class Job:
    """What the options resolved to: the model, the job, N if given, and what was assumed."""

    spec: ModelSpec
    train: TrainSpec
    params: int | None
    assumed: str


def resolve_model(params: str | None, model: str | None, config: Path | None,
                  as_family: str | None = None) -> tuple[ModelSpec, int | None, str]:
    """The ModelSpec from exactly one of --params, --model, --config."""
    given = [flag for flag, v in (("--params", params), ("--model", model),
                                  ("--config", config)) if v is not None]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise MemplanError(f"give exactly one of --params, --model or --config (got {what}); "
                           "e.g. --params 7e9 or --model llama-2-7b")
    if as_family is not None and config is None and model is None:
        raise MemplanError("--as approximates a --config of another model_type; give --config")
    if model is not None:
        from memplan.presets import find_model

        spec, where = find_model(model, as_family=as_family)
        warning = spec.approximation or None
        if warning:
            from memplan.report import warning_line

            warning_line(warning)
        return spec, None, where + (f" ({warning})" if warning else "")
    if config is not None:
        from memplan.config import load_config

        spec = load_config(config, as_family=as_family)
        warning = spec.approximation or None
        if warning:
            from memplan.report import warning_line

            warning_line(warning)
        return spec, None, f"config {config}" + (f" ({warning})" if warning else "")
    from memplan.shapes import shape_for_params
    from memplan.units import parse_count

    n = parse_count(params, "--params")
    spec, sentence = shape_for_params(n)
    return spec, n, f"N = {n:,} as given; activations and LoRA shapes from {sentence}"


def make_job(params: str | None, model: str | None, config: Path | None, *,
             as_family: str | None = None, regime: str = "full",
             rank: int = 8, alpha: float = 16.0, targets: str = "all",
             train_embeddings: bool = False, batch: int | None = None, seq: int | None = None,
             gpus: int = 1, classes: int = 2, prompt_tokens: int = 20, optimizer: str = "adamw",
             optimizer_impl: str = "fused", checkpointing: bool = False,
             attention: str = "sdpa", impl: str = "auto",
             lora_backend: str = "auto", shard: str = "none",
             param_dtype: str = "fp32", adapters: int = 1, dtype: str | None = None,
             autocast: str = "none", grad_accum: int = 1, loop: str = "manual") -> Job:
    """Validate the options and build the job (every bad value raises MemplanError).

    ``impl="auto"``: memplan's reference model where the family has one, else Hugging Face's;
    ``lora_backend="auto"``: memplan's LoRALinear on memplan's models, PEFT on Hugging Face's.
    """
    options = dict(regime=regime, rank=rank, alpha=alpha, targets=targets,
                   train_embeddings=train_embeddings, batch=batch, seq=seq, gpus=gpus,
                   classes=classes, prompt_tokens=prompt_tokens, optimizer=optimizer,
                   optimizer_impl=optimizer_impl, checkpointing=checkpointing,
                   shard=shard, param_dtype=param_dtype, adapters=adapters, dtype=dtype,
                   autocast=autocast, grad_accum=grad_accum, loop=loop)
    try:
        spec, n, assumed = resolve_model(params, model, config, as_family)
    except UnprofiledModel as exc:  # the command may measure it instead (memplan.cli.measured)
        exc.train = make_train(**options, attention=attention, impl="hf", lora_backend="peft")
        raise
    if impl == "auto":
        from memplan import arch

        impl = "memplan" if arch.profile_of(spec).reference_model and lora_backend != "peft" \
            else "hf"
    if lora_backend == "auto":
        lora_backend = "peft" if impl == "hf" and adapters == 1 else "memplan"
    if attention == "auto":
        from memplan import arch

        attention = arch.profile_of(spec).attentions[0]
    train = make_train(**options, attention=attention, impl=impl, lora_backend=lora_backend)
    if seq is not None and spec.learned_positions and seq > spec.max_positions:
        raise MemplanError(f"--seq {seq} exceeds the {spec.max_positions} learned positions of "
                           f"{spec.name}; use --seq {spec.max_positions} or less")
    if seq is not None and n is None and seq > spec.max_positions:  # rotary: planned, said
        from memplan.report import warning_line

        beyond = (f"--seq {seq} is beyond the {spec.max_positions:,} positions of {spec.name} "
                  "(max_position_embeddings)")
        warning_line(f"{beyond}; planned anyway, but the model was not trained that long")
        assumed = f"{assumed}; {beyond}"
    return Job(spec, train, n, assumed)


def make_train(*, regime: str = "full", rank: int = 8, alpha: float = 16.0, targets: str = "all",
               train_embeddings: bool = False, batch: int | None = None, seq: int | None = None,
               gpus: int = 1, classes: int = 2, prompt_tokens: int = 20,
               optimizer: str = "adamw", optimizer_impl: str = "fused",
               checkpointing: bool = False, attention: str = "sdpa", impl: str = "memplan",
               lora_backend: str = "memplan", shard: str = "none",
               param_dtype: str = "fp32", adapters: int = 1, dtype: str | None = None,
               autocast: str = "none", grad_accum: int = 1, loop: str = "manual"
               ) -> TrainSpec:
    """The TrainSpec of the job options alone, for commands where the model is optional
    (``auto`` choices take memplan's reference models' defaults)."""
    attention = "sdpa" if attention == "auto" else attention
    impl = "memplan" if impl == "auto" else impl
    lora_backend = "memplan" if lora_backend == "auto" else lora_backend
    if isinstance(gpus, int) and gpus < 1:
        raise MemplanError(f"--gpus must be at least 1, got {gpus}")
    return TrainSpec(
        regime=regime, batch=batch, seq=seq,
        lora=LoraSpec(rank=rank, alpha=alpha, targets=targets, train_embeddings=train_embeddings),
        num_classes=classes, prompt_tokens=prompt_tokens, gpus=gpus, optimizer=optimizer,
        optimizer_impl=optimizer_impl, checkpointing=checkpointing, attention=attention,
        impl=impl, lora_backend=lora_backend, shard=shard, param_dtype=param_dtype,
        adapters=adapters, dtype=dtype, autocast=autocast, grad_accum=grad_accum, loop=loop,
    )


def resolve_device(gpu: str | None, memory: str | None, example: str = "a100-80gb"
                   ) -> tuple[int, str, str | None]:
    """(capacity bytes, label, catalogue name or None) from exactly one of --gpu, --memory."""
    from memplan.presets import get_gpu
    from memplan.units import parse_bytes

    if (gpu is None) == (memory is None):
        raise MemplanError(f"give exactly one of --gpu NAME or --memory SIZE (e.g. --gpu "
                           f"{example} or --memory 24GiB)")
    if gpu is not None:
        device = get_gpu(gpu)
        return device.capacity_bytes, device.label, device.name
    return parse_bytes(memory, "--memory"), f"{memory} of memory", None


def parse_reserve(reserve: str | None) -> int:
    """The runtime reserve in bytes (default: the planner's documented assumption)."""
    from memplan.planner import DEFAULT_RESERVE_BYTES
    from memplan.units import parse_bytes

    if reserve is None:
        return DEFAULT_RESERVE_BYTES
    if reserve.strip() in ("0", "0GiB", "0B"):
        return 0
    return parse_bytes(reserve, "--reserve")
