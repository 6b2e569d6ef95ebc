import pytest

torch = pytest.importorskip("torch")

import resource  # noqa: E402

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from memplan.errors import MemplanError, OutOfMemory  # noqa: E402
from memplan.profile.cuda import CudaTracker  # noqa: E402
from memplan.profile.trackers import CATEGORIES, StorageTracker, make_tracker  # noqa: E402

MiB = 2**20
FP32 = 4


def zeros(**kw):
    return dict(dict.fromkeys(CATEGORIES, 0), **kw)


# -- simple ops ----------------------------------------------------------------------------------
def test_allocation_view_and_free_are_exact():
    with StorageTracker() as tr:
        a = torch.empty(1024, 1024)
        assert tr.current_bytes == 4 * MiB
        v, t, row = a.view(-1), a.t(), a[3]
        a.add_(1.0)
        assert tr.current_bytes == 4 * MiB  # views and in-place ops share the storage
        b = a.clone()
        assert tr.current_bytes == 8 * MiB
        del a, v, t, row
        assert tr.current_bytes == 4 * MiB  # a's storage died with its last view
        del b
        assert tr.current_bytes == 0
    assert tr.peak_bytes == 8 * MiB
    assert tr.peak_components == zeros(temporaries=8 * MiB)


def test_torch_tensor_and_storage_resize_are_counted():
    with StorageTracker() as tr:
        s = torch.tensor([1.0, 2.0, 3.0])  # built below dispatch, seen via lift_fresh
        assert tr.current_bytes == 3 * FP32
        t = torch.empty(1024)
        t.untyped_storage().resize_(0)  # FSDP-style free, invisible to dispatch
        assert tr.current_bytes == 3 * FP32
        t.untyped_storage().resize_(2048 * FP32)
        assert tr.current_bytes == 3 * FP32 + 2048 * FP32
        del s, t
    assert tr.current_bytes == 0 and tr.peak_bytes == 2051 * FP32


def test_register_counts_each_storage_once_and_unregistered_old_tensors_never():
    old = torch.empty(256, 256)
    w = torch.nn.Linear(64, 64, bias=False)
    tied = torch.nn.ModuleList([w, w])
    with StorageTracker() as tr:
        _ = old.t() + 0  # the view of `old` is not counted; the sum is a new temporary
        assert tr.current_bytes == 256 * 256 * FP32
        del _
        assert tr.register(tied, "weights") == 64 * 64 * FP32
        assert tr.register([w.weight, w.weight.view(-1)], "weights") == 64 * 64 * FP32
        assert tr.snapshot() == zeros(weights=64 * 64 * FP32)
        with pytest.raises(MemplanError, match="did you mean 'weights'"):
            tr.register(w.weight, "weight")


def test_saved_tensors_are_activations_until_released_and_graphs_do_not_leak():
    x = torch.randn(1000, requires_grad=True)
    with StorageTracker() as tr:
        tr.watch_params([x])
        y = x.exp()  # exp saves its result
        z = y.sin()  # sin saves its input (y again)
        assert tr.snapshot() == zeros(activations=1000 * FP32, temporaries=1000 * FP32)
        del y, z  # never backpropagated: the graph and its saved tensors must go
        assert tr.current_bytes == 0
        x.exp().sum().backward()
        assert tr.snapshot() == zeros(gradients=1000 * FP32)


# -- a small MLP with AdamW, by hand -----------------------------------------------------------
B, I, H, O = 64, 256, 1024, 128


def _mlp_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(I, H), torch.nn.ReLU(), torch.nn.Linear(H, O))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    x = torch.randn(B, I)

    def step(tracker=None):
        loss = model(x).pow(2).mean()
        if tracker is not None:
            tracker.mark("forward_end")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, opt, x, step


def test_mlp_adamw_step_matches_the_hand_computed_peak():
    model, opt, x, step = _mlp_setup()
    with StorageTracker() as tr:
        tr.register(model, "weights")
        tr.register(x, "activations")
        tr.watch_params(model.parameters())
        step(tr)  # warm-up: AdamW creates its states lazily
        tr.register(opt, "optimizer_states")
        tr.reset_peak()
        step(tr)

    n = sum(p.numel() for p in model.parameters())
    weights = grads = FP32 * n
    # exp_avg + exp_avg_sq (fp32 each) and one fp32 0-d `step` tensor per parameter tensor
    opt_states = 2 * FP32 * n + FP32 * len(list(model.parameters()))
    inputs = FP32 * B * I
    # The peak is in the optimizer step of the largest tensor, W1 (H x I): with every gradient
    # live, `exp_avg_sq.sqrt()` and its division by the bias correction coexist (2 copies of W1),
    # and the 0-d loss is still referenced by the step function.
    temporaries = 2 * FP32 * H * I + FP32
    expected = zeros(weights=weights, gradients=grads, optimizer_states=opt_states,
                     activations=inputs, temporaries=temporaries)
    assert tr.peak_components == expected
    assert tr.peak_bytes == sum(expected.values()) == 8_472_596

    # After the forward pass: x, ReLU output (saved by ReLU and the 2nd Linear) and the output
    # (saved by pow) are activations; the pre-ReLU output and pow's output are gone.
    assert tr.marks["forward_end"] == zeros(
        weights=weights, optimizer_states=opt_states,
        activations=inputs + FP32 * B * H + FP32 * B * O, temporaries=FP32)
    assert tr.snapshot() == zeros(weights=weights, optimizer_states=opt_states,
                                  activations=inputs)


def test_mlp_backward_peak_keeps_the_labels_of_its_moment():
    model, opt, _, _ = _mlp_setup()
    batch = 4096  # big activations: the peak moves into the backward pass
    x = torch.randn(batch, I)
    with StorageTracker() as tr:
        tr.register(model, "weights")
        tr.register(x, "activations")
        tr.watch_params(model.parameters())
        model(x).pow(2).mean().backward()
    n = sum(p.numel() for p in model.parameters())
    relu_out = grad_relu_out = grad_pre_relu = FP32 * batch * H
    # The peak: ReLU's backward writes the gradient before its input, beside the gradient of
    # its output and its saved output (an activation: autograd releases it right after, and
    # that later release must not relabel it). Layer 2's gradients exist, layer 1's do not yet;
    # the 0-d loss and the seed of backward are temporaries.
    assert tr.peak_components == zeros(
        weights=FP32 * n, gradients=FP32 * (H * O + O),
        activations=FP32 * batch * I + relu_out,
        temporaries=grad_relu_out + grad_pre_relu + 2 * FP32)


def test_memtracker_from_pytorch_agrees_on_the_peak():
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    for batch in (B, 4096):  # the peak in the optimizer step, then in the backward pass
        model, opt, _, step = _mlp_setup()
        x = torch.randn(batch, I)
        ours = StorageTracker()
        with ours:
            ours.register(model, "weights")
            ours.register(x, "activations")
            ours.watch_params(model.parameters())
            for _ in range(2):
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        model, opt, _, step = _mlp_setup()
        theirs = mem_tracker.MemTracker()  # works on the CPU, no process group needed
        theirs.track_external(model, opt, x)
        with theirs:
            for _ in range(2):
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                theirs.reset_mod_stats()  # else it refuses a second iteration
        (snap,) = theirs.get_tracker_snapshot("peak").values()
        assert abs(snap["Total"] - ours.peak_bytes) <= 0.01 * ours.peak_bytes
        assert snap["Total"] == ours.peak_bytes  # in fact exact: same storages, same moments


# -- fake mode: big models, no memory --------------------------------------------------------------
def fake_linear_stack(layers: int, width: int, batch: int):
    """Run one forward+backward of bias-free Linear layers under FakeTensorMode; return tracker."""
    with FakeTensorMode():
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False)
                                      for _ in range(layers)])
        x = torch.randn(batch, width)
        with StorageTracker() as tr:  # entered INSIDE the fake mode: see the module docstring
            tr.register(model, "weights")
            tr.register(x, "activations")
            tr.watch_params(model.parameters())
            loss = model(x).sum()
            tr.mark("forward_end")
            loss.backward()
            del loss
    return tr


def test_fake_mode_big_linear_stack_is_exact_and_uses_little_memory():
    layers, width, batch = 8, 8192, 16
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tr = fake_linear_stack(layers, width, batch)
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    w, act = FP32 * width * width, FP32 * batch * width
    assert layers * w == 2 * 2**30  # 2 GiB of weights, never allocated
    # The peak: the first layer's weight gradient is made while the other 7 exist, with the
    # input and the gradient flowing into the first layer; plus the 0-d loss and its grad seed.
    assert tr.peak_components == zeros(weights=layers * w, gradients=layers * w,
                                       activations=act, temporaries=act + 2 * FP32)
    assert tr.peak_bytes == 4 * 2**30 + 2 * act + 8
    # After forward: x and the outputs of layers 1..7 are saved; the last output was freed.
    assert tr.marks["forward_end"] == zeros(weights=layers * w, activations=layers * act,
                                            temporaries=FP32)
    # A real run would need > 4 GiB; the high-water mark of this process barely moves.
    assert (maxrss_after - maxrss_before) * 1024 < 2**30


def test_tracker_must_be_entered_inside_the_fake_mode():
    fake = FakeTensorMode()
    with fake:
        model = torch.nn.Linear(1024, 1024, bias=False)
        x = torch.randn(8, 1024)
    with StorageTracker() as tr, fake:  # wrong order: the fake mode dispatches first
        tr.register(model, "weights")
        model(x).sum().backward()
    assert tr.peak_bytes == FP32 * 1024 * 1024  # only what was registered: the step is unseen
    with pytest.raises(MemplanError, match="FakeTensorMode"):
        with make_tracker("fake"):
            pass


# -- simulated out of memory -----------------------------------------------------------------------
def test_capacity_raises_out_of_memory_with_the_measured_bytes():
    tr = make_tracker("cpu", capacity_bytes=10 * MiB)
    kept = []
    with pytest.raises(OutOfMemory) as info, tr:
        for _ in range(5):
            kept.append(torch.empty(1024, 1024))
    assert info.value.measured_bytes == 12 * MiB
    assert len(kept) == 2 and tr.peak_bytes == 12 * MiB


def test_fake_mode_capacity_simulates_a_small_gpu():
    with FakeTensorMode():
        with make_tracker("fake", capacity_bytes=2**30):
            a = torch.empty(2**28)  # 1 GiB
            with pytest.raises(OutOfMemory) as info:
                b = a * 2  # noqa: F841
    assert info.value.measured_bytes == 2 * 2**30


# -- CUDA -----------------------------------------------------------------------------------------
class FakeCudaAPI:
    """A scripted allocator: tests move `allocated` by hand."""

    def __init__(self, available=True, total=80 * 2**30, context=500 * MiB):
        self.available, self.total, self.context = available, total, context
        self.allocated = self.peak = self.reserved = self.peak_reserved = 0
        self.synced = 0

    def alloc(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)
        self.reserved = max(self.reserved, self.allocated + 2 * MiB)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def is_available(self):
        return self.available

    def synchronize(self):
        self.synced += 1

    def reset_peak_memory_stats(self):
        self.peak, self.peak_reserved = self.allocated, self.reserved

    def max_memory_allocated(self):
        return self.peak

    def memory_allocated(self):
        return self.allocated

    def memory_reserved(self):
        return self.reserved

    def max_memory_reserved(self):
        return self.peak_reserved

    def mem_get_info(self):
        return self.total - self.context - self.reserved, self.total


def test_cuda_tracker_refuses_without_cuda():
    with pytest.raises(MemplanError, match="CUDA is not available"):
        CudaTracker(api=FakeCudaAPI(available=False))
    if not torch.cuda.is_available():  # the real thing on this machine
        with pytest.raises(MemplanError, match="CUDA is not available"):
            make_tracker("cuda")


def test_cuda_tracker_with_a_fake_api():
    api = FakeCudaAPI()
    model = torch.nn.Linear(256, 256, bias=False)
    w = FP32 * 256 * 256
    api.alloc(w)  # the weights, on the "device"
    tr = CudaTracker(api=api)
    with pytest.raises(MemplanError, match="measured nothing"):
        _ = tr.peak_bytes
    tr.register(model, "weights")
    tr.watch_params(model.parameters())
    with tr:
        api.alloc(3 * MiB)  # activations
        tr.mark("forward_end")
        api.alloc(w)  # the gradient
        model.weight.grad = torch.zeros_like(model.weight)
        api.alloc(1 * MiB)  # a temporary at the peak
        tr.mark("backward_end")
        api.alloc(-(4 * MiB))
    assert api.synced >= 3
    assert tr.peak_bytes == 2 * w + 4 * MiB
    assert tr.peak_components == zeros(weights=w, gradients=w, activations=3 * MiB,
                                       temporaries=1 * MiB)
    assert tr.marks["forward_end"] == zeros(weights=w, activations=3 * MiB)
    assert tr.runtime_reserve_bytes == 500 * MiB
    assert tr.extra == {"reserved_bytes": 2 * w + 6 * MiB, "peak_reserved_bytes": 2 * w + 6 * MiB,
                        "runtime_reserve_bytes": 500 * MiB, "total_bytes": 80 * 2**30}


def test_cuda_tracker_turns_oom_into_a_result_and_never_reports_zero():
    api = FakeCudaAPI()
    with pytest.raises(OutOfMemory) as info:
        with CudaTracker(api=api):
            api.alloc(7 * MiB)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert info.value.measured_bytes == 7 * MiB

    with pytest.raises(OutOfMemory) as info:
        with CudaTracker(api=FakeCudaAPI(), capacity_bytes=MiB) as tr:
            tr.api.alloc(2 * MiB)
    assert info.value.measured_bytes == 2 * MiB

    with CudaTracker(api=FakeCudaAPI()) as tr:
        pass
    with pytest.raises(MemplanError, match="0 bytes"):
        _ = tr.peak_bytes


def test_make_tracker_devices():
    assert isinstance(make_tracker("cpu"), StorageTracker)
    assert make_tracker("fake").require_fake
    with pytest.raises(MemplanError, match="unknown device 'cdua'.*did you mean 'cuda'"):
        make_tracker("cdua")
