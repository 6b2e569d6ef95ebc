"""Commands on a config whose model_type has no profile: measured by a dry run, or refused.

With the ``[hf]`` extra, ``estimate``, ``fits`` and ``profile`` measure the real transformers
model under FakeTensorMode (:mod:`memplan.profile.dryrun`) and say that the figure is a
measurement, not a plan, and how long it took. Without it, the one-line refusal stands.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path
from typing import Any

from memplan.errors import UnprofiledModel
from memplan.spec import DRY_RUN_REGIMES

NOTE = ("no architecture profile for model_type {t!r}: measured by a fake-mode dry run of the "
        "transformers model{shape}, not planned")


def _causal_lm_in_transformers(model_type: Any) -> bool:
    """Whether the installed transformers defines a ``...ForCausalLM`` for ``model_type``,
    read from its source files (importing transformers to ask takes seconds)."""
    if not isinstance(model_type, str) or not model_type.replace("_", "").isalnum():
        return False
    found = importlib.util.find_spec("transformers")
    if found is None or not found.submodule_search_locations:
        return False
    folder = Path(list(found.submodule_search_locations)[0]) / "models" / model_type
    return any("ForCausalLM(" in path.read_text(errors="ignore")
               for path in folder.glob("modeling_*.py"))


def _dry_runs(exc: UnprofiledModel, regimes: list[str]) -> list[Any]:
    if not _causal_lm_in_transformers(exc.cfg.get("model_type")):
        raise exc
    try:
        import torch  # noqa: F401

        from memplan.profile.dryrun import dry_run, transformers_available
    except ImportError:
        raise exc from None
    if not transformers_available():
        raise exc
    from memplan.report import progress

    out = []
    with progress() as bar:
        task = bar.add_task("dry run", total=len(regimes))
        for regime in regimes:
            out.append(dry_run(exc.cfg, replace(exc.train, regime=regime)))
            bar.advance(task)
    return out


def _note(exc: UnprofiledModel) -> str:
    train = exc.train
    shape = (f", batch {train.batch} × seq {train.seq}" if train.has_activations
             else ", batch 1 × seq 1 (model states and one token)")
    return NOTE.format(t=exc.cfg.get("model_type"), shape=shape)


def estimate(exc: UnprofiledModel, json_out: bool, regimes: list[str] | None) -> None:
    """``memplan estimate`` of an unprofiled model: full, lora and lora-bf16 measured."""
    from memplan.report import console, print_json
    from memplan.units import format_bytes

    runs = _dry_runs(exc, list(regimes or DRY_RUN_REGIMES))
    note = _note(exc)
    if json_out:
        print_json({"params": runs[0].params, "measured": True, "note": note,
                    "regimes": {r.regime: r.to_dict() for r in runs}})
        return
    out = console()
    out.print(note, style="yellow", markup=False)
    for r in runs:
        out.print(f"{r.regime:<10} measured peak {format_bytes(r.peak_bytes):>12}  "
                  f"(N = {r.params:,}, trainable {r.trainable:,}; {r.seconds:.1f} s)")


def fits(exc: UnprofiledModel, json_out: bool, capacity: int, reserve: int, label: str,
         search_only: bool = False) -> int:
    """``memplan fits`` of an unprofiled model; returns the exit code.

    As for a planned model, "fits" is said only of a measured step with activations: without
    --seq the measurement holds the model states only; with --seq alone, batch 1 is measured
    (no search for the largest batch).
    """
    from memplan.report import console, print_json
    from memplan.units import format_bytes

    run = _dry_runs(exc, [exc.train.regime])[0]
    required = run.peak_bytes + reserve
    ok = required <= capacity
    note = _note(exc)
    full = exc.train.has_activations
    verdict = ("fits" if ok else "does not fit") if full else \
        ("model states fit" if ok else "model states do not fit")
    if full and search_only:
        verdict = f"{verdict} at batch 1 (the largest batch is not searched for a measured model)"
    if json_out:
        print_json({"fits": ok if full or not ok else None, "verdict": verdict,
                    "planned": "full" if full else "model_states",
                    "required_bytes": required, "capacity_bytes": capacity,
                    "headroom_bytes": capacity - required, "max_batch": None,
                    "measured": True, "note": note, "gpu": label,
                    "activations_included": full, "dry_run": run.to_dict()})
    else:
        out = console()
        out.print(note, style="yellow", markup=False)
        out.print(f"{run.regime} on {label}: {verdict} (measured "
                  f"{format_bytes(run.peak_bytes)} + reserve {format_bytes(reserve)} of "
                  f"{format_bytes(capacity)}; {run.seconds:.1f} s)", markup=False)
        if not full:
            out.print("activations are not measured: give --batch and --seq to check the "
                      "whole step", markup=False)
    return 0 if ok else 1


def profile(exc: UnprofiledModel, json_out: bool) -> None:
    """``memplan profile`` of an unprofiled model: the measurement alone, no plan."""
    from memplan.report import console, print_json
    from memplan.units import format_bytes

    run = _dry_runs(exc, [exc.train.regime])[0]
    note = _note(exc)
    if json_out:
        print_json({"device": "fake", "predicted": None,
                    "measured": {"peak_bytes": run.peak_bytes, "components": run.components},
                    "relative_error": None, "note": note, "dry_run": run.to_dict()})
        return
    out = console()
    out.print(note, style="yellow", markup=False)
    out.print(f"{run.regime}: measured peak {format_bytes(run.peak_bytes)} "
              f"({run.seconds:.1f} s)", markup=False)
