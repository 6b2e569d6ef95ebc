"""A plain-torch reference of bitsandbytes' block-wise 8-bit AdamW (``AdamW8bit``, paged or not).

bitsandbytes does not run here (no CUDA build; it is not installed), so this module re-implements
its optimizer with the *same tensors*, so that memplan can measure the memory of
``--optimizer adamw-8bit`` / ``paged-adamw-8bit`` on the CPU and under ``FakeTensorMode``.

Layout followed (bitsandbytes-foundation/bitsandbytes, 0.50.2.dev0, commit 95f9af3, and the
same since 0.44.0 when the block size went 2048 -> 256):

* ``bitsandbytes/optim/adamw.py`` ``AdamW8bit`` / ``PagedAdamW8bit``: ``Optimizer2State("adam",
  ..., optim_bits=8, min_8bit_size=4096, is_paged=...)``; defaults lr=1e-3, betas=(0.9, 0.999),
  eps=1e-8, weight_decay=1e-2 (decoupled, AdamW).
* ``bitsandbytes/optim/optimizer.py`` ``Optimizer8bit.__init__`` / ``fill_qmap``: two quantisation
  maps per optimizer, ``name2qmap["dynamic"] = F.create_dynamic_map(signed=True)`` (for m) and
  ``name2qmap["udynamic"] = create_dynamic_map(signed=False)`` (for v), 256 fp32 entries each,
  shared by every parameter (``state["qmap1"]``/``state["qmap2"]`` are references), moved to the
  parameter's device on the first 8-bit ``init_state``.
* ``Optimizer2State.init_state``: ``state["step"] = 0`` (a Python int, +1 before each update);
  if ``p.numel() >= min_8bit_size``: ``state1``, ``state2`` = ``zeros_like(p, dtype=uint8)``
  and ``absmax1``, ``absmax2`` = fp32 ``(ceil(numel / 256),)``; else ``state1``, ``state2`` =
  ``zeros_like(p, dtype=float32)`` (fp32 whatever the parameter's dtype, no absmax, no qmap).
* ``Optimizer8bit.get_state_buffer``: with ``is_paged`` and ``p.numel() >= 1e5`` on CUDA the
  state1/state2 buffers come from ``F.get_paged`` (``cget_managed_ptr`` -> ``cudaMallocManaged``,
  wrapped with ``torch.frombuffer``): unified memory outside PyTorch's caching allocator, so
  ``torch.cuda.memory_allocated`` does not count them; absmax and qmaps stay ordinary CUDA
  tensors. On the CPU bitsandbytes warns and allocates them normally.
* ``bitsandbytes/functional.py`` ``optimizer_update_8bit_blockwise`` -> the CUDA kernel
  ``kOptimizerStatic8bit2StateBlockwise`` (``csrc/kernels.cu``): per block of 256 elements,
  dequantise m, v with the map and the block's absmax, Adam update in fp32 registers, new absmax =
  max |state| of the block, re-quantise to the map. The fused kernel allocates nothing: on CUDA a
  step has **no temporaries**. The CPU/pure-torch references in bitsandbytes
  (``backends/cpu/ops.py`` ``_optimizer_update_8bit_blockwise_cpu``,
  ``backends/triton/kernels_optim.py`` ``optimizer_update_8bit_blockwise_pytorch``) dequantise
  whole tensors; the update below is the same arithmetic, chunked.

Bytes kept (per parameter of ``n`` elements): ``n >= min_8bit_size``: ``2n + 8*ceil(n/256)``
(uint8 m, v + fp32 absmax); else ``8n`` (fp32 m, v), and so for the parameters given in
``fp32_params`` (bitsandbytes' ``optim_bits=32`` override). Plus once per optimizer the two maps,
``2 * 256 * 4 = 2048`` bytes (created at construction on the CPU, like bitsandbytes; on another
device they exist there once a parameter is 8-bit, and :meth:`AdamW8bit.state_tensors` lists them
from then on, on every device). ``step`` is a Python int (0 bytes).
``paged=True`` keeps the same tensors and bytes here (the CPU has no unified memory, and under
``FakeTensorMode`` nothing is allocated); :meth:`AdamW8bit.paged_tensors` lists the ones
bitsandbytes would put in managed memory on CUDA (state1, state2 of parameters with
``n >= 100_000``).

Step temporaries of this reference (exact, for the storage tracker on CPU and fake): each
parameter is processed in chunks of ``chunk_blocks`` blocks (``e = min(chunk_blocks*256, ...)``
elements; the last partial block, if any, is a chunk of its own). With ``c16 = 1`` for 16-bit
parameters and gradients (their fp32 copies), ``0`` for fp32:

* 8-bit chunk of ``e`` elements: ``12e + 4e*c16`` bytes (fp32 m, v, and then the fp32 sqrt(v)
  denominator or an int32 index, plus the fp32 parameter copy for 16-bit parameters).
* 32-bit chunk (small parameter): ``4e + 4e*c16`` bytes (the denominator, plus the fp32 copy).
* Plus, while a step that has any 8-bit parameter runs, the two 255-entry fp32 midpoint tables
  of the maps: ``2 * 255 * 4 = 2040`` bytes.

So ``peak temporaries = max over chunks of the above (+ 2040 when any parameter is 8-bit)``;
with the default ``chunk_blocks = 4096`` a chunk is at most 1,048,576 elements (12 MiB of
fp32 temporaries): small beside a 7B model's states, and few enough chunks that an 8B model's
step runs in seconds under FakeTensorMode.
Everything runs as plain tensor ops (``index_select``, ``linalg.vector_norm``, ``bucketize``)
without reading tensor values into Python, so it works under ``FakeTensorMode``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

__all__ = ["AdamW8bit", "PagedAdamW8bit", "BLOCK_SIZE", "MIN_8BIT_SIZE", "PAGED_MIN_NUMEL",
           "create_dynamic_map", "state_bytes", "step_temporary_bytes"]

BLOCK_SIZE = 256  # bitsandbytes >= 0.44.0 (was 2048 before)
CHUNK_BLOCKS = 4096  # blocks dequantised at a time: bounds the step's temporaries
MIN_8BIT_SIZE = 4096  # Optimizer2State default: smaller parameters keep fp32 states
PAGED_MIN_NUMEL = 100_000  # get_state_buffer pages only tensors of at least 1e5 elements
QMAP_BYTES = 2 * 256 * 4  # the two shared fp32 maps
MIDS_BYTES = 2 * 255 * 4  # their midpoint tables, temporaries of a step with 8-bit parameters


@functools.cache
def _dynamic_map_values(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8
                        ) -> tuple[float, ...]:
    """``bitsandbytes.functional.create_dynamic_map`` as Python floats (computed outside modes)."""
    with _disable_current_modes():  # no fake tensors, no tracker: real, untracked scratch
        data: list[float] = []
        non_sign_bits = total_bits - 1
        additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
        for i in range(max_exponent_bits):
            fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                                 else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
            boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
            means = (boundaries[:-1] + boundaries[1:]) / 2.0
            data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
            if signed:
                data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if additional_items > 0:
            boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
            means = (boundaries[:-1] + boundaries[1:]) / 2.0
            data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
            if signed:
                data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data.append(0)
        data.append(1.0)
        assert len(data) == 2**total_bits
        data += [0] * (256 - len(data))
        data.sort()
        return tuple(float(x) for x in data)


def create_dynamic_map(signed: bool = True, device: Any = None) -> torch.Tensor:
    """The 256-entry fp32 dynamic quantisation map of bitsandbytes (sorted ascending)."""
    return torch.tensor(_dynamic_map_values(signed), dtype=torch.float32, device=device)


def _blocks(n: int) -> int:
    return n // BLOCK_SIZE + bool(n % BLOCK_SIZE)


def state_bytes(numel: int, min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Bytes bitsandbytes' AdamW8bit keeps for one parameter of ``numel`` elements (no qmaps)."""
    if numel >= min_8bit_size:
        return 2 * numel + 2 * 4 * _blocks(numel)
    return 2 * 4 * numel


def _chunks(n: int, chunk_blocks: int, quantised: bool) -> list[tuple[int, int, int]]:
    """(start, length, block row length) of the chunks a parameter of ``n`` elements is cut into.

    8-bit: whole blocks, ``chunk_blocks`` at a time, then the partial last block on its own.
    32-bit: ``chunk_blocks * 256`` elements at a time.
    """
    step = chunk_blocks * BLOCK_SIZE
    if not quantised:
        return [(s, min(step, n - s), 0) for s in range(0, n, step)]
    full = (n // BLOCK_SIZE) * BLOCK_SIZE
    out = [(s, min(step, full - s), BLOCK_SIZE) for s in range(0, full, step)]
    if n > full:
        out.append((full, n - full, n - full))
    return out


def step_temporary_bytes(params: Iterable[tuple[int, torch.dtype]],
                         chunk_blocks: int = CHUNK_BLOCKS,
                         min_8bit_size: int = MIN_8BIT_SIZE) -> int:
    """Peak temporaries of one :meth:`AdamW8bit.step` over ``(numel, dtype)`` parameters.

    The exact formula of the module docstring: max over chunks of ``12e + 4e*c16`` (8-bit) or
    ``4e + 4e*c16`` (32-bit), plus 2040 bytes when any parameter is 8-bit. Zero for
    bitsandbytes' fused CUDA kernel.
    """
    peak, any8 = 0, False
    for numel, dtype in params:
        c16 = dtype.itemsize < 4
        q = numel >= min_8bit_size
        any8 |= q
        for _, e, _ in _chunks(numel, chunk_blocks, q):
            peak = max(peak, (12 * e if q else 4 * e) + 4 * e * c16)
    return peak + (MIDS_BYTES if any8 else 0)


class AdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' ``AdamW8bit`` (block-wise, 256-element blocks) in plain torch.

    Args:
        params: Parameters or parameter groups.
        lr, betas, eps, weight_decay: As bitsandbytes (weight decay decoupled: ``p *= 1 -
            lr*wd`` before the update, as its kernels do).
        min_8bit_size: Parameters with fewer elements keep fp32 states (bitsandbytes: 4096).
        paged: bitsandbytes' ``is_paged`` (``PagedAdamW8bit``); same tensors here, see
            :meth:`paged_tensors`.
        chunk_blocks: Blocks processed at once; bounds the step's temporaries (module docstring).
        fp32_params: Parameters whose m and v stay fp32 whatever their size, as bitsandbytes'
            ``GlobalOptimManager`` override ``{"optim_bits": 32}`` does (the Hugging Face
            Trainer registers every ``nn.Embedding`` weight so).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2,
                 min_8bit_size: int = MIN_8BIT_SIZE, paged: bool = False,
                 chunk_blocks: int = CHUNK_BLOCKS,
                 fp32_params: Iterable[torch.Tensor] = ()) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW8bit hyper-parameters: lr={lr} betas={betas} "
                             f"eps={eps} weight_decay={weight_decay}")
        if chunk_blocks < 1:
            raise ValueError(f"chunk_blocks must be >= 1, got {chunk_blocks}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self.is_paged = paged
        self.chunk_blocks = chunk_blocks
        self._fp32_ids = {id(p) for p in fp32_params}
        self._maps_placed = False  # a parameter is 8-bit: the maps are on its device
        # Optimizer8bit.fill_qmap: made at construction (CPU), moved on the first 8-bit init.
        self.name2qmap: dict[str, torch.Tensor] = {
            "dynamic": create_dynamic_map(signed=True),
            "udynamic": create_dynamic_map(signed=False)}

    # -- state -------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_state(self, p: torch.Tensor) -> None:
        state = self.state[p]
        state["step"] = 0
        if p.numel() >= self.min_8bit_size and id(p) not in self._fp32_ids:
            for key in ("dynamic", "udynamic"):
                self.name2qmap[key] = self.name2qmap[key].to(p.device)
            self._maps_placed = True
            state["state1"] = torch.zeros_like(p, dtype=torch.uint8,
                                               memory_format=torch.contiguous_format)
            state["qmap1"] = self.name2qmap["dynamic"]
            state["state2"] = torch.zeros_like(p, dtype=torch.uint8,
                                               memory_format=torch.contiguous_format)
            state["qmap2"] = self.name2qmap["udynamic"]
            blocks = _blocks(p.numel())
            state["absmax1"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)
        else:
            state["state1"] = torch.zeros_like(p, dtype=torch.float32,
                                               memory_format=torch.contiguous_format)
            state["state2"] = torch.zeros_like(p, dtype=torch.float32,
                                               memory_format=torch.contiguous_format)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor this optimizer keeps on the parameters' device: per-parameter states,
        then the two maps once, if a parameter is 8-bit (before that, bitsandbytes keeps them
        on the host, where they were made)."""
        out: list[torch.Tensor] = []
        for state in self.state.values():
            out += [state[k] for k in ("state1", "state2", "absmax1", "absmax2") if k in state]
        return out + (list(self.name2qmap.values()) if self._maps_placed else [])

    def paged_tensors(self) -> list[torch.Tensor]:
        """The states bitsandbytes would allocate in CUDA managed memory (``paged=True`` only):
        state1 and state2 of parameters with at least 100 000 elements."""
        if not self.is_paged:
            return []
        return [state[k] for p, state in self.state.items() if p.numel() >= PAGED_MIN_NUMEL
                for k in ("state1", "state2")]

    # -- update ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [(group, p) for group in self.param_groups for p in group["params"]
                if p.grad is not None]
        for _, p in todo:
            if len(self.state[p]) == 0:
                self._init_state(p)
        mids: tuple[torch.Tensor, torch.Tensor] | None = None
        if any("absmax1" in self.state[p] for _, p in todo):
            q1, q2 = self.name2qmap["dynamic"], self.name2qmap["udynamic"]
            mids = ((q1[:-1] + q1[1:]).mul_(0.5), (q2[:-1] + q2[1:]).mul_(0.5))
        for group, p in todo:
            self._update(group, p, mids)
        return loss

    def _update(self, group: dict, p: torch.Tensor,
                mids: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        state = self.state[p]
        state["step"] += 1
        step = state["step"]
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        quantised = "absmax1" in state
        if not p.is_contiguous():  # bitsandbytes: p.data = p.data.contiguous()
            p.data = p.data.contiguous()
        grad = p.grad.contiguous().view(-1)
        flat_p = p.view(-1)
        s1, s2 = state["state1"].view(-1), state["state2"].view(-1)
        for start, e, row in _chunks(p.numel(), self.chunk_blocks, quantised):
            end = start + e
            if quantised:
                b0, b1 = start // BLOCK_SIZE, start // BLOCK_SIZE + e // row
                a1, a2 = state["absmax1"][b0:b1], state["absmax2"][b0:b1]
                m = self._dequant(s1[start:end], a1, state["qmap1"], row)
                v = self._dequant(s2[start:end], a2, state["qmap2"], row)
            else:
                m, v = s1[start:end], s2[start:end]
            g = grad[start:end].float()  # a copy only for 16-bit gradients
            m.mul_(beta1).add_(g, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            del g
            denom = v.sqrt().div_(correction2).add_(eps)
            pc = flat_p[start:end]
            p32 = pc.float()  # a copy only for 16-bit parameters
            if wd > 0.0:
                p32.mul_(1.0 - lr * wd)
            p32.addcdiv_(m, denom, value=-lr / correction1)
            del denom
            if p32 is not pc:
                pc.copy_(p32)
            del p32
            if quantised:
                assert mids is not None
                self._quant(m, a1, mids[0], s1[start:end], row)
                self._quant(v, a2, mids[1], s2[start:end], row)
            del m, v  # else the next chunk's dequantisation would overlap this chunk's m, v

    @staticmethod
    def _dequant(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor,
                 row: int) -> torch.Tensor:
        """fp32 values of ``codes`` (uint8, whole blocks of ``row``): qmap[code] * absmax[block]."""
        idx = codes.int()
        vals = torch.index_select(qmap, 0, idx)
        del idx
        vals.view(-1, row).mul_(absmax.unsqueeze(1))
        return vals

    @staticmethod
    def _quant(vals: torch.Tensor, absmax: torch.Tensor, mids: torch.Tensor,
               codes: torch.Tensor, row: int) -> None:
        """New block absmax (into ``absmax``) and nearest-map-entry codes (into ``codes``)."""
        blocks = vals.view(-1, row)
        torch.linalg.vector_norm(blocks, float("inf"), dim=1, out=absmax)
        absmax.clamp_(min=torch.finfo(torch.float32).tiny)  # an all-zero block stays zero
        blocks.div_(absmax.unsqueeze(1))
        idx = torch.bucketize(vals, mids, out_int32=True)  # index of the nearest map entry
        codes.copy_(idx)


class PagedAdamW8bit(AdamW8bit):
    """bitsandbytes' ``PagedAdamW8bit``: :class:`AdamW8bit` with ``paged=True``."""

    def __init__(self, params: Any, **kw: Any) -> None:
        kw.setdefault("paged", True)
        super().__init__(params, **kw)
