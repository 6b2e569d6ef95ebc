"""What other tools estimate for the same job, computed by their own code, for the reports.

Accelerate (``accelerate estimate-memory``): the model's parameter bytes from
``accelerate.utils.calculate_maximum_sizes`` on the same Hugging Face model (built from the
same config on the meta device), and its training figure ``max(estimate_training_usage(...))``
(4× the fp32 model size for float32 training; for bf16 mixed precision, the optimizer's 2×
fp32 size plus 1.5× for gradients). It knows no batch, sequence, LoRA or checkpointing.
"""

from __future__ import annotations

from memplan.spec import ModelSpec, TrainSpec


def accelerate_training_bytes(spec: ModelSpec, train: TrainSpec) -> int | None:
    """Accelerate's "Training using Adam" figure for this model, or None without accelerate."""
    try:
        from accelerate.commands.estimate import estimate_training_usage
        from accelerate.utils import calculate_maximum_sizes
    except ImportError:
        return None
    from memplan.nn.hf import build_hf_model

    model = build_hf_model(spec, device="meta")
    total, _ = calculate_maximum_sizes(model.hf)
    precision = "bfloat16" if train.recipe.notes_mixed or train.recipe.dtype == "bf16" \
        else "float32"
    return int(max(estimate_training_usage(total, precision).values()))
