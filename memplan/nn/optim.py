"""Optimizers: torch's, by name and implementation, and the notes' mixed-precision recipe.

:func:`build_optimizer` maps the planner's names to ``torch.optim``, to bitsandbytes' 8-bit
AdamW (memplan's plain-torch reference :class:`memplan.nn.optim8bit.AdamW8bit`, or bitsandbytes
itself on CUDA when it is installed) and to transformers' Adafactor as the Hugging Face Trainer
builds it. :class:`MixedAdamW` is the
``mixed`` regime of the notes for fp32 weights: bf16 gradients, bf16 momentum, fp32 second
moment, i.e. per trainable element 4 (weight) + 2 (grad) + 2 (m) + 4 (v) = 12 bytes, 12N.
:class:`MixedSGD` is the SGD analogue: 4 + 2 + 2 (bf16 momentum buffer) = 8N, or 6N without
momentum.

PyTorch insists that ``param.grad`` has the parameter's dtype, so a bf16 gradient cannot live
in ``.grad`` of an fp32 weight. Both mixed optimizers register on every parameter a
``register_post_accumulate_grad_hook`` that adds the fresh fp32 ``p.grad`` into a bf16 buffer
they own and then frees ``p.grad``: at most one parameter's fp32 gradient is alive at a time
(beside the ones autograd is still accumulating), and gradient accumulation over several
backward passes works (the buffer sums them, in bf16).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from memplan.errors import MemplanError, unknown
from memplan.spec import OPTIMIZER_IMPLS, OPTIMIZERS

__all__ = ["build_optimizer", "MixedAdamW", "MixedSGD", "embedding_weights",
           "optimizer_backend", "optimizer_state_tensors"]

SGD_MOMENTUM = 0.9  # the momentum of "sgd-momentum", the common default
EIGHT_BIT = ("adamw-8bit", "paged-adamw-8bit")
BACKENDS = ("auto", "reference", "bitsandbytes")
# transformers' Trainer, optim="adafactor": Adafactor(lr=args.learning_rate, **these)
ADAFACTOR_TRAINER_KWARGS = {"scale_parameter": False, "relative_step": False}


def _param_list(params: Iterable[nn.Parameter] | dict[str, nn.Parameter]) -> list[nn.Parameter]:
    items = list(params.values()) if isinstance(params, dict) else list(params)
    if not items:
        raise MemplanError("the optimizer got no trainable parameters")
    return items


def build_optimizer(params: Iterable[nn.Parameter] | dict[str, nn.Parameter],
                    optimizer: str = "adamw", impl: str = "fused", lr: float = 1e-3,
                    weight_decay: float = 0.0, *, fp32_state: Iterable[nn.Parameter] = (),
                    backend: str = "auto") -> torch.optim.Optimizer:
    """An optimizer by the planner's names.

    ``adamw`` → ``torch.optim.AdamW`` (state m, v: 8 bytes per fp32 element); ``sgd`` →
    ``SGD`` (no state); ``sgd-momentum`` → ``SGD(momentum=0.9)`` (one buffer, 4 bytes per
    element). ``impl``: ``fused`` (``fused=True``: one kernel, no temporaries), ``foreach``
    (``foreach=True``: multi-tensor ops whose temporaries are about one extra copy of the
    trainable parameters), ``forloop`` (``foreach=False, fused=False``: one parameter at a
    time, temporaries of one parameter's size).

    ``adamw-8bit`` / ``paged-adamw-8bit`` → bitsandbytes' block-wise 8-bit AdamW (``is_paged``
    for the second): ``backend="bitsandbytes"`` the real one (``bitsandbytes.optim.AdamW(...,
    optim_bits=8)``, as the Trainer's ``adamw_bnb_8bit`` / ``paged_adamw_8bit``), ``reference``
    memplan's plain-torch :class:`~memplan.nn.optim8bit.AdamW8bit` (same tensors, runs on the
    CPU and under ``FakeTensorMode``), ``auto`` bitsandbytes when every parameter is on CUDA and
    it imports, else the reference; :func:`optimizer_backend` says which one was built.
    ``fp32_state``: parameters whose m and v stay fp32 (bitsandbytes' ``optim_bits=32``
    override; the Trainer's are :func:`embedding_weights`); ignored by the other optimizers.

    ``adafactor`` → ``transformers.optimization.Adafactor(lr=lr, scale_parameter=False,
    relative_step=False, weight_decay=weight_decay)``, the Trainer's ``optim="adafactor"``
    (beta1 None: no first moment).

    These have one implementation each: ``impl`` must be ``fused`` (the default).

    Raises:
        MemplanError: an unknown optimizer, implementation or backend, no parameters,
            bitsandbytes asked for and missing, Adafactor without transformers.
    """
    if optimizer not in OPTIMIZERS:
        raise unknown("optimizer", optimizer, OPTIMIZERS)
    if impl not in OPTIMIZER_IMPLS:
        raise unknown("optimizer implementation", impl, OPTIMIZER_IMPLS)
    if backend not in BACKENDS:
        raise unknown("8-bit optimizer backend", backend, BACKENDS)
    items = _param_list(params)
    if optimizer in EIGHT_BIT or optimizer == "adafactor":
        if impl != "fused":
            raise MemplanError(f"--optimizer {optimizer} has one implementation; drop "
                               "--optimizer-impl")
        if optimizer == "adafactor":
            return _adafactor(items, lr, weight_decay)
        return _adamw_8bit(items, lr, weight_decay, optimizer == "paged-adamw-8bit",
                           list(fp32_state), backend)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True},
             "forloop": {"foreach": False, "fused": False}}[impl]
    if optimizer == "adamw":
        return torch.optim.AdamW(items, lr=lr, weight_decay=weight_decay, **flags)
    momentum = SGD_MOMENTUM if optimizer == "sgd-momentum" else 0.0
    return torch.optim.SGD(items, lr=lr, momentum=momentum, weight_decay=weight_decay, **flags)


def embedding_weights(*modules: nn.Module) -> list[nn.Parameter]:
    """The weight of every ``nn.Embedding`` in ``modules``: what the Hugging Face Trainer
    registers with bitsandbytes' ``GlobalOptimManager`` as ``{"optim_bits": 32}`` when its
    optimizer is 8-bit (transformers 5.24 ``Trainer.create_optimizer``), each once."""
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.Embedding):
                seen.setdefault(id(sub.weight), sub.weight)
    return list(seen.values())


def optimizer_backend(opt: torch.optim.Optimizer) -> str:
    """Which implementation ``opt`` is: ``bitsandbytes``, ``reference`` (memplan's 8-bit
    AdamW), ``transformers`` (Adafactor) or ``torch``."""
    module = type(opt).__module__
    if module.startswith("bitsandbytes"):
        return "bitsandbytes"
    if module == "memplan.nn.optim8bit":
        return "reference"
    if module.startswith("transformers"):
        return "transformers"
    return "torch"


def _adafactor(items: list[nn.Parameter], lr: float,
               weight_decay: float) -> torch.optim.Optimizer:
    try:
        from transformers.optimization import Adafactor
    except ImportError as exc:
        raise MemplanError("--optimizer adafactor runs transformers' Adafactor, and "
                           "transformers is not installed; install memplan's Hugging Face "
                           "extra: pip install 'memplan[hf]'") from exc
    return Adafactor(items, lr=lr, weight_decay=weight_decay, **ADAFACTOR_TRAINER_KWARGS)


def _adamw_8bit(items: list[nn.Parameter], lr: float, weight_decay: float, paged: bool,
                fp32_state: list[nn.Parameter], backend: str) -> torch.optim.Optimizer:
    from memplan.nn.optim8bit import AdamW8bit

    if backend == "auto":
        on_cuda = all(p.device.type == "cuda" for p in items)
        backend = "bitsandbytes" if on_cuda and _bitsandbytes() is not None else "reference"
    if backend == "reference":
        return AdamW8bit(items, lr=lr, weight_decay=weight_decay, paged=paged,
                         fp32_params=fp32_state)
    bnb = _bitsandbytes()
    if bnb is None:
        raise MemplanError("the bitsandbytes backend of the 8-bit AdamW needs bitsandbytes "
                           "(pip install bitsandbytes, on a CUDA machine); or use the reference")
    opt = bnb.optim.AdamW(items, lr=lr, weight_decay=weight_decay, optim_bits=8,
                          is_paged=paged)
    manager = bnb.optim.GlobalOptimManager.get_instance()
    for p in fp32_state:  # as the Trainer: a (module, "weight", config) override per embedding
        manager.register_module_override(_Holder(p), "weight", {"optim_bits": 32})
    return opt


class _Holder:
    """A stand-in module for ``GlobalOptimManager.register_module_override``, which only reads
    ``getattr(module, "weight")``."""

    def __init__(self, weight: nn.Parameter) -> None:
        self.weight = weight


def _bitsandbytes():  # noqa: ANN202 - the module, or None
    try:
        import bitsandbytes
    except Exception:  # noqa: BLE001 - a missing or broken install (no CUDA build) alike
        return None
    return bitsandbytes


def optimizer_state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor an optimizer owns (its state: m, v, momentum, step counters, buffers,
    bitsandbytes' absmax and shared quantisation maps, Adafactor's factored moments and RMS).

    Uses ``opt.state_tensors()`` when the optimizer has one (the mixed optimizers and the 8-bit
    reference here). A tensor referenced from several states (bitsandbytes' maps) is listed once.
    """
    own = getattr(opt, "state_tensors", None)
    if callable(own):
        return list(own())
    seen: dict[int, torch.Tensor] = {}
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                seen.setdefault(id(value), value)
    return list(seen.values())


class _BF16GradOptimizer(torch.optim.Optimizer):
    """Base of the mixed optimizers: bf16 gradient buffers filled by post-accumulate hooks."""

    grad_dtype = torch.bfloat16

    def __init__(self, params: Iterable[nn.Parameter] | dict[str, nn.Parameter],
                 defaults: dict) -> None:
        items = [p for p in _param_list(params) if p.requires_grad]
        if not items:
            raise MemplanError("the optimizer got no parameters that require grad")
        super().__init__(items, defaults)
        # Allocated once here (2 bytes per element), zeroed in place by zero_grad.
        self.grad_buffers: dict[nn.Parameter, torch.Tensor] = {
            p: torch.zeros_like(p, dtype=self.grad_dtype, memory_format=torch.preserve_format)
            for p in items
        }
        self._has_grad: dict[nn.Parameter, bool] = {p: False for p in items}
        self._hooks = [p.register_post_accumulate_grad_hook(self._take_grad) for p in items]

    def _take_grad(self, param: torch.Tensor) -> None:
        """Add the fresh fp32 gradient into the bf16 buffer (cast element-wise, no fp32
        temporary) and free ``param.grad``."""
        if param.grad is None:
            return
        self.grad_buffers[param].add_(param.grad)
        self._has_grad[param] = True
        param.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the bf16 gradient buffers in place (never reallocated); ``p.grad`` stays None.

        ``set_to_none`` is accepted for API compatibility; the buffers are always kept.
        """
        for param, buf in self.grad_buffers.items():
            buf.zero_()
            self._has_grad[param] = False
            param.grad = None

    def remove_hooks(self) -> None:
        """Detach the gradient hooks from the parameters (for reuse with another optimizer)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor this optimizer owns: the bf16 gradient buffers and the state."""
        tensors = list(self.grad_buffers.values())
        for state in self.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        return tensors

    def _params_with_grad(self) -> Iterable[tuple[dict, nn.Parameter, torch.Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if self._has_grad.get(p, False):
                    yield group, p, self.grad_buffers[p]


class MixedAdamW(_BF16GradOptimizer):
    """AdamW for fp32 weights with bf16 gradients, bf16 momentum m and fp32 second moment v.

    For each parameter with a gradient g (read from the bf16 buffer) at step t, as
    ``torch.optim.AdamW`` (Loshchilov & Hutter, decoupled weight decay λ):

        θ ← θ · (1 − lr·λ)
        m ← β1·m + (1 − β1)·g          (computed in fp32, stored rounded to bf16)
        v ← β2·v + (1 − β2)·g²         (fp32, in place)
        θ ← θ − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)

    The update uses the fp32 value of the new m, before rounding.

    Memory per trainable element: 2 (grad buffer) + 2 (m) + 4 (v) bytes of state; m and v are
    created on the first step, the grad buffers at construction. Temporaries of ``step``: it
    loops over parameters one at a time and holds, for ONE parameter of n elements, exactly two
    fp32 tensors of n elements (8n bytes): ``g32`` (the gradient upcast, reused in place as the
    denominator √v/√(1−β2^t) + ε) and ``m32`` (the momentum upcast, updated in place); all
    other operations are in place (``lerp_``, ``mul_``, ``addcmul_``, ``addcdiv_``).

    Args:
        params: the trainable fp32 parameters (those not requiring grad are skipped).
        lr: learning rate. betas: (β1, β2). eps: ε. weight_decay: λ.
    """

    def __init__(self, params: Iterable[nn.Parameter] | dict[str, nn.Parameter],
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise MemplanError(f"MixedAdamW needs lr, eps, weight_decay >= 0, got {lr}, {eps}, "
                               f"{weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise MemplanError(f"MixedAdamW betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW update of every parameter that received a gradient since zero_grad."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, p, grad_buf in self._params_with_grad():
            lr, (beta1, beta2), eps, wd = (group["lr"], group["betas"], group["eps"],
                                           group["weight_decay"])
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            t = state["step"]
            g32 = grad_buf.to(torch.float32)                 # temporary 1: n fp32
            m32 = state["exp_avg"].to(torch.float32)         # temporary 2: n fp32
            v = state["exp_avg_sq"]
            if wd != 0.0:
                p.mul_(1.0 - lr * wd)
            m32.lerp_(g32, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
            state["exp_avg"].copy_(m32)
            bias_correction1 = 1.0 - beta1 ** t
            bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** t)
            denom = torch.sqrt(v, out=g32).div_(bias_correction2_sqrt).add_(eps)  # reuses g32
            p.addcdiv_(m32, denom, value=-lr / bias_correction1)
            del g32, m32, denom
        return loss


class MixedSGD(_BF16GradOptimizer):
    """SGD (optionally with momentum μ) for fp32 weights with bf16 gradients and bf16 momentum.

    As ``torch.optim.SGD`` without dampening or Nesterov: g ← g + λθ; b ← g on the first step,
    else b ← μ·b + g (fp32, stored rounded to bf16); θ ← θ − lr·b (or θ − lr·g with μ = 0).

    Memory per trainable element: 2 (grad buffer) + 2 (momentum, if μ > 0) bytes of state.
    Temporaries of ``step``, one parameter of n elements at a time: ``g32`` (n fp32) and, with
    momentum, ``b32`` (n fp32).
    """

    def __init__(self, params: Iterable[nn.Parameter] | dict[str, nn.Parameter],
                 lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if not lr >= 0 or not 0.0 <= momentum < 1.0 or not weight_decay >= 0:
            raise MemplanError(f"MixedSGD needs lr >= 0, 0 <= momentum < 1, weight_decay >= 0, "
                               f"got {lr}, {momentum}, {weight_decay}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One SGD update of every parameter that received a gradient since zero_grad."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, p, grad_buf in self._params_with_grad():
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            g32 = grad_buf.to(torch.float32)                 # temporary 1: n fp32
            if wd != 0.0:
                g32.add_(p, alpha=wd)
            if mu == 0.0:
                p.add_(g32, alpha=-lr)
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = g32.to(torch.bfloat16)
                p.add_(g32, alpha=-lr)
                continue
            b32 = state["momentum_buffer"].to(torch.float32)  # temporary 2: n fp32
            b32.mul_(mu).add_(g32)
            state["momentum_buffer"].copy_(b32)
            p.add_(b32, alpha=-lr)
        return loss
