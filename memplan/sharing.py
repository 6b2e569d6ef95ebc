"""What training K LoRA adapters on one shared base saves against K separate jobs.

K adapters on one frozen base (``TrainSpec.adapters``, ``batch`` samples each) hold the base
once, K adapters with their gradients and optimizer states, and the activations of K × batch
samples. K separate jobs (one adapter each, ``batch`` samples each) hold K bases: their memory
is K times the single-adapter plan. The difference is mostly K - 1 copies of the frozen base.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memplan.spec import ModelSpec, TrainSpec
from memplan.units import format_bytes


@dataclass(frozen=True)
class Sharing:
    """The shared plan against K separate single-adapter jobs, in bytes (integers)."""

    adapters: int
    shared_bytes: int
    single_bytes: int

    @property
    def separate_bytes(self) -> int:
        """K separate jobs: K × the single-adapter plan."""
        return self.adapters * self.single_bytes

    @property
    def saved_bytes(self) -> int:
        """What sharing the base saves against the K separate jobs."""
        return self.separate_bytes - self.shared_bytes

    def to_dict(self) -> dict:
        """The JSON form: ``shared_bytes`` is this plan's total."""
        return {"adapters": self.adapters, "shared_bytes": self.shared_bytes,
                "single_adapter_bytes": self.single_bytes,
                "separate_jobs_bytes": self.separate_bytes, "saved_bytes": self.saved_bytes}

    def line(self) -> str:
        """One sentence for the text report."""
        k = self.adapters
        return (f"{k} adapters on one base: {format_bytes(self.shared_bytes)}; {k} separate "
                f"jobs: {k} × {format_bytes(self.single_bytes)} = "
                f"{format_bytes(self.separate_bytes)}; sharing the base saves "
                f"{format_bytes(self.saved_bytes)}")


def sharing(spec: ModelSpec, train: TrainSpec, shared_bytes: int,
            params: int | None = None) -> Sharing | None:
    """The saving of a K-adapter job whose plan totals ``shared_bytes``; None when K = 1."""
    if train.adapters == 1:
        return None
    from memplan.planner import plan

    single = plan(spec, replace(train, adapters=1), params)
    return Sharing(train.adapters, shared_bytes, single.total_bytes)
