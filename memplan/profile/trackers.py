"""Memory trackers: the peak bytes of a training step, split into categories.

:class:`StorageTracker` measures on the CPU and under ``FakeTensorMode`` by counting the bytes of
live untyped storages, the same idea as PyTorch's own
``torch.distributed._tools.mem_tracker.MemTracker`` (a ``TorchDispatchMode`` that sees every
op's outputs, plus weak references to their storages that say when the bytes are freed). On a GPU,
:class:`memplan.profile.cuda.CudaTracker` reads the caching allocator's counters instead.
:func:`make_tracker` picks one by device name.

Categories (:data:`CATEGORIES`): weights, gradients, optimizer_states, activations (storages held
by autograd for backward) and temporaries (everything else that is live).

Nesting with ``FakeTensorMode``: build the model inside the fake mode, then enter the tracker
*inside* it (``with FakeTensorMode(): model = ...; with StorageTracker(): step()``). The tracker
then sits above the fake mode on the dispatch stack, sees every op first and receives
``FakeTensor`` outputs whose (meta) storages are tracked like real ones. Entered the other way
round the fake mode dispatches first and the tracker sees nothing of the step; the tracker
records the fake mode active on entry and ignores ops run under any other one (as MemTracker does).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch._guards import active_fake_mode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass_type

from memplan.errors import MemplanError, OutOfMemory, unknown
from memplan.profile import storages as cat
from memplan.profile.storages import CATEGORIES, iter_tensors, storages

__all__ = ["CATEGORIES", "DEVICES", "StorageTracker", "make_tracker", "iter_tensors", "storages"]

DEVICES: tuple[str, ...] = ("cpu", "fake", "cuda")


class _Rec(weakref.ref):
    """A weak reference to one live storage, carrying what the tracker knows about it.

    PyTorch keeps one Python object per storage alive as long as the storage lives (PyObject
    preservation), for real and fake tensors alike, so ``id(storage)`` identifies a live storage
    and the weakref's callback fires exactly when its bytes are freed.
    """

    __slots__ = ("key", "nbytes", "category", "saved", "grad")

    def __new__(cls, st: torch.UntypedStorage, callback: Any, nbytes: int, category: str | None):
        self = super().__new__(cls, st, callback)
        self.key, self.nbytes, self.category = id(st), nbytes, category
        self.saved, self.grad = 0, False
        return self

    def __init__(self, st: torch.UntypedStorage, callback: Any, *_: Any) -> None:
        super().__init__(st, callback)

    def bucket(self) -> str:
        """Registered category, else gradient, else activation while saved, else temporary."""
        if self.category is not None:
            return self.category
        return cat.GRADIENTS if self.grad else cat.ACTIVATIONS if self.saved else cat.TEMPORARIES


class _Saved:
    """What autograd keeps for a saved tensor: the tensor (detached) and a live 'saved' mark.

    Detaching avoids the reference cycle output -> grad_fn -> packed object -> output that an
    identity pack hook creates (it would leak graphs that are never backpropagated).
    """

    __slots__ = ("tensor", "recs", "tracker")

    def __init__(self, tracker: StorageTracker, t: torch.Tensor) -> None:
        self.tracker, self.tensor = tracker, t.detach()
        self.recs = [r for st in storages(t) if (r := tracker._live.get(id(st))) is not None]
        for rec in self.recs:
            tracker._relabel(rec, saved=+1)

    def __del__(self) -> None:
        for rec in self.recs:
            self.tracker._relabel(rec, saved=-1)


# ``torch.tensor(data)`` builds its tensor below dispatch, then shows it to modes via lift_fresh.
_FRESH = frozenset({torch.ops.aten.lift_fresh.default})


def _unpack(packed: _Saved) -> torch.Tensor:
    return packed.tensor


def _input_storage_ids(args: tuple, kwargs: dict) -> set[int]:
    """Ids of the storages of the tensor arguments of an aten op (flat or lists of tensors)."""
    ids: set[int] = set()
    for arg in (*args, *kwargs.values()):
        for t in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(t, torch.Tensor):
                ids.update(id(st) for st in storages(t))
    return ids


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of live untyped storages, with a categorised snapshot at the peak.

    Counted: the storages of every op output produced inside the tracker (views share theirs and
    add nothing; in-place ops add nothing), plus what was registered with :meth:`register`.
    Storages that existed before and were not registered are never counted, even when an op
    returns a view of them.

    Labels: a registered category wins; then gradients (storages accumulated into the ``.grad``
    of a watched parameter, or found there); then activations (storages saved by autograd for
    backward, while saved); the rest are temporaries.

    The peak is the largest number of live bytes. Its categories are those of the storages live
    at that moment, labelled as they stand just before the next allocation: autograd labels a
    tensor right after making it (saves it, or accumulates it as a ``.grad`` after releasing the
    inputs of the node that made it), and those labels are kept; labels lost in that window are
    put back. Categorisation is O(1) per event and O(watched params) per peak plateau.

    Args:
        capacity_bytes: Simulated memory size; exceeding it raises
            :class:`memplan.errors.OutOfMemory` with ``measured_bytes`` set.
        require_fake: Refuse to start unless a ``FakeTensorMode`` is active (device "fake").
    """

    def __init__(self, capacity_bytes: int | None = None, require_fake: bool = False) -> None:
        super().__init__()
        self.capacity_bytes = capacity_bytes
        self.require_fake = require_fake
        self._live: dict[int, _Rec] = {}
        self._totals: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self._current = 0
        self._params: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._fake_on_entry: Any = None
        self._hooks: Any = None
        self._orig_resize: Any = None
        self.peak_bytes = 0
        self._peak_components = dict.fromkeys(CATEGORIES, 0)
        self._dirty = False  # a peak whose categories are not settled yet
        self._lost = dict.fromkeys(CATEGORIES, 0)  # bytes freed or unlabelled since the peak
        self._unsaved: set[int] = set()  # released by autograd since the peak, still live
        self.marks: dict[str, dict[str, int]] = {}

    # -- bookkeeping -------------------------------------------------------------------------
    def _add(self, st: torch.UntypedStorage, category: str | None) -> _Rec:
        rec = self._live[id(st)] = _Rec(st, self._on_free, 0, category)
        self._grow(rec, st.nbytes())
        return rec

    def _on_free(self, rec: _Rec) -> None:
        if self._live.get(rec.key) is rec:
            del self._live[rec.key]
            self._totals[rec.bucket()] -= rec.nbytes
            self._current -= rec.nbytes
            if self._dirty:
                self._lost[rec.bucket()] += rec.nbytes
                self._unsaved.discard(rec.key)

    def _relabel(self, rec: _Rec, category: str | None = None, saved: int = 0,
                 grad: bool = False) -> None:
        """Change a live record's category, saved count or gradient flag, moving its bytes."""
        if self._live.get(rec.key) is not rec:
            return
        if category is not None:
            self._settle()
        old = rec.bucket()
        rec.category = category or rec.category
        rec.saved += saved
        rec.grad = rec.grad or grad
        new, n = rec.bucket(), rec.nbytes
        if old == new:
            return
        self._totals[old] -= n
        self._totals[new] += n
        if self._dirty and rec.key in self._unsaved:  # relabelled again: the new label stands
            self._unsaved.discard(rec.key)
            self._lost[cat.ACTIVATIONS] -= n
            self._lost[cat.TEMPORARIES] += n
        if self._dirty and saved < 0:  # released by autograd after the peak: an activation then
            self._unsaved.add(rec.key)
            self._lost[cat.ACTIVATIONS] += n
            self._lost[cat.TEMPORARIES] -= n

    def _resize(self, rec: _Rec, nbytes: int) -> None:
        if nbytes >= rec.nbytes:
            self._grow(rec, nbytes)
            return
        delta, rec.nbytes = rec.nbytes - nbytes, nbytes
        self._totals[rec.bucket()] -= delta
        self._current -= delta
        if self._dirty:
            self._lost[rec.bucket()] += delta

    def _grow(self, rec: _Rec, nbytes: int) -> None:
        """Grow a live record to ``nbytes``: settle the old peak first, or start a new one."""
        delta = nbytes - rec.nbytes
        if self._current + delta > self.peak_bytes:
            self.peak_bytes = self._current + delta
            self._dirty = True
            self._lost = dict.fromkeys(CATEGORIES, 0)
            self._unsaved.clear()
        else:
            self._settle()
        rec.nbytes = nbytes
        self._totals[rec.bucket()] += delta
        self._current += delta
        if self.capacity_bytes is not None and self._current > self.capacity_bytes:
            self._settle()
            raise OutOfMemory(f"live tensor storage reached {self._current} bytes, over the "
                              f"capacity of {self.capacity_bytes} bytes", self._current)

    def _settle(self) -> None:
        if self._dirty:
            self._dirty = False
            self._scan_grads()
            self._peak_components = {c: self._totals[c] + self._lost[c] for c in CATEGORIES}

    def _scan_grads(self) -> None:
        """Label the storages now in a watched parameter's ``.grad`` as gradients."""
        for p in self._params.values():
            self._flag_grad(p.grad)

    def _flag_grad(self, grad: torch.Tensor | None) -> None:
        for st in storages(grad) if grad is not None else ():
            if (rec := self._live.get(id(st))) is not None and not rec.grad:
                self._relabel(rec, grad=True)

    # -- public API --------------------------------------------------------------------------
    def register(self, tensors: Any, category: str) -> int:
        """Count tensors made outside the tracker (or re-label ones made inside) as ``category``.

        Args:
            tensors: A tensor, module, optimizer, or nested containers of them (see
                :func:`iter_tensors`); each distinct storage is counted once.
            category: One of :data:`CATEGORIES`.

        Returns:
            The bytes of the distinct storages registered by this call.
        """
        if category not in CATEGORIES:
            raise unknown("memory category", category, CATEGORIES)
        done: set[int] = set()
        total = 0
        for t in iter_tensors(tensors):
            for st in storages(t):
                if id(st) in done:
                    continue
                done.add(id(st))
                rec = self._live.get(id(st))
                if rec is None:
                    rec = self._add(st, category)
                else:
                    self._relabel(rec, category=category)
                total += rec.nbytes
        return total

    def watch_params(self, params: Iterable[torch.Tensor]) -> None:
        """Count the ``.grad`` of these parameters as gradients.

        Gradients that exist now are registered as gradients; later ones are labelled when
        autograd accumulates them (a post-accumulate-grad hook, installed while the tracker is
        active) or when found in ``.grad`` at a peak or snapshot. A storage keeps the label for
        its lifetime.
        """
        for p in params:
            if id(p) not in self._params:
                self._params[id(p)] = p
                if p.grad is not None:
                    self.register(p.grad, cat.GRADIENTS)
                if self._hooks is not None:
                    self._hook(p)

    def _hook(self, p: torch.Tensor) -> None:
        if p.requires_grad:
            hook = p.register_post_accumulate_grad_hook(lambda q: self._flag_grad(q.grad))
            self._handles.append(hook)

    @property
    def current_bytes(self) -> int:
        """Bytes of all live counted storages now."""
        return self._current

    @property
    def peak_components(self) -> dict[str, int]:
        """The categories at the peak; they sum exactly to :attr:`peak_bytes`."""
        self._settle()
        return dict(self._peak_components)

    @property
    def extra(self) -> dict[str, int]:
        """Diagnostics for reports: how many storages are counted now."""
        return {"live_storages": len(self._live)}

    def snapshot(self) -> dict[str, int]:
        """The categories of what is live now (summing to :attr:`current_bytes`)."""
        self._settle()
        self._scan_grads()
        return dict(self._totals)

    def mark(self, name: str) -> dict[str, int]:
        """Store :meth:`snapshot` under ``name`` in :attr:`marks` (e.g. "forward_end")."""
        self.marks[name] = self.snapshot()
        return self.marks[name]

    def reset_peak(self) -> None:
        """Forget the peak so far: it becomes what is live now (e.g. after a warm-up step)."""
        self._settle()
        self.peak_bytes = self._current
        self._peak_components = self.snapshot()

    # -- the mode ----------------------------------------------------------------------------
    def __enter__(self) -> StorageTracker:
        if self._hooks is not None:
            raise MemplanError("this StorageTracker is already active; use a new one")
        self._fake_on_entry = active_fake_mode()
        if self.require_fake and self._fake_on_entry is None:
            raise MemplanError("device 'fake' needs an active FakeTensorMode: build the model "
                               "inside `with FakeTensorMode():` and enter the tracker inside it")
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(self, t), _unpack)
        self._hooks.__enter__()
        for p in self._params.values():
            self._hook(p)
        self._patch_resize()
        try:
            super().__enter__()
        except BaseException:
            self._unpatch()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._unpatch()

    def _patch_resize(self) -> None:
        # UntypedStorage.resize_ (used by FSDP to free/refill storages) bypasses dispatch.
        orig = self._orig_resize = torch.UntypedStorage.resize_
        tracker = self

        def resize_(st: torch.UntypedStorage, size: int) -> Any:
            before = st.nbytes()
            out = orig(st, size)
            rec = tracker._live.get(id(st))
            if rec is not None and st.nbytes() != rec.nbytes:
                tracker._resize(rec, st.nbytes())
            elif (rec is None and before == 0 and st.nbytes() > 0
                  and active_fake_mode() is tracker._fake_on_entry):
                # An empty storage made before the tracker and refilled inside it (FSDP2
                # frees its unsharded parameters with resize_(0) after each step and refills
                # the same storages in the next one): its bytes are a new allocation.
                tracker._add(st, None)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]

    def _unpatch(self) -> None:
        if self._orig_resize is not None:
            torch.UntypedStorage.resize_ = self._orig_resize  # type: ignore[method-assign]
            self._orig_resize = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        # Let wrapper subclasses (DTensor...) unwrap first; we then see their local ops.
        if any(is_traceable_wrapper_subclass_type(t) for t in types):
            return NotImplemented
        out = func(*args, **kwargs)
        # Ops run under another fake mode (e.g. sharding propagation) allocate nothing real.
        if active_fake_mode() is not self._fake_on_entry:
            return out
        if isinstance(out, torch.Tensor):
            self._track_output(func, out, args, kwargs)
        elif isinstance(out, (tuple, list)):
            for o in out:
                for t in o if isinstance(o, (tuple, list)) else (o,):
                    if isinstance(t, torch.Tensor):
                        self._track_output(func, t, args, kwargs)
        return out

    def _track_output(self, func: Any, t: torch.Tensor, args: tuple, kwargs: dict) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        rec = self._live.get(id(st))
        if rec is not None:  # a view, an in-place op, or a resize of a counted storage
            if st.nbytes() != rec.nbytes:
                self._resize(rec, st.nbytes())
        elif func in _FRESH or id(st) not in _input_storage_ids(args, kwargs):
            self._add(st, None)  # new; an input's storage would be pre-existing and unregistered


def make_tracker(device: str, **kw: Any) -> Any:
    """Return the tracker for ``device``: "cpu", "fake" (:class:`StorageTracker`) or "cuda".

    Args:
        device: The device name.
        **kw: Passed to the tracker (e.g. ``capacity_bytes``).

    Returns:
        A :class:`StorageTracker` or :class:`memplan.profile.cuda.CudaTracker`.
    """
    if device == "cpu":
        return StorageTracker(**kw)
    if device == "fake":
        return StorageTracker(require_fake=True, **kw)
    if device == "cuda":
        from memplan.profile.cuda import CudaTracker

        return CudaTracker(**kw)
    raise unknown("device", device, DEVICES)
