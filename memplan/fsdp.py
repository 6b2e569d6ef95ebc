"""FSDP per rank: what ``torch.distributed.fsdp.fully_shard`` (FSDP2) stores on each of M GPUs,
and when. Pure Python: sizes and events, no tensors.

The model is wrapped the way training scripts do it: every transformer block is one unit, the
root (embeddings, final norm, untied head) the last. Each parameter of d0 rows and r elements
per row is split by rows: every rank stores ``pad(d0) = ⌈d0/M⌉`` rows (the last ranks' padded),
and rank k owns rows ``[k·pad, min((k+1)·pad, d0))``. Per rank, then:

- sharded parameters, S = Σ pad(d0)·r·itemsize (padded), always;
- optimizer states on the unpadded local shard (rank 0 holds the most), plus AdamW's fp32 step
  counter per tensor, always; the mixed recipe's bf16 gradient buffers of the local shard;
- a unit's gathered parameters, U = M·Σ pad(d0)·r·itemsize, and the flat all-gather buffer of
  the same size, while the unit computes (the events below);
- gradients: the unsharded ones autograd makes in a unit's backward, the flat reduce-scatter
  input (U of the trainable parameters), its 1/M output that becomes the sharded gradient.

The events, read from FSDP2's code (torch 2.13) and checked allocation by allocation on its
runs (``memplan profile --nproc``, ``memplan validate --sharded``):

- forward: the root gathers first and keeps its parameters to the end of backward. Block i's
  pre-forward all-gathers (+buffer), copies out (+U), and only then frees the previous unit's
  buffer (its reference lives to the end of ``wait_for_unshard``): U_root + 3·U_b at that
  moment. Its post-forward frees its parameters (FULL_SHARD; SHARD_GRAD_OP keeps them to its
  backward). The root's post-forward, after the loss, frees the last buffer.
- backward: the root's pre-backward prefetches the last block's all-gather. Block i's
  pre-backward copies out (+U), frees its buffer and prefetches block i-1's. Its post-backward
  (once its input's gradient is complete; at the end when the input needs none) frees its
  parameters, frees the previous reduce-scatter input, allocates its own (kept until the
  next post-backward), frees autograd's gradients, and allocates the 1/M output. The root's
  post-backward and the release of the last input end the backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from memplan import optimizer as O
from memplan import params as P
from memplan.arch.base import Weight
from memplan.errors import MemplanError
from memplan.recipe import PRESETS
from memplan.spec import ModelSpec, TrainSpec

STRATEGIES = ("full-shard", "shard-grad-op")
# Regimes whose trainable parameters all live inside the model, so FSDP shards and syncs them
# (:attr:`memplan.recipe.Recipe.shardable`). Heads, input adapters and prompts held outside
# it are not; QLoRA's NF4 base is bitsandbytes' own storage, not planned sharded here.
SHARDABLE_REGIMES = tuple(name for name, preset in PRESETS.items() if preset.shardable)


def is_sharded(train: TrainSpec) -> bool:
    """Whether the job is planned per rank of FSDP: regime ``zero``, or any shardable regime
    with ``shard`` set, over ``train.gpus`` > 1 ranks (one GPU shards nothing)."""
    return train.gpus > 1 and (train.recipe.fsdp or train.shard != "none")


def strategy(train: TrainSpec) -> str:
    """FULL_SHARD or SHARD_GRAD_OP; ``zero`` without ``shard`` is FULL_SHARD."""
    return "full-shard" if train.shard == "none" else train.shard


def check_shardable(train: TrainSpec) -> None:
    """One clear line for a regime FSDP cannot shard, or a bf16 policy it cannot take."""
    if train.param_dtype != "fp32":
        if train.gpus < 2:
            raise MemplanError("--param-dtype bf16 is FSDP's mixed-precision policy: it needs "
                               "--gpus 2 or more (and --nproc 2 or more to profile it)")
        if train.shard == "none" and not train.recipe.fsdp:
            raise MemplanError("--param-dtype bf16 is FSDP's mixed-precision policy: add "
                               "--shard full-shard (or use regime zero) over --gpus 2 or more")
        if train.recipe.notes_mixed:
            raise MemplanError("regime mixed is the notes' own bf16 recipe; with FSDP's bf16 "
                               "policy use regime zero (or full) instead")
    if train.shard != "none" and not train.recipe.shardable:
        what = "the ZeRO paper's stages are sharded already; drop --shard" \
            if train.recipe.stage else \
            "its trainable parameters live outside the model, which FSDP would not sync"
        raise MemplanError(f"regime {train.regime!r} cannot be sharded with FSDP: {what}; "
                           f"shardable regimes: {', '.join(SHARDABLE_REGIMES)}")


@dataclass(frozen=True)
class Param:
    """One parameter tensor: rows (dim 0), elements, bytes per element, trainable."""

    rows: int
    numel: int
    itemsize: int
    trainable: bool
    late: bool = False  # an input embedding: its gradient is the last the backward makes

    def padded(self, m: int) -> int:
        """Elements each rank stores: ⌈rows/M⌉ rows."""
        return -(-self.rows // m) * (self.numel // self.rows)

    def local(self, m: int, rank: int) -> int:
        """Elements rank ``rank`` owns (its unpadded shard)."""
        per = -(-self.rows // m)
        rows = max(0, min(per, self.rows - rank * per))
        return rows * (self.numel // self.rows)


@dataclass(frozen=True)
class Unit:
    """The parameters of one FSDP unit, in registration order."""

    params: tuple[Param, ...]

    def gathered(self, m: int, itemsize: int | None = None) -> int:
        """Bytes of the unit's gathered parameters, and of its all-gather buffer (in
        ``itemsize``, the policy's parameter dtype, when given)."""
        return m * sum(p.padded(m) * (itemsize or p.itemsize) for p in self.params)

    def cast_inputs(self, m: int, itemsize: int | None) -> int:
        """Bytes of the shards cast to the policy's dtype before an all-gather."""
        if itemsize is None:
            return 0
        return sum(p.padded(m) * itemsize for p in self.params if p.itemsize != itemsize)

    def sharded(self, m: int) -> int:
        """Bytes of the unit's shards on one rank (padded)."""
        return sum(p.padded(m) * p.itemsize for p in self.params)

    @property
    def trainable(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.trainable)

    def reduce_scatter(self, m: int, itemsize: int | None = None) -> int:
        """Bytes of the flat reduce-scatter input (the trainable gradients, padded; in
        ``itemsize``, the policy's reduce dtype, when given)."""
        return m * sum(p.padded(m) * (itemsize or p.itemsize) for p in self.trainable)

    def last_grad(self, itemsize: int | None = None) -> int:
        """Bytes of the last trainable gradient (freed after the reduce-scatter output)."""
        if not self.trainable:
            return 0
        return self.trainable[-1].numel * (itemsize or self.trainable[-1].itemsize)


def _params(weights: tuple[Weight, ...], itemsize: int, train_w: bool, train_b: bool,
            targeted: set[str], rank: int) -> list[Param]:
    """The Params of an inventory; LoRALinear's lora_A (R × in) and lora_B (out × R), fp32,
    follow each targeted linear's own parameters."""
    out: list[Param] = []
    for i, w in enumerate(weights):
        out.append(Param(w.rows, w.numel, itemsize, train_b if w.bias else train_w))
        if w.module in targeted and not w.bias:
            out_f, in_f = w.shape
        if w.module in targeted and (i + 1 == len(weights) or weights[i + 1].module != w.module):
            out += [Param(rank, rank * in_f, 4, True), Param(out_f, out_f * rank, 4, True)]
    return out


def units(spec: ModelSpec, train: TrainSpec) -> tuple[Unit, Unit]:
    """(root, block) units of the model under ``train.regime``, from its inventory."""
    r = train.recipe
    full, bitfit, lora = r.full, r.bitfit, r.lora
    itemsize = r.weight_itemsize
    targeted = {l.name for l in P.check_rank(spec, train.lora)} if lora else set()
    block = _params(P.block_weights(spec), itemsize, full, full or bitfit, targeted,
                    train.lora.rank)
    emb = full or (lora and train.lora.train_embeddings)
    root = []
    for w in P.root_weights(spec):
        if w.group == "embedding":  # its gradient comes last unless the head shares it
            root.append(Param(w.rows, w.numel, itemsize, emb, late=not spec.tie_embeddings))
        elif w.group == "position":
            root.append(Param(w.rows, w.numel, itemsize, full, late=True))
        elif w.group == "head":
            root.append(Param(w.rows, w.numel, itemsize, emb))
        else:
            root.append(Param(w.rows, w.numel, itemsize, full if not w.bias else full or bitfit))
    return Unit(tuple(root)), Unit(tuple(block))


@dataclass(frozen=True)
class RankStates:
    """What one rank keeps for the whole step, in bytes."""

    weights: int            # sharded parameters (padded)
    optimizer_states: int   # on the local shard, with the step counters
    persistent_grads: int   # the mixed recipe's bf16 gradient buffers (else 0)
    sharded_grads: int      # the reduce-scatter outputs kept as .grad after backward
    step_temporaries: int   # what optimizer.step() allocates on the local shards


def rank_states(spec: ModelSpec, train: TrainSpec, m: int, rank: int) -> RankStates:
    """The step-long states of rank ``rank`` of ``m``."""
    root, block = units(spec, train)
    reduce = FP32 if train.param_dtype == "bf16" else None
    every = [*root.params, *block.params * spec.num_layers]
    trainable = [p for p in every if p.trainable]
    local = [(p, p.local(m, rank)) for p in trainable]
    mixed = train.recipe.notes_mixed
    opt = train.optimizer
    # MixedAdamW: bf16 m and fp32 v, bf16 gradient buffers; torch.optim keeps its states in
    # the parameter's dtype
    states = O.state_bytes(train, [O.TrainTensor((n,), p.itemsize) for p, n in local])
    counters = O.STEP_COUNTER_BYTES * len(trainable) if opt == "adamw" and not mixed else 0
    temps = O.step_temporaries(train, sum(n * p.itemsize for p, n in local),
                               max((n for _, n in local), default=0),
                               max((n * p.itemsize for p, n in local), default=0))
    return RankStates(
        weights=root.sharded(m) + spec.num_layers * block.sharded(m),
        optimizer_states=states + counters,
        persistent_grads=2 * sum(n for _, n in local) if mixed else 0,
        sharded_grads=0 if mixed else (root.reduce_scatter(m, reduce)
                                       + spec.num_layers * block.reduce_scatter(m, reduce)) // m,
        step_temporaries=temps,
    )


def scaled(states: RankStates, n: int, shape_n: int) -> RankStates:
    """``states`` of a shape with ``shape_n`` parameters, scaled to ``n`` (``--params``)."""
    return RankStates(*(v * n // shape_n for v in (
        states.weights, states.optimizer_states, states.persistent_grads,
        states.sharded_grads, states.step_temporaries)))


FP32, BF16 = 4, 2
ROOT = -1  # the root unit's index; blocks are 0 .. L-1


@dataclass
class Schedule:
    """FSDP2's buffers over one step, moved by the events of the module docstring.

    A :class:`memplan.autograd.Tape` calls the events as its forward and backward pass the
    unit boundaries, and adds :attr:`weights` (gathered parameters and all-gather buffers) and
    :attr:`grads` (unsharded gradients, reduce-scatter buffers, sharded gradients made so far)
    to every moment it checks. ``check`` is the tape's: called after every allocation.
    """

    root: Unit
    block: Unit
    layers: int
    m: int
    reshard_after_forward: bool = True
    mixed: bool = False
    param_itemsize: int | None = None   # MixedPrecisionPolicy: gathered in bf16 ...
    reduce_itemsize: int | None = None  # ... and reduced in fp32
    weights: int = 0
    grads: int = 0
    check: Callable[[], None] = lambda: None
    _ag_state: int = 0          # forward: the buffer kept until the next copy-out finishes
    _prefetched: set[int] = field(default_factory=set)
    _gathered: set[int] = field(default_factory=set)
    _unit_grads: dict[int, int] = field(default_factory=dict)
    _rs_state: int = 0          # the reduce-scatter input kept until the next post-backward
    _posted: set[int] = field(default_factory=set)

    def _unit(self, i: int) -> Unit:
        return self.root if i == ROOT else self.block

    def _gathered_bytes(self, i: int) -> int:
        return self._unit(i).gathered(self.m, self.param_itemsize)

    def _all_gather(self, i: int) -> int:
        """Cast the shards (bf16 policy), all-gather into a new buffer, free the casts."""
        cast = self._unit(i).cast_inputs(self.m, self.param_itemsize)
        if cast:
            self._alloc(cast)
        u = self._gathered_bytes(i)
        self._alloc(u)
        self.weights -= cast
        return u

    def _alloc(self, nbytes: int, grads: bool = False) -> None:
        if grads:
            self.grads += nbytes
        else:
            self.weights += nbytes
        self.check()

    # -- forward ----------------------------------------------------------------------------
    def pre_forward(self, i: int) -> None:
        """Unit ``i`` (ROOT first) is about to run: all-gather, copy out, free the previous."""
        u = self._all_gather(i)        # the all-gather buffer
        self._alloc(u)                 # the copy-out into the unsharded parameters
        self._gathered.add(i)
        self.weights -= self._ag_state  # the previous unit's buffer, freed only now
        self._ag_state = u

    def post_forward(self, i: int) -> None:
        """Block ``i`` ran: FULL_SHARD frees its gathered parameters."""
        if self.reshard_after_forward:
            self.weights -= self._gathered_bytes(i)
            self._gathered.discard(i)

    def forward_end(self) -> None:
        """The root's post-forward (after the loss): the last buffer is freed."""
        self.weights -= self._ag_state
        self._ag_state = 0

    # -- backward ---------------------------------------------------------------------------
    def backward_start(self) -> None:
        """The root's pre-backward: prefetch the last block when it was resharded."""
        self._prefetch(self.layers - 1)

    def _prefetch(self, i: int) -> None:
        if i >= 0 and i not in self._gathered and i not in self._prefetched:
            self._prefetched.add(i)
            self._all_gather(i)

    def pre_backward(self, i: int) -> None:
        """Block ``i``'s output gradient is complete: gather it (if needed), prefetch i-1."""
        if i not in self._gathered:
            u = self._gathered_bytes(i)
            if i not in self._prefetched:
                self._all_gather(i)
            self._prefetched.discard(i)
            self._alloc(u)             # copy-out
            self._gathered.add(i)
            self.weights -= u          # the buffer, freed at once in backward
        self._prefetch(i - 1)

    def param_grad(self, i: int, nbytes: int) -> None:
        """Autograd made ``nbytes`` of unit ``i``'s unsharded parameter gradients."""
        self._unit_grads[i] = self._unit_grads.get(i, 0) + nbytes
        self._alloc(nbytes, grads=True)

    def post_backward(self, i: int) -> None:
        """Reshard, recycle the previous reduce-scatter input, reduce-scatter this unit's."""
        if i in self._posted:
            return
        self._posted.add(i)
        unit = self._unit(i)
        if i in self._gathered:
            self.weights -= self._gathered_bytes(i)
            self._gathered.discard(i)
        made = self._unit_grads.pop(i, 0)
        if not made:
            self.grads -= self._rs_state  # the recycle runs before the early return
            self._rs_state = 0
            return
        self.grads -= self._rs_state
        rs_in = unit.reduce_scatter(self.m, self.reduce_itemsize)
        self._alloc(rs_in, grads=True)
        last = min(unit.last_grad(self.param_itemsize), made)
        self.grads -= made - last     # autograd's gradients, freed after the copy-in
        self._alloc(rs_in // self.m, grads=True)  # the output: the sharded gradients
        self.grads -= last
        if self.mixed:  # moved into the recipe's bf16 buffers (counted as model state)
            self.grads -= rs_in // self.m
        self._rs_state = rs_in

    def backward_end(self, pending: list[int]) -> None:
        """The final callback: the root's post-backward, then blocks whose input needed no
        gradient, then the last reduce-scatter input is released."""
        for i in [ROOT, *sorted(pending)]:
            self.post_backward(i)
        self.grads -= self._rs_state
        self._rs_state = 0


def schedule(spec: ModelSpec, train: TrainSpec, m: int) -> Schedule:
    """The FSDP2 schedule of ``train`` over ``m`` ranks."""
    root, block = units(spec, train)
    bf16 = train.param_dtype == "bf16"
    return Schedule(root, block, spec.num_layers, m,
                    reshard_after_forward=strategy(train) == "full-shard",
                    mixed=train.recipe.notes_mixed, param_itemsize=BF16 if bf16 else None,
                    reduce_itemsize=FP32 if bf16 else None)


def replay(sched: Schedule) -> tuple[int, int]:
    """Run the events with no activations (every unit's gradients made at once); return
    ``(weights, grads)`` at the largest moment (the plan without --batch and --seq)."""
    peak = (0, 0)

    def check() -> None:
        nonlocal peak
        if sched.weights + sched.grads > sum(peak):
            peak = (sched.weights, sched.grads)

    sched.check = check
    sched.pre_forward(ROOT)
    for i in range(sched.layers):
        sched.pre_forward(i)
        sched.post_forward(i)
    sched.forward_end()
    sched.backward_start()
    size = sched.param_itemsize
    root = [p.numel * (size or p.itemsize) for p in sched.root.trainable if not p.late]
    embeddings = [p.numel * (size or p.itemsize) for p in sched.root.trainable if p.late]
    if sum(root):  # the loss's end of the root: the head and the final norm
        sched.param_grad(ROOT, sum(root))
    block_grads = sum(p.numel * (size or p.itemsize) for p in sched.block.trainable)
    for i in reversed(range(sched.layers)):
        sched.pre_backward(i)
        if block_grads:
            sched.param_grad(i, block_grads)
        sched.post_backward(i)
    if sum(embeddings):  # the input embeddings, last
        sched.param_grad(ROOT, sum(embeddings))
    sched.backward_end([])
    return peak
