"""One profiled job against its plan: the planner's Breakdown beside the measurement.

The plan comes from :func:`memplan.planner.plan`, which never looks at tensors; the
measurement from :func:`memplan.profile.step.measure`, which never looks at formulas.

Two guards keep a run from taking the machine down: a CPU run whose plan exceeds the host's
physical memory is refused (the kernel would kill the process), and so is any plan beyond
what torch's int64 sizes can hold, even under FakeTensorMode. A run that still fails to
allocate (a real GPU out of memory, also in the warm-up step) is a "does not fit" result.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from memplan.errors import MemplanError
from memplan.planner import Breakdown, plan
from memplan.profile.step import Measurement, measure, resolve_device
from memplan.spec import ModelSpec, TrainSpec
from memplan.units import format_bytes

# torch counts a storage's bytes in int64; a plan past 2**60 bytes cannot be built at all.
MAX_RUN_BYTES = 2**60


@dataclass(frozen=True)
class ProfileResult:
    """Predicted and measured peak of one job, and the relative error of the plan."""

    spec: ModelSpec
    train: TrainSpec
    predicted: Breakdown
    measured: Measurement

    @property
    def relative_error(self) -> float | None:
        """(predicted − measured) / measured; None when the run did not complete."""
        if not self.measured.fits or self.measured.peak_bytes <= 0:
            return None
        return (self.predicted.total_bytes - self.measured.peak_bytes) / self.measured.peak_bytes

    def to_dict(self) -> dict:
        """The JSON contract of DESIGN.md."""
        return {
            "device": self.measured.device,
            "model": self.spec.name,
            "regime": self.train.regime,
            "predicted": {"peak_bytes": self.predicted.total_bytes,
                          "components": dict(self.predicted.components),
                          "peak_phase": self.predicted.peak_phase,
                          "formula": self.predicted.formula},
            "measured": self.measured.to_dict(),
            "relative_error": self.relative_error,
        }


def profile(spec: ModelSpec, train: TrainSpec, device: str = "auto", steps: int = 2,
            capacity_bytes: int | None = None) -> ProfileResult:
    """Plan ``train`` on ``spec``, run it on ``device``, and hold the two side by side."""
    device = resolve_device(device)
    # The plan of the run as it is measured: see memplan.planner.plan's ``runtime``.
    predicted = plan(spec, train, runtime=device)
    check_runnable(predicted, device)
    start = time.perf_counter()
    try:
        measured = measure(spec, train, device=device, steps=steps, capacity_bytes=capacity_bytes)
    except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(exc):
            raise
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
        measured = Measurement(device, peak, {}, {}, 0, time.perf_counter() - start, fits=False,
                               extra={"error": str(exc).strip().splitlines()[0][:300]})
    return ProfileResult(spec, train, predicted, measured)


def is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's refusal."""
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


def host_memory_bytes() -> int | None:
    """The machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_runnable(predicted: Breakdown, device: str) -> None:
    """Refuse a run that cannot be built, or that would exhaust this machine's memory."""
    need = predicted.total_bytes
    if need > MAX_RUN_BYTES:
        raise MemplanError(f"the plan needs {format_bytes(need)}, more than torch can address "
                           "even under --device fake; `memplan estimate` plans it")
    host = host_memory_bytes() if device == "cpu" else None
    if host and need > host:
        raise MemplanError(f"--device cpu would need about {format_bytes(need)} (the plan), "
                           f"more than this machine's {format_bytes(host)} of memory; use "
                           "--device fake, or a smaller --batch or --seq")
