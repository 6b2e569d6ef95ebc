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
        """The JSON contract of `memplan profile --json` (the README's JSON contract)."""
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


# -- sharded runs: every rank of FSDP2 against its own plan --------------------------------------
RANK_PROCESS_BYTES = 600 * 2**20  # a CPU rank's own process: the interpreter, torch, gloo


@dataclass(frozen=True)
class ShardedResult:
    """Each measured rank of one FSDP2 job beside the plan of that rank."""

    spec: ModelSpec
    train: TrainSpec
    ranks: tuple[ProfileResult, ...]

    @property
    def nproc(self) -> int:
        return self.train.gpus

    @property
    def worst(self) -> ProfileResult:
        """The rank whose plan is furthest from its measurement (a rank that did not fit
        first)."""
        def key(r: ProfileResult) -> float:
            err = r.relative_error
            return float("inf") if err is None else abs(err)
        return max(self.ranks, key=key)

    @property
    def worst_relative_error(self) -> float | None:
        return self.worst.relative_error

    @property
    def fits(self) -> bool:
        return all(r.measured.fits for r in self.ranks)

    def to_dict(self) -> dict:
        """One JSON object: the job, each rank (plan, measurement, error), the worst error."""
        return {
            "device": self.ranks[0].measured.device, "model": self.spec.name,
            "regime": self.train.regime, "nproc": self.nproc, "shard": self.train.shard,
            "ranks": [{"rank": r.measured.extra.get("rank", i)} | {
                k: v for k, v in r.to_dict().items() if k not in ("device", "model", "regime")}
                for i, r in enumerate(self.ranks)],
            "worst_relative_error": self.worst_relative_error,
        }


def sharded_job(train: TrainSpec, nproc: int) -> TrainSpec:
    """The job as ``nproc`` FSDP ranks run it: ``gpus = nproc``, FULL_SHARD unless asked."""
    from dataclasses import replace

    return replace(train, gpus=nproc, shard="full-shard" if train.shard == "none"
                   else train.shard)


def profile_sharded(spec: ModelSpec, train: TrainSpec, nproc: int, device: str = "auto",
                    steps: int = 2, capacity_bytes: int | None = None) -> ShardedResult:
    """Run ``train`` with FSDP2 over ``nproc`` ranks and hold every rank against its plan.

    ``cpu``: real processes on gloo; ``cuda``: one process per GPU on NCCL; ``fake``: the
    fake process group in this process, measuring the first and the last rank (the others
    hold what one of them holds, their shards being the same padded size).
    """
    from memplan.profile.distributed import check_nproc, measure_fake_sharded, measure_sharded
    from memplan.profile.sharding import check_sharded

    device = resolve_device(device)
    if train.impl != "memplan":
        from memplan import arch

        if not arch.profile_of(spec).reference_model:
            raise MemplanError(f"sharded profiles run memplan's reference models (llama, gpt2); "
                               f"{spec.name} has none: plan it with `memplan estimate --gpus "
                               f"{nproc}`")
        raise MemplanError("sharded runs use memplan's reference models; drop --impl hf")
    check_sharded(train, nproc)
    check_nproc(nproc, device)
    job = sharded_job(train, nproc)
    plans = {r: plan(spec, job, runtime=device, rank=r) for r in sorted({0, nproc - 1})}
    check_runnable_ranks(plans[0], device, nproc)
    raf = job.shard != "shard-grad-op"
    if device == "fake":
        measured = [measure_fake_sharded(spec, job, nproc, rank=r, steps=steps,
                                         reshard_after_forward=raf,
                                         capacity_bytes=capacity_bytes) for r in plans]
    else:
        measured = measure_sharded(spec, job, nproc, device=device, steps=steps,
                                   reshard_after_forward=raf, capacity_bytes=capacity_bytes)
    results = []
    for i, m in enumerate(measured):
        rank = m.extra.get("rank", i)
        predicted = plans.get(rank) or plan(spec, job, runtime=device, rank=rank)
        results.append(ProfileResult(spec, job, predicted, m))
    return ShardedResult(spec, job, tuple(results))


def check_runnable_ranks(predicted: Breakdown, device: str, nproc: int) -> None:
    """Refuse a sharded CPU run whose ranks together would exhaust this machine's memory."""
    check_runnable(predicted, device)
    host = host_memory_bytes() if device == "cpu" else None
    need = (predicted.total_bytes + RANK_PROCESS_BYTES) * nproc
    if host and need > host:
        raise MemplanError(f"{nproc} CPU ranks would need about {format_bytes(need)} (the "
                           f"plan and each rank's process), more than this machine's "
                           f"{format_bytes(host)}; use --device fake, fewer --nproc, or a "
                           "smaller --batch or --seq")
