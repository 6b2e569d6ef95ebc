"""A symbolic autograd: tensor sizes through a forward pass, then the backward pass walked.

Nothing here touches tensors; it follows how PyTorch stores them. Each op of the forward
creates its output (a :class:`Sym`: elements, bytes per element, requires-grad, storage),
saves for backward exactly what its derivative in ``tools/autograd/derivatives.yaml`` needs for
the inputs that require grad, and records a :class:`Node` when its output requires grad.

:meth:`Tape.backward` then walks the nodes the way autograd's engine does (reverse order of
creation): a node runs once its output's gradient has arrived; it allocates the gradients of
its inputs (or passes its own gradient through, for additions and views) and of its
parameters; then its incoming gradient and saved tensors are released; then each input
gradient is added into that input's buffer (in place when one side is not shared, as
``InputBuffer::accumulate`` does, else out of place). The largest moment is the backward peak.

Activation checkpointing: a checkpointed block's saved tensors are not kept in the forward;
they reappear (recomputed) when backward reaches the block's first node.

Identical blocks are walked once (:meth:`Tape.repeat`, :meth:`Tape.walks`; which blocks are
alike, the caller's keys say, :func:`layout`). Of a run of copies of a period of blocks, two
are walked: ``a`` before the others and ``b`` after them. Each copy between would move the
tape as ``a`` did in the forward and as ``b`` did in the backward, so every moment of copy
``c`` is a moment of the walked copy plus ``c`` times its net change (the bytes it leaves
saved, the gradients it leaves made, FSDP's buffers). Their largest moment is then in the
first or the last copy, by the sign of that change, and never above both walked copies'
(those are the ends of the same progression); it is added as one moment all the same. The
copies' saved bytes stand in one storage, freed as the backward passes them; their parameter
gradients are added; FSDP's unit events still fire for each copy (they are cheap): the walk
goes on in the state a full walk reaches, to the byte. ``b``'s forward and ``a``'s backward
are compared with the other's; any difference raises :class:`NotPeriodic`, and the caller
walks every block instead.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

FP32, INT64, BOOL = 4, 8, 1
ALIAS = -1  # an input's gradient is the node's own incoming gradient (add, view, copy)


@dataclass(eq=False, slots=True)
class Sym:
    """A symbolic tensor: element count, bytes per element, requires-grad, storage id."""

    numel: int
    itemsize: int
    rg: bool
    storage: int
    storage_bytes: int = 0  # of the storage (a view's may be larger than the view)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def held(self) -> int:
        """Bytes of the storage this value keeps alive."""
        return self.storage_bytes or self.nbytes


@dataclass(eq=False, slots=True)
class Node:
    """One autograd node: outputs, inputs with the bytes of their gradients, saved storages."""

    outputs: list[Sym]
    inputs: list[tuple[Sym, int]]  # (input, gradient bytes or ALIAS)
    saved: list[Sym]
    param_grad: int = 0            # bytes of parameter gradients it makes
    scratch: int = 0               # bytes allocated and freed inside its backward
    group: int | None = None       # the checkpointed block it belongs to
    tied: bool = False             # its parameter gradient is for a tied embedding
    unit: int = -1                 # the block it belongs to (-1: none, the FSDP root)


class NotPeriodic(Exception):
    """Two walked copies of a period of blocks moved the tape differently: walk every block."""


@dataclass(frozen=True)
class Layout:
    """Which blocks are walked when blocks repeat with ``period`` (:func:`layout`).

    Blocks ``[0, first)`` are walked; ``a = [first, first + period)`` is walked and recorded;
    ``[first + period, last)`` (``copies`` periods) are stood for by arithmetic;
    ``b = [last, last + period)`` is walked and recorded; ``[last + period, layers)`` walked.
    """

    period: int
    first: int
    last: int

    @property
    def copies(self) -> int:
        return (self.last - self.first) // self.period - 1


def layout(keys: list[Any], shared: list[tuple[int, ...]] | None = None) -> Layout | None:
    """The blocks to walk for per-block ``keys`` (equal keys: blocks alike in memory) and the
    storages each block reads that others read too (``shared``: masks, rotary tables).

    The period is the smallest ``p`` with ``keys[i] == keys[i + p]`` for every block from 1
    on (block 0 reads the embedding's output and always walks). The blocks before ``a`` are
    block 0 and every block up to the first of each key and the first reader of each shared
    storage: a shared storage is first kept (by a checkpoint) and last freed (in the
    backward) in a walked block, so the copies between only read it. After ``b`` at least two
    blocks walk (FSDP's first post-backward has no reduce-scatter to recycle). None when
    fewer than one period would be stood for: every block walks. Keys are hashable.
    """
    n = len(keys)
    if n < 6:  # block 0, a, one copy, b and two more
        return None
    period = next((p for p in range(1, n) if all(keys[i] == keys[i + p] for i in range(1, n - p))),
                  n)
    met: dict[Any, int] = {}
    for i, key in enumerate(keys):
        met.setdefault(("key", key), i)
    for i, storages in enumerate(shared or ()):
        for storage in storages:
            met.setdefault(("storage", storage), i)
    first = 1 + max(met.values())
    periods = (n - 2 - period - first) // period
    if periods < 2:
        return None
    return Layout(period, first, first + periods * period)


@dataclass
class _Segment:
    """The moments a walked copy of a period made, from the state it started in."""

    entry: tuple[int, ...]
    moments: list[tuple[int, int, int, int]] = field(default_factory=list)
    exit: tuple[int, ...] = ()
    events: list[tuple[str, int, int]] = field(default_factory=list)  # FSDP, in backward
    moment: Any = None  # a state's moment: _forward_moment or _backward_moment
    _relative: tuple | None = None

    def relative(self) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
        """Each moment less the moment the segment started at, and the net change of the
        state."""
        if self._relative is None:
            a, b, c, d = self.moment(self.entry)
            self._relative = ([(w - a, x - b, y - c, z - d) for w, x, y, z in self.moments],
                              tuple(v - e for v, e in zip(self.exit, self.entry, strict=True)))
        return self._relative


def _repeated_peak(segment: _Segment, copies: int) -> Moment | None:
    """The first largest moment of ``copies`` further copies of ``segment``, each starting
    where the previous ended: copy ``c`` (1 first) shifts every moment by ``c`` times the
    segment's net change, so the largest is in the last copy when that change grows the
    total, else in the first (ties go to the earlier moment, as in a walk)."""
    if not segment.moments:
        return None
    rel, delta = segment.relative()
    best = max(rel, key=sum)  # the first of the largest
    step = segment.moment(delta)
    c = copies if sum(step) > 0 else 1
    start = segment.moment(segment.entry)
    return Moment(*(s + c * d + r for s, d, r in zip(start, step, best, strict=True)))


@dataclass
class _Repeat:
    """The tape's bookkeeping for one :class:`Layout`."""

    plan: Layout
    a: _Segment | None = None
    b: _Segment | None = None
    ballast: int = -1      # the storage standing for the copies' saved tensors
    ballast_bytes: int = 0
    top: int = -1          # node positions: b's nodes are [middle, top), a's [bottom, middle)
    middle: int = -1
    bottom: int = -1


@dataclass(eq=False)
class _Grad:
    nbytes: int
    refs: int = 1


@dataclass
class Moment:
    """Bytes beyond the model states at the backward peak, by component."""

    activations: int = 0
    gradients: int = 0
    temporaries: int = 0
    weights: int = 0  # gathered parameters and all-gather buffers (FSDP)

    @property
    def total(self) -> int:
        return self.activations + self.gradients + self.temporaries + self.weights


@dataclass
class Tape:
    """Records a symbolic forward pass and walks its backward.

    ``dropout_mask_bytes``: bytes per element of a dropout mask (1 on CUDA, where the mask is
    bool; None on the CPU kernels, whose mask has the input's dtype). ``param_grads_temporary``:
    parameter gradients are moved out at once (the mixed recipe's hooks) instead of kept.
    ``inplace_accumulation``: autograd adds a second gradient into an unshared first one in
    place (``InputBuffer::accumulate``); under any TorchDispatchMode (memory trackers,
    FakeTensorMode) ``at::isTensorSubclassLike`` is true and every sum is out of place.
    ``accumulating``: a later micro-batch of gradient accumulation: every parameter's
    ``.grad`` exists already (the planner counts it), and each new gradient is added into it
    in place (``AccumulateGrad`` with grad mode off: ``variable_grad += new_grad``, under a
    dispatch mode too, measured) and then freed.
    ``fsdp``: a :class:`memplan.fsdp.Schedule` whose buffers join every moment; the forward
    marks the blocks (:meth:`enter_block`, :meth:`exit_block`) and the backward fires the
    units' pre- and post-backward at their boundaries.
    """

    dropout_mask_bytes: int | None = BOOL
    param_grads_temporary: bool = False
    grad_itemsize: int = FP32  # of parameter gradients (fp16 in the ZeRO paper's stages)
    inplace_accumulation: bool = True
    accumulating: bool = False
    saved: dict[int, int] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    pinned: set[int] = field(default_factory=set)
    deferred: dict[int, dict[int, int]] = field(default_factory=dict)
    group: int | None = None
    live: dict[int, int] = field(default_factory=dict)
    forward_peak: Moment = field(default_factory=Moment)
    _ids: itertools.count = field(default_factory=itertools.count)
    _hold: list[Sym] = field(default_factory=list)
    _union: int = 0
    fsdp: Any = None
    unit: int = -1
    block_input_rg: dict[int, bool] = field(default_factory=dict)
    _kept: int = 0                      # sum(saved.values()), kept as it changes
    _peak_total: int = 0                # forward_peak.total
    _repeat: _Repeat | None = None
    _rec: list | None = None            # the moments of the segment being recorded
    _entry: tuple[int, ...] = ()        # the state it started in

    # ---- building ----------------------------------------------------------------------
    def new(self, numel: int, itemsize: int, rg: bool) -> Sym:
        """A fresh tensor with its own storage."""
        return Sym(numel, itemsize, rg, next(self._ids), numel * itemsize)

    def view(self, t: Sym, numel: int | None = None, rg: bool | None = None) -> Sym:
        """A view: another value sharing ``t``'s storage."""
        return Sym(t.numel if numel is None else numel, t.itemsize, t.rg if rg is None else rg,
                   t.storage, t.held)

    def pin(self, t: Sym) -> None:
        """A storage that lives through the whole step (the batch), counted as saved."""
        self.pinned.add(t.storage)
        self._keep(t)

    # ---- forward liveness: storages alive as the model's Python references keep them -------
    def _keep(self, t: Sym) -> None:
        """Count ``t``'s storage as saved for backward."""
        old = self.saved.get(t.storage)
        if old is None and t.storage not in self.live:
            self._union += t.held
        self.saved[t.storage] = t.held
        self._kept += t.held - (old or 0)
        self._check()

    def alloc(self, t: Sym) -> Sym:
        """``t`` is made now and referenced by the forward (a fresh storage, or a view)."""
        if t.storage not in self.live:
            if t.storage not in self.saved:
                self._union += t.held
            self.live[t.storage] = t.held
            self._check()
        return t

    def free(self, *ts: Sym) -> None:
        """The forward drops its references to these (saved storages stay, as saved)."""
        for t in ts:
            if self.live.pop(t.storage, None) is not None and t.storage not in self.saved:
                self._union -= t.held

    def _check(self) -> None:
        weights = self.fsdp.weights if self.fsdp is not None else 0
        if self._rec is not None:
            self._rec.append((self._kept, 0, self._union - self._kept, weights))
        if self._union + weights > self._peak_total:
            self.forward_peak = Moment(self._kept, 0, self._union - self._kept, weights)
            self._peak_total = self._union + weights

    # ---- identical blocks: one walked, the others counted -------------------------------
    def repeat(self, keys: list[Any], shared: list[tuple[int, ...]] | None = None) -> None:
        """Blocks with equal ``keys`` (one per block) are alike: walk one copy of each period
        of them where :func:`layout` finds one (call before the first block). ``shared``: the
        storages each block reads that other blocks read too."""
        plan = layout(keys, shared)
        self._repeat = _Repeat(plan) if plan is not None else None

    def walks(self, i: int, x: Sym) -> bool:
        """Whether block ``i``, on input ``x``, is walked (call before each block); False for
        a block the arithmetic stands for (a copy's input is ``x``, its output too)."""
        r = self._repeat
        if r is None:
            return True
        p = r.plan
        if p.first + p.period < i < p.last:
            return False
        if i in (p.first, p.last):
            if i == p.first:
                r.bottom = len(self.nodes)
            self._rec = []
            self._entry = self._forward_state()
        elif i == p.first + p.period:
            r.a, r.middle = self._segment(), len(self.nodes)
            self._stand_in(r, x)
            return False
        elif i == p.last + p.period:
            r.b, r.top = self._segment(), len(self.nodes)
            if r.a.relative() != r.b.relative():
                raise NotPeriodic(f"blocks {p.first} and {p.last} differ in the forward")
        return True

    def _forward_state(self) -> tuple[int, int, int]:
        return self._kept, self._union, self.fsdp.weights if self.fsdp is not None else 0

    def _segment(self) -> _Segment:
        seg = _Segment(self._entry, self._rec, self._forward_state(), moment=_forward_moment)
        self._rec = None
        return seg

    def _stand_in(self, r: _Repeat, x: Sym) -> None:
        """The forward of the copies after ``a``: their largest moment, the bytes they leave
        saved (one storage) or referenced, FSDP's gathers of their units."""
        p, copies = r.plan, r.plan.copies
        peak = _repeated_peak(r.a, copies)
        if peak is not None and peak.total > self._peak_total:
            self.forward_peak, self._peak_total = peak, peak.total
        kept, union, weights = r.a.relative()[1]
        if union < kept:
            raise NotPeriodic("a block frees what it did not make")
        blocks = range(p.first + p.period, p.last)
        for i in blocks:
            self.block_input_rg[i] = x.rg
        if self.fsdp is not None:
            self.fsdp.check = _nothing
            for i in blocks:
                self.fsdp.pre_forward(i)
                self.fsdp.post_forward(i)
            self.fsdp.check = self._check
            if self.fsdp.weights != r.a.exit[2] + copies * weights:
                raise NotPeriodic("FSDP's gathered units differ between blocks")
        if kept:
            r.ballast, r.ballast_bytes = next(self._ids), copies * kept
            self.saved[r.ballast] = r.ballast_bytes
        if union > kept:  # referenced, never saved: they stay to the end of the forward
            self.live[next(self._ids)] = copies * (union - kept)
        self._kept += copies * kept
        self._union += copies * union

    # ---- FSDP units: the root around the whole forward, each block inside it -------------
    def begin_forward(self) -> None:
        """The model is called (its root unit gathers)."""
        if self.fsdp is not None:
            self.fsdp.check = self._check
            self.fsdp.pre_forward(-1)

    def enter_block(self, i: int, x: Sym) -> None:
        """Block ``i`` starts, on input ``x``; its nodes belong to unit ``i``."""
        self.unit = i
        self.block_input_rg[i] = x.rg
        if self.fsdp is not None:
            self.fsdp.pre_forward(i)

    def exit_block(self, i: int) -> None:
        """Block ``i`` returned."""
        self.unit = -1
        if self.fsdp is not None:
            self.fsdp.post_forward(i)

    def end_forward(self) -> None:
        """The model returned the loss."""
        if self.fsdp is not None:
            self.fsdp.forward_end()

    def begin_group(self, group: int, inputs: list[Sym]) -> None:
        """Start a checkpointed block: only ``inputs`` are kept, by its first node."""
        self.group = group
        self.deferred[group] = {}
        self._hold = [t for t in inputs]
        for t in inputs:
            self._keep(t)

    def end_group(self) -> None:
        """End the checkpointed block."""
        if self._hold:  # no node in the block: its inputs live to the end
            self.pinned.update(t.storage for t in self._hold)
        self.group, self._hold = None, []

    def op(self, out: Sym, inputs: list[tuple[Sym, int]], saves: list[Sym] = (),
           param_grad: int = 0, scratch: int = 0, outputs: list[Sym] | None = None,
           tied: bool = False) -> Sym:
        """Record an op: save ``saves``; add a node when the output requires grad."""
        inputs = [(t, g) for t, g in inputs if t.rg]
        saves = list(saves)
        for t in outputs or [out]:
            self.alloc(t)
        for t in saves:
            if self.group is None:
                self._keep(t)
            else:
                self.deferred[self.group][t.storage] = t.held
        if out.rg:
            saved = saves
            if self._hold and self.group is not None:
                saved = saves + self._hold  # checkpoint keeps the block inputs until here
                self._hold = []
            param_grad = param_grad * self.grad_itemsize // FP32
            self.nodes.append(Node(outputs or [out], inputs, saved, param_grad, scratch,
                                   self.group, tied, self.unit))
        return out

    # ---- backward ------------------------------------------------------------------------
    def backward(self, loss: Sym) -> Moment:
        """Walk the recorded nodes from ``loss``; return the largest moment."""
        refs: dict[int, int] = {}
        saved_by = [{t.storage for t in node.saved} for node in self.nodes]
        for storages in saved_by:
            for st in storages:
                refs[st] = refs.get(st, 0) + 1
        live = dict(self.saved)
        live_bytes = self._kept  # sum(live.values()), kept as it changes
        buffers: dict[int, _Grad] = {id(loss): _Grad(loss.nbytes)}
        grads = loss.nbytes
        params = 0
        tied_pending = 0
        materialised: set[int] = set()
        peak, peak_total = Moment(), 0
        fsdp = self.fsdp
        rec: list | None = None  # the moments of the copy being recorded (:meth:`repeat`)
        events: list[list] = []  # its FSDP unit events: [kind, block offset, bytes]
        base = 0                 # its first block
        entry: tuple[int, ...] = ()  # the state it started in
        reached: int | None = None   # the block offset it reached last

        def check(extra: int = 0) -> None:
            nonlocal peak, peak_total
            if fsdp is not None:
                now = (live_bytes, params + fsdp.grads, grads + extra + tied_pending,
                       fsdp.weights)
            else:
                now = (live_bytes, params, grads + extra + tied_pending, 0)
            if rec is not None:
                rec.append(now)
            if now[0] + now[1] + now[2] + now[3] > peak_total:
                peak, peak_total = Moment(*now), sum(now)

        def release(g: _Grad) -> None:
            nonlocal grads
            g.refs -= 1
            if g.refs == 0:
                grads -= g.nbytes

        def state() -> tuple[int, ...]:
            sharded = (fsdp.grads, fsdp.weights) if fsdp is not None else (0, 0)
            return live_bytes, params, sharded[0], grads, tied_pending, sharded[1]

        def record(first: int) -> None:
            nonlocal rec, base, entry, reached
            rec, base, entry, reached = [], first, state(), None
            events.clear()

        def closed() -> _Segment:
            nonlocal rec
            seg = _Segment(entry, rec, state(), [tuple(e) for e in events], _backward_moment)
            rec = None
            return seg

        def event(kind: str, unit: int, nbytes: int = 0) -> None:
            """One of FSDP's unit events in the recorded copy (by block offset); a unit
            reached again, or gradients made in a row, make one event."""
            nonlocal reached
            offset = unit - base
            if not 0 <= offset < r.plan.period:
                raise NotPeriodic(f"block {unit}'s node runs in another block's backward")
            if kind == "reach":
                if offset != reached:
                    reached = offset
                    events.append([kind, offset, 0])
            elif events and events[-1][:2] == ["grad", offset]:
                events[-1][2] += nbytes
            else:
                events.append([kind, offset, nbytes])

        def stand_in(b: _Segment) -> None:
            """The backward of the copies between ``b`` and ``a``, from ``b``'s."""
            nonlocal live_bytes, params, peak, peak_total
            p, copies = r.plan, r.plan.copies
            top = _repeated_peak(b, copies)
            if top is not None and top.total > peak_total:
                peak, peak_total = top, top.total
            d_live, d_params, d_sharded, d_grads, d_tied, d_weights = b.relative()[1]
            freed = -d_live * copies  # of the copies' saved bytes (the rest: no node ran)
            if d_grads or d_tied or not 0 <= freed <= r.ballast_bytes:
                raise NotPeriodic("a block's backward leaves other bytes than it found")
            if freed:
                live[r.ballast] -= freed
                live_bytes -= freed
            params += copies * d_params
            if fsdp is not None:
                fsdp.check = _nothing
                for c in range(1, copies + 1):
                    for kind, offset, nbytes in b.events:
                        unit = p.last - c * p.period + offset
                        if kind == "reach":
                            units.reach(unit)
                        else:
                            fsdp.param_grad(unit, nbytes)
                fsdp.check = check
                if (fsdp.grads, fsdp.weights) != (b.exit[2] + copies * d_sharded,
                                                  b.exit[5] + copies * d_weights):
                    raise NotPeriodic("FSDP's units differ between blocks in the backward")

        r = self._repeat
        marks = set() if r is None else {r.top, r.middle, r.bottom}
        walked: list[_Segment] = []  # b's backward, then a's

        def mark(pos: int) -> None:
            """Every node from ``pos`` on has run: begin or end a recorded copy."""
            if pos == r.top:
                record(r.plan.last)
            if pos == r.middle:
                walked.append(closed())
                stand_in(walked[0])
                record(r.plan.first)
            if pos == r.bottom:
                a, b = closed(), walked[0]
                if (a.relative(), a.events) != (b.relative(), b.events):
                    raise NotPeriodic(f"blocks {r.plan.first} and {r.plan.last} differ in the "
                                      "backward")

        check()
        units = _Units(self, fsdp, check)
        for index in range(len(self.nodes) - 1, -1, -1):
            if index + 1 in marks:
                mark(index + 1)
            node = self.nodes[index]
            incoming = [buffers.pop(id(out)) for out in node.outputs if id(out) in buffers]
            if not incoming:
                continue  # no gradient reached it: nothing below needs one
            if rec is not None and fsdp is not None:
                event("reach", node.unit)
            units.reach(node.unit)
            if node.group is not None and node.group not in materialised:
                materialised.add(node.group)
                for st, nbytes in self.deferred[node.group].items():  # recomputed for backward
                    live_bytes += nbytes - live.get(st, 0)
                    live[st] = nbytes
                check()
            # Outputs whose gradient never came are filled with zeros (e.g. split).
            missing = 0 if len(incoming) == len(node.outputs) else \
                sum(out.nbytes for out in node.outputs) - sum(g.nbytes for g in incoming)
            made: list[tuple[Sym, _Grad]] = []
            for t, nbytes in node.inputs:
                if nbytes == ALIAS:
                    incoming[0].refs += 1
                    made.append((t, incoming[0]))
                else:
                    made.append((t, _Grad(nbytes)))
                    grads += nbytes
            grad_p = node.param_grad
            if node.tied and not tied_pending:  # the head: held in the input buffer
                tied_pending, grad_p = grad_p, 0
            elif node.tied:  # the embedding: its gradient, added into the head's
                check(node.scratch + grad_p * (1 if self.inplace_accumulation else 2))
                tied_pending = 0
            if fsdp is not None:
                if rec is not None:
                    event("grad", node.unit, grad_p)
                fsdp.param_grad(node.unit, grad_p)
            else:
                params += grad_p
            check(node.scratch + missing)
            if self.param_grads_temporary and fsdp is None:
                params -= grad_p
            elif self.accumulating and fsdp is None:
                params -= grad_p  # added into .grad in place (grad mode is off), then freed
            for g in incoming:
                release(g)
            for st in saved_by[index]:
                refs[st] -= 1
                if refs[st] == 0 and st not in self.pinned:
                    live_bytes -= live.pop(st, 0)
            for t, g in made:
                old = buffers.get(id(t))
                if old is None:
                    buffers[id(t)] = g
                elif self.inplace_accumulation and (old.refs == 1 or g.refs == 1):
                    keep, drop = (old, g) if old.refs == 1 else (g, old)
                    buffers[id(t)] = keep
                    release(drop)
                else:
                    grads += t.nbytes
                    check()
                    release(old)
                    release(g)
                    buffers[id(t)] = _Grad(t.nbytes)
        if 0 in marks:
            mark(0)
        units.finish()
        return peak


def _forward_moment(state: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The moment of a forward state (saved, saved or referenced, FSDP's weights)."""
    kept, union, weights = state
    return kept, 0, union - kept, weights


def _backward_moment(state: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The moment of a backward state (live saved tensors, parameter gradients, FSDP's
    sharded gradients, gradient buffers, the tied head's pending gradient, FSDP's weights)."""
    live, params, sharded, grads, tied, weights = state
    return live, params + sharded, grads + tied, weights


def _nothing() -> None:
    """FSDP's check while the copies' unit events are replayed (their moments are counted)."""


@dataclass
class _Units:
    """Fires FSDP's pre- and post-backward as the backward walk crosses block boundaries.

    A block's post-backward runs once its input's gradient is complete, i.e. when the walk
    leaves it; a block whose input needs no gradient (LoRA's first) waits for the final
    callback, after the root's.
    """

    tape: Tape
    fsdp: Any
    check: Any
    current: int | None = None
    pending: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fsdp is not None:
            self.fsdp.check = self.check
            self.fsdp.backward_start()

    def _leave(self) -> None:
        if self.current is not None and self.current >= 0:
            if self.tape.block_input_rg.get(self.current, True):
                self.fsdp.post_backward(self.current)
            else:
                self.pending.append(self.current)

    def reach(self, unit: int) -> None:
        if self.fsdp is None or unit == self.current:
            return
        self._leave()
        if unit >= 0:
            self.fsdp.pre_backward(unit)
        self.current = unit

    def finish(self) -> None:
        if self.fsdp is not None:
            self._leave()
            self.fsdp.backward_end(self.pending)
