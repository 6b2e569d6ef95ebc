"""What to change so that a job fits: the practitioner's changes, searched and ranked by compute.

Starting from the user's job, :func:`advise_options` tries the combinations of the changes that
memplan plans, each planned exactly as ``memplan fits`` plans it (the option's command line
reproduces its bytes):

- the base's precision. LoRA: ``lora`` → ``lora-bf16`` → ``qlora`` (NF4). Full fine-tuning on
  fp32 weights without autocast: ``--autocast bf16`` (the Trainer's ``bf16=True``), the notes'
  ``mixed`` recipe, then pure bf16 (``--dtype bf16``: weights, gradients and AdamW states in
  bf16); under autocast, pure bf16. When no full fine-tuning option fits, LoRA on a bf16 or
  NF4 base (a change of method, said so);
- activation checkpointing (on; or off, when the user has it on and memory allows: it saves a
  forward of compute);
- a lower LoRA rank (half the user's) and narrower targets (attention only, from ``all``);
- bitsandbytes' 8-bit AdamW (``adamw-8bit``) in place of AdamW, for full fine-tuning on one
  GPU or plain data parallel (bitsandbytes does not step FSDP's sharded tensors; the notes'
  ``mixed`` and the ZeRO stages keep their own AdamW);
- the loop: ``manual`` → ``trainer`` (the model's outputs dropped before backward), at no
  compute;
- a smaller micro-batch, the largest divisor of the user's that fits, with gradient
  accumulation keeping the effective batch: micro-batch ``b`` plans
  ``grad_accum = user.grad_accum × batch / b``, the gradients of the earlier micro-batches
  alive beside the later ones' activations;
- FSDP over more GPUs (2, 4, 8... up to ``max_gpus``; ``full-shard`` unless the user chose a
  strategy), for the regimes FSDP shards (never QLoRA's NF4 base), each GPU taking its share
  of the effective batch in one micro-batch: memplan does not plan accumulation under FSDP or
  the ZeRO stages, so no sharded option accumulates;
- a shorter sequence (halving, not below ``min_seq``), only when nothing fits at the user's.

Bounded by pruning: along each combination of the categorical changes (base, checkpointing,
rank, targets, optimizer, loop) the micro-batch is the largest that fits and the GPU count the
smallest (more GPUs only when one micro-batch of one sequence does not fit); an option is
dropped when another fits with a subset of its changes, none taken further (more GPUs, a
smaller micro-batch or sequence), at no more than 1% more compute per token
(:data:`COMPUTE_TOLERANCE`); a round of the search is skipped when its most frugal point does
not fit. Options are ranked by compute per trained token (:mod:`memplan.flops`), which is the
compute of a step of the same tokens; within :data:`RANK_STEP` of each other, fewer changes
first, then 16-bit compute before fp32. The precision, the optimizer and the loop change no
FLOPs; the compute dtype (:func:`compute_dtype`) sets the peak a step time is read against.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction

from memplan import arch
from memplan.errors import MemplanError
from memplan.flops import Flops, flops_per_token
from memplan.fsdp import is_sharded, strategy
from memplan.planner import Breakdown, plan
from memplan.recipe import preset
from memplan.regimes import model_state
from memplan.spec import MAX_JOB_SIZE, ModelSpec, TrainSpec

# Design choices, not measurements. Two options whose compute per token differs by less than
# COMPUTE_TOLERANCE of the user's job cost the same here (the FLOPs model leaves out norms,
# softmax and element-wise ops, so it cannot tell them apart), and options within RANK_STEP of
# each other rank as equals, fewer changes first.
COMPUTE_TOLERANCE = 0.01
RANK_STEP = 0.02
DEFAULT_MAX_GPUS = 8
DEFAULT_MIN_SEQ = 128
# The MFU of the step times, said beside each: a round figure below the 46.2% that PaLM 540B
# trained at (Chowdhery et al. 2022, "Training efficiency"); ``--mfu`` sets another.
DEFAULT_MFU = 0.4

# Changes a practitioner would try that advise does not search (memplan plans each of them
# with its own flag: check them with `memplan fits`).
NOT_SEARCHED = (
    "Adafactor and SGD in place of AdamW (--optimizer adafactor|sgd|sgd-momentum): they change "
    "the training, not only its memory",
    "paged-adamw-8bit: the bytes of adamw-8bit on the GPU, its states paged to host memory "
    "under pressure",
    "fp16 (--autocast fp16, for GPUs without bf16: T4, V100): the bytes of bf16 autocast plus "
    "a gradient scaler",
    "gradient accumulation under FSDP or ZeRO (memplan does not plan --grad-accum with "
    "sharding): sharded options keep the effective batch over more GPUs instead",
)


@dataclass(frozen=True)
class Change:
    """One change from the user's job: what, from and to, and a sentence for people."""

    kind: str
    before: str
    after: str
    text: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "from": self.before, "to": self.after, "text": self.text}


@dataclass(frozen=True)
class Option:
    """A job that fits: its plan, what changed, and its compute relative to the user's job.

    ``accumulation_steps`` micro-batches of ``train.batch`` sequences on each of
    ``train.gpus`` GPUs make one optimizer step of ``effective_batch`` sequences; they are the
    job's ``grad_accum``, planned (the plan holds the gradients kept between micro-batches).
    """

    train: TrainSpec
    changes: tuple[Change, ...]
    breakdown: Breakdown = field(repr=False)
    required_bytes: int
    capacity_bytes: int
    reserve_bytes: int
    flops: Flops
    relative_compute: float
    compute_bytes: int = 2
    levels: tuple = field(repr=False, default=())

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (the job's ``grad_accum``)."""
        return self.train.grad_accum

    @property
    def effective_batch(self) -> int:
        """Sequences of one optimizer step, all GPUs and micro-batches together."""
        return self.train.gpus * self.train.batch * self.train.grad_accum

    @property
    def compute_dtype(self) -> str:
        """The dtype the forward's matmuls run in (:func:`compute_dtype`)."""
        return compute_dtype(self.train)

    @property
    def peak_bytes(self) -> int:
        """The planned peak per GPU (without the runtime reserve)."""
        return self.breakdown.total_bytes

    @property
    def headroom_bytes(self) -> int:
        """Capacity left after the peak and the reserve."""
        return self.capacity_bytes - self.required_bytes

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step, all GPUs and accumulation steps together."""
        return self.effective_batch * self.train.seq

    @property
    def step_flops(self) -> int:
        """FLOPs of one optimizer step, all GPUs together."""
        return self.flops.total * self.tokens_per_step

    def step_seconds(self, peak_flops: float | None, mfu: float) -> float | None:
        """Seconds per optimizer step at ``mfu`` of ``peak_flops`` per GPU (None without)."""
        if not peak_flops:
            return None
        return self.step_flops / (self.train.gpus * mfu * peak_flops)

    def to_dict(self) -> dict:
        """The JSON form (the command is added by the caller, which knows the model flags)."""
        r = self.train.recipe
        return {
            "peak_bytes": self.peak_bytes, "required_bytes": self.required_bytes,
            "headroom_bytes": self.headroom_bytes,
            "relative_compute": round(self.relative_compute, 4),
            "changes": [c.to_dict() for c in self.changes],
            "regime": self.train.regime, "batch": self.train.batch, "seq": self.train.seq,
            "gpus": self.train.gpus, "shard": self.train.shard,
            "checkpointing": self.train.checkpointing,
            "rank": self.train.lora.rank if r.lora else None,
            "targets": self.train.lora.targets if r.lora else None,
            "dtype": r.dtype, "autocast": r.autocast, "optimizer": r.optimizer,
            "loop": r.loop,
            "accumulation_steps": self.accumulation_steps,
            # kept for readers of the earlier contract: accumulation is planned exactly now
            # (``peak_bytes`` includes it), so there is no bound left to give
            "accumulation_bound_bytes": None, "accumulation_bound_fits": None,
            "effective_batch": self.effective_batch, "tokens_per_step": self.tokens_per_step,
            "flops_per_token": self.flops.total, "step_flops": self.step_flops,
            "compute_dtype": self.compute_dtype,
            "plan": self.breakdown.to_dict(),
        }


@dataclass(frozen=True)
class _Value:
    """One value of a categorical dimension: its level (0 = the user's), fields, change.

    ``full_only``: the value goes with a base whose every weight trains (8-bit states save
    next to nothing on LoRA's adapters).
    """

    level: int
    fields: dict
    change: Change | None
    tier: int = 1
    full_only: bool = False


USER = _Value(0, {}, None)


def _regime_values(train: TrainSpec) -> list[_Value]:
    """The base's precision: the regime presets and, for full fine-tuning, the dtypes."""
    regime = train.regime
    r = train.recipe

    def to(level: int, new: str, why: str, tier: int = 1) -> _Value:
        # a preset's own dtype and no autocast: --dtype and --autocast go with the regime
        return _Value(level, {"regime": new, "dtype": None, "autocast": "none"},
                      Change("regime", regime, new, f"regime {regime} → {new} ({why})"), tier)

    values = [USER]
    if r.lora and r.dtype == "fp32":  # K adapters train on an fp32 or bf16 base only
        values += [to(1, "lora-bf16", "bf16 base")] + \
            ([to(2, "qlora", "NF4 base")] if train.adapters == 1 else [])
    elif r.lora and not r.nf4 and train.adapters == 1:
        values += [to(1, "qlora", "NF4 base")]
    elif r.full and not (r.notes_mixed or r.stage) and r.dtype == "fp32" \
            and train.param_dtype == "fp32":
        pure = Change("dtype", "fp32", "bf16", "pure bf16: weights bf16 (--dtype bf16), so "
                      "gradients and AdamW states too; updates lose precision without Kahan "
                      "summation or stochastic rounding")
        if r.autocast == "none":
            values.append(_Value(1, {"autocast": "bf16"}, Change(
                "autocast", "none", "bf16", "autocast bf16 (the Trainer's bf16=True: bf16 "
                "matmuls and activations; fp32 weights, gradients and AdamW states)")))
            if not r.fsdp:
                values.append(to(2, "mixed", "bf16 gradients and momentum"))
            values.append(_Value(values[-1].level + 1, {"dtype": "bf16"}, pure))
        else:  # under autocast: its weights, gradients and states go 16-bit too
            values.append(_Value(1, {"dtype": "bf16", "autocast": "none"}, replace(
                pure, before=f"fp32, autocast {r.autocast}",
                text=f"autocast {r.autocast} → {pure.text}")))
    if r.full and not r.stage:  # a change of method, searched only when nothing else fits
        top = values[-1].level
        values += [to(top + 1, "lora-bf16", "LoRA on a bf16 base: a change of method", 2),
                   to(top + 2, "qlora", "LoRA on an NF4 base: a change of method", 2)]
    return values


def _dimensions(train: TrainSpec) -> list[list[_Value]]:
    """The categorical dimensions of the search, each with the user's value first: the base,
    checkpointing, then (LoRA or full fine-tuning) rank and targets, the optimizer, the loop."""
    r = train.recipe
    ckpt = not train.checkpointing
    dims = [_regime_values(train),
            [USER,
             _Value(1, {"checkpointing": ckpt},
                    Change("checkpointing", "off" if ckpt else "on", "on" if ckpt else "off",
                           "activation checkpointing " + ("on" if ckpt else "off (saves a "
                                                          "forward of compute)")))]]
    lora = train.lora
    if r.lora or (r.full and not r.stage):
        rank = [USER]
        if lora.rank > 1 and r.lora:
            low = lora.rank // 2
            rank.append(_Value(1, {"rank": low},
                               Change("rank", str(lora.rank), str(low),
                                      f"LoRA rank {lora.rank} → {low}")))
        targets = [USER]
        if lora.targets == "all" and r.lora:
            targets.append(_Value(1, {"targets": "attention"},
                                  Change("targets", "all", "attention",
                                         "LoRA targets all → attention")))
        dims += [rank, targets]
    optimizer = [USER]
    if r.optimizer == "adamw" and r.full and not (r.notes_mixed or r.stage) \
            and not is_sharded(train):
        optimizer.append(_Value(1, {"optimizer": "adamw-8bit", "optimizer_impl": "fused"},
                                Change("optimizer", "adamw", "adamw-8bit",
                                       "optimizer adamw → adamw-8bit (bitsandbytes' AdamW8bit: "
                                       "its two states in 8 bits)"), full_only=True))
    loop = [USER]
    if r.keeps_outputs:
        loop.append(_Value(1, {"loop": "trainer"}, Change(
            "loop", r.loop, "trainer", "loop manual → trainer (drop the outputs before "
            "backward: keep the loss, `del out`, as the Trainer does)")))
    return [*dims, optimizer, loop]


def _apply(train: TrainSpec, combo: tuple[_Value, ...]) -> TrainSpec:
    """The job with the combination's fields (MemplanError for one memplan refuses)."""
    fields: dict = {}
    lora: dict = {}
    for value in combo:
        for k, v in value.fields.items():
            (lora if k in ("rank", "targets") else fields)[k] = v
    if lora:
        fields["lora"] = replace(train.lora, **lora)
    return replace(train, **fields) if fields else train


def _valid(train: TrainSpec, combo: tuple[_Value, ...]) -> bool:
    """Whether memplan plans the combination (recipe.py refuses what does not exist)."""
    try:
        job = _apply(train, combo)
    except MemplanError:
        return False
    return job.recipe.full or not any(v.full_only for v in combo)


def _combos(train: TrainSpec, tier: int) -> list[tuple[_Value, ...]]:
    """Every valid combination of one value per dimension in ``tier``, fewest changes first."""
    combos: list[tuple[_Value, ...]] = [()]
    for dim in _dimensions(train):
        combos = [c + (v,) for c in combos for v in dim]
    combos = [c for c in combos if c[0].tier == tier and _valid(train, c)]
    return sorted(combos, key=lambda c: (sum(v.level for v in c), [v.level for v in c]))


def _divisors(n: int) -> list[int]:
    """The divisors of ``n``, largest first."""
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)}, reverse=True)


def _scalable(train: TrainSpec) -> bool:
    return train.recipe.shardable or bool(train.recipe.stage)


def _sharded_at(train: TrainSpec, user: TrainSpec, gpus: int, shard: bool) -> TrainSpec:
    """The job over ``gpus`` GPUs; with ``shard``, FSDP with the user's strategy, else
    full-shard (regime zero and the ZeRO paper's stages shard by themselves)."""
    if not shard:
        return replace(train, gpus=gpus)
    if train.recipe.stage or train.recipe.fsdp:
        return replace(train, gpus=gpus)
    return replace(train, gpus=gpus, shard=user.shard if user.shard != "none" else "full-shard")


def _jobs(make: Callable[[], TrainSpec], tries: list[tuple[int, int]]) -> list[TrainSpec]:
    """The jobs of ``(micro-batch, grad_accum)`` tries, leaving out what memplan refuses
    (accumulation or 8-bit states under FSDP...)."""
    try:
        job = make()
    except MemplanError:
        return []
    out = []
    for batch, accum in tries:
        try:
            out.append(replace(job, batch=batch, grad_accum=accum))
        except MemplanError:
            continue
    return out


def gpu_counts(user_gpus: int, max_gpus: int) -> list[int]:
    """The user's count, then the powers of two above it up to ``max_gpus``."""
    counts, g = [user_gpus], 2
    while g <= max_gpus:
        if g > user_gpus:
            counts.append(g)
        g *= 2
    return counts


class _Search:
    """One search: the user's job, the plans made so far (memoised), the options found."""

    def __init__(self, spec: ModelSpec, user: TrainSpec, capacity: int, reserve: int,
                 params: int | None, max_gpus: int) -> None:
        self.spec, self.user, self.params = spec, user, params
        self.capacity, self.reserve, self.max_gpus = capacity, reserve, max_gpus
        self.base_flops = flops_per_token(spec, user, params).total
        self.plans: dict[TrainSpec, Breakdown | None] = {}
        self.found: list[Option] = []
        self.frugal: dict[int, tuple[_Value, ...]] = {}

    def plan(self, train: TrainSpec) -> Breakdown | None:
        """The plan, or None for a combination memplan refuses (FSDP of QLoRA...)."""
        if train not in self.plans:
            try:
                self.plans[train] = plan(self.spec, train, self.params)
            except MemplanError:
                self.plans[train] = None
        return self.plans[train]

    def fits(self, train: TrainSpec) -> bool:
        b = self.plan(train)
        return b is not None and b.total_bytes + self.reserve <= self.capacity

    def dominated(self, levels: tuple, compute: int) -> bool:
        slack = COMPUTE_TOLERANCE * self.base_flops
        return any(all(a <= b for a, b in zip(y.levels, levels, strict=True))
                   and y.flops.total <= compute + slack for y in self.found)

    def points(self, train: TrainSpec) -> list[tuple[Fraction, list[TrainSpec]]]:
        """Where to run: (level, the jobs to try, largest micro-batch first), fewest GPUs
        first. The user's GPUs as they are, each divisor of the micro-batch with the
        accumulation that keeps the effective batch; sharded with FSDP if they were not
        (level + 1/2); then more GPUs, each taking its share in one micro-batch (memplan plans
        no accumulation under FSDP or ZeRO). Jobs memplan refuses are left out."""
        user, out = self.user, []
        accum = user.grad_accum
        same = [(b, accum * (user.batch // b)) for b in _divisors(user.batch)]
        out.append((Fraction(user.gpus),
                    _jobs(lambda: _sharded_at(train, user, user.gpus, False), same)))
        if not _scalable(train) or train.adapters > 1:  # K adapters: no FSDP plan
            return [(g, jobs) for g, jobs in out if jobs]
        total = user.gpus * user.batch * accum  # sequences per optimizer step
        if user.gpus > 1 and user.shard == "none" and train.recipe.shardable \
                and not train.recipe.fsdp and total % user.gpus == 0:
            out.append((Fraction(2 * user.gpus + 1, 2),
                        _jobs(lambda: _sharded_at(train, user, user.gpus, True),
                              [(total // user.gpus, 1)])))
        for g in gpu_counts(user.gpus, self.max_gpus)[1:]:
            if total % g == 0:
                share = (total // g, 1)
            elif g > total:  # more GPUs than sequences: one each, the effective batch grows
                share = (1, 1)
            else:  # the effective batch cannot be kept over g GPUs
                continue
            out.append((Fraction(g),
                        _jobs(lambda g=g: _sharded_at(train, user, g, True), [share])))
        return [(g, jobs) for g, jobs in out if jobs]

    def search(self, combo: tuple[_Value, ...], seq: int) -> Option | None:
        """The least-changed point of ``combo`` at ``seq`` that fits and is not dominated."""
        try:
            train = replace(_apply(self.user, combo), seq=seq)
        except MemplanError:
            return None
        flops = flops_per_token(self.spec, train, self.params)
        cat = tuple(v.level for v in combo)
        seq_level = Fraction(self.user.seq, seq)
        for g, jobs in self.points(train):

            def levels(job: TrainSpec, g: Fraction = g) -> tuple:
                return (*cat, g, Fraction(self.user.batch, job.batch), seq_level)

            smallest = jobs[-1]
            jobs = [j for j in jobs if not self.dominated(levels(j), flops.total)]
            best = self.largest_fitting(jobs, combo)
            if best is not None:
                option = self.option(best, combo, flops, levels(best))
                self.found.append(option)
                return option
            if self.may_fit(smallest, combo) and self.fits(smallest):  # fits, found already
                return None
        return None

    def largest_fitting(self, jobs: list[TrainSpec], combo: tuple[_Value, ...]
                        ) -> TrainSpec | None:
        """The first job of ``jobs`` (largest micro-batch first) that fits. Memory falls with
        the micro-batch among jobs that accumulate alike; starting to accumulate adds the
        gradients kept between micro-batches, so the user's own accumulation is tried on its
        own, then the rest bisected."""
        if jobs and jobs[0].grad_accum == self.user.grad_accum:
            if self.may_fit(jobs[0], combo) and self.fits(jobs[0]):
                return jobs[0]
            jobs = jobs[1:]
        low, high, best = 0, len(jobs) - 1, None
        while low <= high:
            mid = (low + high) // 2
            if self.may_fit(jobs[mid], combo) and self.fits(jobs[mid]):
                best, high = mid, mid - 1
            else:
                low = mid + 1
        return None if best is None else jobs[best]

    def may_fit(self, job: TrainSpec, combo: tuple[_Value, ...]) -> bool:
        """False when ``job`` cannot fit: the most frugal job of its base at the same point
        (every other change that saves memory taken, as far as memplan plans it there) does
        not. One plan, shared by the combinations of the base, instead of one each."""
        frugal = self.frugal.get(id(combo[0]))
        if frugal is None:
            return True
        lean = job
        for value in frugal[1:]:
            if value.level:
                try:
                    lean = _apply(lean, (value,))
                except MemplanError:  # 8-bit states under FSDP...: not at this point
                    continue
        return lean == job or self.fits(lean)

    def option(self, train: TrainSpec, combo: tuple[_Value, ...], flops: Flops,
               levels: tuple) -> Option:
        user = self.user
        changes = [v.change for v in combo if v.change is not None]
        if train.gpus != user.gpus or train.shard != user.shard:
            how = f"FSDP {strategy(train)}" if is_sharded(train) else \
                f"{train.regime}, sharded" if train.recipe.stage else "data parallel"
            changes.append(Change("gpus", str(user.gpus), str(train.gpus),
                                  f"{train.gpus} GPUs ({how})"))
        steps = train.grad_accum
        if train.batch != user.batch:
            text = f"micro-batch {user.batch} → {train.batch}"
            if steps > 1:
                text += f" × {steps} gradient accumulation steps"
                if user.grad_accum > 1:
                    text += f" (from {user.grad_accum})"
            changes.append(Change("micro-batch", str(user.batch), str(train.batch), text))
        elif steps != user.grad_accum:
            changes.append(Change("grad-accum", str(user.grad_accum), str(steps),
                                  f"gradient accumulation {user.grad_accum} → {steps} steps"))
        before = user.gpus * user.batch * user.grad_accum
        effective = train.gpus * train.batch * steps
        if effective != before:
            changes.append(Change("effective-batch", str(before), str(effective),
                                  f"effective batch {before} → {effective} ({train.gpus} "
                                  f"GPUs × 1)"))
        if train.seq != user.seq:
            changes.append(Change("seq", str(user.seq), str(train.seq),
                                  f"sequence {user.seq} → {train.seq} tokens"))
        b = self.plan(train)
        return Option(train, tuple(changes), b, b.total_bytes + self.reserve, self.capacity,
                      self.reserve, flops, flops.total / self.base_flops,
                      compute_bytes(self.spec, train, self.params), levels)

    def frugal_fits(self, seq: int, tier: int, combos: list[tuple[_Value, ...]]) -> bool:
        """Whether the most frugal point of each base fits, on the user's GPUs or the most
        searched (else the round is hopeless and skipped)."""
        for combo in _frugal(combos, self.user).values():
            try:
                train = replace(_apply(self.user, combo), seq=seq)
            except MemplanError:
                continue
            points = self.points(train)
            if not points:
                continue
            for _, jobs in {id(p): p for p in (points[0], points[-1])}.values():
                if self.fits(jobs[-1]):
                    return True
        return False


def _frugal(combos: list[tuple[_Value, ...]], user: TrainSpec) -> dict[int, tuple[_Value, ...]]:
    """Each base's most frugal combination (by the id of its base value): the last value of
    each other dimension it can take (checkpointing stays as the user has it when that is on:
    turning it off saves compute, not memory)."""

    def frugality(combo: tuple[_Value, ...]) -> tuple:
        levels = [v.level for v in combo[1:]]
        if user.checkpointing:
            levels[0] = -levels[0]
        return sum(levels), levels

    out: dict[int, tuple[_Value, ...]] = {}
    for combo in combos:
        key = id(combo[0])
        if key not in out or frugality(combo) > frugality(out[key]):
            out[key] = combo
    return out


def compute_bytes(spec: ModelSpec, train: TrainSpec, params: int | None = None) -> int:
    """Bytes per element the matmuls run in: 2 (bf16 or fp16) on a 16-bit or NF4 base, under
    autocast, for the ZeRO paper's stages and under FSDP's bf16 policy; 4 (fp32) otherwise
    (memplan's ``mixed`` recipe computes in fp32, as :mod:`memplan.activations` plans it)."""
    if is_sharded(train) and train.param_dtype == "bf16":
        return 2
    return model_state(spec, train, params).compute_bytes


def compute_dtype(train: TrainSpec) -> str:
    """The dtype the forward's matmuls run in: FSDP's bf16 policy, the ZeRO paper's fp16,
    else the recipe's (the autocast dtype, or the weights')."""
    r = train.recipe
    if is_sharded(train) and train.param_dtype == "bf16":
        return "bf16"
    return "fp16" if r.stage else r.compute


def job_option(spec: ModelSpec, train: TrainSpec, capacity: int, reserve: int,
               params: int | None = None) -> Option:
    """The user's job, planned and costed as an option (whether or not it fits)."""
    return _Search(spec, train, capacity, reserve, params, 1).option(
        train, (), flops_per_token(spec, train, params), ())


def sequences(seq: int, min_seq: int = DEFAULT_MIN_SEQ) -> list[int]:
    """The user's sequence length, then halvings down to ``min_seq``."""
    out = [seq]
    while out[-1] // 2 >= min_seq:
        out.append(out[-1] // 2)
    return out


def advise_options(spec: ModelSpec, train: TrainSpec, capacity: int, reserve: int,
                   params: int | None = None, *, max_gpus: int = DEFAULT_MAX_GPUS,
                   min_seq: int = DEFAULT_MIN_SEQ,
                   on_progress: Callable[[int, int], None] | None = None) -> list[Option]:
    """The jobs that fit ``capacity`` after ``reserve``, changed as little as they need,
    ranked by compute per trained token (the user's job first when it fits as it is).

    ``train`` must plan activations (batch and seq). ``on_progress(done, total)`` is called
    after each combination searched. Empty when nothing fits, down to ``min_seq``.
    """
    if not train.has_activations:
        raise MemplanError("advise plans the whole step: give --batch and --seq "
                           "(e.g. --batch 4 --seq 2048)")
    if isinstance(max_gpus, bool) or not isinstance(max_gpus, int) \
            or not 1 <= max_gpus <= MAX_JOB_SIZE:
        raise MemplanError(f"--max-gpus must be 1 to {MAX_JOB_SIZE:,}, got {max_gpus!r}")
    if isinstance(min_seq, bool) or not isinstance(min_seq, int) or min_seq < 1:
        raise MemplanError(f"--min-seq must be a positive integer, got {min_seq!r}")
    plan(spec, train, params)  # the user's job itself must be valid: its error, verbatim
    search = _Search(spec, train, capacity, reserve, params, max_gpus)
    tiers = {tier: _combos(train, tier) for tier in (1, 2)}
    search.frugal = _frugal(tiers[1] + tiers[2], train)
    rounds = [(seq, tier) for seq in sequences(train.seq, min_seq) for tier in (1, 2)
              if tiers[tier]]
    total = sum(len(tiers[tier]) for _, tier in rounds)
    done = 0
    for seq, tier in rounds:
        combos = tiers[tier]
        if search.frugal_fits(seq, tier, combos):
            for combo in combos:
                search.search(combo, seq)
                done += 1
                if on_progress:
                    on_progress(done, total)
        else:
            done += len(combos)
        if search.found:
            break
    options = [o for o in search.found
               if not any(y is not o and all(a <= b for a, b in zip(y.levels, o.levels,
                                                                   strict=True))
                          and y.flops.total <= o.flops.total
                          + COMPUTE_TOLERANCE * search.base_flops for y in search.found)]
    return sorted(options, key=lambda o: (-o.train.seq, round(o.relative_compute / RANK_STEP),
                                          len(o.changes), o.compute_bytes,
                                          o.relative_compute, o.peak_bytes))


def gpu_peak_flops(name: str) -> dict[str, tuple[float, str]]:
    """Dense peak FLOP/s of a catalogue GPU by compute dtype, with the figure's source:
    ``{"bf16": (flops, source)}`` from ``bf16_tflops`` and ``flops_source``/``flops_url`` of
    ``memplan/presets/gpus.json``; empty where the catalogue has no figure. The catalogue has
    no fp32 figures, so fp32 compute gets no step time."""
    from memplan.presets import get_gpu

    gpu = get_gpu(name)
    tflops = getattr(gpu, "bf16_tflops", None)
    if not tflops:
        return {}
    source = getattr(gpu, "flops_source", "") or "memplan/presets/gpus.json"
    url = getattr(gpu, "flops_url", "")
    return {"bf16": (float(tflops) * 1e12, f"{source}; {url}" if url else source)}


def family_defaults(spec: ModelSpec) -> tuple[str, str]:
    """(implementation, attention) that ``memplan fits`` picks for ``auto`` on this model."""
    profile = arch.profile_of(spec)
    return ("memplan" if profile.reference_model else "hf"), profile.attentions[0]


def fits_args(spec: ModelSpec, train: TrainSpec) -> list[str]:
    """The job flags of ``memplan fits`` that plan ``train`` on ``spec`` (defaults left out;
    ``auto`` choices spelled out where the job differs from what auto picks)."""
    args = ["--regime", train.regime]
    lora = train.lora
    if train.recipe.lora:
        args += ["--rank", str(lora.rank)]
        if lora.alpha != 16.0:
            args += ["--alpha", f"{lora.alpha:g}"]
        if lora.targets != "all":
            targets = lora.targets if isinstance(lora.targets, str) else ",".join(lora.targets)
            args += ["--targets", targets]
        if lora.train_embeddings:
            args.append("--train-embeddings")
        if train.adapters > 1:
            args += ["--adapters", str(train.adapters)]
    if train.has_activations:
        args += ["--batch", str(train.batch), "--seq", str(train.seq)]
    if train.gpus != 1:
        args += ["--gpus", str(train.gpus)]
    if train.shard != "none":
        args += ["--shard", train.shard]
    if train.param_dtype != "fp32":
        args += ["--param-dtype", train.param_dtype]
    if train.recipe.trains == "head" and train.num_classes != 2:
        args += ["--classes", str(train.num_classes)]
    if train.recipe.trains == "prompt" and train.prompt_tokens != 20:
        args += ["--prompt-tokens", str(train.prompt_tokens)]
    r = train.recipe
    if r.dtype != preset(train.regime).dtype:
        args += ["--dtype", r.dtype]
    if r.autocast != "none":
        args += ["--autocast", r.autocast]
    if train.optimizer != "adamw":
        args += ["--optimizer", train.optimizer]
    if train.optimizer_impl != "fused":
        args += ["--optimizer-impl", train.optimizer_impl]
    if r.grad_accum != 1:
        args += ["--grad-accum", str(r.grad_accum)]
    if r.loop != "manual":
        args += ["--loop", r.loop]
    if train.checkpointing:
        args.append("--checkpointing")
    impl, attention = family_defaults(spec)
    if train.attention != attention:
        args += ["--attention", train.attention]
    if train.impl != impl:
        args += ["--impl", train.impl]
    if train.lora_backend != ("peft" if train.impl == "hf" else "memplan"):
        args += ["--lora-backend", train.lora_backend]
    return args


def fits_command(spec: ModelSpec, train: TrainSpec, head: Sequence[str]) -> str:
    """``memplan fits`` with ``head`` (the model and GPU flags, as the user gave them) and
    the job's flags, quoted for a POSIX shell."""
    return shlex.join(["memplan", "fits", *head, *fits_args(spec, train)])
