"""What FSDP2 holds at the peak: the storage tracker with every storage named by its role.

:class:`TermTracker` is a :class:`~memplan.profile.trackers.StorageTracker` that also tags
storages with the role they play under ``torch.distributed.fsdp.fully_shard`` (FSDP2) and
reports, beside the categories, the bytes of each role at the peak (:attr:`peak_terms`; they
sum exactly to the peak). The roles (:data:`TERMS`), with their sizes per rank for a model
sharded over M ranks, a parameter of d0 rows and r elements per row, ``pad(d0) = ⌈d0/M⌉``:

==========================  =================================================================
term                        what, and how long FSDP2 (torch 2.13) keeps it
==========================  =================================================================
sharded_params              each parameter's local shard, padded: pad(d0)·r elements; always
buffers                     module buffers (replicated, e.g. rotary inv_freq); always
optimizer_states            optimizer state of the local shards; always
inputs                      the batch (ids, labels); always
unsharded_params            a unit's gathered parameters, M·pad(d0)·r per parameter: the
                            root's from its forward to the end of backward, a block's from its
                            pre-forward to its post-forward and again in its backward
all_gather_buffers          a unit's flat all-gather output (M × its padded shards). Forward:
                            unit i's lives until unit i+1's copy-out has finished; backward:
                            the next unit's is prefetched when the current one starts
unsharded_grads             autograd's gradients of the unsharded parameters, until the unit's
                            post-backward (the root's: the whole backward)
reduce_scatter_input        a unit's gradients copied flat (padded); kept until the next
                            unit's post-backward (one buffer in flight)
reduce_scatter_output       the flat reduce-scatter output (1/M of the input), until it
                            becomes the ``.grad`` views (or, mixed, is moved to bf16)
sharded_grads               the sharded gradients: the fp32 views of reduce-scatter outputs,
                            or the mixed recipe's bf16 buffers; until zero_grad
==========================  =================================================================

Storages with no role (the activations autograd saves, the temporaries of the compute) are
reported under their tracker category. Tags come from wrapping FSDP2's collective helpers
(``foreach_all_gather``, ``foreach_all_gather_copy_out``, ``foreach_reduce``) while the
tracker is active, and from post-accumulate-grad hooks on the unsharded parameters; both use
FSDP2 internals (torch 2.13) and degrade to category-only reports when they are missing.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from memplan.profile.storages import iter_tensors, storages
from memplan.profile.trackers import StorageTracker

__all__ = ["TERMS", "TermTracker", "fsdp_params", "fsdp_units"]

TERMS: tuple[str, ...] = (
    "sharded_params", "buffers", "optimizer_states", "inputs", "unsharded_params",
    "all_gather_buffers", "unsharded_grads", "reduce_scatter_input", "reduce_scatter_output",
    "sharded_grads",
)
_SCOPES = {"foreach_all_gather": "all_gather_buffers",
           "foreach_all_gather_copy_out": "unsharded_params",
           "foreach_reduce": "reduce_scatter_output"}
_HOOKS = {"pre_forward": "pre_forward", "post_forward": "post_forward",
          "pre_backward": "pre_backward", "post_backward": "post_backward"}


def fsdp_units(model: nn.Module) -> list[tuple[str, Any]]:
    """(module name, FSDPParamGroup) of every ``fully_shard``-ed module with parameters."""
    units = []
    for name, module in model.named_modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        group = getattr(get_state(), "_fsdp_param_group", None) if callable(get_state) else None
        if group is not None:
            units.append((name, group))
    return units


def fsdp_params(model: nn.Module) -> list[Any]:
    """Every FSDPParam (FSDP2's per-parameter record) of the model."""
    return [fp for _, group in fsdp_units(model) for fp in group.fsdp_params]


class TermTracker(StorageTracker):
    """A StorageTracker that names each storage's FSDP role; see the module docstring."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._tags: dict[int, str] = {}
        self._scope: str | None = None
        self._lost_tagged: Counter[tuple[str, str]] = Counter()
        self._peak_tagged: dict[tuple[str, str], int] = {}
        self.where = ""  # the step's phase, set by the caller
        self.unit = ""  # the FSDP unit hook that ran last (set while fsdp_scopes is active)
        self.peak_where = ""  # both, at the peak

    # -- tags ---------------------------------------------------------------------------------
    def tag(self, tensors: Any, term: str) -> int:
        """Give the counted storages of ``tensors`` the role ``term``; returns their bytes."""
        total = 0
        for t in iter_tensors(tensors):
            for st in storages(t):
                if (rec := self._live.get(id(st))) is not None:
                    self._tags[id(st)] = term
                    total += rec.nbytes
        return total

    def register_as(self, tensors: Any, category: str, term: str) -> int:
        """:meth:`register` under ``category``, then :meth:`tag` with ``term``."""
        self.register(tensors, category)
        return self.tag(tensors, term)

    def watch_unsharded(self, params: list[torch.Tensor]) -> None:
        """Label the gradients autograd accumulates into these (unsharded) parameters as
        gradients and ``unsharded_grads``. Call while the tracker is active."""
        def hook(p: torch.Tensor) -> None:
            if p.grad is not None:
                self._flag_grad(p.grad)
                self.tag(p.grad, "unsharded_grads")
        self._handles.extend(p.register_post_accumulate_grad_hook(hook)
                             for p in params if p.requires_grad)

    @contextlib.contextmanager
    def fsdp_scopes(self) -> Iterator[None]:
        """Tag what FSDP2's collective helpers allocate, for the duration of the block."""
        try:
            from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_mod
        except ImportError:  # pragma: no cover - other torch versions
            yield
            return
        originals = {name: getattr(group_mod, name) for name in _SCOPES
                     if hasattr(group_mod, name)}
        cls = group_mod.FSDPParamGroup
        methods = {name: getattr(cls, name) for name in _HOOKS if hasattr(cls, name)}
        for name, fn in originals.items():
            setattr(group_mod, name, self._scoped(fn, _SCOPES[name]))
        for name, fn in methods.items():
            setattr(cls, name, self._located(fn, _HOOKS[name]))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(group_mod, name, fn)
            for name, fn in methods.items():
                setattr(cls, name, fn)

    def _located(self, fn: Any, label: str) -> Any:
        def wrapper(group: Any, *args: Any, **kwargs: Any) -> Any:
            self.unit = f"{label} {getattr(group, '_module_fqn', '') or '<root>'}"
            return fn(group, *args, **kwargs)
        return wrapper

    def _scoped(self, fn: Any, term: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            outer, self._scope = self._scope, term
            try:
                out = fn(*args, **kwargs)
            finally:
                self._scope = outer
            if term == "reduce_scatter_output" and isinstance(out, tuple) and out:
                self.tag(out[0], "reduce_scatter_input")  # foreach_reduce returns it first
            return out
        return wrapper

    def _term(self, key: int, rec: Any) -> str | None:
        term = self._tags.get(key)
        if term == "reduce_scatter_output" and rec.grad:
            return "sharded_grads"
        return term

    # -- the base tracker's events, extended --------------------------------------------------
    def _add(self, st: torch.UntypedStorage, category: str | None) -> Any:
        if self._scope is not None:
            self._tags[id(st)] = self._scope
        return super()._add(st, category)

    def _on_free(self, rec: Any) -> None:
        if self._live.get(rec.key) is rec:
            term = self._term(rec.key, rec)
            self._tags.pop(rec.key, None)
            if term is not None and self._dirty:
                self._lost_tagged[(term, rec.bucket())] += rec.nbytes
        super()._on_free(rec)

    def _resize(self, rec: Any, nbytes: int) -> None:
        term = self._term(rec.key, rec)
        if term is not None and self._dirty and nbytes < rec.nbytes:
            self._lost_tagged[(term, rec.bucket())] += rec.nbytes - nbytes
        super()._resize(rec, nbytes)

    def _grow(self, rec: Any, nbytes: int) -> None:
        if self._current + nbytes - rec.nbytes > self.peak_bytes:
            self._lost_tagged = Counter()  # a new peak: what was lost since the old one resets
            self.peak_where = f"{self.where} (after {self.unit})" if self.unit else self.where
        super()._grow(rec, nbytes)

    def _tagged_now(self) -> Counter[tuple[str, str]]:
        tagged: Counter[tuple[str, str]] = Counter()
        for key in list(self._tags):
            rec = self._live.get(key)
            if rec is None:
                del self._tags[key]
            elif (term := self._term(key, rec)) is not None:
                tagged[(term, rec.bucket())] += rec.nbytes
        return tagged

    def _settle(self) -> None:
        if self._dirty:
            self._peak_tagged = dict(self._tagged_now() + self._lost_tagged)
        super()._settle()

    def reset_peak(self) -> None:
        super().reset_peak()
        self._peak_tagged = dict(self._tagged_now())

    @property
    def peak_terms(self) -> dict[str, int]:
        """Bytes of each role at the peak, then the untagged rest by category; sums to
        :attr:`peak_bytes`."""
        rest = self.peak_components
        terms: Counter[str] = Counter()
        for (term, bucket), n in self._peak_tagged.items():
            terms[term] += n
            rest[bucket] -= n
        out = {t: terms[t] for t in TERMS if terms[t]}
        out.update({f"other_{c}": n for c, n in rest.items() if n})
        return out
