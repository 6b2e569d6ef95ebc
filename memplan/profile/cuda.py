"""The CUDA tracker: the caching allocator's own counters, read honestly.

``torch.cuda.max_memory_allocated`` is the ground truth on a GPU, but on a CPU-only build it
silently returns 0, so :class:`CudaTracker` refuses to start unless CUDA is available and never
reports a zero peak. The counters give the total exactly; the split into categories is an
estimate (see :attr:`CudaTracker.peak_components`). All device calls go through the small
:class:`CudaMemoryAPI` interface so that the tracker can be tested without a GPU.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch.utils.weak import WeakIdKeyDictionary

from memplan.errors import MemplanError, OutOfMemory, unknown
from memplan.profile.storages import (
    ACTIVATIONS,
    CATEGORIES,
    GRADIENTS,
    OPTIMIZER_STATES,
    TEMPORARIES,
    WEIGHTS,
    iter_tensors,
    storages,
)


class CudaMemoryAPI(Protocol):
    """What :class:`CudaTracker` needs from the device (all byte counts are ints)."""

    def is_available(self) -> bool: ...
    def synchronize(self) -> None: ...
    def reset_peak_memory_stats(self) -> None: ...
    def max_memory_allocated(self) -> int: ...
    def memory_allocated(self) -> int: ...
    def memory_reserved(self) -> int: ...
    def max_memory_reserved(self) -> int: ...
    def mem_get_info(self) -> tuple[int, int]: ...  # (free, total)


class TorchCudaMemoryAPI:
    """:class:`CudaMemoryAPI` over ``torch.cuda`` for one device (default: the current one)."""

    def __init__(self, device: int | str | torch.device | None = None) -> None:
        self.device = device

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def reset_peak_memory_stats(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def max_memory_allocated(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def memory_allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def memory_reserved(self) -> int:
        return int(torch.cuda.memory_reserved(self.device))

    def max_memory_reserved(self) -> int:
        return int(torch.cuda.max_memory_reserved(self.device))

    def mem_get_info(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free), int(total)


class CudaTracker:
    """Peak allocated bytes on a CUDA device, with the interface of ``StorageTracker``.

    Weights, optimizer states and gradients are the bytes of the registered tensors (and of the
    watched parameters' ``.grad``), counted once per storage while alive. At the peak, gradients
    are the most seen at any read or :meth:`mark` (mark "backward_end" after backward);
    activations are what was allocated beyond the other categories at mark "forward_end" (all of
    the rest when there is no such mark); temporaries are the remainder.

    Args:
        api: The device interface; default :class:`TorchCudaMemoryAPI`.
        capacity_bytes: Simulated memory size: a peak above it raises
            :class:`memplan.errors.OutOfMemory` when the tracker exits.

    Raises:
        MemplanError: CUDA is not available.
    """

    def __init__(self, api: CudaMemoryAPI | None = None, capacity_bytes: int | None = None) -> None:
        self.api: CudaMemoryAPI = api if api is not None else TorchCudaMemoryAPI()
        self._require_cuda()
        self.capacity_bytes = capacity_bytes
        self._registered: Any = WeakIdKeyDictionary()  # storage -> (category, nbytes)
        self._params: dict[int, torch.Tensor] = {}
        self._grad_seen = 0
        self._active = False
        self._measured = False
        self._peak = self._current = 0
        self.marks: dict[str, dict[str, int]] = {}
        self.total_bytes = self.free_at_start_bytes = self.reserved_at_start_bytes = 0
        self.reserved_bytes = self.peak_reserved_bytes = 0

    def _require_cuda(self) -> None:
        if not self.api.is_available():
            raise MemplanError(
                "CUDA is not available, so GPU memory cannot be measured (a CPU-only build "
                "reports 0 bytes); use --device cpu or --device fake"
            )

    # -- what is known without the device -----------------------------------------------------
    def register(self, tensors: Any, category: str) -> int:
        """Count the storages of ``tensors`` (see ``iter_tensors``) as ``category`` while alive."""
        if category not in CATEGORIES:
            raise unknown("memory category", category, CATEGORIES)
        total = 0
        for t in iter_tensors(tensors):
            for st in storages(t):
                if self._registered.get(st, (None,))[0] != category:
                    self._registered[st] = (category, st.nbytes())
                    total += st.nbytes()
        return total

    def watch_params(self, params: Any) -> None:
        """Count the ``.grad`` of these parameters as gradients whenever it is live."""
        for p in params:
            self._params.setdefault(id(p), p)

    def _static(self) -> dict[str, int]:
        """Registered bytes by category, plus the watched parameters' live gradients."""
        comps = dict.fromkeys(CATEGORIES, 0)
        seen: set[int] = set()
        for st, (category, nbytes) in list(self._registered.items()):
            seen.add(id(st))
            comps[category] += nbytes
        for p in self._params.values():
            for st in storages(p.grad) if p.grad is not None else ():
                if id(st) not in seen:
                    seen.add(id(st))
                    comps[GRADIENTS] += st.nbytes()
        self._grad_seen = max(self._grad_seen, comps[GRADIENTS])
        return comps

    # -- measuring ---------------------------------------------------------------------------
    def __enter__(self) -> CudaTracker:
        self._require_cuda()
        self.api.synchronize()
        self.free_at_start_bytes, self.total_bytes = self.api.mem_get_info()
        self.reserved_at_start_bytes = self.api.memory_reserved()
        self.api.reset_peak_memory_stats()
        self._active = self._measured = True
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                self._read()
                raise OutOfMemory(f"CUDA out of memory: {str(exc).splitlines()[0]}",
                                  measured_bytes=self._peak) from exc
            if exc is None:
                self._read()
                self._check_capacity()
        finally:
            self._active = False

    def _read(self) -> None:
        """Refresh the counters from the device (only while active)."""
        if not self._active:
            return
        self.api.synchronize()
        self._peak = self.api.max_memory_allocated()
        self.reserved_bytes = self.api.memory_reserved()
        self.peak_reserved_bytes = self.api.max_memory_reserved()
        self._static()

    def _check_capacity(self) -> None:
        if self.capacity_bytes is not None and self._peak > self.capacity_bytes:
            raise OutOfMemory(f"peak allocated {self._peak} bytes, over the capacity of "
                              f"{self.capacity_bytes} bytes", measured_bytes=self._peak)

    @property
    def extra(self) -> dict[str, int]:
        """Allocator and device numbers for reports (reserved, runtime reserve, total)."""
        return {"reserved_bytes": self.reserved_bytes,
                "peak_reserved_bytes": self.peak_reserved_bytes,
                "runtime_reserve_bytes": self.runtime_reserve_bytes,
                "total_bytes": self.total_bytes}

    @property
    def runtime_reserve_bytes(self) -> int:
        """Device memory used outside PyTorch's allocator at start (CUDA context, other users)."""
        return self.total_bytes - self.free_at_start_bytes - self.reserved_at_start_bytes

    @property
    def peak_bytes(self) -> int:
        """``max_memory_allocated`` since start or :meth:`reset_peak` (never a silent 0)."""
        if not self._measured:
            raise MemplanError("CudaTracker has measured nothing yet: use it as a context manager")
        self._read()
        if self._peak <= 0:
            raise MemplanError("CUDA reported a peak of 0 bytes allocated; refusing to report "
                               "it as a measurement")
        return self._peak

    @property
    def current_bytes(self) -> int:
        """``memory_allocated`` now (the last value read once the tracker has exited)."""
        if self._active:
            self.api.synchronize()
            self._current = self.api.memory_allocated()
        return self._current

    @property
    def peak_components(self) -> dict[str, int]:
        """The categories at the peak (estimated split, exact sum :attr:`peak_bytes`)."""
        peak = self.peak_bytes
        comps = self._static()
        comps[GRADIENTS] = min(self._grad_seen, peak - comps[WEIGHTS] - comps[OPTIMIZER_STATES])
        rest = peak - sum(comps[c] for c in (WEIGHTS, GRADIENTS, OPTIMIZER_STATES))
        if rest < 0:  # registered more than was allocated (e.g. tensors on another device)
            raise MemplanError(f"registered tensors ({peak - rest} bytes) exceed the CUDA peak "
                               f"({peak} bytes): register only tensors on this device")
        fwd = self.marks.get("forward_end")
        acts = rest if fwd is None else max(0, min(rest, fwd[ACTIVATIONS]))
        comps[ACTIVATIONS], comps[TEMPORARIES] = acts, rest - acts
        return comps

    def snapshot(self) -> dict[str, int]:
        """What is allocated now: the static categories, the rest as activations."""
        comps = self._static()
        comps[ACTIVATIONS] = max(0, self.current_bytes - sum(comps.values()))
        return comps

    def mark(self, name: str) -> dict[str, int]:
        """Store :meth:`snapshot` under ``name`` in :attr:`marks`."""
        self.marks[name] = self.snapshot()
        return self.marks[name]

    def reset_peak(self) -> None:
        """Restart the peak from what is allocated now (after a warm-up step)."""
        self.api.synchronize()
        self.api.reset_peak_memory_stats()
        self._grad_seen = 0
