"""A dry run of a model type memplan has no architecture profile for: measured, not planned.

The real transformers class of the config (``AutoModelForCausalLM``) is built under
``FakeTensorMode`` (no memory is used), the regime applied (every weight trains, or PEFT's LoRA
on a fp32 or bf16 base), and steady-state steps run under memplan's storage tracker, exactly
as ``memplan profile --device fake`` measures a profiled family. The figure is a measurement of
this one job: nothing is predicted, and it says so.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from memplan.errors import MemplanError
from memplan.spec import DRY_RUN_REGIMES, TrainSpec


@dataclass(frozen=True)
class DryRun:
    """The measured peak of one job on a model with no profile."""

    model_type: str
    regime: str
    params: int
    trainable: int
    peak_bytes: int
    components: dict[str, int]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "regime": self.regime, "params": self.params,
                "trainable": self.trainable, "peak_bytes": self.peak_bytes,
                "components": dict(self.components), "seconds": round(self.seconds, 3),
                "method": "measured: fake-mode dry run of the transformers model (no profile)"}


def transformers_available() -> bool:
    """Whether the ``[hf]`` extra (transformers and PEFT) is installed."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def dry_run(cfg: dict[str, Any], train: TrainSpec, steps: int = 1) -> DryRun:
    """Measure ``train`` on the transformers model of ``cfg`` under FakeTensorMode.

    Raises:
        MemplanError: a regime the dry run does not apply, or a config transformers refuses.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.nn.optim import build_optimizer, optimizer_state_tensors
    from memplan.nn.regimes import cast_floating
    from memplan.profile.step import output_tensors
    from memplan.profile.trackers import make_tracker
    from memplan.recipe import choices_text

    r = train.recipe
    plain = r.trains in ("all", "lora") and not (r.nf4 or r.stage or r.fsdp or r.notes_mixed)
    if not plain or train.dtype or r.autocast != "none" \
            or r.grad_accum > 1 or r.optimizer not in ("adamw", "sgd", "sgd-momentum"):
        raise MemplanError(f"a model type with no profile is measured for regimes "
                           f"{', '.join(DRY_RUN_REGIMES)} only, as they are (torch.optim, no "
                           f"autocast or accumulation); got --regime {train.regime} "
                           f"({choices_text(train)})")
    batch, seq = train.batch or 1, train.seq or 1
    start = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=False):
        model = _build(cfg, train)
        params = sum(p.numel() for p in model.parameters())
        if r.lora:
            model = _peft(model, train)
            if r.dtype == "bf16":
                cast_floating(model, torch.bfloat16, keep=lambda name: "lora_" in name)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = build_optimizer(trainable, train.optimizer, train.optimizer_impl)
        vocab = int(model.config.vocab_size)
        ids = torch.randint(vocab, (batch, seq))
        labels = torch.randint(vocab, (batch, seq))

        kept: list[Any] = []  # the manual loop's outputs, replaced when the next forward returns

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=ids, labels=labels, use_cache=False)
            kept[:] = [out] if r.keeps_outputs else []
            loss = out.loss
            del out
            loss.backward()
            del loss
            opt.step()

        step()  # warm-up: the optimizer's states now exist
        opt.zero_grad(set_to_none=True)
        tracker = make_tracker("fake")
        with tracker:
            tracker.register([model], "weights")
            tracker.register(optimizer_state_tensors(opt), "optimizer_states")
            tracker.register([ids, labels], "activations")
            tracker.register([t for o in kept for t in output_tensors(o)], "activations")
            tracker.watch_params(trainable)
            tracker.reset_peak()
            for _ in range(steps):
                step()
    return DryRun(str(cfg.get("model_type")), train.regime, params,
                  sum(p.numel() for p in trainable), tracker.peak_bytes,
                  dict(tracker.peak_components), time.perf_counter() - start)


def _build(cfg: dict[str, Any], train: TrainSpec) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    keys = {k: v for k, v in cfg.items() if k != "model_type" and not k.startswith("_")}
    try:
        config = transformers.AutoConfig.for_model(cfg.get("model_type"), **keys)
        config.use_cache = False
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=train.attention)
    except (ValueError, KeyError, TypeError) as exc:
        raise MemplanError(f"model_type {cfg.get('model_type')!r} is not supported (no "
                           "architecture profile), and transformers cannot build it as a causal "
                           f"LM to measure it: {str(exc).splitlines()[0][:160]}") from None
    if train.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _peft(model: torch.nn.Module, train: TrainSpec) -> torch.nn.Module:
    import peft

    from memplan.nn.hf import _no_adapter_moves_under_fake_tensors
    from memplan.nn.regimes import cast_floating

    targets = train.lora.targets
    if isinstance(targets, str):
        names = [t.strip() for t in targets.split(",") if t.strip()]
    else:
        names = list(targets)
    if names in (["all"], []):
        modules: Any = "all-linear"
    elif any(n in ("mlp", "attention") for n in names):
        raise MemplanError("with no profile, LoRA targets are all or module names "
                           "(e.g. q_proj,v_proj); the groups mlp and attention need a profile")
    else:
        modules = names
    for p in model.parameters():
        p.requires_grad_(False)
    config = peft.LoraConfig(r=train.lora.rank, lora_alpha=train.lora.alpha,
                             target_modules=modules, lora_dropout=0.0, bias="none")
    try:
        with _no_adapter_moves_under_fake_tensors():
            wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as exc:
        raise MemplanError(f"PEFT cannot place LoRA on {modules}: "
                           f"{str(exc).splitlines()[0][:200]}") from None
    for module in wrapped.modules():
        for name in ("lora_A", "lora_B"):
            if isinstance(getattr(module, name, None), torch.nn.ModuleDict):
                cast_floating(getattr(module, name), torch.float32)
    return wrapped
