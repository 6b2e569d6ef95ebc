"""Sharded training measured on PyTorch's own FSDP2: real ranks on gloo, or fake ranks.

:func:`measure_sharded` launches ``nproc`` processes (``torch.multiprocessing``, spawn), each a
rank of a ``gloo`` process group on localhost (``nccl`` with ``device="cuda"``, one GPU per
rank). Every rank builds the reference model with the same seed, applies the regime with
``torch.distributed.fsdp.fully_shard`` on each transformer block and then on the root (before
the optimizer is built, so the optimizer steps the sharded DTensor parameters), runs a warm-up
step and measures the steady-state steps on its own batch (same shape, a seed that differs by
rank) with memplan's storage tracker. Each rank's :class:`~memplan.profile.step.Measurement`
carries, in ``extra["terms"]``, what FSDP2 holds at its peak (see
:mod:`memplan.profile.fsdp_terms`).

Nothing hangs: every collective runs under the process group's timeout, a rank that fails or
dies makes the parent stop the others and raise :class:`~memplan.errors.MemplanError` naming
the rank and its error, and the whole run has a deadline.

:func:`measure_fake_sharded` runs ONE rank of ``nproc`` in this process: the ``fake`` process
group (its collectives return at once and move no data) under ``FakeTensorMode``, so 7B and
70B models over 8 to 1024 ranks are dry-run in seconds with no memory used.

Test hook: ``MEMPLAN_DIST_INJECT="RANK:raise|exit|hang"`` makes that rank raise, exit hard
(``os._exit``) or sleep forever at the start of its first measured step.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import time
from dataclasses import replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from memplan.errors import MemplanError, OutOfMemory
from memplan.nn.models import build_model
from memplan.nn.optim import optimizer_state_tensors
from memplan.nn.regimes import prepare
from memplan.profile.fsdp_terms import TermTracker, fsdp_params
from memplan.profile.sharding import SHARDABLE_REGIMES, check_sharded, fsdp_facts, shard_model
from memplan.profile.step import Measurement, output_tensors
from memplan.spec import ModelSpec, TrainSpec

__all__ = ["SHARDABLE_REGIMES", "INJECT_ENV", "measure_sharded", "measure_fake_sharded",
           "shard_model"]

INJECT_ENV = "MEMPLAN_DIST_INJECT"
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
DEFAULT_TIMEOUT_S = 120.0  # per collective (and the rendezvous)
DEFAULT_DEADLINE_S = 900.0  # the whole run
FAILURE_GRACE_S = 2.0  # after a rank fails, how long the others get to report their errors
MAX_FAKE_RANKS = 2**16  # one process stands for them all; FSDP2's records grow with M
CPU_RANKS_PER_CORE = 8  # beyond this, oversubscribed gloo ranks crawl toward their timeouts


def check_nproc(nproc: int, device: str) -> None:
    """``--nproc`` (already a positive integer: ``check_sharded``) within what this machine
    can run: gloo processes per core, visible GPUs, fake ranks (one clear line otherwise)."""
    if device == "cpu":
        cores = os.cpu_count() or 1
        if nproc > CPU_RANKS_PER_CORE * cores:
            raise MemplanError(f"--nproc {nproc} is more gloo processes than this machine's "
                               f"{cores} CPU cores can keep in step (at most "
                               f"{CPU_RANKS_PER_CORE * cores}); use --device fake for more ranks")
    elif device == "cuda":
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise MemplanError(f"--nproc {nproc} needs {nproc} GPUs, this machine has {gpus}; "
                               "use --device fake to dry-run more ranks")
    elif nproc > MAX_FAKE_RANKS:
        raise MemplanError(f"--nproc {nproc} is beyond {MAX_FAKE_RANKS:,} fake ranks")


def _inject(rank: int) -> None:
    spec = os.environ.get(INJECT_ENV, "")
    if not spec:
        return
    who, _, how = spec.partition(":")
    if who != str(rank):
        return
    if how == "exit":
        os._exit(3)
    if how == "hang":
        while True:
            time.sleep(60)
    raise RuntimeError(f"failure injected on rank {rank} by {INJECT_ENV}={spec}")


def _run_rank(spec: ModelSpec, train: TrainSpec, mesh: Any, *, rank: int, nproc: int,
              device: str, steps: int, seed: int, reshard_after_forward: bool,
              capacity_bytes: int | None = None) -> Measurement:
    """Build, shard, warm up and measure one rank (real or fake, per ``device``)."""
    regime = check_sharded(train, nproc)
    start = time.perf_counter()
    torch_device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" \
        else torch.device("cpu")
    torch.manual_seed(seed)  # the same weights (and LoRA A) on every rank
    model = build_model(spec, device=torch_device, attention=train.attention,
                        checkpointing=train.checkpointing)
    # the job as one process runs it (zero runs as full); the wrapper shards it
    local = replace(train, regime=regime, gpus=1, shard="none", param_dtype="fp32")
    setup = prepare(model, local,
                    shard=partial(shard_model, mesh=mesh,
                                  reshard_after_forward=reshard_after_forward,
                                  param_dtype=train.param_dtype))
    gen = torch.Generator(device="cpu").manual_seed(seed + 1 + rank)  # data differs by rank
    ids = torch.randint(spec.vocab_size, (train.batch, train.seq), generator=gen).to(torch_device)
    labels = torch.randint(spec.vocab_size, (train.batch, train.seq),
                           generator=gen).to(torch_device)
    setup.train_step(ids, labels)  # warm-up: optimizer states and FSDP buffers now exist
    setup.zero_grad()
    kw = {"capacity_bytes": capacity_bytes} if capacity_bytes else {}
    if device == "cuda":
        from memplan.profile.cuda import CudaTracker

        tracker: Any = CudaTracker(**kw)
    else:
        tracker = TermTracker(require_fake=device == "fake", **kw)
    terms = isinstance(tracker, TermTracker)
    reg = tracker.register_as if terms else (lambda t, c, _term: tracker.register(t, c))
    scopes = tracker.fsdp_scopes() if terms else contextlib.nullcontext()
    loss_value = None
    try:
        with tracker, scopes:
            reg(list(model.parameters()), "weights", "sharded_params")
            reg(list(model.buffers()), "weights", "buffers")
            records = fsdp_params(model)
            # The gathered parameters: storages FSDP2 keeps at 0 bytes between uses.
            reg([t for fp in records for t in getattr(fp, "all_gather_outputs", ())],
                "weights", "unsharded_params")
            reg(optimizer_state_tensors(setup.optimizer), "optimizer_states", "optimizer_states")
            grad_buffers = getattr(setup.optimizer, "grad_buffers", None)
            if grad_buffers:  # the mixed recipe's bf16 sharded gradients
                reg(list(grad_buffers.values()), "gradients", "sharded_grads")
            reg([ids, labels], "activations", "inputs")
            # the manual loop's outputs of the warm-up, alive into the first forward
            reg(output_tensors(setup.outputs), "activations", "inputs")
            tracker.watch_params(list(setup.trainable.values()))
            if terms:
                tracker.watch_unsharded([fp._unsharded_param for fp in records
                                         if hasattr(fp, "_unsharded_param")])
            tracker.reset_peak()
            for step in range(steps):
                if step == 0:
                    _inject(rank)
                setup.zero_grad()
                _where(tracker, "forward")
                loss = setup.loss(ids, labels)
                tracker.mark("forward_end")
                _where(tracker, "backward")
                setup.backward(loss)
                tracker.mark("backward_end")
                if device != "fake":
                    loss_value = float(loss.detach())
                del loss
                _where(tracker, "step")
                setup.step()
                tracker.mark("step_end")
    except OutOfMemory as exc:
        return Measurement(device, exc.measured_bytes, {}, {}, setup.num_trainable,
                           time.perf_counter() - start, fits=False,
                           extra={"error": str(exc), "rank": rank, "nproc": nproc})
    extra: dict[str, Any] = {"rank": rank, "nproc": nproc, "regime": train.regime,
                             "reshard_after_forward": reshard_after_forward,
                             **dict(getattr(tracker, "extra", {}) or {})}
    if terms:
        extra["terms"] = tracker.peak_terms
        extra["peak_where"] = tracker.peak_where
    extra.update(fsdp_facts(model))
    if loss_value is not None:
        extra["loss"] = loss_value
    return Measurement(device, tracker.peak_bytes, tracker.peak_components, dict(tracker.marks),
                       setup.num_trainable, time.perf_counter() - start, extra=extra)


def _where(tracker: Any, phase: str) -> None:
    if isinstance(tracker, TermTracker):
        tracker.where = phase


# -- real ranks ----------------------------------------------------------------------------------
def _worker(rank: int, nproc: int, port: int, spec: ModelSpec, train: TrainSpec, device: str,
            steps: int, seed: int, timeout_s: float, reshard_after_forward: bool,
            capacity_bytes: int | None, out_dir: str) -> None:
    """One rank (the entry point of each spawned process)."""
    out = Path(out_dir)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, None, False, timeout)
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(BACKENDS[device], store=store, rank=rank, world_size=nproc,
                                timeout=timeout)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device, (nproc,))
        result = _run_rank(spec, train, mesh, rank=rank, nproc=nproc, device=device,
                           steps=steps, seed=seed, reshard_after_forward=reshard_after_forward,
                           capacity_bytes=capacity_bytes)
        tmp = out / f"rank{rank}.pkl.tmp"
        tmp.write_bytes(pickle.dumps(result))
        tmp.rename(out / f"rank{rank}.pkl")
        dist.destroy_process_group()
    except BaseException as exc:
        line = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
        (out / f"rank{rank}.err").write_text(f"{time.time()!r}\n{line}\n")
        raise


def _failure(out: Path, nproc: int, codes: list[int | None]) -> MemplanError:
    """Name the rank that failed first, then what became of the others.

    A rank that died without a Python error (killed, ``os._exit``) comes first: the others'
    errors are then only the broken connections it left. Otherwise the earliest error wins.
    """
    errors: dict[int, tuple[float, str]] = {}
    for path in out.glob("rank*.err"):
        stamp, _, line = path.read_text().partition("\n")
        errors[int(path.stem[4:])] = (float(stamp), line.strip())
    dead = [r for r, code in enumerate(codes) if code not in (None, 0) and r not in errors]
    order = dead + sorted(errors, key=lambda r: errors[r][0])
    if not order:
        return MemplanError(f"the {nproc}-rank run failed without a message; every rank was "
                            "stopped")

    def what(rank: int) -> str:
        if rank in errors:
            return f"failed: {errors[rank][1]}"
        code = codes[rank] or 0
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        return f"died ({how}) without a Python error"

    first, rest = order[0], order[1:]
    msg = f"rank {first} of {nproc} {what(first)}"
    msg += "".join(f"; then rank {r} {what(r)}" for r in rest)
    hung = [str(r) for r, code in enumerate(codes) if code is None]
    if hung:
        msg += f"; rank(s) {', '.join(hung)} still running were stopped"
    return MemplanError(msg + "; no rank is left running")


def measure_sharded(spec: ModelSpec, train: TrainSpec, nproc: int, device: str = "cpu",
                    steps: int = 2, seed: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S,
                    deadline_s: float = DEFAULT_DEADLINE_S,
                    reshard_after_forward: bool = True,
                    capacity_bytes: int | None = None) -> list[Measurement]:
    """Run ``train`` sharded over ``nproc`` real ranks and return each rank's measurement.

    Args:
        spec: The model (built with :func:`memplan.nn.models.build_model`).
        train: The job; ``batch`` is the micro-batch of each rank. Regimes: see
            :data:`SHARDABLE_REGIMES`.
        nproc: Ranks (processes); with ``device="cuda"`` at most the visible GPUs.
        device: ``cpu`` (gloo) or ``cuda`` (nccl, one GPU per rank).
        steps: Steady-state steps measured after the warm-up step.
        seed: Weights use ``seed`` on every rank; rank r's batch uses ``seed + 1 + r``.
        timeout_s: Timeout of every collective and of the rendezvous.
        deadline_s: The whole run; past it every rank is stopped.
        reshard_after_forward: FSDP's FULL_SHARD (True) or SHARD_GRAD_OP (False).
        capacity_bytes: Simulated memory of each rank (CPU tracker); a rank over it reports
            ``fits=False`` and the bytes it reached.

    Returns:
        One :class:`Measurement` per rank, in rank order.

    Raises:
        MemplanError: bad input, or a rank that failed, died or timed out (the others are
            stopped first; nothing is left running).
    """
    check_sharded(train, nproc)
    if steps < 1:
        raise MemplanError(f"--steps must be at least 1, got {steps}")
    if device not in BACKENDS:
        raise MemplanError(f"sharded runs use --device cpu (gloo) or cuda (nccl), got "
                           f"{device!r}; for --device fake use measure_fake_sharded")
    check_nproc(nproc, device)
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=timeout_s),
                          wait_for_workers=False)  # the rendezvous, on a free port
    with tempfile.TemporaryDirectory(prefix="memplan-dist-") as tmp:
        out = Path(tmp)
        ctx = mp.start_processes(
            _worker, args=(nproc, store.port, spec, train, device, steps, seed, timeout_s,
                           reshard_after_forward, capacity_bytes, tmp),
            nprocs=nproc, join=False, start_method="spawn")
        try:
            _wait(ctx, out, nproc, time.monotonic() + deadline_s, deadline_s)
        finally:
            _stop(ctx)
            for path in ctx.error_files:  # tracebacks torch's wrapper wrote for failed ranks
                with contextlib.suppress(OSError):
                    os.unlink(path)
        results = []
        for rank in range(nproc):
            path = out / f"rank{rank}.pkl"
            if not path.exists():
                raise MemplanError(f"rank {rank} of {nproc} exited without a measurement")
            results.append(pickle.loads(path.read_bytes()))
    del store
    return results


def _wait(ctx: Any, out: Path, nproc: int, deadline: float, deadline_s: float) -> None:
    """Wait for every rank to exit 0; on the first failure, give the others a moment to report
    their own errors, then raise (the caller stops whatever still runs)."""
    while True:
        codes = [proc.exitcode for proc in ctx.processes]
        if all(code == 0 for code in codes):
            return
        if any(code not in (None, 0) for code in codes):
            time.sleep(FAILURE_GRACE_S)
            raise _failure(out, nproc, [proc.exitcode for proc in ctx.processes])
        if time.monotonic() > deadline:
            raise MemplanError(f"the {nproc}-rank run passed its deadline of {deadline_s:g} s; "
                               f"every rank was stopped")
        time.sleep(0.2)


def _stop(ctx: Any) -> None:
    for proc in ctx.processes:
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)


# -- fake ranks ----------------------------------------------------------------------------------
def measure_fake_sharded(spec: ModelSpec, train: TrainSpec, nproc: int, rank: int = 0,
                         steps: int = 1, seed: int = 0, reshard_after_forward: bool = True,
                         capacity_bytes: int | None = None) -> Measurement:
    """Dry-run rank ``rank`` of ``nproc`` in this process: fake process group, fake tensors.

    The fake group's collectives return at once, so every rank sees the same shapes; one rank
    stands for all (ranks differ only by padding of the last shards, which FSDP2 stores padded
    on every rank). Needs no process group to exist in this process already.
    """
    check_sharded(train, nproc)
    if not 0 <= rank < nproc:
        raise MemplanError(f"rank must be in [0, {nproc}), got {rank}")
    if dist.is_initialized():
        raise MemplanError("a process group already exists in this process; the fake dry run "
                           "needs its own (call it outside torch.distributed jobs)")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=nproc)
    try:
        mesh = init_device_mesh("cpu", (nproc,))  # outside the fake mode: it reads its ranks
        with FakeTensorMode():
            return _run_rank(spec, train, mesh, rank=rank, nproc=nproc, device="fake",
                             steps=steps, seed=seed, reshard_after_forward=reshard_after_forward,
                             capacity_bytes=capacity_bytes)
    finally:
        dist.destroy_process_group()
