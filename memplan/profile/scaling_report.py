"""The scaling report: per-GPU memory against the number of GPUs for a 7B and a 70B model.

Written by ``memplan validate --sharded --device fake`` beside its rows, as
``reports/scaling.{md,json,png}``: the plan of rank 0 (the fullest) for G = 1 to 1024 GPUs, the
notes' 16N/G beside it, the fake-process-group measurements of the validation rows on top,
and the ZeRO paper's published example (7.5B parameters on 64 GPUs) against memplan's
accounting of its stages.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from memplan.params import count_params
from memplan.planner import plan
from memplan.presets import get_model
from memplan.scaling import per_gpu
from memplan.shapes import shape_for_params
from memplan.spec import TrainSpec
from memplan.units import format_bytes

MODELS = ("llama-2-7b", "llama-2-70b")
# (label, regime, FSDP parameter dtype): fp32 as the notes count, and FSDP's bf16 policy
VARIANTS = (("zero", "zero", "fp32"), ("mixed", "mixed", "fp32"), ("lora", "lora", "fp32"),
            ("zero bf16", "zero", "bf16"), ("lora bf16", "lora", "bf16"))
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:olive")
GPU_COUNTS = tuple(2**k for k in range(11))  # 1 to 1024
JOB = TrainSpec(batch=1, seq=512)  # the fake validation rows' job

# Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
# Models", Figure 1: Ψ = 7.5B, Nd = 64, K = 12; model-state memory per device in GB (10^9).
PAPER_PSI, PAPER_GPUS = 7_500_000_000, 64
PAPER_GB = {"baseline": 120.0, "zero1": 31.4, "zero2": 16.6, "zero3": 1.9}


def paper_check() -> list[dict]:
    """Each of the paper's four figures beside memplan's model states for the same Ψ and Nd."""
    spec, _ = shape_for_params(PAPER_PSI)
    rows = []
    for name, gb in PAPER_GB.items():
        regime, gpus = ("zero1", 1) if name == "baseline" else (name, PAPER_GPUS)
        b = plan(spec, TrainSpec(regime=regime, gpus=gpus), params=PAPER_PSI)
        rows.append({"stage": name, "paper_gb": gb, "memplan_bytes": b.total_bytes,
                     "memplan_gb": b.total_bytes / 1e9, "formula": b.formula})
    return rows


def curves(measured: list[dict]) -> dict:
    """Planned per-GPU bytes by model, regime and GPU count G; 16N/G; and the measured points
    (JSON keys keep their round-1 names: ``notes_16N_over_M``)."""
    out: dict[str, Any] = {}
    for model in MODELS:
        spec = get_model(model)
        n = count_params(spec)
        entry = {"N": n, "notes_16N_over_M": {m: 16 * n // m for m in GPU_COUNTS}, "plan": {},
                 "measured": {}}
        for label, regime, dtype in VARIANTS:
            entry["plan"][label] = {m: per_gpu(spec, replace(JOB, regime=regime), regime, m,
                                               param_dtype=dtype).total_bytes
                                    for m in GPU_COUNTS}
            options = "batch=1 seq=512" + (f" param_dtype={dtype}" if dtype != "fp32" else "")
            entry["measured"][label] = {
                r["nproc"]: _rank0(r) for r in measured
                if r.get("model") == model and r.get("regime") == regime and "ranks" in r
                and r.get("options") == f"{options} ×{r['nproc']} full-shard"}
        out[model] = entry
    return out


def _rank0(row: dict) -> int:
    for k in row["ranks"]:
        if k["rank"] == 0:
            return k["measured_bytes"]
    return row["measured_bytes"]


def markdown(data: dict, paper: list[dict], meta: dict) -> str:
    lines = ["# Per-GPU memory against the number of GPUs", "",
             f"Produced by `{meta['command']}` on {meta['date']} (torch {meta['torch']}). "
             "Plan: rank 0 of FSDP2 FULL_SHARD (the rank that owns the most rows), batch 1 × "
             "seq 512 per GPU, fp32 AdamW (zero), the mixed recipe, LoRA r=8 on all linear "
             "layers, and zero and LoRA under FSDP's bf16 policy (`MixedPrecisionPolicy("
             "param_dtype=bf16, reduce_dtype=fp32)`: bf16 gathers, activations and gradients); "
             "G = 1 is the regime unsharded (in fp32). Measured: the fake process group under "
             "FakeTensorMode, rank 0, from `reports/validation-fsdp-fake`.", "",
             "![per-GPU memory against G](scaling.png)", ""]
    for model, entry in data.items():
        lines += [f"## {model} (N = {entry['N']:,})", "",
                  "| G | 16N/G | " + " | ".join(f"{v[0]} plan | measured" for v in VARIANTS)
                  + " |", "|---:|---:|" + "---:|---:|" * len(VARIANTS)]
        for m in GPU_COUNTS:
            cells = [format_bytes(entry["notes_16N_over_M"][m])]
            for r, _, _ in VARIANTS:
                meas = entry["measured"][r].get(m)
                cells += [format_bytes(entry["plan"][r][m]),
                          format_bytes(meas) if meas else "–"]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## The ZeRO paper's example: 7.5B parameters on 64 GPUs", "",
              "Model states per GPU (K = 12, mixed-precision Adam), in GB of 10^9 bytes as the "
              "paper gives them (Rajbhandari et al. 2020, Figure 1), against `memplan estimate "
              "--params 7.5e9 --gpus 64 --regime zero1/zero2/zero3`.", "",
              "| stage | formula | paper | memplan | difference |", "|---|---|---:|---:|---:|"]
    for row in paper:
        diff = row["memplan_gb"] - row["paper_gb"]
        lines.append(f"| {row['stage']} | {row['formula']} | {row['paper_gb']:g} GB | "
                     f"{row['memplan_gb']:.3f} GB | {diff:+.3f} GB |")
    lines += ["", "The paper rounds to three figures; the differences are that rounding."]
    return "\n".join(lines) + "\n"


def figure(data: dict) -> Any:
    """One panel per model: planned per-GPU GiB against M (log-log), 16N/M dashed, the
    measured points as markers."""
    from memplan.plots import _figure

    fig, axes = _figure(ncols=len(data), width=6.2 * len(data), height=4.8)
    axes = list(axes) if len(data) > 1 else [axes]
    for ax, (model, entry) in zip(axes, data.items(), strict=True):
        ms = list(GPU_COUNTS)
        ax.plot(ms, [entry["notes_16N_over_M"][m] / 2**30 for m in ms], "k--", lw=1.2,
                label="16N/G (the notes)")
        for (regime, _, dtype), color in zip(VARIANTS, COLORS, strict=True):
            ax.plot(ms, [entry["plan"][regime][m] / 2**30 for m in ms], color=color, lw=2,
                    ls="-" if dtype == "fp32" else "-.", label=f"{regime}: plan")
            points = sorted(entry["measured"][regime].items())
            if points:
                ax.plot([m for m, _ in points], [v / 2**30 for _, v in points], "o",
                        color=color, mfc="none", ms=9, mew=1.8, label=f"{regime}: measured")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GPUs G")
        ax.set_ylabel("per-GPU peak (GiB)")
        ax.set_title(f"{model}: batch 1 × seq 512 per GPU")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def write_scaling_report(rows: list[dict], out_dir: Path, meta: dict) -> list[Path]:
    """Write scaling.{json,md,png} into ``out_dir``, each whole or not at all."""
    from memplan.plots import save_figure
    from memplan.profile.validate import write_staged

    data = curves(rows)
    paper = paper_check()
    doc = {"meta": meta, "job": {"batch": JOB.batch, "seq": JOB.seq}, "models": data,
           "zero_paper": paper}
    stem = out_dir / "scaling"
    return write_staged([
        (stem.with_suffix(".png"), lambda tmp: save_figure(figure(data), tmp)),
        (stem.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(doc, indent=1) + "\n")),
        (stem.with_suffix(".md"), lambda tmp: tmp.write_text(markdown(data, paper, meta))),
    ])
