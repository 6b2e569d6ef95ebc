"""The prepared GPU check: ``python3 -m memplan.profile.gpu_check`` on one lent GPU.

One run, inside a time budget (8 minutes by default, the device tool's share for it), does:

1. the rows of ``memplan validate --device cuda --quick``: writes
   ``reports/validation-cuda.{json,md,png}``;
2. the rows of ``memplan validate --device cuda --quick --impl hf``: writes
   ``reports/validation-hf-cuda.{json,md,png}``;
3. real-size rows (:data:`SCALE_ROWS`: 0.5B to 8B models, 24 to 101 GiB planned), as the
   budget allows;

and around every job reads the CUDA caching allocator and the device
(``torch.cuda.max_memory_allocated``, ``max_memory_reserved``, ``memory_reserved``,
``memory_allocated``, ``mem_get_info`` and ``memory_stats``), writing them with the measured
runtime reserve to ``reports/gpu-check-cuda.{json,md}``.

**The measured reserve.** ``fits`` adds a runtime reserve to the planned peak
(:data:`memplan.planner.DEFAULT_RESERVE_BYTES`, 1 GiB, an assumption). What a job really needs
beyond its peak of allocated tensors is the device memory in use at the peak minus that peak:

    reserve = (total − free at the peak) − max_memory_allocated
            = non_allocator + max_memory_reserved − max_memory_allocated

where ``non_allocator = total − free − memory_reserved`` (read after the job, before the cache
is emptied) is what lives outside PyTorch's allocator: the CUDA context, the kernels loaded
lazily, and any other process on the GPU; and ``max_memory_reserved − max_memory_allocated``
is the allocator's cache beyond the peak (block rounding, fragmentation). The caching
allocator frees nothing during a job (only ``empty_cache`` or an out-of-memory retry does), so
the device memory in use at the peak is at most ``non_allocator + max_memory_reserved``: the
figure is an upper bound, the safe side for a reserve. The profiler's
:class:`memplan.profile.cuda.CudaTracker` resets the peak counters after the warm-up step, so
both maxima are those of the steady-state steps, the peak the plan predicts. The report's
reserve is the largest over the jobs. References: PyTorch's CUDA memory management notes
(https://pytorch.org/docs/stable/notes/cuda.html#memory-management) and
``torch.cuda.mem_get_info`` (cudaMemGetInfo).

**Guards.** Before each row the remaining budget is checked against the longest row of its
suite so far (or the suite's guess before its first row); a row that would not finish is
skipped and the reports are marked PARTIAL. A row still running when the budget runs out is
stopped by an alarm (SIGALRM) and dropped. All reports are written together, each whole or
not at all (:func:`memplan.profile.validate.write_staged`); finished rows are appended to
``.gpu-check-cuda.partial.jsonl`` meanwhile, so a killed run keeps them.

**Dry run** (``--dry-run``): the same code on the CPU with no GPU: the validation rows run on
``cpu``, the real-size rows under FakeTensorMode (``fake``), and every CUDA reading is a zero
from :class:`ZeroCudaMemoryAPI`, labelled so in every file. It writes to a new temporary folder
unless ``--out`` is given, and refuses to overwrite a real GPU check's reports.

Exit codes: 0 complete; 1 written but PARTIAL (budget reached, or a row failed); 2 bad input
or a report that cannot be written; 130 interrupted (the finished rows are written).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memplan.errors import MemplanError
from memplan.planner import DEFAULT_RESERVE_BYTES
from memplan.spec import LoraSpec
from memplan.units import format_bytes

BUDGET_SECONDS = 480.0  # the whole script: 8 minutes on one H100 or H200
WRITE_MARGIN_SECONDS = 30.0  # kept for writing the reports (matplotlib: a few seconds)
CHECK_NAME = "gpu-check-cuda"
DRY_LABEL = "DRY RUN on the CPU: every CUDA reading is a zero placeholder, not a measurement"
SUITES = ("validate", "hf", "scale")

# Real-size jobs, most telling first. The first is the users' question (Llama-3-8B LoRA at
# rank 16, batch 4 × 2048) on a bf16 base with checkpointing; then the same without
# checkpointing (activations at scale), the Trainer's bf16=True (autocast) on a full
# fine-tune and on PEFT's LoRA, the Hugging Face + PEFT 7B rows of the fake matrix, a
# large-vocabulary full fine-tune, and a 7B full fine-tune near the card's capacity, where
# the allocator's fragmentation matters most. Planned peaks (runtime cuda, manual loop where
# not the Trainer's): 31.3, 74.3, 32.6, 39.1, 48.0, 23.9, 43.9 and 100.6 GiB, all under an
# H100's 80 GB but the last (H200: 140 GiB).
_PEFT = {"impl": "hf", "lora_backend": "peft"}
SCALE_ROWS: tuple[tuple, ...] = (
    ("llama-3-8b", dict(regime="lora-bf16", batch=4, seq=2048, lora=LoraSpec(rank=16),
                        checkpointing=True)),
    ("llama-3-8b", dict(regime="lora-bf16", batch=4, seq=2048, lora=LoraSpec(rank=16))),
    # the Trainer's bf16=True on CUDA: autocast's cast cache and its fp32 op list
    ("qwen2.5-0.5b", dict(regime="full", batch=8, seq=1024, impl="hf", autocast="bf16",
                          loop="trainer"), {}),
    ("llama-2-7b", dict(regime="lora-bf16", batch=2, seq=2048, autocast="bf16",
                        loop="trainer") | _PEFT, {}),
    ("llama-2-7b", dict(regime="lora-bf16", batch=2, seq=2048) | _PEFT, {}),
    ("llama-2-7b", dict(regime="lora-bf16", batch=4, seq=4096, checkpointing=True) | _PEFT, {}),
    ("qwen2.5-0.5b", dict(regime="full", batch=8, seq=1024, impl="hf"), {}),
    ("llama-2-7b", dict(regime="full", batch=1, seq=1024)),
)


# -- reading the device ----------------------------------------------------------------------
class TorchProbeAPI:
    """``torch.cuda`` for the check: :class:`memplan.profile.cuda.TorchCudaMemoryAPI` plus
    ``empty_cache``, ``memory_stats`` and the device's name (torch ≥ 2.5 APIs only)."""

    def __init__(self) -> None:
        from memplan.profile.cuda import TorchCudaMemoryAPI

        self._api = TorchCudaMemoryAPI()

    def __getattr__(self, name: str):  # the CudaMemoryAPI readings
        return getattr(self._api, name)

    def empty_cache(self) -> None:
        import torch

        torch.cuda.empty_cache()

    def memory_stats(self) -> dict[str, int]:
        import torch

        return dict(torch.cuda.memory_stats())

    def init(self) -> None:
        """Create the CUDA context (one small tensor) so that it can be read before any job."""
        import torch

        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()

    def describe(self) -> dict:
        import torch

        props = torch.cuda.get_device_properties(0)
        return {"name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "properties_total_bytes": int(props.total_memory),
                "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}


class ZeroCudaMemoryAPI:
    """The dry run's stand-in: every reading 0, every action a no-op (no CUDA is touched)."""

    def is_available(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass

    def reset_peak_memory_stats(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def init(self) -> None:
        pass

    def max_memory_allocated(self) -> int:
        return 0

    def memory_allocated(self) -> int:
        return 0

    def memory_reserved(self) -> int:
        return 0

    def max_memory_reserved(self) -> int:
        return 0

    def mem_get_info(self) -> tuple[int, int]:
        return 0, 0

    def memory_stats(self) -> dict[str, int]:
        return {}

    def describe(self) -> dict:
        return {"name": "none (dry run)", "cuda": None, "capability": None,
                "properties_total_bytes": 0, "alloc_conf": ""}


@dataclass(frozen=True)
class MemoryReading:
    """One job's CUDA memory in bytes, read before it (cache emptied, peaks reset) and after
    it (its tensors freed, the cache kept)."""

    allocated_before: int
    reserved_before: int
    free_before: int
    max_allocated: int
    max_reserved: int
    allocated_after: int
    reserved_after: int
    free_after: int
    total: int
    inactive_split_peak: int = 0  # memory_stats: cached blocks split and unusable (fragments)
    alloc_retries: int = 0  # memory_stats: allocations that had to empty the cache and retry
    ooms: int = 0

    @property
    def non_allocator_bytes(self) -> int:
        """In use outside PyTorch's allocator: the CUDA context, lazily loaded kernels, any
        other process (``total − free − memory_reserved``)."""
        return self.total - self.free_after - self.reserved_after

    @property
    def peak_used_bytes(self) -> int:
        """The device memory in use at the peak, at most: non-allocator + max reserved."""
        return self.non_allocator_bytes + self.max_reserved

    @property
    def allocator_overhead_bytes(self) -> int:
        """The allocator's cache beyond the peak of allocated tensors."""
        return self.max_reserved - self.max_allocated

    @property
    def reserve_bytes(self) -> int:
        """What the job needed beyond ``max_memory_allocated``: the measured runtime reserve."""
        return self.peak_used_bytes - self.max_allocated

    def to_dict(self) -> dict[str, int]:
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return fields | {k: getattr(self, k) for k in (
            "non_allocator_bytes", "peak_used_bytes", "allocator_overhead_bytes", "reserve_bytes")}


class MemoryProbe:
    """Reads a :class:`MemoryReading` around each job through a probe API."""

    def __init__(self, api) -> None:
        self.api = api

    def settle(self) -> tuple[int, int, int]:
        """Free what the last job left (collect, empty the cache), reset the peaks; returns
        (allocated, reserved, free) now."""
        gc.collect()
        self.api.synchronize()
        self.api.empty_cache()
        self.api.reset_peak_memory_stats()
        free, _ = self.api.mem_get_info()
        return self.api.memory_allocated(), self.api.memory_reserved(), free

    def context_bytes(self) -> int:
        """Device memory in use outside the allocator before any job (the CUDA context)."""
        self.api.init()
        self.api.synchronize()
        free, total = self.api.mem_get_info()
        return total - free - self.api.memory_reserved()

    def read(self, before: tuple[int, int, int]) -> MemoryReading:
        """The reading after a job, given :meth:`settle`'s values from before it."""
        gc.collect()  # the job's tensors back to the cache; the cache itself is kept
        self.api.synchronize()
        free, total = self.api.mem_get_info()
        stats = self.api.memory_stats()
        return MemoryReading(
            allocated_before=before[0], reserved_before=before[1], free_before=before[2],
            max_allocated=self.api.max_memory_allocated(),
            max_reserved=self.api.max_memory_reserved(),
            allocated_after=self.api.memory_allocated(),
            reserved_after=self.api.memory_reserved(), free_after=free, total=total,
            inactive_split_peak=int(stats.get("inactive_split_bytes.all.peak", 0)),
            alloc_retries=int(stats.get("num_alloc_retries", 0)),
            ooms=int(stats.get("num_ooms", 0)))


# -- the suites ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Suite:
    """A list of rows run on one device, with the validation report it writes (if any).

    ``first_row_guess_s`` is a scheduling guess for the budget guard before the suite's first
    row has run (not a measurement; never reported as one).
    """

    key: str
    rows: tuple
    device: str
    command: str
    report: str | None = None
    first_row_guess_s: float = 30.0


def default_suites(dry_run: bool = False, keys: Sequence[str] = SUITES) -> list[Suite]:
    """The check's suites: validate's quick rows, the HF quick rows, the real-size rows."""
    from memplan.profile.matrix import matrix_for
    from memplan.profile.validate import report_name

    device = "cpu" if dry_run else "cuda"
    suites = {
        "validate": Suite("validate", tuple(matrix_for("cuda", True)), device,
                          "memplan validate --device cuda --quick", report_name("cuda")),
        "hf": Suite("hf", tuple(matrix_for("cuda", True, "hf")), device,
                    "memplan validate --device cuda --quick --impl hf",
                    report_name("cuda", "hf")),
        "scale": Suite("scale", SCALE_ROWS, "fake" if dry_run else "cuda",
                       "memplan profile (each row's job)", None, first_row_guess_s=90.0),
    }
    return [suites[k] for k in keys]


# -- the run ---------------------------------------------------------------------------------
class _Deadline(BaseException):
    """The time budget ran out inside a row (raised by the alarm; not an Exception, so that no
    ``except Exception`` inside the profiler swallows it)."""


ALARM_RETRY_SECONDS = 1.0  # the alarm fires again until it is heard (see _alarm)


@contextlib.contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """Raise :class:`_Deadline` after ``seconds`` of wall time (main thread, POSIX only).

    An exception raised by a signal handler inside a finaliser or a weakref callback (the
    garbage collector runs them anywhere) is printed and dropped by Python, so the alarm is
    re-armed each time it fires and goes on firing every :data:`ALARM_RETRY_SECONDS` until the
    block is left.
    """
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return
    active = [True]

    def fire(signum, frame):
        if not active[0]:
            return
        signal.setitimer(signal.ITIMER_REAL, ALARM_RETRY_SECONDS)
        raise _Deadline()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        active[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass(frozen=True)
class CheckResult:
    """What one check did: its document (the gpu-check report's JSON) and the files written."""

    doc: dict
    paths: list[Path] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.doc["status"] == "complete"


def _label(model: str, kw: dict) -> dict:
    from memplan.profile.validate import _options

    return {"model": model, "regime": kw["regime"], "options": _options(kw)}


def run_check(out_dir: Path, *, dry_run: bool = False, budget_s: float = BUDGET_SECONDS,
              suites: Sequence[Suite] | None = None, api=None, max_rows: int | None = None,
              runner: Callable[..., dict] | None = None,
              clock: Callable[[], float] = time.monotonic, start: float | None = None,
              hard_stop: bool = True, log: Callable[[str], None] | None = None) -> CheckResult:
    """Run the suites inside the budget, reading the device around every job; write the
    reports (each whole or not at all) and return what was done.

    Args:
        out_dir: The folder for the reports.
        dry_run: Run on the CPU with zero CUDA readings (see the module's docstring).
        budget_s: Seconds for the whole run, counted from ``start``.
        suites: Default :func:`default_suites`.
        api: The probe API; default :class:`TorchProbeAPI` (:class:`ZeroCudaMemoryAPI` when
            ``dry_run``).
        max_rows: At most this many rows of each suite (a smoke run).
        runner: ``runner(model, kw, device, changes=...) -> row``; default
            :func:`memplan.profile.validate.run_row`.
        clock: Seconds, monotonic; ``start`` is its value when the run began (default: now;
            the command line passes its own start, before torch is imported).
        hard_stop: Stop a row still running when the budget (less the write margin) is spent.
        log: Where progress lines go (one per row).

    Raises:
        MemplanError: No GPU (without ``dry_run``), or a report that cannot be written.
    """
    import torch

    from memplan.profile.validate import run_row, write_staged

    start = clock() if start is None else start
    if api is None:
        if dry_run:
            api = ZeroCudaMemoryAPI()
        else:
            if not torch.cuda.is_available():
                raise MemplanError("the GPU check needs a CUDA GPU, and torch sees none here; "
                                   "run it with --dry-run to check it on the CPU")
            api = TorchProbeAPI()
    suites = list(default_suites(dry_run) if suites is None else suites)
    runner = runner or run_row
    log = log or (lambda line: None)
    _prepare_out(out_dir, dry_run)
    partial = out_dir / f".{CHECK_NAME}.partial.jsonl"
    try:
        partial.write_text("")
    except OSError as exc:
        raise MemplanError(f"cannot write {partial}: {exc.strerror or exc}") from None

    probe = MemoryProbe(api)
    context = probe.context_bytes()
    device = api.describe()
    log(("DRY RUN, no GPU: " if dry_run else "") + f"GPU {device['name']}, CUDA context "
        f"{format_bytes(context)}, budget {budget_s:.0f} s")
    jobs: list[dict] = []
    failed: list[dict] = []
    skipped: list[dict] = []
    rows_of: dict[str, list[dict]] = {s.key: [] for s in suites}
    stop_reason = ""
    longest: dict[str, float] = {}
    queue = [(suite, i, n, row) for suite in suites
             for rows in [list(suite.rows[:max_rows] if max_rows is not None else suite.rows)]
             for n in [len(rows)] for i, row in enumerate(rows)]
    handled = 0  # rows of the queue run, failed or skipped
    limit = budget_s - WRITE_MARGIN_SECONDS
    hard = limit - (clock() - start) if hard_stop else None
    try:
        with _alarm(hard):
            for k, (suite, i, n, (model, kw, *changes)) in enumerate(queue):
                label = {"suite": suite.key} | _label(model, kw)
                guess = longest.get(suite.key, max([suite.first_row_guess_s, *longest.values()]))
                if stop_reason or clock() - start + guess > limit:
                    stop_reason = stop_reason or "time budget"
                    skipped.append(label | {"reason": stop_reason})
                    handled = k + 1
                    continue
                before = probe.settle()
                began = clock()
                try:
                    row = runner(model, kw, suite.device, changes=changes[0] if changes else None)
                except Exception as exc:  # noqa: BLE001 - one failed row is a result
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                    failed.append(label | {"error": f"{type(exc).__name__}: {first[:300]}"})
                    handled = k + 1
                    _append(partial, failed[-1])
                    log(f"[{suite.key} {i + 1}/{n}] {model} {kw['regime']}: FAILED "
                        f"{failed[-1]['error']}")
                    continue
                finally:
                    longest[suite.key] = max(longest.get(suite.key, 0.0), clock() - began)
                reading = probe.read(before)
                row["cuda_memory"] = reading.to_dict() | ({"readings": DRY_LABEL} if dry_run
                                                          else {})
                rows_of[suite.key].append(row)
                jobs.append({"suite": suite.key} | row)
                handled = k + 1
                _append(partial, jobs[-1])
                log(_progress(suite.key, i + 1, n, row, reading))
    except (_Deadline, KeyboardInterrupt) as stop:
        stop_reason = ("INTERRUPTED" if isinstance(stop, KeyboardInterrupt)
                       else "time budget (a row was stopped)")
        log(f"{stop_reason}: the running row is dropped; the finished rows are kept")
        for suite, _, _, (model, kw, *_) in queue[handled:]:  # the stopped row and the rest
            skipped.append({"suite": suite.key} | _label(model, kw) | {"reason": stop_reason})

    elapsed = clock() - start
    meta = _meta(dry_run, budget_s, elapsed, device, context)
    doc = _check_doc(suites, jobs, failed, skipped, meta, context, dry_run, stop_reason)
    files = []
    for suite in suites:
        if suite.report and rows_of[suite.key]:
            files += _validation_files(suite, rows_of[suite.key], failed, skipped, out_dir,
                                       meta, dry_run)
    files += _check_files(doc, out_dir)
    doc["reports"] = [str(target) for target, _ in files]  # the report lists itself too
    paths = write_staged(files)
    if stop_reason != "INTERRUPTED":
        partial.unlink(missing_ok=True)
    result = CheckResult(doc, paths)
    if stop_reason == "INTERRUPTED":
        raise _Interrupted(result)
    return result


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C during the check, once the finished rows are written."""

    def __init__(self, result: CheckResult) -> None:
        super().__init__()
        self.result = result


def _append(path: Path, record: dict) -> None:
    try:
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise MemplanError(f"cannot write {path}: {exc.strerror or exc}") from None


def _progress(key: str, i: int, n: int, row: dict, reading: MemoryReading) -> str:
    err = row.get("relative_error")
    return (f"[{key} {i}/{n}] {row['model']} {row['regime']} {row['options']}: plan "
            f"{format_bytes(row['predicted_bytes'])}, measured "
            f"{format_bytes(row['measured_bytes'])}"
            f" ({'n/a' if err is None else f'{100 * err:+.3f}%'}), reserve "
            f"{format_bytes(reading.reserve_bytes)}, {row['wall_seconds']:.1f} s")


def _prepare_out(out_dir: Path, dry_run: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise MemplanError(f"--out {str(out_dir)!r} is a file; give a folder")
    previous = out_dir / f"{CHECK_NAME}.json"
    if dry_run and previous.is_file():
        try:
            real = not json.loads(previous.read_text()).get("dry_run", False)
        except (OSError, ValueError):
            real = False
        if real:
            raise MemplanError(f"{out_dir} holds a real GPU check ({previous.name}); a dry run "
                               "would overwrite it: give another --out, or none (a temporary "
                               "folder)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MemplanError(f"cannot write {out_dir}: {exc.strerror or exc}") from None


def _meta(dry_run: bool, budget_s: float, elapsed: float, device: dict, context: int) -> dict:
    import torch

    return {"command": "python3 -m memplan.profile.gpu_check" + (" --dry-run" if dry_run else ""),
            "date": time.strftime("%Y-%m-%d"), "platform": platform.platform(terse=True),
            "torch": torch.__version__, "elapsed_seconds": elapsed, "budget_seconds": budget_s,
            "gpu": device, "context_bytes": context}


def measured_reserve(jobs: list[dict]) -> dict:
    """The reserve summary over the jobs' readings: the largest reserve, its job, the largest
    non-allocator bytes and allocator overhead, against the planner's default."""
    readings = [(j, j["cuda_memory"]) for j in jobs if "cuda_memory" in j]
    if not readings:
        return {"measured_reserve_bytes": None, "default_reserve_bytes": DEFAULT_RESERVE_BYTES}
    job, worst = max(readings, key=lambda jr: jr[1]["reserve_bytes"])
    big = [m for _, m in readings if m["max_allocated"] >= 2**30]
    return {
        "measured_reserve_bytes": worst["reserve_bytes"],
        "measured_reserve_job": f"{job['model']} {job['regime']} {job['options']}".strip(),
        "non_allocator_bytes_max": max(m["non_allocator_bytes"] for _, m in readings),
        "allocator_overhead_bytes_max": max(m["allocator_overhead_bytes"] for _, m in readings),
        "allocator_overhead_fraction_max_1gib": (
            max(m["allocator_overhead_bytes"] / m["max_allocated"] for m in big) if big
            else None),
        "default_reserve_bytes": DEFAULT_RESERVE_BYTES,
    }


def _status(stop_reason: str, failed: int, skipped: int, done: int, total: int) -> str:
    if not (stop_reason or failed or skipped):
        return "complete"
    why = [f"{failed} failed" if failed else "", f"{skipped} not run ({stop_reason})"
           if skipped else ""]
    head = "INTERRUPTED" if stop_reason == "INTERRUPTED" else "PARTIAL"
    return f"{head}: {done} of {total} rows finished; " + ", ".join(w for w in why if w)


def _check_doc(suites, jobs, failed, skipped, meta, context, dry_run, stop_reason) -> dict:
    total = len(jobs) + len(failed) + len(skipped)
    return {"name": CHECK_NAME, "dry_run": dry_run,
            "readings": DRY_LABEL if dry_run else "torch.cuda counters and cudaMemGetInfo",
            "status": _status(stop_reason, len(failed), len(skipped), len(jobs), total),
            "meta": meta, "context_bytes": context, "reserve": measured_reserve(jobs),
            "suites": {s.key: {"device": s.device, "command": s.command, "report": s.report}
                       for s in suites},
            "jobs": jobs, "failed": failed, "skipped": skipped}


def _validation_files(suite: Suite, rows: list[dict], failed: list[dict], skipped: list[dict],
                      out_dir: Path, meta: dict, dry_run: bool) -> list:
    from memplan.profile.validate import report_files

    bad = [f for f in failed if f["suite"] == suite.key]
    missing = [s for s in skipped if s["suite"] == suite.key]
    complete = not (bad or missing)
    status = "complete" if complete else (
        f"PARTIAL: {len(rows)} of {len(rows) + len(bad) + len(missing)} rows"
        + (f"; {len(bad)} failed" if bad else "") + (f"; {len(missing)} not run "
                                                      "(time budget)" if missing else "")
        + f" (see {CHECK_NAME}.md)")
    reserve = measured_reserve(rows)
    extra = {"run by": meta["command"] + f", which read the CUDA memory around every row "
                                         f"({CHECK_NAME}.md)",
             "GPU": meta["gpu"]["name"]}
    if dry_run:
        extra["DRY RUN"] = f"rows on {suite.device}; {DRY_LABEL}"
    elif reserve["measured_reserve_bytes"] is not None:
        extra["measured runtime reserve (largest)"] = (
            f"{format_bytes(reserve['measured_reserve_bytes'])} "
            f"({reserve['measured_reserve_job']}); planner default "
            f"{format_bytes(DEFAULT_RESERVE_BYTES)}")
    vmeta = {"command": meta["command"] if dry_run else suite.command,
             "date": meta["date"], "platform": meta["platform"], "torch": meta["torch"],
             "complete": complete, "status": status, "elapsed_seconds": sum(
                 r["wall_seconds"] for r in rows), "extra": extra, "gpu_check": True,
             "dry_run": dry_run}
    device = f"{suite.device} (dry run)" if dry_run else "cuda"
    files = report_files(rows, device, out_dir, vmeta, suite.report)
    if not any(r.get("relative_error") is not None for r in rows):  # nothing to plot
        files = [f for f in files if f[0].suffix != ".png"]
    return files


def _check_files(doc: dict, out_dir: Path) -> list:
    stem = out_dir / CHECK_NAME
    return [(stem.with_suffix(".json"),
             lambda tmp: tmp.write_text(json.dumps(doc, indent=1) + "\n")),
            (stem.with_suffix(".md"), lambda tmp: tmp.write_text(check_markdown(doc)))]


def check_markdown(doc: dict) -> str:
    """The gpu-check report in Markdown: the reserve, then every job's readings."""
    meta, res = doc["meta"], doc["reserve"]
    gpu = meta["gpu"]

    def b(n):
        return "n/a" if n is None else format_bytes(n)

    lines = [f"# memplan GPU check — {gpu['name']}", ""]
    if doc["dry_run"]:
        lines += [f"**{DRY_LABEL}.**", ""]
    lines += [f"Produced by `{meta['command']}` on {meta['date']} ({meta['platform']}, torch "
              f"{meta['torch']}, CUDA {gpu['cuda']}, {meta['elapsed_seconds']:.0f} s of a "
              f"{meta['budget_seconds']:.0f} s budget). Status: **{doc['status']}**.", "",
              "## Runtime reserve", "",
              "reserve = (total − free at the peak) − max_memory_allocated = non-allocator "
              "(total − free − memory_reserved: CUDA context, loaded kernels) + "
              "max_memory_reserved − max_memory_allocated; an upper bound (the allocator frees "
              "nothing during a job). Peaks are those of the steady-state steps.", "",
              f"- CUDA context before any job: {b(doc['context_bytes'])}",
              f"- measured reserve, largest over the jobs: **{b(res['measured_reserve_bytes'])}**"
              + (f" ({res['measured_reserve_job']})" if res.get("measured_reserve_job") else "")
              + f"; planner default {b(res['default_reserve_bytes'])}"]
    if res.get("measured_reserve_bytes") is not None:
        frac = res["allocator_overhead_fraction_max_1gib"]
        lines += [f"- largest non-allocator memory: {b(res['non_allocator_bytes_max'])}; "
                  f"largest allocator overhead: {b(res['allocator_overhead_bytes_max'])}"
                  + (f" ({100 * frac:.2f}% of the peak, jobs of ≥ 1 GiB)" if frac is not None
                     else "")]
    lines += [f"- device total (cudaMemGetInfo): {b(_total(doc))}", "",
              "## Every job", "",
              "| suite | model | regime | options | planned | measured (max allocated) | error | "
              "max reserved | allocated before | non-allocator | used at peak | reserve | "
              "inactive split peak | time |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for j in doc["jobs"]:
        m, err = j["cuda_memory"], j.get("relative_error")
        lines.append(
            f"| {j['suite']} | {j['model']} | {j['regime']} | {j['options']} | "
            f"{b(j['predicted_bytes'])} | {b(j['measured_bytes'])} | "
            f"{'n/a' if err is None else f'{100 * err:+.3f}%'} | {b(m['max_reserved'])} | "
            f"{b(m['allocated_before'])} | {b(m['non_allocator_bytes'])} | "
            f"{b(m['peak_used_bytes'])} | {b(m['reserve_bytes'])} | "
            f"{b(m['inactive_split_peak'])} | {j['wall_seconds']:.1f} s |")
    for title, key, col in (("Failed rows", "failed", "error"),
                            ("Rows not run", "skipped", "reason")):
        if doc[key]:
            lines += ["", f"## {title}", "", f"| suite | model | regime | options | {col} |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['suite']} | {r['model']} | {r['regime']} | {r['options']} | "
                      f"{r[col]} |" for r in doc[key]]
    lines += ["", "Suites: " + "; ".join(f"`{k}`: {s['command']} on {s['device']}"
                                         + (f" → {s['report']}.*" if s["report"] else "")
                                         for k, s in doc["suites"].items()) + "."]
    return "\n".join(lines) + "\n"


def _total(doc: dict) -> int | None:
    totals = [j["cuda_memory"]["total"] for j in doc["jobs"]]
    return max(totals) if totals else None


# -- command line ----------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as every memplan command
        from memplan.report import error_line

        error_line(f"{message}; see python3 -m memplan.profile.gpu_check --help")
        raise SystemExit(2)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _suites(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in keys if k not in SUITES]
    if bad or not keys:
        raise argparse.ArgumentTypeError(f"unknown suite {bad[0] if bad else text!r}; known: "
                                         f"{', '.join(SUITES)}")
    return keys


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python3 -m memplan.profile.gpu_check",
                description="The prepared GPU check: validate's quick rows, the HF quick rows "
                            "and real-size rows on CUDA, with the CUDA memory read around each "
                            "job and the measured runtime reserve.")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the reports (default: reports; a new temporary folder "
                        "with --dry-run)")
    p.add_argument("--budget", type=_positive, default=BUDGET_SECONDS,
                   help=f"seconds for the whole run (default {BUDGET_SECONDS:.0f})")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: rows on the CPU (real-size ones under FakeTensorMode), CUDA "
                        "readings zero")
    p.add_argument("--rows", type=_count, default=None,
                   help="at most this many rows of each suite (a smoke run)")
    p.add_argument("--suites", type=_suites, default=SUITES,
                   help=f"comma-separated, of {','.join(SUITES)} (default all)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check from the command line; returns the exit code."""
    start = time.monotonic()  # the budget counts from here: importing torch is part of it
    args = parser().parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="memplan-gpu-check-")) if args.dry_run
                       else Path("reports"))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        result = run_check(out, dry_run=args.dry_run, budget_s=args.budget,
                           suites=default_suites(args.dry_run, args.suites), max_rows=args.rows,
                           start=start, log=log)
    except MemplanError as exc:
        if os.environ.get("MEMPLAN_DEBUG"):
            raise
        from memplan.report import error_line

        error_line(str(exc))
        return 2
    except _Interrupted as stop:
        log(f"interrupted: the finished rows are in {', '.join(map(str, stop.result.paths))}")
        return 130
    doc = result.doc
    if args.json:
        print(json.dumps({"status": doc["status"], "dry_run": doc["dry_run"],
                          "context_bytes": doc["context_bytes"], "reserve": doc["reserve"],
                          "files": doc["reports"]}))
    else:
        res = doc["reserve"]["measured_reserve_bytes"]
        print(("DRY RUN (zero CUDA readings): " if doc["dry_run"] else "")
              + f"{doc['status']}; {len(doc['jobs'])} jobs, measured reserve "
              + ("n/a" if res is None else format_bytes(res))
              + f" (planner default {format_bytes(DEFAULT_RESERVE_BYTES)}); wrote "
              + ", ".join(doc["reports"]))
    return 0 if result.complete else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

__all__ = ["run_check", "default_suites", "MemoryReading", "MemoryProbe", "ZeroCudaMemoryAPI",
           "TorchProbeAPI", "Suite", "SCALE_ROWS", "measured_reserve", "main"]
