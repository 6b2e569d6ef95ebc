"""LoRA: low-rank adapters on a model's linear layers (Hu et al., 2021, arXiv:2106.09685).

A wrapped layer computes

    y = W x + b + s · B(A(dropout(x))),    s = alpha / R,

with ``A ∈ R^{R×in}`` (``lora_A.weight``) and ``B ∈ R^{out×R}`` (``lora_B.weight``). B starts at
zero, so a freshly wrapped model is exactly the base model. The wrapper keeps the base ``weight``
and ``bias`` as its own parameters, so the state-dict keys of the base (``...q_proj.weight``) are
unchanged and a base checkpoint loads into the wrapped model; the adapters add
``...q_proj.lora_A.weight`` and ``...q_proj.lora_B.weight`` (PEFT's keys minus the adapter name).

Trainable parameters: M = Σ over targeted matrices of R · (in + out), which is exactly
:func:`memplan.params.lora_params`.

Several adapters at once (``adapters=K``, K > 1): each wrapped layer holds K adapters, keyed
``adapter0`` ... ``adapter{K-1}`` in ``lora_A`` and ``lora_B`` ModuleDicts as PEFT keys them
(state-dict keys ``...q_proj.lora_A.adapter0.weight``), and every sample of the batch goes
through the adapter its index names (:func:`set_adapter_index`): PEFT's mixed-adapter batch
(``peft/tuners/lora/layer.py``, ``Linear._mixed_batch_forward``). Trainable: K · M.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memplan.errors import MemplanError

__all__ = [
    "LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "lora_state_dict",
    "load_lora_state_dict", "save_lora", "load_lora", "get_adapter_params",
    "set_adapter_index", "adapter_names",
]

INITS = ("kaiming", "gaussian")
ATTENTION_NAMES = ("self_attn", "attn", "attention")
HEAD_NAMES = ("lm_head", "score", "classifier", "head")
_BLOCK = re.compile(r"(?:^|\.)\d+\.")  # a ".N." path segment: a block inside a ModuleList
_ADAPTER_PART = re.compile(r"(?:^|\.)lora_[AB](?:\.|$)")  # inside an adapter: never a target


def adapter_names(adapters: int) -> tuple[str, ...]:
    """The keys of K adapters in ``lora_A`` and ``lora_B``: ``adapter0`` ... ``adapter{K-1}``."""
    return tuple(f"adapter{k}" for k in range(adapters))


class LoRALinear(nn.Module):
    """A linear layer with a low-rank adapter: ``W x + b + (alpha / R) · B(A(dropout(x)))``.

    Memory: beside the base layer's saved input x, autograd saves only A's output (B, T, R)
    for B's backward; the product with the Python scalar ``scaling`` comes after ``lora_B`` and
    saves nothing. With ``dropout > 0`` the dropped-out copy of x and its mask are saved too;
    with ``dropout == 0`` the dropout module is not called at all.

    Mixed dtypes (the ``lora-bf16`` regime): when the input is bf16 (a bf16 base) and the
    adapters are fp32, the adapter weights are cast to the input's dtype for the matmuls, as
    ``torch.autocast`` would do; the casts are of A and B (R·(in+out) elements, tiny), never of
    the activation x, so no fp32 copy of x is stored. The gradients reach the fp32 adapters
    through the casts, in fp32. (PEFT instead casts x up to fp32, which stores an fp32 copy of
    x per adapted layer.) The base matmul runs in the base's dtype.

    Args:
        in_features: input width.
        out_features: output width.
        rank: R, the adapter rank, ``1 <= R <= min(in, out)``.
        alpha: the LoRA alpha; ``scaling = alpha / R`` is computed once here.
        bias: whether the base layer has a bias.
        dropout: dropout probability on the adapter's input.
        init: ``"kaiming"`` (default): A ~ kaiming-uniform(a=√5), as PEFT and nn.Linear do.
            The lecture notes say "A small random normal"; ``"gaussian"`` gives A ~ N(0, 1/R²)
            (std 1/R, PEFT's ``init_lora_weights="gaussian"``). B is zero either way.
        device: device of the new parameters.
        dtype: dtype of the base weight and bias.
        adapter_dtype: dtype of A and B (default: ``dtype``).
        adapters: K, the adapters of the layer. K = 1 (default): ``lora_A`` and ``lora_B`` are
            ``nn.Linear``. K > 1: ModuleDicts of K each (:func:`adapter_names`), all of the same
            rank, alpha and init, and the forward routes each sample by the index set with
            :func:`set_adapter_index`.

    Memory of K > 1, per adapter k with rows ``r_k`` of the batch: the gather ``x[r_k]`` (a
    copy, which A keeps for its gradient, so the layer's input is kept once more in all: every
    adapted layer keeps its own copy, where one adapter shares x with the base), A's output
    (kept for B), and ``out.index_put((r_k,), ·, accumulate=True)`` out of place, which keeps
    only ``r_k`` (torch's IndexPutBackward0; ``index_add`` would keep its source, the adapter's
    whole output). PEFT writes the last step as ``result[r_k] += ·``, which keeps the same
    tensors; the out-of-place form avoids the in-place write on the base output (a view of
    ``addmm``'s result, which autograd would wrap in CopySlices).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 bias: bool = True, dropout: float = 0.0, *, init: str = "kaiming",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 adapter_dtype: torch.dtype | None = None, adapters: int = 1) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._set_base(base)
        self._init_adapters(rank, alpha, dropout, init, base.weight.device,
                            adapter_dtype or base.weight.dtype, adapters)

    def _set_base(self, linear: nn.Linear) -> None:
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias  # a Parameter or None (registers None as nn.Linear does)

    def _init_adapters(self, rank: int, alpha: float, dropout: float, init: str,
                       device: torch.device, dtype: torch.dtype, adapters: int = 1) -> None:
        _check_rank_alpha(rank, alpha)
        _check_adapters(adapters)
        if rank > min(self.in_features, self.out_features):
            raise MemplanError(
                f"LoRA rank {rank} is larger than min(in, out) = "
                f"{min(self.in_features, self.out_features)} of a {self.in_features}×"
                f"{self.out_features} layer; use a smaller --rank")
        if init not in INITS:
            raise MemplanError(f"LoRA init {init!r} is not one of {INITS}")
        if not 0.0 <= dropout < 1.0:
            raise MemplanError(f"LoRA dropout {dropout!r} must be in [0, 1)")
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.dropout_p = float(dropout)
        self.init = init
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapters = adapters
        self._rows: list[tuple[str, torch.Tensor]] | None = None  # set_adapter_index
        if adapters == 1:
            self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device,
                                    dtype=dtype)
            self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device,
                                    dtype=dtype)
        else:
            names = adapter_names(adapters)
            self.lora_A = nn.ModuleDict({n: nn.Linear(self.in_features, rank, bias=False,
                                                      device=device, dtype=dtype)
                                         for n in names})
            self.lora_B = nn.ModuleDict({n: nn.Linear(rank, self.out_features, bias=False,
                                                      device=device, dtype=dtype)
                                         for n in names})
        self.reset_lora_parameters()

    def adapter_pairs(self) -> list[tuple[str, nn.Linear, nn.Linear]]:
        """(name, A, B) of every adapter; the name is ``""`` for a single adapter."""
        if self.adapters == 1:
            return [("", self.lora_A, self.lora_B)]
        return [(n, self.lora_A[n], self.lora_B[n]) for n in self.lora_A]

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, *,
                    init: str = "kaiming", adapter_dtype: torch.dtype | None = None,
                    adapters: int = 1) -> LoRALinear:
        """Wrap an existing ``nn.Linear``, reusing its weight and bias Parameters (no copy)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._set_base(linear)
        self._init_adapters(rank, alpha, dropout, init, linear.weight.device,
                            adapter_dtype or linear.weight.dtype, adapters)
        return self

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A as chosen by ``init``, B = 0, so the layer equals its base exactly."""
        for _, lora_a, lora_b in self.adapter_pairs():
            if self.init == "gaussian":
                nn.init.normal_(lora_a.weight, std=1.0 / self.rank)
            else:
                nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_b.weight)

    def delta_weight(self) -> torch.Tensor:
        """The adapter's weight update ``s · B @ A`` (out × in), in fp32."""
        if self.adapters > 1:
            raise MemplanError(f"a layer with {self.adapters} adapters has no single weight "
                               "update to merge; merge a single-adapter model")
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _adapt(self, lora_a: nn.Linear, lora_b: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``B(A(dropout(x)))`` in x's dtype (casting the adapter weights, not x)."""
        h = x if self.dropout_p == 0.0 else self.lora_dropout(x)
        if lora_a.weight.dtype == x.dtype:
            return lora_b(lora_a(h))
        # autocast-style: cast the small adapter weights, never the activation
        return F.linear(F.linear(h, lora_a.weight.to(x.dtype)), lora_b.weight.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W x + b + s · B(A(dropout(x)))``; see the class docstring for memory and dtypes."""
        out = F.linear(x, self.weight, self.bias)
        if self.adapters > 1:
            return self._mixed_forward(x, out)
        h = x if self.dropout_p == 0.0 else self.lora_dropout(x)
        if self.lora_A.weight.dtype == x.dtype:
            adapted = self.lora_B(self.lora_A(h))
        else:  # autocast-style: cast the small adapter weights, never the activation
            a = self.lora_A.weight.to(x.dtype)
            b = self.lora_B.weight.to(x.dtype)
            adapted = F.linear(F.linear(h, a), b)
        return out + adapted * self.scaling

    def _mixed_forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each sample through its own adapter: per adapter k present in the index, the rows
        ``r_k`` of x, ``s · B_k(A_k(x[r_k]))``, added into those rows of the output."""
        if self._rows is None:
            raise MemplanError(f"this model has {self.adapters} LoRA adapters per layer; call "
                               "set_adapter_index(model, index) with one adapter per sample")
        if sum(len(rows) for _, rows in self._rows) != x.shape[0]:
            raise MemplanError(f"the adapter index routes {sum(len(r) for _, r in self._rows)} "
                               f"samples, the batch has {x.shape[0]}; set it for this batch")
        for name, rows in self._rows:  # one expression: each temporary dies inside it
            out = out.index_put((rows,), self._adapt(self.lora_A[name], self.lora_B[name],
                                                     x[rows]) * self.scaling, accumulate=True)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.rank}, alpha={self.alpha}, "
                f"dropout={self.dropout_p}"
                + (f", adapters={self.adapters}" if self.adapters > 1 else ""))


def _check_adapters(adapters: int) -> None:
    if isinstance(adapters, bool) or not isinstance(adapters, int) or adapters <= 0:
        raise MemplanError(f"LoRA adapters must be a positive integer, got {adapters!r}; "
                           "try --adapters 2")


def set_adapter_index(model: nn.Module, index: Sequence[int] | torch.Tensor) -> None:
    """Route sample i of the next batches through adapter ``index[i]`` in every LoRALinear.

    The index is read once here (a list, or a tensor that is not fake) and turned into the
    rows of each adapter present, int64 tensors on the adapters' device, shared by the layers:
    the forward then makes no index tensors of its own (PEFT builds them per layer and call).

    Raises:
        MemplanError: a model without multi-adapter LoRA layers, or an index out of range.
    """
    values = index.tolist() if isinstance(index, torch.Tensor) else [int(v) for v in index]
    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and m.adapters > 1]
    if not layers:
        raise MemplanError("the model has no layers with several LoRA adapters; call "
                           "apply_lora(..., adapters=K) with K > 1 first")
    cache: dict[tuple[torch.device, int], list[tuple[str, torch.Tensor]]] = {}
    for layer in layers:
        bad = [v for v in values if not 0 <= v < layer.adapters]
        if bad or not values:
            raise MemplanError(f"adapter index {bad[0] if bad else '(empty)'} is not one of "
                               f"0 to {layer.adapters - 1}; give one adapter per sample")
        key = (layer.lora_A[adapter_names(1)[0]].weight.device, layer.adapters)
        if key not in cache:
            names = adapter_names(layer.adapters)
            cache[key] = [(names[k], torch.tensor([i for i, v in enumerate(values) if v == k],
                                                  dtype=torch.int64, device=key[0]))
                          for k in sorted(set(values))]
        layer._rows = cache[key]


def _check_rank_alpha(rank: int, alpha: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise MemplanError(f"LoRA rank must be a positive integer, got {rank!r}; try --rank 8")
    if not alpha > 0:
        raise MemplanError(f"LoRA alpha must be positive, got {alpha!r}; try --alpha 16")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _block_relative(name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``; None outside blocks."""
    match = _BLOCK.search(name)
    return name[match.end():] if match else None


def _candidates(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers LoRA may target: those inside transformer blocks.

    A block is a member of a ModuleList, i.e. its dotted path holds a numeric segment
    (``model.layers.N.``, ``transformer.h.N.``); lm_head and classifier heads are outside. A
    model with no such blocks offers every linear layer except heads named in HEAD_NAMES.
    """
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
               and not _ADAPTER_PART.search(n)}
    in_blocks = {n: m for n, m in linears.items() if _block_relative(n)}
    if in_blocks:
        return in_blocks
    return {n: m for n, m in linears.items() if n.rsplit(".", 1)[-1] not in HEAD_NAMES}


def _matches(name: str, target: str) -> bool:
    """Whether the dotted module ``name`` is selected by one target word."""
    inner = _block_relative(name) or name
    parents = inner.split(".")[:-1]
    if target == "all":
        return True
    if target == "mlp":
        return "mlp" in parents
    if target == "attention":
        return any(p in ATTENTION_NAMES for p in parents)
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: str | tuple[str, ...] | list[str] = "all"
                 ) -> list[str]:
    """The dotted names of the linear layers that ``targets`` selects, in model order.

    Targets mean what :func:`memplan.params.resolve_targets` means: ``all`` (every linear of
    the transformer blocks), ``mlp`` (under a module named ``mlp``), ``attention`` (under
    ``self_attn``/``attn``/``attention``), or module names as a comma list or sequence, each
    matching a module's own name (``c_proj``) or a dotted suffix (``attn.c_proj``).

    Raises:
        MemplanError: a target word that matches no linear layer (the message lists them).
    """
    words = ([t.strip() for t in targets.split(",")] if isinstance(targets, str)
             else [str(t).strip() for t in targets])
    words = [w for w in words if w]
    if not words:
        raise MemplanError("LoRA targets are empty; use all, mlp, attention or module names")
    candidates = _candidates(model)
    chosen: set[str] = set()
    for word in words:
        matched = {n for n in candidates if _matches(n, word)}
        if not matched:
            known = sorted({_block_relative(n) or n for n in candidates})
            raise MemplanError(
                f"LoRA target {word!r} matches no linear layer of the model; use all, mlp, "
                f"attention or one of these linear modules: {', '.join(known) or '(none)'}")
        chosen |= matched
    return [n for n in candidates if n in chosen]


def _input_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        return getter()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("embed_tokens", "wte"):
            return module
    return None


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        return getter()
    return getattr(model, "lm_head", None)


def apply_lora(model: nn.Module, rank: int, alpha: float = 16.0,
               targets: str | tuple[str, ...] | list[str] = "all",
               train_embeddings: bool = False, dropout: float = 0.0, *, init: str = "kaiming",
               adapter_dtype: torch.dtype | None = None, adapters: int = 1) -> list[str]:
    """Wrap the targeted linear layers in :class:`LoRALinear` and freeze all but the adapters.

    After this, ``requires_grad`` is True exactly for every ``lora_A``/``lora_B`` weight and,
    with ``train_embeddings``, for the input embedding and the output head (one tensor when
    they are tied), so the trainable count is ``lora_params + lora_embedding_params`` of
    :mod:`memplan.params`. The base Parameters are reused, not copied.

    Args:
        model: the model, changed in place.
        rank: R. alpha: the LoRA alpha (scaling alpha / R). targets: see :func:`find_targets`.
        train_embeddings: also train the full input embedding and output head.
        dropout: LoRA dropout. init: ``kaiming`` or ``gaussian`` (see :class:`LoRALinear`).
        adapter_dtype: dtype of A and B (default: each base weight's dtype).
        adapters: K adapters per layer (see :class:`LoRALinear`; route samples with
            :func:`set_adapter_index`).

    Returns:
        The dotted names of the wrapped modules.

    Raises:
        MemplanError: rank <= 0, alpha <= 0, rank > min(in, out) of a targeted layer, or a
            target that matches no linear layer.
    """
    _check_rank_alpha(rank, alpha)
    _check_adapters(adapters)
    names = find_targets(model, targets)
    for name in names:
        layer = model.get_submodule(name)
        if rank > min(layer.in_features, layer.out_features):
            raise MemplanError(
                f"LoRA rank {rank} is larger than min(in, out) = "
                f"{min(layer.in_features, layer.out_features)} of {name} "
                f"({layer.in_features}×{layer.out_features}); use --rank "
                f"{min(layer.in_features, layer.out_features)} or less")
    for name in names:
        layer = model.get_submodule(name)
        wrapped = LoRALinear.from_linear(layer, rank, alpha, dropout, init=init,
                                         adapter_dtype=adapter_dtype, adapters=adapters)
        _set_submodule(model, name, wrapped)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in get_adapter_params(model).values():
        param.requires_grad_(True)
    if train_embeddings:
        for module in (_input_embedding(model), _output_embedding(model)):
            if module is None:
                raise MemplanError("train_embeddings: the model has no input embedding or "
                                   "output head that memplan can find")
            module.weight.requires_grad_(True)
    return names


def get_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter Parameter (``...lora_A.weight``, ``...lora_B.weight``) by dotted name."""
    out: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            prefix = f"{name}." if name else ""
            for key, lora_a, lora_b in module.adapter_pairs():
                key = f".{key}" if key else ""
                out[f"{prefix}lora_A{key}.weight"] = lora_a.weight
                out[f"{prefix}lora_B{key}.weight"] = lora_b.weight
    return out


@dataclass
class _Merged:
    """The LoRALinear a merged nn.Linear came from (a plain object, so not a submodule)."""

    lora: LoRALinear


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight, ``W' = W + s · B @ A``, and unwrap.

    Each LoRALinear becomes a plain ``nn.Linear`` that shares the (updated in place) weight
    and bias Parameters; the LoRALinear is kept on it (not as a submodule, so it is neither in
    the state dict nor moved by ``.to``) for :func:`unmerge_lora`. The sum is computed in fp32
    and rounded to W's dtype. Returns the merged module names.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if any(model.get_submodule(n).adapters > 1 for n in names):
        raise MemplanError("the model has several LoRA adapters per layer; merge_lora folds "
                           "one adapter into W, so train and merge each adapter on its own")
    for name in names:
        lora = model.get_submodule(name)
        lora.weight.copy_((lora.weight.float() + lora.delta_weight().to(lora.weight.device))
                          .to(lora.weight.dtype))
        plain = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None,
                          device="meta")
        plain.weight = lora.weight
        plain.bias = lora.bias
        plain._memplan_lora = _Merged(lora)
        _set_submodule(model, name, plain)
    return names


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo :func:`merge_lora`: ``W = W' - s · B @ A`` and put each LoRALinear back.

    W is restored within the rounding of its dtype (exactly up to fp32 round-off for fp32).
    Returns the unmerged module names.
    """
    names = [n for n, m in model.named_modules() if isinstance(getattr(m, "_memplan_lora", None),
                                                               _Merged)]
    for name in names:
        plain = model.get_submodule(name)
        lora = plain._memplan_lora.lora
        lora.lora_A.to(plain.weight.device)
        lora.lora_B.to(plain.weight.device)
        lora._set_base(plain)
        lora.weight.copy_((lora.weight.float() - lora.delta_weight()).to(lora.weight.dtype))
        _set_submodule(model, name, lora)
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed as in ``model.state_dict()`` (detached, not copied)."""
    return {name: param.detach() for name, param in get_adapter_params(model).items()}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor],
                         strict: bool = True) -> None:
    """Copy adapter tensors into the model's adapters (shape and key checked).

    Raises:
        MemplanError: a key that is not an adapter of this model, a shape mismatch, or (with
            ``strict``) an adapter of the model that the state dict lacks.
    """
    params = get_adapter_params(model)
    unknown = sorted(set(state_dict) - set(params))
    if unknown:
        raise MemplanError(f"LoRA state dict has keys that are not adapters of this model: "
                           f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    missing = sorted(set(params) - set(state_dict))
    if strict and missing:
        raise MemplanError(f"LoRA state dict lacks adapters of this model: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for key, value in state_dict.items():
        if params[key].shape != value.shape:
            raise MemplanError(f"LoRA tensor {key} has shape {tuple(value.shape)}, the model's "
                               f"adapter has {tuple(params[key].shape)} (a different rank?)")
        params[key].copy_(value)


def save_lora(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the adapter tensors to a safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    if not tensors:
        raise MemplanError("the model has no LoRA adapters to save; call apply_lora first")
    save_file(tensors, os.fspath(path), metadata={"format": "pt", "memplan": "lora"})


def load_lora(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> None:
    """Read adapter tensors from a safetensors file written by :func:`save_lora`."""
    from safetensors.torch import load_file

    load_lora_state_dict(model, load_file(os.fspath(path)), strict=strict)
