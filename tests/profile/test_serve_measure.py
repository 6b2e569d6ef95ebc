"""The plan of Hugging Face's DynamicCache loop (memplan.serve.plan_hf_inference) against the
measurement (memplan.profile.serve_measure): prefill, then decode steps, peak bytes."""

from __future__ import annotations

import pytest

from memplan.presets import get_model
from memplan.serve import plan_hf_inference

pytest.importorskip("transformers")

FAMILIES = ["llama-tiny", "qwen3-tiny", "phi3-tiny", "gpt_neox-tiny", "gpt2-tiny",
            "gemma2-tiny", "mixtral-tiny"]


@pytest.mark.parametrize("model", FAMILIES)
def test_prefill_peak_on_cpu(model: str) -> None:
    """Prefill-dominated: the peak is the last layers' activations over the cache."""
    from memplan.profile.serve_measure import measure_inference

    spec = get_model(model)
    plan = plan_hf_inference(spec, 4, 64, 2, "fp32", "cpu")
    got = measure_inference(spec, 4, 64, 2, "fp32", "cpu")
    assert got.cache_bytes == plan.cache_bytes == \
        2 * spec.num_layers * 4 * 66 * spec.num_kv_heads * spec.head_dim * 4
    assert plan.prefill_peak_bytes > plan.decode_peak_bytes
    assert abs(plan.peak_bytes - got.peak_bytes) <= 2e-3 * got.peak_bytes


@pytest.mark.parametrize("model", ["llama-tiny", "gemma2-tiny", "gpt2-tiny"])
def test_decode_peak_on_cpu(model: str) -> None:
    """Decode-dominated (a short prompt, many steps): the cache's torch.cat copies and, for
    eager attention (Gemma 2), scores and masks over every cached key."""
    from memplan.profile.serve_measure import measure_inference

    spec = get_model(model)
    plan = plan_hf_inference(spec, 2, 2, 8, "fp32", "cpu")
    got = measure_inference(spec, 2, 2, 8, "fp32", "cpu")
    assert plan.decode_peak_bytes > plan.prefill_peak_bytes
    assert abs(plan.peak_bytes - got.peak_bytes) <= 2e-4 * got.peak_bytes


def test_fake_mode_bf16() -> None:
    from memplan.profile.serve_measure import measure_inference

    spec = get_model("llama-tiny")
    plan = plan_hf_inference(spec, 2, 16, 2, "bf16", "fake")
    got = measure_inference(spec, 2, 16, 2, "bf16", "fake")
    assert got.cache_bytes == plan.cache_bytes
    assert abs(plan.peak_bytes - got.peak_bytes) <= 1e-3 * got.peak_bytes


def _gap(model: str, batch: int, prompt: int, steps: int, dtype: str, device: str,
         adapters: int = 0, rank: int = 0):
    from memplan.profile.serve_measure import measure_inference

    spec = get_model(model)
    plan = plan_hf_inference(spec, batch, prompt, steps, dtype, device, adapters, rank)
    got = measure_inference(spec, batch, prompt, steps, dtype, device, adapters=adapters,
                            rank=rank)
    return plan, got


@pytest.mark.parametrize(("model", "batch", "prompt", "steps", "dtype", "device", "k", "r"), [
    ("llama-tiny", 4, 32, 2, "fp32", "cpu", 2, 4),     # prefill-dominated, peak in a LoRA layer
    ("qwen3-tiny", 4, 16, 2, "bf16", "cpu", 4, 8),
    ("llama-tiny", 4, 2, 8, "fp32", "cpu", 4, 8),      # decode-dominated
    ("llama-tiny", 4, 16, 2, "bf16", "fake", 2, 16),
])
def test_mixed_adapter_batch(model: str, batch: int, prompt: int, steps: int, dtype: str,
                             device: str, k: int, r: int) -> None:
    """K resident PEFT adapters and a mixed-adapter batch (adapter_names=): the plan moves by
    exactly what the measurement moves (the base loop's few-byte gap stays as it was); where
    the peak falls in a LoRA layer, the move is more than the adapters' weights (the sub-batch
    gathers and the adapters' outputs are counted)."""
    from memplan import params as P
    from memplan.spec import LoraSpec

    base_plan, base_got = _gap(model, batch, prompt, steps, dtype, device)
    plan, got = _gap(model, batch, prompt, steps, dtype, device, k, r)
    itemsize = 4 if dtype == "fp32" else 2
    adapter = P.lora_params(get_model(model), LoraSpec(rank=r)) * itemsize
    assert plan.weights_bytes - base_plan.weights_bytes == k * adapter
    assert got.cache_bytes == plan.cache_bytes == base_got.cache_bytes
    assert plan.peak_bytes - got.peak_bytes == base_plan.peak_bytes - base_got.peak_bytes
    if (model, prompt, k) == ("llama-tiny", 32, 2):
        assert got.peak_bytes - base_got.peak_bytes > k * adapter


def test_mixed_adapter_batch_bad_input() -> None:
    from memplan.errors import MemplanError

    spec = get_model("llama-tiny")
    with pytest.raises(MemplanError, match="use 2 or more"):
        plan_hf_inference(spec, 4, 16, 1, "fp32", "cpu", 1, 8)
    with pytest.raises(MemplanError, match="multiple of 3"):
        plan_hf_inference(spec, 4, 16, 1, "fp32", "cpu", 3, 8)
