"""The validation matrices: which jobs `memplan validate` profiles against their plans.

Rows are data (model, the TrainSpec fields that differ from the defaults, and optionally
ModelSpec fields to change), chosen to cover: both reference architectures; every regime the
profiler runs (full, mixed, lora on all/mlp/attention/named targets, lora on a bf16 base,
classifier, input-adapter, prompt-tuning, bitfit); ranks 1 to 64; batch 1 to 8; seq 32 to
512; checkpointing on and off; sdpa and eager; fused, foreach and for-loop optimizers;
AdamW, SGD with momentum; and the jobs as choices (autocast, pure bf16, 8-bit AdamW,
Adafactor, accumulation, both loops). The ``stress`` rows shrink the vocabulary so that the
peak moves from the loss into a block's backward (eager scores at long sequences, checkpoint
recomputation), and add a Qwen2-style shape (q/k/v biases, grouped-query attention, tied
embeddings) and dropout.
"""

from __future__ import annotations

from dataclasses import replace

from memplan import arch
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
    # sdpa with dropout: the CPU kernels' math fallback keeps the s² scores
    ("gpt2-tiny", dict(regime="full", batch=2, seq=256), {"dropout": 0.1}),
    ("llama-tiny", dict(regime="lora", batch=4, seq=128, checkpointing=True), {"dropout": 0.1}),
    ("gpt2-tiny", dict(regime="lora", batch=1, seq=256), {"dropout": 0.1}),  # one sequence
]
# Multi-adapter LoRA: K adapters on one frozen base, ``batch`` samples each.
CPU_MATRIX += [(m, kw) for m in ("llama-tiny", "gpt2-tiny") for kw in (
    dict(regime="lora", batch=2, seq=64, adapters=2),
    dict(regime="lora", batch=1, seq=128, adapters=4, lora=LoraSpec(rank=4, targets="attention")),
    dict(regime="lora-bf16", batch=2, seq=64, adapters=2),
    dict(regime="lora", batch=2, seq=64, adapters=4, checkpointing=True),
)]

# The jobs people run, as choices: the Trainer's bf16=True (autocast over fp32 weights, its
# loop), pure bf16, LoRA on a bf16 base under autocast, 8-bit and paged AdamW, Adafactor,
# fp16 autocast with its gradient scaler, accumulation of 4, and both loops.
JOB_ROWS: list[dict] = [
    dict(regime="full", batch=2, seq=128, autocast="bf16", loop="trainer"),
    dict(regime="full", batch=2, seq=128, autocast="bf16"),
    dict(regime="full", batch=2, seq=64, autocast="fp16"),
    dict(regime="full", batch=2, seq=128, dtype="bf16"),
    dict(regime="lora", batch=4, seq=128, autocast="bf16"),
    dict(regime="lora", batch=4, seq=128, dtype="bf16", autocast="bf16"),
    dict(regime="full", batch=2, seq=64, optimizer="adamw-8bit"),
    dict(regime="lora", batch=2, seq=64, optimizer="paged-adamw-8bit", loop="trainer"),
    dict(regime="full", batch=2, seq=64, optimizer="adafactor"),
    dict(regime="lora", batch=2, seq=64, optimizer="adafactor", dtype="bf16"),
    dict(regime="full", batch=2, seq=64, grad_accum=4),
    dict(regime="lora", batch=2, seq=128, grad_accum=4, loop="trainer"),
    dict(regime="lora", batch=4, seq=256, loop="trainer"),
    dict(regime="full", batch=2, seq=64, dtype="bf16", optimizer="adamw-8bit", grad_accum=2),
]
CPU_MATRIX += _both(JOB_ROWS)

QUICK_MATRIX: list[Row] = [CPU_MATRIX[i] for i in (0, 1, 14, 16, 17, 29, 30, 33, 39)]

# Fake mode: 7B-class presets at batch 1 to 4 and seq 512 to 4096, bf16 bases.
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
    ("gpt2", dict(regime="full", batch=2, seq=1024), {"dropout": 0.1}),  # the preset's own
    ("gpt2", dict(regime="full", batch=1, seq=512), {"dropout": 0.1}),
]
FAKE_MATRIX += [  # multi-adapter LoRA: K = 4 adapters on one 7B base
    ("llama-2-7b", dict(regime="lora", batch=1, seq=512, adapters=4)),
    ("llama-2-7b", dict(regime="lora-bf16", batch=1, seq=4096, checkpointing=True, adapters=4)),
]
FAKE_MATRIX += [  # the jobs people run, at 7B-class sizes
    # the Trainer's bf16=True with paged AdamW 8-bit and accumulation of 4
    ("llama-3-8b", dict(regime="full", batch=2, seq=2048, autocast="bf16",
                        optimizer="paged-adamw-8bit", grad_accum=4, loop="trainer")),
    ("llama-2-7b", dict(regime="full", batch=1, seq=1024, dtype="bf16")),  # pure bf16
    ("mistral-7b", dict(regime="lora", batch=2, seq=2048, dtype="bf16", autocast="bf16")),
    ("llama-2-7b", dict(regime="full", batch=1, seq=512, optimizer="adafactor")),
    ("llama-3-8b", dict(regime="lora-bf16", batch=2, seq=2048, optimizer="paged-adamw-8bit",
                        grad_accum=4, loop="trainer")),
]
QUICK_FAKE: list[Row] = FAKE_MATRIX[:2]


# Hugging Face transformers models: Llama, Mistral-, Qwen2- and GPT-2-shaped, with
# memplan's LoRALinear or PEFT, fp32 and bf16 bases, checkpointing on and off.
_HF = {"impl": "hf"}
_PEFT = {"impl": "hf", "lora_backend": "peft"}
HF_CPU_MATRIX: list[Row] = [
    (m, kw | extra, changes) for m, changes in (
        ("llama-tiny", {}), ("gpt2-tiny", {}),
        ("llama-tiny", QWEN_LIKE | {"model_type": "qwen2"}))
    for kw, extra in (
        (dict(regime="full", batch=2, seq=128), _HF),
        (dict(regime="mixed", batch=2, seq=64), _HF),
        (dict(regime="lora", batch=2, seq=128), _PEFT),
        (dict(regime="lora-bf16", batch=4, seq=128), _PEFT),
        (dict(regime="full", batch=2, seq=128, attention="eager"), _HF),
        (dict(regime="lora", batch=2, seq=256, checkpointing=True), _PEFT),
    )
] + [
    ("llama-tiny", dict(regime="lora", batch=4, seq=128) | _HF, {}),
    ("llama-tiny", dict(regime="lora-bf16", batch=2, seq=128) | _HF, {}),
    ("llama-tiny", dict(regime="classifier", batch=4, seq=128) | _HF, {}),
]
HF_FAKE_MATRIX: list[Row] = [
    ("llama-2-7b", dict(regime="lora", batch=1, seq=512) | _HF, {}),
    ("llama-2-7b", dict(regime="lora-bf16", batch=2, seq=2048) | _PEFT, {}),
    ("llama-2-7b", dict(regime="lora-bf16", batch=4, seq=4096, checkpointing=True) | _PEFT, {}),
    ("llama-2-7b", dict(regime="full", batch=1, seq=1024) | _HF, {}),
    ("mistral-7b", dict(regime="lora-bf16", batch=1, seq=4096) | _PEFT, {}),
    ("mistral-7b", dict(regime="mixed", batch=1, seq=2048) | _HF, {}),
    ("qwen2.5-7b", dict(regime="lora-bf16", batch=1, seq=4096) | _PEFT, {}),
    ("qwen2.5-0.5b", dict(regime="full", batch=8, seq=1024) | _HF, {}),
    ("qwen2.5-0.5b", dict(regime="lora", batch=4, seq=2048) | _PEFT, {}),
    ("qwen2.5-0.5b", dict(regime="lora-bf16", batch=8, seq=4096, checkpointing=True) | _PEFT, {}),
    ("qwen2.5-0.5b", dict(regime="lora", batch=2, seq=512, attention="eager") | _HF, {}),
    ("tinyllama-1.1b", dict(regime="full", batch=1, seq=128) | _HF, {}),
    ("tinyllama-1.1b", dict(regime="lora", batch=8, seq=2048) | _PEFT, {}),
    ("gpt2", dict(regime="full", batch=8, seq=1024) | _HF, {}),
    ("gpt2", dict(regime="lora", batch=4, seq=1024) | _PEFT, {}),
    ("gpt2", dict(regime="lora-bf16", batch=2, seq=1024, checkpointing=True) | _PEFT, {}),
    ("gpt2-medium", dict(regime="mixed", batch=2, seq=1024) | _HF, {}),
]
# Every other family's rows live beside its profile (memplan/arch/<family>.py).
HF_CPU_MATRIX += [  # the jobs people run, on Hugging Face's models (PEFT for LoRA)
    (m, kw | (_PEFT if kw["regime"] == "lora" else _HF), {})
    for m in ("llama-tiny", "gpt2-tiny") for kw in JOB_ROWS[:10]
]
HF_FAKE_MATRIX += [
    ("llama-3-8b", dict(regime="full", batch=2, seq=2048, autocast="bf16",
                        optimizer="paged-adamw-8bit", grad_accum=4, loop="trainer") | _HF, {}),
    # a hand-written loop keeps the logits: 4096 tokens × 151,936 in fp32
    ("qwen2.5-0.5b", dict(regime="full", batch=8, seq=512) | _HF, {}),
    ("qwen2.5-0.5b", dict(regime="full", batch=8, seq=512, loop="trainer") | _HF, {}),
    ("qwen2.5-0.5b", dict(regime="lora", batch=4, seq=1024, dtype="bf16", autocast="bf16")
     | _PEFT, {}),
    ("mistral-7b", dict(regime="full", batch=1, seq=2048, dtype="bf16") | _HF, {}),
]
HF_CPU_MATRIX += arch.validation_rows("HF_CPU_ROWS")
HF_FAKE_MATRIX += arch.validation_rows("HF_FAKE_ROWS")


# FSDP2: ``gpus`` is the number of ranks. Real gloo processes for both reference
# architectures, full (zero), mixed and LoRA over 2 and 4 ranks, plus SHARD_GRAD_OP, a bf16
# base, checkpointing and the foreach optimizer; then 7B and 70B over 8 to 1024 fake ranks.
FSDP_CPU_MATRIX: list[Row] = [
    (m, dict(regime=r, batch=2, seq=64, gpus=n)) for m in ("llama-tiny", "gpt2-tiny")
    for r in ("zero", "mixed", "lora") for n in (2, 4)
] + [
    ("llama-tiny", dict(regime="lora", batch=2, seq=128, gpus=2, shard="shard-grad-op")),
    ("gpt2-tiny", dict(regime="zero", batch=2, seq=64, gpus=2, shard="shard-grad-op")),
    ("llama-tiny", dict(regime="lora-bf16", batch=4, seq=64, gpus=3)),
    ("gpt2-tiny", dict(regime="zero", batch=2, seq=128, gpus=2, checkpointing=True,
                       optimizer_impl="foreach")),
    ("llama-tiny", dict(regime="lora", batch=2, seq=256, gpus=4, checkpointing=True,
                        attention="eager")),
    # FSDP's MixedPrecisionPolicy (bf16 parameters and gradients, fp32 reduce-scatter)
    ("llama-tiny", dict(regime="zero", batch=2, seq=64, gpus=2, param_dtype="bf16")),
    ("gpt2-tiny", dict(regime="lora", batch=2, seq=128, gpus=3, param_dtype="bf16")),
]
FSDP_FAKE_MATRIX: list[Row] = [
    (m, dict(regime=r, batch=1, seq=512, gpus=n))
    for m, regimes in (("llama-2-7b", ("zero", "mixed", "lora")), ("llama-2-70b", ("zero", "lora")))
    for r in regimes for n in (8, 64, 1024)
] + [
    ("llama-2-7b", dict(regime=r, batch=1, seq=512, gpus=n, param_dtype="bf16"))
    for r in ("zero", "lora") for n in (8, 64)
]


def train_of(kw: dict) -> TrainSpec:
    """The TrainSpec of a row."""
    return replace(TrainSpec(), **kw)


def matrix_for(device: str, quick: bool, impl: str = "memplan",
               sharded: bool = False) -> list[Row]:
    """The rows for a device: the tiny CPU matrix (cpu, cuda) or the 7B-class one (fake);
    with ``impl="hf"``, those of Hugging Face models; with ``sharded``, the FSDP rows."""
    if sharded:
        if device == "fake":
            return FSDP_FAKE_MATRIX[:2] if quick else FSDP_FAKE_MATRIX
        return [FSDP_CPU_MATRIX[0], FSDP_CPU_MATRIX[-1]] if quick else FSDP_CPU_MATRIX
    if impl == "hf":
        rows = HF_FAKE_MATRIX if device == "fake" else HF_CPU_MATRIX
        return rows[:3] if quick else rows
    if device == "fake":
        return QUICK_FAKE if quick else FAKE_MATRIX
    return QUICK_MATRIX if quick else CPU_MATRIX


# Serving: Hugging Face inference with a DynamicCache, a prefill then decode steps
# (memplan.profile.serve_measure against memplan.serve.plan_hf_inference). Each row: model,
# batch, prompt tokens, decode steps, dtype.
# a serving row: model, batch, prompt, decode steps, dtype, and optionally K resident PEFT
# adapters of rank R serving a mixed-adapter batch (``adapter_names=``)
ServeRow = tuple[str, int, int, int, str] | tuple[str, int, int, int, str, int, int]
SERVE_FAKE_MATRIX: list[ServeRow] = [
    ("llama-3.2-1b", 8, 1024, 4, "bf16"), ("qwen3-0.6b", 8, 1024, 4, "bf16"),
    ("gemma-2b", 4, 1024, 4, "bf16"), ("phi-3-mini", 4, 1024, 4, "bf16"),
    ("mistral-7b", 4, 1024, 4, "bf16"), ("mixtral-tiny", 8, 512, 4, "bf16"),
    ("pythia-160m", 8, 1024, 4, "bf16"), ("gpt2", 8, 512, 4, "bf16"),
    ("llama-3.2-1b", 8, 1024, 4, "bf16", 4, 16), ("qwen3-0.6b", 8, 1024, 4, "bf16", 8, 8),
    ("olmo-2-7b", 4, 1024, 4, "bf16"), ("olmoe-1b-7b", 4, 512, 4, "bf16"),
    ("qwen1.5-moe-a2.7b", 4, 512, 4, "bf16"), ("gemma-2-9b", 2, 1024, 4, "bf16"),
    ("gemma-3-1b", 4, 1024, 4, "bf16"),
]
SERVE_CPU_MATRIX: list[ServeRow] = [
    ("llama-tiny", 4, 128, 4, "fp32"), ("qwen3-tiny", 4, 128, 4, "fp32"),
    ("gemma2-tiny", 4, 128, 4, "fp32"), ("phi3-tiny", 4, 128, 4, "fp32"),
    ("mixtral-tiny", 4, 128, 4, "fp32"), ("gpt_neox-tiny", 4, 128, 4, "fp32"),
    ("gpt2-tiny", 4, 128, 4, "fp32"), ("llama-tiny", 2, 64, 8, "bf16"),
    ("llama-tiny", 4, 128, 4, "fp32", 2, 8), ("qwen3-tiny", 4, 64, 4, "bf16", 4, 4),
    ("olmo2-tiny", 4, 128, 4, "fp32"), ("olmoe-tiny", 4, 128, 4, "fp32"),
    ("qwen2_moe-tiny", 4, 128, 4, "fp32"),
]
