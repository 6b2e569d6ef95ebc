"""Measure Hugging Face inference: a prefill with a ``DynamicCache``, then decode steps.

The model is transformers' class of the spec, built in the serving dtype under FakeTensorMode
(``fake``) or on the CPU (``cpu``), in eval mode. Under ``torch.no_grad``: one prefill
``model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)`` of ``batch`` ×
``prompt`` tokens, then ``decode_steps`` single-token steps, each step's output dropped
before the next. memplan's :class:`~memplan.profile.trackers.StorageTracker` counts every
live storage, the weights included; the plan of the same loop is
:func:`memplan.serve.plan_hf_inference` (the contiguous cache grown by ``torch.cat``, not
vLLM's pages).

With ``adapters`` K > 0, K PEFT LoRA adapters of rank ``rank`` are resident and unmerged on
the model (``peft.get_peft_model`` for the first, ``add_adapter`` for the others, on
memplan's targets of the family: :func:`memplan.nn.hf.apply_peft_lora`), all in the serving
dtype, and every forward is a mixed-adapter batch: ``adapter_names`` routes sample i to
adapter ``i mod K`` (PEFT's ``_mixed_batch_forward``, ``peft/tuners/lora/layer.py``).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from memplan.spec import ModelSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ServeMeasurement:
    """Peak bytes measured (weights included) and the DynamicCache's bytes at the end."""

    peak_bytes: int
    prefill_peak_bytes: int
    cache_bytes: int


def measure_inference(spec: ModelSpec, batch: int, prompt: int, decode_steps: int,
                      dtype: str = "bf16", device: str = "fake", seed: int = 0,
                      adapters: int = 0, rank: int = 16) -> ServeMeasurement:
    """Run the loop and measure it (``device``: fake or cpu; ``adapters``: K resident PEFT
    LoRA adapters of rank ``rank``, a mixed-adapter batch)."""
    from transformers import DynamicCache

    from memplan.nn.hf import build_hf_model
    from memplan.profile.trackers import make_tracker

    fake: contextlib.AbstractContextManager = contextlib.nullcontext()
    if device == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake = FakeTensorMode(allow_non_fake_inputs=False)
    torch.manual_seed(seed)
    with fake:
        model = build_hf_model(spec, device="cpu")
        names = _add_peft_adapters(model, adapters, rank) if adapters else []
        if dtype != "fp32":
            from memplan.nn.regimes import cast_floating

            cast_floating(model, DTYPES[dtype])
        model.eval()
        hf = model.hf
        gen = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.randint(spec.vocab_size, (batch, prompt), generator=gen)
        nxt = torch.randint(spec.vocab_size, (batch, 1), generator=gen)
        tracker = make_tracker(device)
        routing = {"adapter_names": [names[i % adapters] for i in range(batch)]} \
            if adapters else {}
        with tracker, torch.no_grad():
            tracker.register([hf], "weights")
            tracker.register([ids, nxt], "activations")
            tracker.reset_peak()
            cache = DynamicCache()
            out = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                     **routing)
            del out
            prefill = tracker.peak_bytes
            for _ in range(decode_steps):
                out = hf(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1,
                         **routing)
                del out
            cache_bytes = sum(t.untyped_storage().nbytes() for layer in cache.layers
                              for t in (layer.keys, layer.values))
            peak = tracker.peak_bytes
    return ServeMeasurement(peak, prefill, cache_bytes)


def _add_peft_adapters(model: object, adapters: int, rank: int) -> list[str]:
    """K PEFT LoRA adapters on memplan's targets, unmerged; returns their names. Added while
    the model is in fp32 (PEFT makes its adapters in fp32), then cast with it."""
    from memplan.nn.hf import _no_adapter_moves_under_fake_tensors, apply_peft_lora
    from memplan.spec import LoraSpec

    apply_peft_lora(model, LoraSpec(rank=rank, alpha=2.0 * rank), adapter_fp32=False)
    hf = model.hf
    config = hf.peft_config["default"]
    names = ["default"] + [f"adapter{k}" for k in range(1, adapters)]
    with _no_adapter_moves_under_fake_tensors():
        for name in names[1:]:
            hf.add_adapter(name, config)
    return names


def validate_serve(device: str, out_dir: Path, quick: bool = False) -> tuple[list[Path], dict]:
    """Measure every serving row of the device's matrix against its plan; write
    ``validation-serve-<device>.json`` and ``.md`` to ``out_dir``."""
    from memplan.presets import get_model
    from memplan.profile.matrix import SERVE_CPU_MATRIX, SERVE_FAKE_MATRIX
    from memplan.serve import plan_hf_inference

    rows = SERVE_FAKE_MATRIX if device == "fake" else SERVE_CPU_MATRIX
    done = []
    for model, batch, prompt, steps, dtype, *lora in rows[:2] if quick else rows:
        adapters, rank = lora or (0, 0)
        spec = get_model(model)
        plan = plan_hf_inference(spec, batch, prompt, steps, dtype, device, adapters, rank)
        got = measure_inference(spec, batch, prompt, steps, dtype, device, adapters=adapters,
                                rank=rank)
        done.append({"model": model, "family": spec.family, "batch": batch, "prompt": prompt,
                     "decode_steps": steps, "dtype": dtype, "adapters": adapters,
                     "rank": rank, "plan_bytes": plan.peak_bytes,
                     "measured_bytes": got.peak_bytes, "weights_bytes": plan.weights_bytes,
                     "cache_plan_bytes": plan.cache_bytes, "cache_measured_bytes":
                     got.cache_bytes, "relative_error":
                     (plan.peak_bytes - got.peak_bytes) / got.peak_bytes})
    errors = [abs(r["relative_error"]) for r in done]
    summary = {"rows": len(done), "max_abs_error": max(errors),
               "within_1pct": sum(e <= 0.01 for e in errors)}
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"validation-serve-{device}"
    doc = {"device": device, "summary": summary, "rows": done,
           "what": "Hugging Face inference under torch.no_grad: prefill with a DynamicCache "
                   "(logits_to_keep=1), then decode steps; peak bytes, weights included; "
                   "adapters K × rank R: K PEFT LoRA adapters resident and unmerged, a "
                   "mixed-adapter batch (adapter_names=, sample i to adapter i mod K)"}
    base.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# Serving validation ({device})", "", doc["what"] + ".", "",
             "| model | batch × prompt | decode | dtype | adapters | plan | measured "
             "| of which weights | cache | error |",
             "|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['batch']} × {r['prompt']} | {r['decode_steps']} | "
              f"{r['dtype']} | {_adapters_text(r)} | {r['plan_bytes']:,} | "
              f"{r['measured_bytes']:,} | "
              f"{r['weights_bytes']:,} | {r['cache_measured_bytes']:,} | "
              f"{100 * r['relative_error']:+.3f}% |"
              for r in done]
    lines += ["", f"{summary['within_1pct']} of {summary['rows']} rows within 1%; max "
              f"|error| {100 * summary['max_abs_error']:.3f}%", ""]
    base.with_suffix(".md").write_text("\n".join(lines))
    return [base.with_suffix(".json"), base.with_suffix(".md")], summary


def _adapters_text(row: dict) -> str:
    return f"{row['adapters']} × rank {row['rank']}" if row["adapters"] else "none"
