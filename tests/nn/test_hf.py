"""Hugging Face models: built from configs, wrapped by memplan's LoRA and by PEFT, planned.

Skipped without the [hf] extra (transformers and peft).
"""

import dataclasses

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from memplan.config import hf_config, spec_from_config  # noqa: E402
from memplan.errors import MemplanError  # noqa: E402
from memplan.nn.hf import apply_peft_lora, build_hf_model  # noqa: E402
from memplan.nn.lora import apply_lora  # noqa: E402
from memplan.nn.models import spec_from_module  # noqa: E402
from memplan.params import count_params, lora_params  # noqa: E402
from memplan.planner import plan  # noqa: E402
from memplan.presets import get_model  # noqa: E402
from memplan.profile.matrix import QWEN_LIKE  # noqa: E402
from memplan.profile.step import measure  # noqa: E402
from memplan.spec import LoraSpec, TrainSpec  # noqa: E402

QWEN = dataclasses.replace(get_model("llama-tiny"), **QWEN_LIKE, name="qwen-tiny")
SPECS = [get_model("llama-tiny"), get_model("gpt2-tiny"), QWEN]


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_hf_model_has_the_planned_parameter_count(spec) -> None:
    model = build_hf_model(spec)
    assert sum(p.numel() for p in model.parameters()) == count_params(spec)
    assert spec_from_config(hf_config(spec)).hidden_size == spec.hidden_size
    assert spec_from_module(model.hf).num_layers == spec.num_layers


@pytest.mark.parametrize("targets", ["all", "attention", "mlp"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_peft_and_memplan_lora_train_what_the_planner_counts(spec, targets) -> None:
    lora = LoraSpec(rank=4, targets=targets)
    peft_model = build_hf_model(spec)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    apply_peft_lora(peft_model, lora)
    assert trainable(peft_model) == lora_params(spec, lora)
    if spec.family != "gpt2":  # transformers' GPT-2 uses Conv1D, which only PEFT wraps
        ours = build_hf_model(spec)
        apply_lora(ours, 4, 16.0, targets)
        assert trainable(ours) == trainable(peft_model)


def test_memplan_lora_on_hf_gpt2_is_refused_clearly() -> None:
    with pytest.raises(MemplanError, match="lora-backend peft"):
        plan(get_model("gpt2-tiny"), TrainSpec(regime="lora", impl="hf", batch=1, seq=8))


def test_peft_needs_a_hugging_face_model() -> None:
    with pytest.raises(MemplanError, match="--impl hf"):
        plan(get_model("llama-tiny"), TrainSpec(regime="lora", lora_backend="peft"))


ROWS = [
    (get_model("llama-tiny"), dict(regime="lora", batch=2, seq=64, lora_backend="peft")),
    (get_model("llama-tiny"), dict(regime="lora-bf16", batch=2, seq=64, lora_backend="peft")),
    (get_model("gpt2-tiny"), dict(regime="full", batch=2, seq=64)),
    (get_model("gpt2-tiny"), dict(regime="lora", batch=2, seq=64, lora_backend="peft",
                                  attention="eager")),
    (QWEN, dict(regime="lora", batch=2, seq=64, checkpointing=True)),
]


@pytest.mark.parametrize(("spec", "job"), ROWS, ids=[f"{s.name}-{j['regime']}" for s, j in ROWS])
def test_hf_plan_matches_cpu_measurement(spec, job) -> None:
    spec = dataclasses.replace(spec, dropout=0.0)
    train = TrainSpec(impl="hf", **job)
    planned = plan(spec, train, runtime="cpu")
    measured = measure(spec, train, device="cpu", steps=1)
    assert abs(planned.total_bytes - measured.peak_bytes) <= 0.01 * measured.peak_bytes


def test_hf_gelu_new_keeps_more_than_fused_gelu() -> None:
    """Hugging Face's GPT-2 activation is a chain of ops: the plan says so."""
    spec = get_model("gpt2-tiny")
    ours = plan(spec, TrainSpec(regime="full", batch=2, seq=256))
    theirs = plan(spec, TrainSpec(regime="full", batch=2, seq=256, impl="hf"))
    assert theirs.phases["forward"]["activations"] > ours.phases["forward"]["activations"]
