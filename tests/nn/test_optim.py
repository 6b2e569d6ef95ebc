"""Tests of the optimizers: torch's by name, and the notes' mixed-precision recipe."""

from __future__ import annotations

import weakref

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from memplan.errors import MemplanError  # noqa: E402
from memplan.nn.optim import (  # noqa: E402
    MixedAdamW,
    MixedSGD,
    build_optimizer,
    optimizer_state_tensors,
)


class NewStorageTracker(TorchDispatchMode):
    """Peak bytes of storages that ops create inside the mode (not views, not in-place)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr()
                  for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, nbytes)
        return out


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    x, y = torch.randn(64, 8), torch.randn(64, 4)
    return model, x, y


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


# ---------------------------------------------------------------------- build_optimizer


@pytest.mark.parametrize("impl, flags", [
    ("fused", {"fused": True}), ("foreach", {"foreach": True}),
    ("forloop", {"foreach": False, "fused": False}),
])
@pytest.mark.parametrize("name, cls, momentum", [
    ("adamw", torch.optim.AdamW, None), ("sgd", torch.optim.SGD, 0.0),
    ("sgd-momentum", torch.optim.SGD, 0.9),
])
def test_build_optimizer(impl, flags, name, cls, momentum):
    model, x, y = _problem()
    opt = build_optimizer(model.parameters(), name, impl, lr=0.1, weight_decay=0.01)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.1 and group["weight_decay"] == 0.01
    for key, value in flags.items():
        assert bool(group[key]) is value
    if momentum is not None:
        assert group["momentum"] == momentum
    _loss(model, x, y).backward()
    opt.step()
    states = optimizer_state_tensors(opt)
    if name == "adamw":  # step, exp_avg, exp_avg_sq per parameter
        assert len(states) == 3 * 4
        assert sum(t.numel() for t in states if t.dim()) == 2 * sum(
            p.numel() for p in model.parameters())
    elif name == "sgd":
        assert states == []
    else:
        assert len(states) == 4


def test_build_optimizer_accepts_a_dict_and_rejects_bad_names():
    model, _, _ = _problem()
    opt = build_optimizer(dict(model.named_parameters()), "sgd", "forloop")
    assert len(opt.param_groups[0]["params"]) == 4
    for kwargs in ({"optimizer": "adam"}, {"optimizer": "lion"}, {"impl": "apex"}):
        with pytest.raises(MemplanError):
            build_optimizer(model.parameters(), **kwargs)
    with pytest.raises(MemplanError, match="no trainable"):
        build_optimizer([], "adamw")


# ---------------------------------------------------------------------- MixedAdamW


def test_mixed_adamw_dtypes_and_grad_handling():
    model, x, y = _problem()
    opt = MixedAdamW(model.parameters(), lr=1e-2)
    buffers = dict(opt.grad_buffers)
    assert all(b.dtype == torch.bfloat16 and b.shape == p.shape for p, b in buffers.items())
    ptrs = {p: b.data_ptr() for p, b in buffers.items()}
    _loss(model, x, y).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.count_nonzero(b) > 0 for b in buffers.values())
    opt.step()
    for p in model.parameters():
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.bfloat16
        assert state["exp_avg_sq"].dtype == torch.float32
        assert p.dtype == torch.float32
    tensors = opt.state_tensors()
    assert len(tensors) == 3 * 4 and optimizer_state_tensors(opt) == tensors
    assert sum(t.nbytes for t in tensors) == 8 * sum(p.numel() for p in model.parameters())
    opt.zero_grad()
    for p, b in opt.grad_buffers.items():
        assert b.data_ptr() == ptrs[p] and torch.count_nonzero(b) == 0  # zeroed in place


def test_mixed_adamw_tracks_torch_adamw():
    model, x, y = _problem()
    ref, _, _ = _problem()
    ref.load_state_dict(model.state_dict())
    opt = MixedAdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    for _ in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        # 5 steps of at most lr each; bf16 rounding of g and m moves them by a few 1e-4
        torch.testing.assert_close(p, q, rtol=0, atol=1e-3)
    pairs = zip(model.parameters(), ref.parameters(), strict=True)
    assert any(not torch.equal(p, q) for p, q in pairs)


def test_mixed_gradient_accumulation_and_skipping():
    model, x, y = _problem()
    opt = MixedAdamW(model.parameters())
    _loss(model, x, y).backward()
    once = {p: b.float().clone() for p, b in opt.grad_buffers.items()}
    _loss(model, x, y).backward()
    for p, b in opt.grad_buffers.items():
        torch.testing.assert_close(b.float(), 2 * once[p], rtol=1e-2, atol=1e-3)
    frozen = MixedAdamW([nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))])
    p0, p1 = frozen.param_groups[0]["params"]
    (p0.sum() * 2).backward()
    frozen.step()  # p1 got no gradient: skipped, as torch skips grad None
    assert not torch.equal(p0, torch.ones(3)) and torch.equal(p1, torch.ones(2))
    assert not frozen.state[p1]


def test_mixed_adamw_rejects_bad_input():
    with pytest.raises(MemplanError):
        MixedAdamW([nn.Parameter(torch.ones(2))], lr=-1.0)
    with pytest.raises(MemplanError):
        MixedAdamW([nn.Parameter(torch.ones(2))], betas=(0.9, 1.0))
    with pytest.raises(MemplanError):
        MixedAdamW([nn.Parameter(torch.ones(2), requires_grad=False)])


def test_mixed_adamw_step_temporaries_are_two_fp32_copies_of_one_parameter():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(256, 64)), nn.Parameter(torch.randn(64, 64)),
              nn.Parameter(torch.randn(64))]
    opt = MixedAdamW(params, lr=1e-3, weight_decay=0.1)
    for _ in range(2):  # the first step creates m and v; the second is steady state
        sum((p ** 2).sum() for p in params).backward()
        tracker = NewStorageTracker()
        with tracker:
            opt.step()
        opt.zero_grad()
    largest = max(p.numel() for p in params)
    assert tracker.peak <= 2 * 4 * largest + 64  # g32 and m32 of one parameter (+ scalars)
    assert tracker.peak >= 2 * 4 * largest


def test_grad_hook_adds_without_an_fp32_temporary():
    p = nn.Parameter(torch.randn(128, 128))
    opt = MixedAdamW([p])
    p.grad = torch.randn(128, 128)
    tracker = NewStorageTracker()
    with tracker:
        opt._take_grad(p)
    assert tracker.peak <= 64 and p.grad is None


# ---------------------------------------------------------------------- MixedSGD


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_mixed_sgd_tracks_torch_sgd(momentum):
    model, x, y = _problem()
    ref, _, _ = _problem()
    opt = MixedSGD(model.parameters(), lr=0.05, momentum=momentum, weight_decay=0.01)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=momentum, weight_decay=0.01)
    for _ in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-3)
    states = opt.state_tensors()
    extra = [t for t in states if t.dtype == torch.bfloat16]
    assert len(extra) == len(states) == (8 if momentum else 4)
