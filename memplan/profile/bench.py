"""How long planning takes, beside Accelerate's estimate, measured in one run.

``python -m memplan.profile.bench`` times, on this machine and in this one process:

- ``plan()`` of 7B to 175B presets at several shapes, walking one copy of identical blocks
  (the default, :meth:`memplan.autograd.Tape.repeat`) and walking every block
  (``plan_activations(reuse=False)``), and checks that both give the same plan;
- ``scale()`` of llama-2-70b over the default regimes, with and without activations;
- the commands as a user runs them (``python -m memplan scale ...``, ``advise ...``: a fresh
  interpreter each, its start-up included);
- Accelerate's estimate path, the function the Hugging Face validation's baseline calls
  (:func:`memplan.profile.baselines.accelerate_training_bytes`: the transformers model built
  on the meta device, ``calculate_maximum_sizes``, ``estimate_training_usage``), cold (its
  first call, importing transformers) and warm.

It writes ``reports/benchmark.md`` and ``reports/benchmark.json``, both or neither
(:func:`memplan.profile.validate.write_staged`). Speed is measured here, never asserted in
the tests: a loaded machine would fail them at random. Times are the median of the repeats
(``time.perf_counter``); ``--quick`` repeats less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from memplan import activations as A
from memplan import arch
from memplan.errors import MemplanError
from memplan.planner import plan
from memplan.presets import get_gpu, get_model
from memplan.scaling import DEFAULT_REGIMES, scale
from memplan.spec import TrainSpec

# The targets: a plan in 10 ms, a scale search in half a second.
PLAN_TARGET_S = 0.010
SCALE_TARGET_S = 0.5
ADVISE_TARGET_S = 2.0

SHAPES = ((1, 2048), (8, 8192))
JOBS = (("lora", {"regime": "lora"}),
        ("full, checkpointing", {"regime": "full", "checkpointing": True}),
        ("zero over 8 GPUs", {"regime": "zero", "gpus": 8}))
MODELS = ("llama-2-7b", "llama-2-70b", "llama-3-70b", "gpt3-175b", "mixtral-8x7b",
          "gemma-2-9b", "gemma-3-1b", "qwen3-8b")
SCALE_MODEL, SCALE_GPU = "llama-2-70b", "h100-80gb"
ADVISE = ["advise", "--model", "llama-3-8b", "--regime", "lora", "--rank", "16", "--batch", "4",
          "--seq", "2048", "--gpu", "rtx-4090"]
SCALE = ["scale", "--model", SCALE_MODEL, "--gpu", SCALE_GPU, "--batch", "1", "--seq", "4096"]
ACCELERATE_MODELS = ("llama-2-7b", "llama-2-70b")


def timed(fn: Callable[[], Any], repeats: int) -> dict:
    """Median and fastest seconds of ``repeats`` calls (one untimed call first)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def _full_walk(spec, train):  # noqa: ANN001, ANN202
    """``plan()`` walking every block (the planner before blocks were reused)."""
    original = A.plan_activations
    A.plan_activations = lambda *a, **k: original(*a, **{**k, "reuse": False})
    try:
        return plan(spec, train)
    finally:
        A.plan_activations = original


def _blocks_walked(spec, train) -> int:  # noqa: ANN001
    """How many blocks one plan walks (the profile's ``block`` calls)."""
    cls = type(arch.profile_of(spec))
    original, calls = cls.block, []

    def block(self, tape, job, x, rope, layer):  # noqa: ANN001, ANN202
        calls.append(layer)
        return original(self, tape, job, x, rope, layer)

    cls.block = block
    try:
        plan(spec, train)
    finally:
        cls.block = original
    return len(calls)


def plans(quick: bool) -> list[dict]:
    """Each model × shape × job: the plan's time, reused and walked whole, and its peak."""
    rows = []
    for model in MODELS:
        spec = get_model(model)
        for batch, seq in SHAPES:
            for label, kw in JOBS:
                train = TrainSpec(batch=batch, seq=seq, **kw)
                kernels = arch.profile_of(spec).attentions  # Gemma 2 trains eager only
                if train.attention not in kernels:
                    train = replace(train, attention=kernels[0])
                try:
                    plan(spec, train)
                except MemplanError:  # LoRA on a mixture of experts: PEFT's, on transformers'
                    train = replace(train, impl="hf", lora_backend="peft")
                walked = _blocks_walked(spec, train)
                reused = plan(spec, train)
                whole = _full_walk(spec, train)
                fast = timed(lambda s=spec, t=train: plan(s, t), 5 if quick else 30)
                slow = timed(lambda s=spec, t=train: _full_walk(s, t), 1 if quick else 5)
                rows.append({"model": model, "layers": spec.num_layers, "walked": walked,
                             "batch": batch, "seq": seq, "job": label,
                             "peak_bytes": reused.total_bytes,
                             "identical": reused == whole, "plan": fast, "full_walk": slow,
                             "speedup": slow["median_s"] / fast["median_s"]})
    return rows


def scaling(quick: bool) -> list[dict]:
    """``scale()`` of the 70B model over the default regimes, as ``memplan scale`` runs it."""
    spec, capacity = get_model(SCALE_MODEL), get_gpu(SCALE_GPU).capacity_bytes
    rows = []
    for label, train in (("model states", TrainSpec()),
                         ("batch 1 × 4096", TrainSpec(batch=1, seq=4096))):
        def run(train: TrainSpec = train) -> None:
            for regime in DEFAULT_REGIMES:
                scale(spec, train, regime, capacity, 2**30)
        rows.append({"model": SCALE_MODEL, "job": label, "regimes": list(DEFAULT_REGIMES),
                     "time": timed(run, 2 if quick else 10)})
    return rows


def commands(quick: bool) -> list[dict]:
    """Whole commands in a fresh interpreter each, start-up included."""
    rows = []
    for args in (["--version"], SCALE, ADVISE):
        times, code = [], None
        for _ in range(2 if quick else 5):
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "memplan", *args],
                                  capture_output=True, text=True, timeout=300)
            times.append(time.perf_counter() - start)
            code = done.returncode
        rows.append({"command": "memplan " + " ".join(args), "exit_code": code,
                     "median_s": statistics.median(times), "min_s": min(times),
                     "repeats": len(times)})
    return rows


def accelerate(quick: bool) -> list[dict]:
    """Accelerate's estimate of each model (the validation's baseline), cold then warm,
    beside memplan's plan of the same model (LoRA, batch 1 × 2048)."""
    from memplan.profile.baselines import accelerate_training_bytes

    rows = []
    for model in ACCELERATE_MODELS:
        spec, train = get_model(model), TrainSpec(regime="lora")
        start = time.perf_counter()
        value = accelerate_training_bytes(spec, train)
        cold = time.perf_counter() - start
        if value is None:
            return [{"model": model, "available": False}]
        warm = timed(lambda s=spec, t=train: accelerate_training_bytes(s, t),
                     2 if quick else 5)
        job = TrainSpec(regime="lora", batch=1, seq=2048)
        ours = timed(lambda s=spec, t=job: plan(s, t), 5 if quick else 30)
        rows.append({"model": model, "available": True, "accelerate_bytes": value,
                     "accelerate_cold_s": cold, "accelerate": warm,
                     "memplan_plan": ours, "memplan_peak_bytes": plan(spec, job).total_bytes,
                     "ratio": warm["median_s"] / ours["median_s"]})
    return rows


def machine() -> dict:
    """Where it ran."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpus": os.cpu_count(), "load_average_1m": round(load[0], 2) if load else None,
            **versions}


def run(quick: bool = False) -> dict:
    """Every measurement, in one process."""
    start = time.perf_counter()
    doc = {"plans": plans(quick), "scale": scaling(quick), "commands": commands(quick),
           "accelerate": accelerate(quick), "machine": machine(), "quick": quick}
    worst = max(r["plan"]["median_s"] for r in doc["plans"])
    scale_cmd = next(r for r in doc["commands"] if r["command"].startswith("memplan scale"))
    advise_cmd = next(r for r in doc["commands"] if r["command"].startswith("memplan advise"))
    doc["targets"] = {
        "plan_s": {"target": PLAN_TARGET_S, "worst_median": worst, "met": worst <= PLAN_TARGET_S},
        "scale_s": {"target": SCALE_TARGET_S, "median": scale_cmd["median_s"],
                    "met": scale_cmd["median_s"] < SCALE_TARGET_S},
        "advise_s": {"target": ADVISE_TARGET_S, "median": advise_cmd["median_s"],
                     "met": advise_cmd["median_s"] < ADVISE_TARGET_S},
        "identical": all(r["identical"] for r in doc["plans"]),
    }
    doc["wall_s"] = time.perf_counter() - start
    return doc


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def markdown(doc: dict) -> str:
    """The Markdown report."""
    t, m = doc["targets"], doc["machine"]
    yes = {True: "met", False: "**missed**"}
    lines = [
        "# memplan planning speed", "",
        "Made by `python -m memplan.profile.bench`" + (" --quick" if doc["quick"] else "")
        + f", in one process on {m['cpu']} ({m['cpus']} CPUs, load average "
        f"{m['load_average_1m']} when it ended), Python {m['python']}, "
        f"accelerate {m['accelerate']}, transformers {m['transformers']}, torch {m['torch']}; "
        f"{doc['wall_s']:.0f} s in all. Medians of repeated calls.", "",
        "| target | goal | measured | |", "|---|---|---|---|",
        f"| one `plan()`, any depth (slowest row below) | ≤ {_ms(t['plan_s']['target'])} "
        f"| {_ms(t['plan_s']['worst_median'])} | {yes[t['plan_s']['met']]} |",
        f"| `{SCALE[0]} --model {SCALE_MODEL} ...`, start-up included | < "
        f"{_ms(t['scale_s']['target'])} | {_ms(t['scale_s']['median'])} "
        f"| {yes[t['scale_s']['met']]} |",
        f"| `advise` (Llama-3-8B LoRA r16, 4 × 2048, on an RTX 4090), start-up included | < "
        f"{_ms(t['advise_s']['target'])} | {_ms(t['advise_s']['median'])} "
        f"| {yes[t['advise_s']['met']]} |",
        f"| every plan identical when each block is walked | yes | "
        f"{'yes' if t['identical'] else '**no**'} | |", "",
        "## Beside Accelerate", "",
        "Accelerate's estimate path, as the Hugging Face validation's baseline calls it: the "
        "transformers model of the config built on the meta device, "
        "`calculate_maximum_sizes`, `estimate_training_usage` (model states only: no batch, "
        "sequence, LoRA or checkpointing). Cold is its first call in the process "
        "(importing transformers); warm, the median of the calls after. memplan: "
        "`plan()` of LoRA at batch 1 × 2048, activations included.", "",
        "| model | Accelerate cold | Accelerate warm | memplan plan | Accelerate warm ÷ memplan "
        "|", "|---|---:|---:|---:|---:|",
    ]
    for r in doc["accelerate"]:
        if not r.get("available"):
            lines.append(f"| {r['model']} | accelerate not installed | | | |")
            continue
        lines.append(f"| {r['model']} | {_ms(r['accelerate_cold_s'])} | "
                     f"{_ms(r['accelerate']['median_s'])} | {_ms(r['memplan_plan']['median_s'])}"
                     f" | {r['ratio']:.0f}× |")
    lines += ["", "## Plans", "",
              "`plan()` walking one copy of identical blocks (now; the blocks it walks), and "
              "walking every block (`plan_activations(reuse=False)`), with the peak both give. "
              "Gemma 3's layers repeat only every 6 (five sliding, one global): of its 26, "
              "one period is stood for.", "",
              "| model | blocks walked | batch × seq | job | peak | plan | every block walked | "
              "speed-up |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in doc["plans"]:
        peak = f"{r['peak_bytes'] / 2**30:,.2f} GiB" + ("" if r["identical"] else " **differs**")
        lines.append(f"| {r['model']} | {r['walked']} of {r['layers']} | {r['batch']} × "
                     f"{r['seq']} | {r['job']} "
                     f"| {peak} | {_ms(r['plan']['median_s'])} | "
                     f"{_ms(r['full_walk']['median_s'])} | {r['speedup']:.1f}× |")
    lines += ["", "## Scale and commands", "",
              "| what | median | fastest |", "|---|---:|---:|"]
    for r in doc["scale"]:
        lines.append(f"| `scale()` of {r['model']}, {', '.join(r['regimes'])}, {r['job']} "
                     f"(in process) | {_ms(r['time']['median_s'])} | {_ms(r['time']['min_s'])} |")
    for r in doc["commands"]:
        lines.append(f"| `{r['command']}` (exit {r['exit_code']}; a fresh interpreter) | "
                     f"{_ms(r['median_s'])} | {_ms(r['min_s'])} |")
    return "\n".join(lines) + "\n"


def write(doc: dict, out_dir: Path) -> list[Path]:
    """``benchmark.md`` and ``benchmark.json`` under ``out_dir``, both or neither."""
    from memplan.profile.validate import write_staged

    out_dir.mkdir(parents=True, exist_ok=True)
    return write_staged([
        (out_dir / "benchmark.json",
         lambda p: p.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")),
        (out_dir / "benchmark.md", lambda p: p.write_text(markdown(doc))),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memplan.profile.bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports", help="folder of the reports")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    doc = run(quick=args.quick)
    for path in write(doc, Path(args.out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
