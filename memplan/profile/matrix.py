"""The validation matrices: which jobs `memplan validate` profiles against their plans.

Rows are data (model, the TrainSpec fields that differ from the defaults, and optionally
ModelSpec fields to change), chosen to cover
issue 5's matrix: both reference architectures; every regime the profiler runs (full, mixed,
lora on all/mlp/attention/named targets, lora on a bf16 base, classifier, input-adapter,
prompt-tuning, bitfit); ranks 1 to 64; batch 1 to 8; seq 32 to 512; checkpointing on and off;
sdpa and eager; fused, foreach and for-loop optimizers; AdamW, SGD with momentum. The
``stress`` rows shrink the vocabulary so that the peak moves from the loss into a block's
backward (eager scores at long sequences, checkpoint recomputation), and add a Qwen2-style
shape (q/k/v biases, grouped-query attention, tied embeddings) and dropout.
"""

from __future__ import annotations

from dataclasses import replace

from memplan.spec import LoraSpec, TrainSpec

Row = tuple  # (model, TrainSpec fields) or (model, TrainSpec fields, ModelSpec fields)


def _both(rows: list[dict]) -> list[Row]:
    return [(m, kw) for kw in rows for m in ("llama-tiny", "gpt2-tiny")]


CPU_MATRIX: list[Row] = _both([
    dict(regime="full", batch=2, seq=128),
    dict(regime="full", batch=8, seq=512),
    dict(regime="full", batch=4, seq=128, optimizer_impl="foreach"),
    dict(regime="full", batch=4, seq=128, optimizer_impl="forloop"),
    dict(regime="full", batch=2, seq=64, optimizer="sgd-momentum"),
    dict(regime="full", batch=4, seq=256, checkpointing=True),
    dict(regime="full", batch=2, seq=128, attention="eager"),
    dict(regime="mixed", batch=4, seq=128),
    dict(regime="lora", batch=4, seq=256),
    dict(regime="lora", batch=2, seq=64, lora=LoraSpec(rank=1, targets="mlp")),
    dict(regime="lora", batch=4, seq=128, lora=LoraSpec(rank=64, targets="attention")),
    dict(regime="lora", batch=1, seq=32, optimizer_impl="foreach"),
    dict(regime="lora", batch=4, seq=256, checkpointing=True),
    dict(regime="lora", batch=4, seq=256, attention="eager"),
    dict(regime="lora-bf16", batch=4, seq=128),
    dict(regime="classifier", batch=8, seq=128),
    dict(regime="input-adapter", batch=2, seq=128),
    dict(regime="prompt-tuning", batch=2, seq=64),
]) + [
    ("llama-tiny", dict(regime="lora", batch=2, seq=64,
                        lora=LoraSpec(rank=16, targets="q_proj,v_proj"))),
    ("gpt2-tiny", dict(regime="bitfit", batch=4, seq=128)),
    ("gpt2-tiny", dict(regime="lora", batch=2, seq=128, lora=LoraSpec(rank=8, targets="c_attn"),
                       optimizer_impl="forloop")),
]

SMALL_VOCAB = {"vocab_size": 256}
QWEN_LIKE = {"model_type": "qwen2", "qkv_bias": True, "num_kv_heads": 2, "tie_embeddings": True,
             "vocab_size": 3000}
CPU_MATRIX += [(m, kw, SMALL_VOCAB) for m in ("llama-tiny", "gpt2-tiny") for kw in (
    dict(regime="full", batch=2, seq=512, attention="eager"),
    dict(regime="lora", batch=2, seq=512),
    dict(regime="full", batch=2, seq=512, checkpointing=True),
    dict(regime="lora", batch=2, seq=512, checkpointing=True, attention="eager"),
)] + [
    ("llama-tiny", dict(regime="full", batch=2, seq=128), QWEN_LIKE),
    ("llama-tiny", dict(regime="lora", batch=4, seq=64, attention="eager"), QWEN_LIKE),
    ("llama-tiny", dict(regime="mixed", batch=2, seq=64, checkpointing=True), QWEN_LIKE),
    ("gpt2-tiny", dict(regime="lora", batch=2, seq=128, attention="eager"), {"dropout": 0.1}),
    ("gpt2-tiny", dict(regime="full", batch=2, seq=128, attention="eager"), {"dropout": 0.1}),
]

QUICK_MATRIX: list[Row] = [CPU_MATRIX[i] for i in (0, 1, 14, 16, 17, 29, 30, 33, 39)]

# Fake mode: 7B-class presets at batch 1 to 4 and seq 512 to 4096 (issue 5), bf16 bases.
FAKE_MATRIX: list[Row] = [
    (m, kw) for m in ("llama-2-7b", "mistral-7b", "llama-3-8b") for kw in (
        dict(regime="lora", batch=1, seq=512),
        dict(regime="lora-bf16", batch=2, seq=2048),
        dict(regime="lora-bf16", batch=4, seq=4096, checkpointing=True),
        dict(regime="lora", batch=1, seq=1024, lora=LoraSpec(rank=16, targets="q_proj,v_proj")),
    )
] + [
    ("llama-2-7b", dict(regime="full", batch=1, seq=512)),
    ("mistral-7b", dict(regime="mixed", batch=1, seq=1024)),
    ("llama-3-8b", dict(regime="lora", batch=2, seq=2048, attention="eager")),
    ("llama-2-7b", dict(regime="classifier", batch=4, seq=1024)),
]
QUICK_FAKE: list[Row] = FAKE_MATRIX[:2]


def train_of(kw: dict) -> TrainSpec:
    """The TrainSpec of a row."""
    return replace(TrainSpec(), **kw)


def matrix_for(device: str, quick: bool) -> list[Row]:
    """The rows for a device: the tiny CPU matrix (cpu, cuda) or the 7B-class one (fake)."""
    if device == "fake":
        return QUICK_FAKE if quick else FAKE_MATRIX
    return QUICK_MATRIX if quick else CPU_MATRIX
