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
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

FP32, INT64, BOOL = 4, 8, 1
ALIAS = -1  # an input's gradient is the node's own incoming gradient (add, view, copy)


@dataclass(eq=False)
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


@dataclass(eq=False)
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
    ``fsdp``: a :class:`memplan.fsdp.Schedule` whose buffers join every moment; the forward
    marks the blocks (:meth:`enter_block`, :meth:`exit_block`) and the backward fires the
    units' pre- and post-backward at their boundaries.
    """

    dropout_mask_bytes: int | None = BOOL
    param_grads_temporary: bool = False
    grad_itemsize: int = FP32  # of parameter gradients (fp16 in the ZeRO paper's stages)
    inplace_accumulation: bool = True
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

    # ---- building ----------------------------------------------------------------------
    def new(self, numel: int, itemsize: int, rg: bool) -> Sym:
        """A fresh tensor with its own storage."""
        return Sym(numel, itemsize, rg, next(self._ids))

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
        if t.storage not in self.saved and t.storage not in self.live:
            self._union += t.held
        self.saved[t.storage] = t.held
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
        if self._union + weights > self.forward_peak.total:
            kept = sum(self.saved.values())
            self.forward_peak = Moment(kept, 0, self._union - kept, weights)

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
        for node in self.nodes:
            for st in {t.storage for t in node.saved}:
                refs[st] = refs.get(st, 0) + 1
        live = dict(self.saved)
        buffers: dict[int, _Grad] = {id(loss): _Grad(loss.nbytes)}
        grads = loss.nbytes
        params = 0
        tied_pending = 0
        materialised: set[int] = set()
        peak = Moment()
        fsdp = self.fsdp

        def check(extra: int = 0) -> None:
            nonlocal peak
            sharded = (fsdp.grads, fsdp.weights) if fsdp is not None else (0, 0)
            now = Moment(sum(live.values()), params + sharded[0],
                         grads + extra + tied_pending, sharded[1])
            if now.total > peak.total:
                peak = now

        def release(g: _Grad) -> None:
            nonlocal grads
            g.refs -= 1
            if g.refs == 0:
                grads -= g.nbytes

        check()
        units = _Units(self, fsdp, check)
        for node in reversed(self.nodes):
            incoming = [buffers.pop(id(out)) for out in node.outputs if id(out) in buffers]
            if not incoming:
                continue  # no gradient reached it: nothing below needs one
            units.reach(node.unit)
            if node.group is not None and node.group not in materialised:
                materialised.add(node.group)
                live.update(self.deferred[node.group])  # recomputed for backward
                check()
            # Outputs whose gradient never came are filled with zeros (e.g. split).
            missing = sum(out.nbytes for out in node.outputs) - sum(g.nbytes for g in incoming)
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
                fsdp.param_grad(node.unit, grad_p)
            else:
                params += grad_p
            check(node.scratch + (len(incoming) < len(node.outputs)) * missing)
            if self.param_grads_temporary and fsdp is None:
                params -= grad_p
            for g in incoming:
                release(g)
            for st in {t.storage for t in node.saved}:
                refs[st] -= 1
                if refs[st] == 0 and st not in self.pinned:
                    live.pop(st, None)
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
        units.finish()
        return peak


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
