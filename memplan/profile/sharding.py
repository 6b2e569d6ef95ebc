"""FSDP2 on the reference models: which regimes shard, how the model is wrapped, and the sizes
FSDP2 records.

:func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` the way a training script
does: each transformer block is one unit, the root (embeddings, final norm, untied head) the
last. It is passed to :func:`memplan.nn.regimes.prepare` as ``shard=`` so that the optimizer
is built on the sharded DTensor parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from memplan.errors import MemplanError
from memplan.fsdp import SHARDABLE_REGIMES
from memplan.profile.fsdp_terms import fsdp_params, fsdp_units
from memplan.spec import TrainSpec

__all__ = ["SHARDABLE_REGIMES", "check_sharded", "shard_model", "fsdp_facts"]




def check_sharded(train: TrainSpec, nproc: int) -> str:
    """The regime to prepare (``zero`` runs as ``full``), after checking the job."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise MemplanError(f"--nproc must be a positive integer, got {nproc!r}")
    if not train.has_activations:
        raise MemplanError("profiling runs real steps: give --batch and --seq")
    r = train.recipe
    if not r.shardable:
        raise MemplanError(f"regime {train.regime!r} cannot be measured sharded: its trainable "
                           f"parameters live outside the model; shardable regimes: "
                           f"{', '.join(SHARDABLE_REGIMES)}")
    preset = TrainSpec(regime=train.regime).recipe
    if (r.dtype, r.autocast, r.grad_accum) != (preset.dtype, "none", 1):
        raise MemplanError("the sharded profiler runs the regimes' own dtypes without autocast "
                           "or accumulation; drop --dtype, --autocast and --grad-accum, or "
                           "measure one process")
    return "full" if r.fsdp else train.regime


def _blocks(model: nn.Module) -> list[nn.Module]:
    for path in ("model.layers", "transformer.h"):
        with contextlib.suppress(AttributeError):
            return list(model.get_submodule(path))
    raise MemplanError(f"cannot find the transformer blocks of a {type(model).__name__}")


def shard_model(model: nn.Module, mesh: Any, reshard_after_forward: bool = True,
                param_dtype: str = "fp32") -> None:
    """``fully_shard`` each transformer block, then the root (embeddings, final norm, head).

    ``reshard_after_forward=False`` keeps each block's gathered parameters from its forward to
    its backward (FSDP's SHARD_GRAD_OP, ZeRO-2-like); the root is never resharded after forward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                            reduce_dtype=torch.float32)} \
        if param_dtype == "bf16" else {}
    with _lazy_chunks():
        for block in _blocks(model):
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, **mp)
        fully_shard(model, mesh=mesh, **mp)  # the root keeps its gathered parameters


class _Chunks(Sequence):
    """``torch.chunk(tensor, n, dim)`` padded with empty tensors to n items, made on access."""

    def __init__(self, tensor: torch.Tensor, num_chunks: int, dim: int) -> None:
        self.tensor, self.num_chunks, self.dim = tensor, num_chunks, dim
        self.rows_per_chunk = -(-tensor.size(dim) // num_chunks)  # rows > 0 (see _lazy_chunks)

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.num_chunks))]
        if i < 0:
            i += self.num_chunks
        if not 0 <= i < self.num_chunks:
            raise IndexError(i)
        start = i * self.rows_per_chunk
        rows = self.tensor.size(self.dim)
        if start >= rows:
            return self.tensor.new_empty(0)
        return self.tensor.narrow(self.dim, start, min(self.rows_per_chunk, rows - start))


@contextlib.contextmanager
def _lazy_chunks() -> Any:
    """Shard without materialising every rank's chunk (minutes at 1024 ranks under fake mode).

    FSDP2's ``_chunk_with_empty`` builds all M chunks of each parameter (``torch.chunk``,
    padded with one new empty tensor per missing rank) and reads two of them: its own rank's
    and the first (for the padded size). Under ``FakeTensorMode`` each costs ~0.5 ms, so a 70B
    model at 1024 ranks spent many minutes there. :class:`_Chunks` gives the same tensors
    (``torch.chunk``'s sizes: ⌈d0/M⌉ rows, then the rest, then empties) on access only.
    """
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param
    except ImportError:  # pragma: no cover - other torch versions
        yield
        return
    original = getattr(_fsdp_param, "_chunk_with_empty", None)
    if original is None:  # pragma: no cover
        yield
        return

    def chunk_with_empty(tensor: torch.Tensor, num_chunks: int, dim: int) -> Any:
        if tensor.size(dim) == 0:  # torch.chunk's own rules for empty tensors
            return original(tensor, num_chunks, dim)
        return _Chunks(tensor, num_chunks, dim)

    _fsdp_param._chunk_with_empty = chunk_with_empty
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = original


def fsdp_facts(model: nn.Module) -> dict[str, Any]:
    """Sizes read from FSDP2's own records (torch 2.13 internals; empty if they moved): each
    unit's gathered bytes (padded) by module name, and this rank's sharded bytes (padded)."""
    try:
        units = {name or "<root>": sum(
            group.mesh_info.shard_mesh_size * fp.padded_sharded_param_size.numel()
            * fp.sharded_param.element_size() for fp in group.fsdp_params)
            for name, group in fsdp_units(model)}
        sharded = sum(fp._sharded_param_data.numel() * fp._sharded_param_data.element_size()
                      for fp in fsdp_params(model))
    except AttributeError:
        return {}
    return {"unit_bytes": units, "sharded_param_bytes": sharded}
