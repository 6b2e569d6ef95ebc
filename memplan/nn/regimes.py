"""Apply a training regime to a real model: what trains, with which optimizer, and the loss.

:func:`prepare` turns a :class:`~memplan.nn.models.CausalLM` into a :class:`TrainingSetup`
whose trainable set is exactly what the planner counts (:mod:`memplan.params`):

=============  =================================================  ===========================
regime         trains                                             planner count
=============  =================================================  ===========================
full           every parameter, fp32, ``torch.optim``             ``count_params`` (N)
mixed          every parameter, fp32 weights, :class:`MixedAdamW`  N (12N bytes)
lora           adapters (+ embeddings if asked), fp32 base        ``lora_params`` (M) [+ E]
lora-bf16      fp32 adapters on a bf16 base (cast first)          M [+ E, kept in bf16]
classifier     a new head on the last token, backbone no-grad     ``classifier_params`` (C)
input-adapter  a zero-init additive embedding, backprop through   ``embedding_params`` (E)
prompt-tuning  P soft-prompt vectors prepended to the input       ``prompt_params``
bitfit         every bias (linear and LayerNorm)                  ``bias_params`` (B)
=============  =================================================  ===========================

The training step is split so a profiler can mark the phases between the calls:
``setup.zero_grad(); loss = setup.loss(ids, labels); setup.backward(loss);
setup.optimizer.step()``. Labels are aligned with positions (the model does not shift them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memplan.errors import MemplanError
from memplan.nn.lora import apply_lora
from memplan.nn.optim import (
    SGD_MOMENTUM,
    MixedAdamW,
    MixedSGD,
    build_optimizer,
    embedding_weights,
)
from memplan.spec import LoraSpec, TrainSpec

__all__ = ["prepare", "TrainingSetup", "SUPPORTED_REGIMES", "SoftPrompt", "cast_floating"]

SUPPORTED_REGIMES = ("full", "mixed", "lora", "lora-bf16", "classifier", "input-adapter",
                     "prompt-tuning", "bitfit")
IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index

# (input_ids, labels, class_labels) -> (loss, what the model returned beside it, or None)
LossFn = Callable[[Tensor, Tensor | None, Tensor | None], tuple[Tensor, Any]]


class SoftPrompt(nn.Module):
    """P trainable prompt vectors (P, H), prepended to the token embeddings (Lester et al.)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, embeds: Tensor) -> Tensor:
        """(B, T, H) -> (B, P + T, H)."""
        prompt = self.weight.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        return torch.cat((prompt, embeds), dim=1)


@dataclass
class TrainingSetup:
    """A model with a job applied: its optimizer, trainable parameters and loss.

    Attributes:
        model: the model (changed in place by :func:`prepare`).
        regime: the regime's name.
        optimizer: the optimizer over exactly ``trainable``.
        trainable: every trainable Parameter by name; names of new modules are prefixed with
            their key in ``extra_modules`` (``head.weight``, ``prompt.weight``).
        extra_modules: the modules the regime created (head, input adapter, soft prompt).
        autocast: ``none``, ``bf16`` or ``fp16``: the forward and the loss run under
            ``torch.autocast`` (backward and step outside it), as the Trainer runs them.
        keep_outputs: the manual loop: ``outputs`` holds what the model returned beside the
            loss (its logits) until the next forward returns, as ``out = model(**batch)`` in
            a hand-written loop does; the Trainer's loop drops them before backward.
        scaler: fp16 autocast's ``torch.amp.GradScaler`` (None otherwise).
    """

    model: nn.Module
    regime: str
    optimizer: torch.optim.Optimizer
    trainable: dict[str, nn.Parameter]
    extra_modules: dict[str, nn.Module] = field(default_factory=dict)
    loss_fn: LossFn | None = None
    autocast: str = "none"
    keep_outputs: bool = False
    scaler: Any = None
    outputs: Any = None

    @property
    def num_trainable(self) -> int:
        """Trainable elements, what the planner calls N, M, C, E, P or B."""
        return sum(p.numel() for p in self.trainable.values())

    def zero_grad(self) -> None:
        """Free (or, for the mixed optimizers, zero) the gradients."""
        self.optimizer.zero_grad(set_to_none=True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast == "none":
            return contextlib.nullcontext()
        device = next(iter(self.trainable.values())).device.type
        dtype = torch.bfloat16 if self.autocast == "bf16" else torch.float16
        return torch.autocast(device, dtype=dtype)

    def loss(self, input_ids: Tensor, labels: Tensor | None = None,
             class_labels: Tensor | None = None) -> Tensor:
        """The scalar loss of one batch: input_ids, labels (B, T); class_labels (B,).

        Under the manual loop the model's outputs replace the previous ones in ``outputs``
        once this forward has returned."""
        assert self.loss_fn is not None
        with self._autocast():
            loss, outputs = self.loss_fn(input_ids, labels, class_labels)
        self.outputs = outputs if self.keep_outputs else None
        return loss

    def backward(self, loss: Tensor) -> None:
        """Backpropagate the loss (scaled by fp16's gradient scaler)."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self) -> None:
        """The optimizer update (through fp16's gradient scaler)."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def train_step(self, input_ids: Tensor, labels: Tensor | None = None,
                   class_labels: Tensor | None = None, accumulate: int = 1) -> float:
        """zero_grad, then ``accumulate`` micro-batches of loss and backward (their gradients
        add up), then step; returns the last loss as a float (NaN for a fake one, which has
        no value, under ``FakeTensorMode``)."""
        from torch._subclasses.fake_tensor import FakeTensor

        self.zero_grad()
        for _ in range(accumulate):
            loss = self.loss(input_ids, labels, class_labels)
            self.backward(loss)
        self.step()
        return float("nan") if isinstance(loss, FakeTensor) else float(loss.detach())


@torch.no_grad()
def cast_floating(model: nn.Module, dtype: torch.dtype,
                  keep: Callable[[str], bool] | None = None) -> None:
    """``model.to(dtype)`` for floating parameters and buffers, one tensor at a time.

    Unlike ``Module.to`` this also works under ``FakeTensorMode`` (whose tensors cannot be
    swapped in place): each floating Parameter is replaced by a new one of ``dtype`` (tied
    Parameters stay tied, ``requires_grad`` is kept), so call it before building optimizers.
    """
    new: dict[int, nn.Parameter] = {}
    for path, module in model.named_modules():
        if keep is not None and keep(path):  # e.g. adapters that stay in their dtype
            continue
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_floating_point() or param.dtype == dtype:
                continue
            if id(param) not in new:
                new[id(param)] = nn.Parameter(param.detach().to(dtype),
                                              requires_grad=param.requires_grad)
            module._parameters[name] = new[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.to(dtype)


def _freeze(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


def _input_embedding(model: nn.Module) -> nn.Embedding:
    getter = getattr(model, "input_embedding", None)  # memplan.nn.hf.HFCausalLM
    if callable(getter):
        return getter()
    body = getattr(model, "transformer", None) or getattr(model, "model", None)
    for name in ("wte", "embed_tokens"):
        if body is not None and isinstance(getattr(body, name, None), nn.Embedding):
            return getattr(body, name)
    raise MemplanError(f"cannot find the input embedding of a {type(model).__name__}")


def _outputs(result: Any) -> tuple[Tensor, Any]:
    """(loss, outputs) from a model called with ``return_logits=True``."""
    return (result[0], result[1]) if isinstance(result, tuple) else (result, None)


def _lm_loss(model: nn.Module) -> LossFn:
    classes = getattr(model, "sequence_classifier", False)  # takes class labels (B,)

    def loss(input_ids: Tensor, labels: Tensor | None, class_labels: Tensor | None
             ) -> tuple[Tensor, Any]:
        if classes:
            return _outputs(model(input_ids, labels=class_labels, return_logits=True))
        if labels is None:
            raise MemplanError("this regime trains a language model: give labels (B, T)")
        return _outputs(model(input_ids, labels=labels, return_logits=True))
    return loss


def _trainable(model: nn.Module, extra: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    out = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for key, module in extra.items():
        out.update({f"{key}.{n}": p for n, p in module.named_parameters() if p.requires_grad})
    return out


def _classifier(model: nn.Module, num_classes: int) -> tuple[dict[str, nn.Module], LossFn]:
    """Frozen backbone, no graph through it; a new fp32 head on the last token's hidden state.

    logits = W_c h_T + b_c with W_c (classes × H), so C = H · classes + classes.
    """
    _freeze(model)
    emb = _input_embedding(model)
    head = nn.Linear(emb.embedding_dim, num_classes, device=emb.weight.device,
                     dtype=torch.float32)

    def loss(input_ids: Tensor, labels: Tensor | None, class_labels: Tensor | None
             ) -> tuple[Tensor, Any]:
        if class_labels is None:
            raise MemplanError("the classifier regime needs class_labels (B,)")
        with torch.no_grad():
            last = model.hidden_states(input_ids)[:, -1, :]  # (B, H)
        logits = head(last.to(head.weight.dtype))  # (B, classes)
        return F.cross_entropy(logits, class_labels), logits
    return {"head": head}, loss


def _input_adapter(model: nn.Module) -> tuple[dict[str, nn.Module], LossFn]:
    """inputs_embeds = embed(ids) + Δ(ids), Δ a zero-init (V × H) embedding: E = V · H."""
    _freeze(model)
    emb = _input_embedding(model)
    delta = nn.Embedding(emb.num_embeddings, emb.embedding_dim, device=emb.weight.device,
                         dtype=emb.weight.dtype)
    nn.init.zeros_(delta.weight)

    def loss(input_ids: Tensor, labels: Tensor | None, class_labels: Tensor | None
             ) -> tuple[Tensor, Any]:
        if labels is None:
            raise MemplanError("the input-adapter regime trains a language model: give labels")
        return _outputs(model(inputs_embeds=model.embed(input_ids) + delta(input_ids),
                              labels=labels, return_logits=True))
    return {"input_adapter": delta}, loss


def _prompt_tuning(model: nn.Module, prompt_tokens: int) -> tuple[dict[str, nn.Module], LossFn]:
    """P soft-prompt vectors, initialised from P random rows of the vocabulary (Lester et al.
    2021), prepended to the embeddings; labels get P leading -100s."""
    _freeze(model)
    emb = _input_embedding(model)
    rows = torch.randint(emb.num_embeddings, (prompt_tokens,), device=emb.weight.device)
    prompt = SoftPrompt(emb.weight.detach()[rows].clone())

    def loss(input_ids: Tensor, labels: Tensor | None, class_labels: Tensor | None
             ) -> tuple[Tensor, Any]:
        if labels is None:
            raise MemplanError("the prompt-tuning regime trains a language model: give labels")
        pad = labels.new_full((labels.shape[0], prompt_tokens), IGNORE_INDEX)
        return _outputs(model(inputs_embeds=prompt(model.embed(input_ids)),
                              labels=torch.cat((pad, labels), dim=1), return_logits=True))
    return {"prompt": prompt}, loss


def _cannot_run(regime: str) -> MemplanError:
    why = {"qlora": "it needs 4-bit NF4 kernels (bitsandbytes on CUDA)"}.get(
        regime, "it shards states over several processes (use memplan.profile.distributed)")
    return MemplanError(f"the profiler cannot run regime {regime!r} on this machine: {why}; "
                        f"`memplan estimate` plans it, and the profiler runs "
                        f"{', '.join(SUPPORTED_REGIMES)}")


def prepare(model: nn.Module, regime: str | TrainSpec, *, lora: LoraSpec | None = None,
            optimizer: str = "adamw", impl: str = "fused", lr: float = 1e-3,
            num_classes: int = 2, prompt_tokens: int = 20,
            lora_backend: str = "memplan",
            shard: Callable[[nn.Module], None] | None = None,
            adapters: int = 1) -> TrainingSetup:
    """Apply a job to ``model`` (in place) and build its optimizer and loss.

    Args:
        model: a :class:`~memplan.nn.models.CausalLM` with fp32 weights.
        regime: a :class:`~memplan.spec.TrainSpec` (every choice: dtype, autocast,
            optimizer...), or a regime's name with the options below.
        lora: the LoRA adapters (``lora``, ``lora-bf16``); default ``LoraSpec()``.
        lora_backend: ``memplan`` (LoRALinear) or ``peft`` (a Hugging Face model only).
        optimizer: a name of :data:`memplan.spec.OPTIMIZERS`.
        impl: ``fused``, ``foreach`` or ``forloop`` (``torch.optim``); the ``mixed`` regime's
            optimizers always loop over parameters, so ``impl`` does not apply there.
        lr: learning rate.
        num_classes: classes of the ``classifier`` head.
        prompt_tokens: P of ``prompt-tuning``.
        shard: called on the model once the regime has changed it (adapters added, weights
            frozen) and before the optimizer is built, so that a sharding wrapper (FSDP2's
            ``fully_shard``, see :mod:`memplan.profile.distributed`) replaces the parameters
            the optimizer then sees.
        adapters: K LoRA adapters per targeted layer (``lora``, ``lora-bf16``, memplan's
            LoRALinear only), one optimizer over all of them, so each adapter has its own
            states; route the samples with :func:`memplan.nn.lora.set_adapter_index`.

    Raises:
        MemplanError: an unknown regime or optimizer, a regime the profiler cannot run here
            (qlora, zero*), bitfit on a model without biases, bad LoRA options.
    """
    if isinstance(regime, TrainSpec):
        train = regime
    else:  # TrainSpec checks every option (regime, optimizer, classes, prompt tokens...)
        train = TrainSpec(regime=regime, lora=lora or LoraSpec(), optimizer=optimizer,
                          optimizer_impl=impl, num_classes=num_classes,
                          prompt_tokens=prompt_tokens, lora_backend=lora_backend,
                          adapters=adapters)
    r = train.recipe
    if r.nf4 or r.stage or r.fsdp:
        raise _cannot_run(r.regime)
    lora, optimizer, impl = train.lora, train.optimizer, train.optimizer_impl
    num_classes, prompt_tokens = train.num_classes, train.prompt_tokens
    lora_backend, adapters = train.lora_backend, train.adapters
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.dtype)
    extra: dict[str, nn.Module] = {}
    loss_fn = _lm_loss(model)

    if r.full:
        if r.notes_mixed and any(p.dtype != torch.float32 for p in model.parameters()):
            raise MemplanError("the mixed regime keeps fp32 weights; build the model in fp32")
        if dtype is not None:  # pure 16-bit: weights, gradients and states in that dtype
            cast_floating(model, dtype)
        for param in model.parameters():
            param.requires_grad_(True)
    elif r.lora:
        spec = lora or LoraSpec()
        if lora_backend == "peft":  # a Hugging Face model, wrapped by PEFT (fp32 adapters)
            from memplan.nn.hf import apply_peft_lora

            if adapters != 1:
                raise MemplanError(f"--adapters {adapters} runs memplan's LoRALinear only; "
                                   "drop --lora-backend peft")

            # Adapters on the fp32 base, then the base cast down: the state PEFT reaches on a
            # bf16 base, without its Module.to, which cannot swap FakeTensor parameters.
            _freeze(model)
            apply_peft_lora(model, spec)
            if dtype is not None:
                cast_floating(model, dtype, keep=lambda name: "lora_" in name)
        else:
            if dtype is not None:
                cast_floating(model, dtype)  # the frozen base; then fp32 adapters
            apply_lora(model, spec.rank, spec.alpha, spec.targets,
                       train_embeddings=spec.train_embeddings,
                       adapter_dtype=torch.float32 if dtype is not None else None,
                       adapters=adapters)
    elif r.trains == "head":
        if dtype is not None:  # the frozen backbone; the new head stays fp32
            cast_floating(model, dtype)
        extra, loss_fn = _classifier(model, num_classes)
    elif r.trains == "input-embedding":
        extra, loss_fn = _input_adapter(model)
    elif r.trains == "prompt":
        extra, loss_fn = _prompt_tuning(model, prompt_tokens)
    elif r.bitfit:
        _freeze(model)
        if dtype is not None:
            cast_floating(model, dtype)
        biases = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]
        if not biases:
            raise MemplanError("the model has no bias parameters, so bitfit trains nothing; "
                               "pick another regime such as lora")
        for param in biases:
            param.requires_grad_(True)

    if shard is not None:
        shard(model)
    trainable = _trainable(model, extra)
    if r.notes_mixed:
        opt: torch.optim.Optimizer = (
            MixedAdamW(trainable, lr=lr) if optimizer == "adamw" else
            MixedSGD(trainable, lr=lr,
                     momentum=SGD_MOMENTUM if optimizer == "sgd-momentum" else 0.0))
    else:
        # the Trainer keeps the nn.Embedding weights' 8-bit AdamW states in 32 bits
        fp32 = embedding_weights(model, *extra.values()) if r.loop == "trainer" else ()
        opt = build_optimizer(trainable, optimizer, impl, lr=lr, fp32_state=fp32)
    scaler = None
    if r.autocast == "fp16":  # the Trainer's fp16=True: a GradScaler on the loss and step
        device = next(iter(trainable.values())).device.type
        scaler = torch.amp.GradScaler(device)
    return TrainingSetup(model=model, regime=r.regime, optimizer=opt, trainable=trainable,
                         extra_modules=extra, loss_fn=loss_fn, autocast=r.autocast,
                         keep_outputs=r.keeps_outputs, scaler=scaler)
