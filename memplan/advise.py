"""What to change so that a job fits: the practitioner's changes, searched and ranked by compute.

Starting from the user's job, :func:`advise_options` tries the combinations of the changes that
memplan can plan today, each planned exactly as ``memplan fits`` plans it:

- a 16-bit base: ``lora`` → ``lora-bf16`` → ``qlora`` (NF4); ``full`` → ``mixed``. When no
  full fine-tuning option fits, LoRA on a bf16 or NF4 base (a change of method, said so);
- activation checkpointing (on; or off, when the user has it on and memory allows: it saves a
  forward of compute);
- a lower LoRA rank (half the user's) and narrower targets (attention only, from ``all``);
- a smaller micro-batch, the largest divisor of the user's that fits, with gradient
  accumulation keeping the effective batch (accumulation steps = batch / micro-batch);
- FSDP over more GPUs (2, 4, 8... up to ``max_gpus``; ``full-shard`` unless the user chose a
  strategy), for the regimes FSDP shards (never QLoRA's NF4 base), each GPU taking its share
  of the effective batch;
- a shorter sequence (halving, not below ``min_seq``), only when nothing fits at the user's.

Bounded by pruning: along each combination of the categorical changes (base, checkpointing,
rank, targets) the micro-batch is the largest that fits and the GPU count the smallest (more
GPUs only when one micro-batch of one sequence does not fit); an option is dropped when
another fits with a subset of its changes, none taken further (more GPUs, a smaller micro-batch
or sequence), at no more than 1% more compute per token (:data:`COMPUTE_TOLERANCE`); a round of
the search is skipped when its most frugal point does not fit. Options are ranked by compute
per trained token (:mod:`memplan.flops`), which is the compute of a step of the same tokens;
within :data:`RANK_STEP` of each other, fewer changes first.

Gradient accumulation is not planned yet (memplan has no ``--grad-accum`` option): an option with
accumulation steps is the plan of one micro-batch, and its ``accumulation_bound_bytes`` bounds
what the gradients kept between micro-batches add (the whole gradient set alive through the
next micro-batch's forward and backward).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction

from memplan import arch
from memplan.errors import MemplanError
from memplan.flops import LORA, Flops, flops_per_token
from memplan.fsdp import SHARDABLE_REGIMES, is_sharded, strategy
from memplan.planner import Breakdown, plan
from memplan.regimes import model_state
from memplan.spec import MAX_JOB_SIZE, PAPER_STAGES, ModelSpec, TrainSpec

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

# Changes a practitioner would try that need options memplan does not have yet.
NOT_SEARCHED = (
    "8-bit optimizers (bitsandbytes AdamW8bit, paged AdamW): memplan plans adamw and sgd only",
    "the training loop's style (a hand-written loop keeps the logits through backward): "
    "memplan plans the Trainer's loop only",
    "gradient accumulation planned exactly: no --grad-accum yet (options with accumulation "
    "steps show the plan of one micro-batch and a bound)",
)

FULL_FAMILY = ("full", "mixed", "zero")


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
    ``train.gpus`` GPUs make one optimizer step of ``effective_batch`` sequences.
    """

    train: TrainSpec
    changes: tuple[Change, ...]
    breakdown: Breakdown = field(repr=False)
    required_bytes: int
    capacity_bytes: int
    reserve_bytes: int
    accumulation_steps: int
    effective_batch: int
    flops: Flops
    relative_compute: float
    accumulation_bound_bytes: int | None
    compute_bytes: int = 2
    levels: tuple = field(repr=False, default=())

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
        bound = self.accumulation_bound_bytes
        return {
            "peak_bytes": self.peak_bytes, "required_bytes": self.required_bytes,
            "headroom_bytes": self.headroom_bytes,
            "relative_compute": round(self.relative_compute, 4),
            "changes": [c.to_dict() for c in self.changes],
            "regime": self.train.regime, "batch": self.train.batch, "seq": self.train.seq,
            "gpus": self.train.gpus, "shard": self.train.shard,
            "checkpointing": self.train.checkpointing,
            "rank": self.train.lora.rank if self.train.regime in LORA else None,
            "targets": self.train.lora.targets if self.train.regime in LORA else None,
            "accumulation_steps": self.accumulation_steps,
            "effective_batch": self.effective_batch, "tokens_per_step": self.tokens_per_step,
            "flops_per_token": self.flops.total, "step_flops": self.step_flops,
            "compute_dtype": "bf16" if self.compute_bytes == 2 else "fp32",
            "accumulation_bound_bytes": bound,
            "accumulation_bound_fits": None if bound is None else
            bound + self.reserve_bytes <= self.capacity_bytes,
            "plan": self.breakdown.to_dict(),
        }


@dataclass(frozen=True)
class _Value:
    """One value of a categorical dimension: its level (0 = the user's), fields, change."""

    level: int
    fields: dict
    change: Change | None
    tier: int = 1


def _regime_values(train: TrainSpec) -> list[_Value]:
    regime = train.regime

    def to(level: int, new: str, why: str, tier: int = 1) -> _Value:
        return _Value(level, {"regime": new}, Change("regime", regime, new,
                                                     f"regime {regime} → {new} ({why})"), tier)

    values = [_Value(0, {}, None)]
    if regime == "lora":  # K adapters train on an fp32 or bf16 base only
        values += [to(1, "lora-bf16", "bf16 base")] + \
            ([to(2, "qlora", "NF4 base")] if train.adapters == 1 else [])
    elif regime == "lora-bf16" and train.adapters == 1:
        values += [to(1, "qlora", "NF4 base")]
    elif regime == "full":
        values += [to(1, "mixed", "bf16 gradients and momentum")]
    if regime in FULL_FAMILY:  # a change of method, searched only when nothing else fits
        top = values[-1].level
        values += [to(top + 1, "lora-bf16", "LoRA on a bf16 base: a change of method", 2),
                   to(top + 2, "qlora", "LoRA on an NF4 base: a change of method", 2)]
    return values


def _dimensions(train: TrainSpec) -> list[list[_Value]]:
    """The categorical dimensions of the search, each with the user's value first."""
    ckpt = not train.checkpointing
    dims = [_regime_values(train),
            [_Value(0, {}, None),
             _Value(1, {"checkpointing": ckpt},
                    Change("checkpointing", "off" if ckpt else "on", "on" if ckpt else "off",
                           "activation checkpointing " + ("on" if ckpt else "off (saves a "
                                                          "forward of compute)")))]]
    lora = train.lora
    if train.regime in LORA or train.regime in FULL_FAMILY:
        rank = [_Value(0, {}, None)]
        if lora.rank > 1 and train.regime in LORA:
            low = lora.rank // 2
            rank.append(_Value(1, {"rank": low},
                               Change("rank", str(lora.rank), str(low),
                                      f"LoRA rank {lora.rank} → {low}")))
        targets = [_Value(0, {}, None)]
        if lora.targets == "all" and train.regime in LORA:
            targets.append(_Value(1, {"targets": "attention"},
                                  Change("targets", "all", "attention",
                                         "LoRA targets all → attention")))
        dims += [rank, targets]
    return dims


def _combos(train: TrainSpec, tier: int) -> list[tuple[_Value, ...]]:
    """Every combination of one value per dimension in ``tier``, fewest changes first."""
    combos: list[tuple[_Value, ...]] = [()]
    for dim in _dimensions(train):
        combos = [c + (v,) for c in combos for v in dim]
    combos = [c for c in combos if c[0].tier == tier]
    return sorted(combos, key=lambda c: (sum(v.level for v in c), [v.level for v in c]))


def _apply(train: TrainSpec, combo: tuple[_Value, ...]) -> TrainSpec:
    job = train
    for value in combo:
        f = dict(value.fields)
        lora = {k: f.pop(k) for k in ("rank", "targets") if k in f}
        if lora:
            job = replace(job, lora=replace(job.lora, **lora))
        job = replace(job, **f)
    return job


def _divisors(n: int) -> list[int]:
    """The divisors of ``n``, largest first."""
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)}, reverse=True)


def _scalable(regime: str) -> bool:
    return regime in SHARDABLE_REGIMES or regime in PAPER_STAGES


def _sharded_at(train: TrainSpec, user: TrainSpec, gpus: int, shard: bool) -> TrainSpec:
    """The job over ``gpus`` GPUs; with ``shard``, FSDP with the user's strategy, else
    full-shard (regime zero and the ZeRO paper's stages shard by themselves)."""
    if not shard:
        return replace(train, gpus=gpus)
    if train.regime in PAPER_STAGES or train.regime == "zero":
        return replace(train, gpus=gpus)
    return replace(train, gpus=gpus, shard=user.shard if user.shard != "none" else "full-shard")


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

    def points(self, train: TrainSpec) -> list[tuple[Fraction, TrainSpec, list[tuple]]]:
        """Where to run: (level, the job over its GPUs, the (micro-batch, accumulation steps,
        effective batch) to try, largest micro-batch first), fewest GPUs first. The user's
        GPUs as they are; sharded with FSDP if they were not (level + 1/2); then more."""
        user, out = self.user, []
        total = user.gpus * user.batch
        same = [(b, user.batch // b, total) for b in _divisors(user.batch)]
        out.append((Fraction(user.gpus), _sharded_at(train, user, user.gpus, False), same))
        if not _scalable(train.regime) or train.adapters > 1:  # K adapters: no FSDP plan
            return out
        if user.gpus > 1 and user.shard == "none" and train.regime in SHARDABLE_REGIMES \
                and train.regime != "zero":
            out.append((Fraction(2 * user.gpus + 1, 2),
                        _sharded_at(train, user, user.gpus, True), same))
        for g in gpu_counts(user.gpus, self.max_gpus)[1:]:
            if total % g == 0:
                share = total // g
                tries = [(b, share // b, total) for b in _divisors(share)]
            elif g > total:  # more GPUs than sequences: one each, the effective batch grows
                tries = [(1, 1, g)]
            else:  # the effective batch cannot be kept over g GPUs
                continue
            out.append((Fraction(g), _sharded_at(train, user, g, True), tries))
        return out

    def search(self, combo: tuple[_Value, ...], seq: int) -> Option | None:
        """The least-changed point of ``combo`` at ``seq`` that fits and is not dominated."""
        train = replace(_apply(self.user, combo), seq=seq)
        flops = flops_per_token(self.spec, train, self.params)
        cat = tuple(v.level for v in combo)
        seq_level = Fraction(self.user.seq, seq)
        for g, job, tries in self.points(train):

            def levels(b: int, g: Fraction = g) -> tuple:
                return (*cat, g, Fraction(self.user.batch, b), seq_level)

            smallest = replace(job, batch=tries[-1][0])
            tries = [t for t in tries if not self.dominated(levels(t[0]), flops.total)]
            low, high, best = 0, len(tries) - 1, None  # micro-batches fall: memory falls
            while low <= high:
                mid = (low + high) // 2
                if self.fits(replace(job, batch=tries[mid][0])):
                    best, high = mid, mid - 1
                else:
                    low = mid + 1
            if best is not None:
                b, steps, effective = tries[best]
                option = self.option(replace(job, batch=b), combo, steps, effective, flops,
                                     levels(b))
                self.found.append(option)
                return option
            if self.fits(smallest):  # it fits here, only as an option already found
                return None
        return None

    def option(self, train: TrainSpec, combo: tuple[_Value, ...], steps: int, effective: int,
               flops: Flops, levels: tuple) -> Option:
        user = self.user
        changes = [v.change for v in combo if v.change is not None]
        if train.gpus != user.gpus or train.shard != user.shard:
            how = f"FSDP {strategy(train)}" if is_sharded(train) else \
                f"{train.regime}, sharded" if train.regime in PAPER_STAGES else "data parallel"
            changes.append(Change("gpus", str(user.gpus), str(train.gpus),
                                  f"{train.gpus} GPUs ({how})"))
        if train.batch != user.batch:
            text = f"micro-batch {user.batch} → {train.batch}"
            if steps > 1:
                text += f" × {steps} gradient accumulation steps"
            changes.append(Change("micro-batch", str(user.batch), str(train.batch), text))
        if effective != user.gpus * user.batch:
            changes.append(Change("effective-batch", str(user.gpus * user.batch),
                                  str(effective), f"effective batch {user.gpus * user.batch} "
                                  f"→ {effective} ({train.gpus} GPUs × 1)"))
        if train.seq != user.seq:
            changes.append(Change("seq", str(user.seq), str(train.seq),
                                  f"sequence {user.seq} → {train.seq} tokens"))
        b = self.plan(train)
        bound = None
        if steps > 1:  # gradients kept between micro-batches: alive through the next one
            fwd, bwd = b.phases.get("forward", {}), b.phases.get("backward", {})
            step = b.phases["step"]
            extra = step.get("gradients", 0) - fwd.get("gradients", 0)
            bound = max(sum(fwd.values()) + extra, sum(bwd.values()) + extra,
                        sum(step.values()))
        return Option(train, tuple(changes), b, b.total_bytes + self.reserve, self.capacity,
                      self.reserve, steps, effective, flops, flops.total / self.base_flops,
                      bound, compute_bytes(self.spec, train, self.params), levels)

    def frugal_fits(self, seq: int, tier: int) -> bool:
        """Whether the most frugal point of each base fits, on the user's GPUs or the most
        searched (else the round is hopeless and skipped)."""
        dims = _dimensions(self.user)
        rest = tuple(dim[-1] for dim in dims[1:])
        if self.user.checkpointing:  # turning it off saves compute, not memory
            rest = (dims[1][0], *rest[1:])
        for value in (v for v in dims[0] if v.tier == tier):
            train = replace(_apply(self.user, (value, *rest)), seq=seq)
            points = self.points(train)
            for _, job, tries in {id(p): p for p in (points[0], points[-1])}.values():
                if self.fits(replace(job, batch=tries[-1][0])):
                    return True
        return False


def compute_bytes(spec: ModelSpec, train: TrainSpec, params: int | None = None) -> int:
    """Bytes per element the matmuls run in: 2 (bf16) on a bf16 or NF4 base, for the ZeRO
    paper's stages and under FSDP's bf16 policy; 4 (fp32) otherwise (memplan's ``mixed``
    recipe computes in fp32, as :mod:`memplan.activations` plans it)."""
    if is_sharded(train) and train.param_dtype == "bf16":
        return 2
    return model_state(spec, train, params).compute_bytes


def job_option(spec: ModelSpec, train: TrainSpec, capacity: int, reserve: int,
               params: int | None = None) -> Option:
    """The user's job, planned and costed as an option (whether or not it fits)."""
    return _Search(spec, train, capacity, reserve, params, 1).option(
        train, (), 1, train.gpus * train.batch, flops_per_token(spec, train, params), ())


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
    rounds = [(seq, tier) for seq in sequences(train.seq, min_seq) for tier in (1, 2)
              if any(c[0].tier == tier for c in _combos(train, tier))]
    total = sum(len(_combos(train, tier)) for _, tier in rounds)
    done = 0
    for seq, tier in rounds:
        combos = _combos(train, tier)
        if search.frugal_fits(seq, tier):
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
                                          len(o.changes), o.relative_compute, o.peak_bytes))


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
    if train.regime in LORA:
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
    if train.regime == "classifier" and train.num_classes != 2:
        args += ["--classes", str(train.num_classes)]
    if train.regime == "prompt-tuning" and train.prompt_tokens != 20:
        args += ["--prompt-tokens", str(train.prompt_tokens)]
    if train.optimizer != "adamw":
        args += ["--optimizer", train.optimizer]
    if train.optimizer_impl != "fused":
        args += ["--optimizer-impl", train.optimizer_impl]
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
