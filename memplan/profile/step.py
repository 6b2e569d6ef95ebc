"""The step driver: build the model, apply the regime, run steps under a tracker.

A warm-up step runs first (optimizer states are created lazily on the first step); the peak
reported is the largest over the following steady-state steps. The driver never looks at the
planner: it measures tensors only.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from memplan.errors import MemplanError, OutOfMemory
from memplan.nn.models import build_model
from memplan.nn.optim import optimizer_state_tensors
from memplan.nn.regimes import prepare
from memplan.profile.trackers import make_tracker
from memplan.spec import ModelSpec, TrainSpec

DEVICES = ("auto", "cuda", "cpu", "fake")


@dataclass(frozen=True)
class Measurement:
    """What one profiled job measured."""

    device: str
    peak_bytes: int
    components: dict[str, int]
    phases: dict[str, dict[str, int]]
    trainable: int
    wall_seconds: float
    fits: bool = True
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON form: integers for bytes."""
        return {"peak_bytes": self.peak_bytes, "components": dict(self.components),
                "phases": {k: dict(v) for k, v in self.phases.items()},
                "trainable": self.trainable, "wall_seconds": round(self.wall_seconds, 3),
                "fits": self.fits, **self.extra}


def resolve_device(device: str) -> str:
    """``auto`` is cuda when a GPU is usable, else cpu."""
    if device not in DEVICES:
        from memplan.errors import unknown

        raise unknown("device", device, DEVICES)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MemplanError("--device cuda, but torch sees no CUDA GPU here; use --device cpu "
                           "or --device fake")
    return device


def measure(spec: ModelSpec, train: TrainSpec, device: str = "cpu", steps: int = 2,
            seed: int = 0, capacity_bytes: int | None = None) -> Measurement:
    """Run ``steps`` steady-state steps of ``train`` on ``spec`` and measure the peak.

    Args:
        spec: The model.
        train: The job; needs batch and seq.
        device: ``cpu``, ``fake`` or ``cuda`` (``auto`` resolves to one of them).
        steps: Steady-state steps after the warm-up.
        seed: Seed for weights and data.
        capacity_bytes: Simulated memory size for the storage tracker.
    """
    if not train.has_activations:
        raise MemplanError("profiling runs real steps: give --batch and --seq")
    if steps < 1:
        raise MemplanError(f"--steps must be at least 1, got {steps}")
    device = resolve_device(device)
    torch.manual_seed(seed)
    start = time.perf_counter()
    fake_ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
    if device == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_ctx = FakeTensorMode(allow_non_fake_inputs=False)
    torch_device = "cuda" if device == "cuda" else "cpu"
    with fake_ctx:
        if train.impl == "hf":
            from memplan.nn.hf import build_hf_model

            model = build_hf_model(spec, device=torch_device, attention=train.attention,
                                   checkpointing=train.checkpointing)
        else:
            model = build_model(spec, device=torch_device, attention=train.attention,
                                checkpointing=train.checkpointing)
        setup = prepare(model, train)
        if train.adapters > 1:  # K adapters, batch samples each: sample i → adapter i // batch
            from memplan.nn.lora import set_adapter_index

            set_adapter_index(model, [i // train.batch for i in range(train.step_batch)])
        gen = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.randint(spec.vocab_size, (train.step_batch, train.seq), generator=gen)
        labels = torch.randint(spec.vocab_size, (train.step_batch, train.seq), generator=gen)
        classes = torch.randint(train.num_classes, (train.step_batch,), generator=gen)
        ids, labels, classes = (t.to(torch_device) for t in (ids, labels, classes))
        # warm-up: optimizer states now exist
        setup.train_step(ids, labels, classes, accumulate=train.grad_accum)
        setup.zero_grad()
        tracker = make_tracker(device, **({"capacity_bytes": capacity_bytes}
                                          if capacity_bytes else {}))
        params = list(model.parameters()) + [p for m in setup.extra_modules.values()
                                             for p in m.parameters()]
        try:
            with tracker:
                tracker.register([model, *setup.extra_modules.values()], "weights")
                tracker.register(optimizer_state_tensors(setup.optimizer), "optimizer_states")
                grad_buffers = getattr(setup.optimizer, "grad_buffers", None)
                if grad_buffers:
                    tracker.register(list(grad_buffers.values()), "gradients")
                tracker.register([ids, labels], "activations")
                # the manual loop's outputs of the warm-up, alive into the first forward
                tracker.register(output_tensors(setup.outputs), "activations")
                tracker.watch_params(params)
                tracker.reset_peak()
                for _ in range(steps):  # the loop: outputs kept or dropped by the setup
                    setup.zero_grad()
                    for _ in range(train.grad_accum):  # micro-batches; their grads add up
                        loss = setup.loss(ids, labels, classes)
                        tracker.mark("forward_end")
                        setup.backward(loss)
                        tracker.mark("backward_end")
                        del loss
                    setup.step()
                    tracker.mark("step_end")
        except OutOfMemory as exc:
            return Measurement(device, exc.measured_bytes, {}, {}, setup.num_trainable,
                               time.perf_counter() - start, fits=False,
                               extra={"error": str(exc)})
    extra = dict(getattr(tracker, "extra", {}) or {})
    return Measurement(device, tracker.peak_bytes, tracker.peak_components, dict(tracker.marks),
                       setup.num_trainable, time.perf_counter() - start, extra=extra)


def output_tensors(outputs: object) -> list[torch.Tensor]:
    """The tensors of what a model returned (a tensor, or a Hugging Face ModelOutput)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [v for v in outputs.values() if isinstance(v, torch.Tensor)]
    return []
