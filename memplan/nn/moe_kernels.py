"""A dtype-agnostic FakeTensorMode kernel for ``aten._grouped_mm`` (the MoE experts' matmul).

Why: transformers 5.24 runs its mixtures of experts (mixtral, qwen2_moe, olmoe...) through
``grouped_mm_experts_forward`` by default, which calls ``torch.nn.functional.grouped_mm``, i.e.
``aten._grouped_mm``. torch's meta kernel (``_meta_registrations.py``) copies the CUDA kernel's
dtype rule and refuses anything but bf16, so an fp32 step cannot run under FakeTensorMode,
although torch's CPU kernel takes fp32 (and the real CPU step runs).

What: under FakeTensorMode, ``aten._grouped_mm`` makes its output with torch's own
``_create_grouped_mm_output_tensor`` (the meta kernel's shape, dtype and strides logic, without
the dtype check) on the input's device. It is faithful: the output has the real kernel's shape
(S, N) and dtype (``out_dtype`` or the inputs'), the op allocates nothing else, and autograd's
formula for ``_grouped_mm`` stays aten's, so what is saved for backward depends on
requires-grad exactly as on a real device (measured: a fake fp32 step's peak equals the real
CPU fp32 step's, up to the attention-mask gap that every family shows in fake mode).
Only fake tensors are affected; real kernels are untouched.
"""

from __future__ import annotations

from typing import Any

import torch

_registered = False


def register_fake_grouped_mm() -> None:
    """Install the kernel (idempotent); a no-op on a torch without ``aten._grouped_mm``."""
    global _registered
    if _registered or not hasattr(torch.ops.aten, "_grouped_mm"):
        return
    from torch._meta_registrations import _create_grouped_mm_output_tensor
    from torch._subclasses.fake_impls import register_op_impl
    from torch._subclasses.fake_tensor import in_kernel_invocation_manager

    @register_op_impl(torch.ops.aten._grouped_mm.default)
    def _grouped_mm_fake(fake_mode: Any, func: Any, mat_a: torch.Tensor, mat_b: torch.Tensor,
                         offs: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
        with in_kernel_invocation_manager(fake_mode):
            out = _create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype)
        return fake_mode.fake_tensor_converter.from_meta_and_device(fake_mode, out,
                                                                     mat_a.device)

    _registered = True
