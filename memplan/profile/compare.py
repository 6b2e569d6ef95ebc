"""One profiled job against its plan: the planner's Breakdown beside the measurement.

The plan comes from :func:`memplan.planner.plan`, which never looks at tensors; the
measurement from :func:`memplan.profile.step.measure`, which never looks at formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.planner import Breakdown, plan
from memplan.profile.step import Measurement, measure, resolve_device
from memplan.spec import ModelSpec, TrainSpec


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
    measured = measure(spec, train, device=device, steps=steps, capacity_bytes=capacity_bytes)
    return ProfileResult(spec, train, predicted, measured)
