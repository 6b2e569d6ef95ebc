"""Memory categories and the walk from Python objects to the untyped storages that hold bytes.

Shared by the storage tracker (:mod:`memplan.profile.trackers`) and the CUDA tracker
(:mod:`memplan.profile.cuda`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

WEIGHTS = "weights"
GRADIENTS = "gradients"
OPTIMIZER_STATES = "optimizer_states"
ACTIVATIONS = "activations"  # storages autograd keeps for the backward pass
TEMPORARIES = "temporaries"  # everything else that is live
CATEGORIES: tuple[str, ...] = (WEIGHTS, GRADIENTS, OPTIMIZER_STATES, ACTIVATIONS, TEMPORARIES)


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Yield every tensor inside ``obj``.

    Args:
        obj: A tensor, a module (its parameters and buffers), an optimizer (its ``state``), or
            nested mappings (values only) and iterables of those. Other objects are skipped.

    Yields:
        The tensors found, possibly repeated.
    """
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        yield from iter_tensors(list(obj.state.values()))
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        for value in obj:
            yield from iter_tensors(value)


def storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The untyped storages behind ``t``: its own, or its inner tensors' for a wrapper subclass
    (DTensor...). Tensors without a storage (sparse, nested...) have none."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
        inner = (getattr(t, a) for a in attrs)
        return [st for x in inner if isinstance(x, torch.Tensor) for st in storages(x)]
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):
        return []
