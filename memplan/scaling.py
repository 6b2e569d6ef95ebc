"""How a job scales over GPUs: the per-GPU plan for each M, and the fewest GPUs that fit.

M = 1 is the regime unsharded (``zero`` on one GPU is full fine-tuning, 16N). Beyond, the
shardable regimes are FSDP per rank (:mod:`memplan.fsdp`, rank 0: the fullest) and the ZeRO
paper's stages follow its accounting. GPUs come as one node (1 to ``per_node``) or whole nodes
(multiples of ``per_node``); FSDP's per-rank memory does not depend on how the ranks are
spread over nodes (one flat mesh).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memplan.errors import MemplanError
from memplan.fsdp import SHARDABLE_REGIMES
from memplan.planner import Breakdown, plan
from memplan.recipe import preset
from memplan.spec import MAX_JOB_SIZE, PAPER_STAGES, ModelSpec, TrainSpec

SCALABLE_REGIMES = SHARDABLE_REGIMES + PAPER_STAGES
DEFAULT_REGIMES = ("zero", "mixed", "lora")


def check_scalable(regime: str) -> None:
    """One clear line for a regime that does not shard."""
    if regime not in SCALABLE_REGIMES:
        raise MemplanError(f"regime {regime!r} does not shard over GPUs (each holds the whole "
                           f"model), so more GPUs never help; `memplan fits` answers it for "
                           f"one GPU. Scalable regimes: {', '.join(SCALABLE_REGIMES)}")


def gpu_counts(max_gpus: int, per_node: int) -> list[int]:
    """Every M worth trying: 1 to ``per_node`` on one node, then whole nodes."""
    if not 1 <= per_node <= MAX_JOB_SIZE or not 1 <= max_gpus <= MAX_JOB_SIZE:
        raise MemplanError(f"--max-gpus and --gpus-per-node must be 1 to {MAX_JOB_SIZE:,}, "
                           f"got {max_gpus} and {per_node}")
    one_node = list(range(1, min(per_node, max_gpus) + 1))
    return one_node + list(range(2 * per_node, max_gpus + 1, per_node))


def table_counts(max_gpus: int, per_node: int) -> list[int]:
    """The M of the table: powers of two on one node, then nodes doubling."""
    counts, m = [], 1
    while m <= min(per_node, max_gpus):
        counts.append(m)
        m *= 2
    if per_node <= max_gpus and per_node not in counts:
        counts.append(per_node)
    m = 2 * per_node
    while m <= max_gpus:
        counts.append(m)
        m *= 2
    return counts


def per_gpu(spec: ModelSpec, train: TrainSpec, regime: str, gpus: int,
            shard: str = "full-shard", param_dtype: str = "fp32") -> Breakdown:
    """The plan of the fullest GPU of ``regime`` over ``gpus`` GPUs (FSDP's bf16 policy with
    ``param_dtype="bf16"``, for the FSDP regimes other than the notes' mixed recipe)."""
    check_scalable(regime)
    if preset(regime).stage:
        return plan(spec, replace(train, regime=regime, gpus=gpus, shard="none"))
    if gpus == 1:
        return plan(spec, replace(train, regime=regime, gpus=1, shard="none"))
    dtype = "fp32" if preset(regime).notes_mixed else param_dtype
    return plan(spec, replace(train, regime=regime, gpus=gpus, shard=shard, param_dtype=dtype))


@dataclass(frozen=True)
class Scaling:
    """One regime over GPUs: the per-GPU plan at each tabled M, and the fewest that fit."""

    regime: str
    plans: dict[int, Breakdown]
    fewest: int | None
    fewest_plan: Breakdown | None

    def to_dict(self, capacity_bytes: int, reserve_bytes: int) -> dict:
        return {
            "fewest_gpus": self.fewest,
            "fewest_per_gpu_bytes": self.fewest_plan.total_bytes if self.fewest_plan else None,
            "per_gpu_bytes": {str(m): b.total_bytes for m, b in self.plans.items()},
            "fits": {str(m): b.total_bytes + reserve_bytes <= capacity_bytes
                     for m, b in self.plans.items()},
        }


def scale(spec: ModelSpec, train: TrainSpec, regime: str, capacity_bytes: int,
          reserve_bytes: int, max_gpus: int = 1024, per_node: int = 8,
          shard: str = "full-shard", param_dtype: str = "fp32") -> Scaling:
    """Per-GPU plans of ``regime`` at the tabled M, and the fewest GPUs whose plan plus the
    reserve fits ``capacity_bytes`` (None when even ``max_gpus`` do not).

    The search halves the candidate list (one node, then whole nodes), taking per-GPU memory
    to fall as M grows: the shards do, and the gathered units grow only by the padding of
    their rows to a multiple of M.
    """
    check_scalable(regime)
    cache: dict[int, Breakdown] = {}

    def at(m: int) -> Breakdown:
        if m not in cache:
            cache[m] = per_gpu(spec, train, regime, m, shard, param_dtype)
        return cache[m]

    def ok(m: int) -> bool:
        return at(m).total_bytes + reserve_bytes <= capacity_bytes

    counts = gpu_counts(max_gpus, per_node)
    plans = {m: at(m) for m in table_counts(max_gpus, per_node)}
    fewest = None
    if ok(counts[-1]):
        low, high = -1, len(counts) - 1  # counts[high] fits; counts[low] does not (or none)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if ok(counts[mid]) else (mid, high)
        fewest = counts[high]
    return Scaling(regime, plans, fewest, at(fewest) if fewest else None)
