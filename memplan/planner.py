"""The planner: ``plan()`` a job into a Breakdown, ``fits()`` it on a GPU, find ``max_batch()``.

A training step is a timeline. The plan evaluates the memory at each moment where a peak can
occur and reports the largest:

- ``forward``: the largest moment of the forward pass: weights, optimizer states,
  persistent gradient buffers, the activations saved so far and the values the forward
  still references (at the loss: the logits and log-probabilities);
- ``backward``: the largest moment of the backward pass, walked node by node on the symbolic
  autograd of :mod:`memplan.autograd` (saved tensors freed as their nodes run, gradients
  made and accumulated);
- ``step``: weights, gradients, optimizer states and the optimizer's own temporaries.

Without batch and sequence length only the model states are planned (the notes' formulas).
A job sharded with FSDP (:mod:`memplan.fsdp`) is planned per GPU: the padded shards, and the
units' gathered parameters and reduce-scatter buffers joined to every moment of the forward
and backward walk (without batch and sequence length: the ``gather`` phase, the units'
events replayed with no activations).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from memplan import activations as A
from memplan import fsdp as F
from memplan import optimizer as O
from memplan import params as P
from memplan.errors import MemplanError
from memplan.recipe import Recipe
from memplan.regimes import ModelState, model_state
from memplan.spec import ModelSpec, TrainSpec

COMPONENTS = ("weights", "gradients", "optimizer_states", "master_weights", "activations",
              "temporaries")

# Memory outside the tensors a job allocates: the CUDA context (about 0.5 GiB on recent
# GPUs), cuBLAS/cuDNN workspaces and the caching allocator's rounding and fragmentation. An
# assumption until measured on a GPU (`memplan validate --device cuda` records it); users
# override it with --reserve.
DEFAULT_RESERVE_BYTES = 1 * 2**30


@dataclass(frozen=True)
class Breakdown:
    """The plan of one regime: its peak, split by component, and the moment it happens."""

    regime: str
    formula: str
    total_bytes: int
    components: dict[str, int]
    peak_phase: str
    phases: dict[str, dict[str, int]]
    model_state_bytes: int
    symbols: dict[str, int]
    activations_included: bool
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The JSON form (the README's JSON contract): integers for bytes."""
        return {
            "total_bytes": self.total_bytes,
            "components": dict(self.components),
            "formula": self.formula,
            "model_state_bytes": self.model_state_bytes,
            "peak_phase": self.peak_phase,
            "phases": {k: dict(v) for k, v in self.phases.items()},
            "symbols": dict(self.symbols),
            "activations_included": self.activations_included,
            "notes": list(self.notes),
        }


def _phase(**parts: int) -> dict[str, int]:
    return {name: int(parts.get(name, 0)) for name in COMPONENTS}


RUNTIMES = ("cuda", "cpu", "fake")


def plan(spec: ModelSpec, train: TrainSpec, params: int | None = None,
         runtime: str = "cuda", rank: int = 0) -> Breakdown:
    """Plan the peak memory per GPU of one training step of ``train`` on ``spec``.

    ``params`` overrides N in the model states (``estimate --params``). ``runtime`` is where
    the step runs: ``cuda`` (a real run, the default) or ``cpu``/``fake`` (measured by
    memplan's tracker, where two things differ: CPU dropout masks have the input's dtype, and
    with a TorchDispatchMode active autograd sums gradients out of place). A sharded job
    (:func:`memplan.fsdp.is_sharded`) is planned for GPU ``rank`` of ``train.gpus``; rank 0
    holds the most (the last ranks' shards are padding).
    """
    result = _plan(spec, train, params, runtime, rank)
    if spec.approximation:  # planned with another family's profile (--as): say so everywhere
        result = replace(result, notes=(spec.approximation, *result.notes))
    return result


def _plan(spec: ModelSpec, train: TrainSpec, params: int | None, runtime: str,
          rank: int) -> Breakdown:
    state = model_state(spec, train, params)
    if F.is_sharded(train):
        return _plan_sharded(spec, train, state, runtime, rank, params)
    states = {"weights": state.weights_bytes + P.buffer_bytes(spec),
              "optimizer_states": state.optimizer_states_bytes + O.step_counter_bytes(spec, train),
              "master_weights": state.master_weights_bytes}
    r = train.recipe
    step_tmp = O.step_temporary_bytes(spec, train, _trainable_param_bytes(r, state),
                                      _largest_itemsize(state), runtime)
    # The mixed recipe keeps its bf16 gradient buffers for good, and each fp32 gradient lives
    # only until its hook moves it; every other regime frees gradients at
    # zero_grad(set_to_none=True) before the forward.
    # ZeRO-2 and -3 reduce-scatter each gradient bucket into a sharded buffer that stays.
    # With gradient accumulation, the micro-batches after the first run their forward and
    # backward beside the gradients of the earlier ones: every .grad exists (the peak of the
    # cycle; the first micro-batch's moments are never larger).
    persistent_grads = state.gradients_bytes \
        if r.notes_mixed or r.stage >= 2 or r.grad_accum > 1 else 0
    gather = _zero3_gather_bytes(spec, train)
    phases = {"step": _phase(**states, gradients=state.gradients_bytes, temporaries=step_tmp)}
    notes: list[str] = [n for n in (O.paged_note(spec, train, runtime),) if n]
    if train.has_activations:
        act = A.plan_activations(spec, train, state, runtime)
        # the manual loop's outputs: the previous step's through this forward (replaced when
        # it returns), this step's through backward (on the tape) and the step
        kept = act.outputs_bytes
        phases["step"]["activations"] += kept + act.inputs_bytes
        states_w = states | {"weights": states["weights"] + gather}
        phases["forward"] = _phase(**states_w, gradients=persistent_grads,
                                   activations=act.forward.activations + kept,
                                   temporaries=act.forward.temporaries)
        moment = act.backward
        phases["backward"] = _phase(**states_w, gradients=persistent_grads + moment.gradients,
                                    activations=moment.activations,
                                    temporaries=moment.temporaries)
        notes.extend(act.notes)
        notes.append(_loop_note(r, kept))
        if gather:
            notes.append("zero3: two blocks gathered in fp16 (the one computing and the one "
                         "prefetched), DeepSpeed's pattern; not measured by memplan")
    else:
        notes.append("activations excluded: give --batch and --seq to plan them")
    peak_phase = max(phases, key=lambda name: sum(phases[name].values()))
    components = phases[peak_phase]
    return Breakdown(
        regime=train.regime, formula=state.formula, total_bytes=sum(components.values()),
        components=components, peak_phase=peak_phase, phases=phases,
        model_state_bytes=state.total_bytes, symbols=state.symbols,
        activations_included=train.has_activations, notes=tuple(notes),
    )


def _loop_note(r: Recipe, kept: int) -> str:
    """What the plan assumed of the training loop."""
    if r.keeps_outputs:
        from memplan.units import format_bytes

        return (f"loop: manual (the model's outputs, {format_bytes(kept)}, stay referenced "
                "through backward and the step; --loop trainer drops them)")
    return "loop: trainer (the outputs are dropped before backward)"


def _zero3_gather_bytes(spec: ModelSpec, train: TrainSpec) -> int:
    """ZeRO-3 (the paper's stage, DeepSpeed) gathers each module's fp16 parameters as it
    computes and prefetches the next: two of the largest unit, a block or the embeddings."""
    if train.recipe.stage != 3 or train.gpus == 1:
        return 0
    largest = max(P.block_params(spec), P.embedding_params(spec))
    return 2 * 2 * largest


def _plan_sharded(spec: ModelSpec, train: TrainSpec, state: ModelState, runtime: str,
                  rank: int, params: int | None) -> Breakdown:
    """Per rank of FSDP2: the step-long shards and states, and the forward and backward
    walked with the units' gather and reduce-scatter buffers (:mod:`memplan.fsdp`).

    ``params`` (N given without a shape) scales the step-long states by N over the shape's
    count; the gather buffers and activations come from the shape.
    """
    m = train.gpus
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < m:
        raise MemplanError(f"rank must be in [0, {m}), got {rank!r}")
    rs = F.rank_states(spec, train, m, rank)
    if params:
        rs = F.scaled(rs, params, P.count_params(spec))
    states = {"weights": rs.weights + P.buffer_bytes(spec),
              "optimizer_states": rs.optimizer_states}
    phases = {"step": _phase(**states, gradients=rs.persistent_grads + rs.sharded_grads,
                             temporaries=rs.step_temporaries)}
    sched = F.schedule(spec, train, m)
    how = F.strategy(train)
    notes = [f"per GPU: rank {rank} of {m}, FSDP {how} (each block one unit, the root last)"]
    if train.has_activations:
        act = A.plan_activations(spec, train, state, runtime, fsdp=sched)
        kept = act.outputs_bytes  # the manual loop's outputs (see _plan)
        phases["step"]["activations"] += kept + act.inputs_bytes
        for name, moment in (("forward", act.forward), ("backward", act.backward)):
            phases[name] = _phase(weights=states["weights"] + moment.weights,
                                  optimizer_states=states["optimizer_states"],
                                  gradients=rs.persistent_grads + moment.gradients,
                                  activations=moment.activations
                                  + (kept if name == "forward" else 0),
                                  temporaries=moment.temporaries)
        notes.extend(act.notes)
        notes.append(_loop_note(train.recipe, kept))
    else:
        weights, grads = F.replay(sched)
        phases["gather"] = _phase(weights=states["weights"] + weights,
                                  optimizer_states=states["optimizer_states"],
                                  gradients=rs.persistent_grads + grads)
        notes.append("activations excluded: give --batch and --seq to plan them")
    peak_phase = max(phases, key=lambda name: sum(phases[name].values()))
    components = phases[peak_phase]
    zero = train.recipe.fsdp  # the notes' zero: its formula is per GPU already
    formula = state.formula if zero else f"({state.formula}) ÷ {m} GPUs"
    symbols = {k: v for k, v in state.symbols.items() if not (k == "M" and zero)}
    return Breakdown(
        regime=train.regime, formula=formula, total_bytes=sum(components.values()),
        components=components, peak_phase=peak_phase, phases=phases,
        # the notes' formula: 16N/M for zero, the regime's model states over M otherwise
        model_state_bytes=state.total_bytes if zero else state.total_bytes // m,
        symbols=symbols | {"GPUs": m}, activations_included=train.has_activations,
        notes=tuple(notes))


def _largest_itemsize(state: ModelState) -> int:
    """Bytes per element of the trainable tensors: fp32 unless existing bf16 ones train."""
    return 4 if state.new_params else state.weight_itemsize


def _trainable_param_bytes(r: Recipe, state: ModelState) -> int:
    """Bytes of the trainable parameters themselves, in their own dtype."""
    if r.stage:
        return state.master_weights_bytes  # the optimizer steps the fp32 master shard
    if r.full:
        return state.weights_bytes
    new = 4 * state.new_params
    return new + state.weight_itemsize * (state.trainable - state.new_params)


@dataclass(frozen=True)
class FitResult:
    """Whether a plan fits a GPU, and by how much."""

    fits: bool
    required_bytes: int
    capacity_bytes: int
    reserve_bytes: int
    headroom_bytes: int
    max_batch: int | None
    breakdown: Breakdown = field(repr=False)

    def to_dict(self) -> dict:
        """The JSON form (the README's JSON contract)."""
        return {
            "fits": self.fits, "required_bytes": self.required_bytes,
            "capacity_bytes": self.capacity_bytes, "reserve_bytes": self.reserve_bytes,
            "headroom_bytes": self.headroom_bytes, "max_batch": self.max_batch,
            "regime": self.breakdown.regime, "plan": self.breakdown.to_dict(),
        }


def fits(spec: ModelSpec, train: TrainSpec, capacity_bytes: int,
         reserve_bytes: int = DEFAULT_RESERVE_BYTES, params: int | None = None) -> FitResult:
    """Whether ``train`` fits in ``capacity_bytes`` after the runtime reserve.

    ``max_batch`` is the largest micro-batch that fits at the job's sequence length (None
    without ``seq``; 0 when not even one sequence fits).
    """
    breakdown = plan(spec, train, params)
    required = breakdown.total_bytes + reserve_bytes
    best = max_batch(spec, train, capacity_bytes, reserve_bytes, params=params) if train.seq \
        else None
    return FitResult(required <= capacity_bytes, required, capacity_bytes, reserve_bytes,
                     capacity_bytes - required, best, breakdown)


def max_batch(spec: ModelSpec, train: TrainSpec, capacity_bytes: int,
              reserve_bytes: int = DEFAULT_RESERVE_BYTES, limit: int = 2**20,
              params: int | None = None) -> int:
    """The largest batch at ``train.seq`` whose plan fits; memory grows with the batch."""
    def ok(batch: int) -> bool:
        job = replace(train, batch=batch, seq=train.seq)
        return plan(spec, job, params).total_bytes + reserve_bytes <= capacity_bytes

    if not ok(1):
        return 0
    low, high = 1, 2
    while high <= limit and ok(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if ok(mid) else (low, mid)
    return low
