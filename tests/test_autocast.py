"""torch.autocast (and pure 16-bit full training) planned term by term, against the profiler.

The planner follows how autocast stores tensors (:class:`memplan.ops.Autocast`): cached casts
of trainable fp32 leaves, per-use casts of frozen weights and of activations, lower-precision
outputs of matmuls and attention, fp32 everywhere else; these tests measure the same steps
(:func:`memplan.profile.step.measure`, CPU and FakeTensorMode) and check the plans.
"""

from __future__ import annotations

import pytest

from memplan import arch, ops
from memplan.autograd import FP32, Tape
from memplan.planner import plan
from memplan.presets import get_model
from memplan.profile.step import measure
from memplan.spec import TrainSpec

HF = {"impl": "hf"}
PEFT = {"impl": "hf", "lora_backend": "peft"}

# (model, TrainSpec fields, device, bytes the plan may differ by): the slack is what the same
# job without autocast differs by already (a few scalars; GPT-2 full fine-tuning's backward
# peak, 131 064 B over, a separate offset), so autocast's own terms are exact.
ROWS = [
    ("llama-tiny", dict(regime="full", autocast="bf16"), "cpu", 8),
    ("llama-tiny", dict(regime="lora", autocast="bf16"), "fake", 8),
    ("llama-tiny", dict(regime="lora-bf16", autocast="bf16"), "fake", 24),
    ("llama-tiny", dict(regime="full", autocast="fp16"), "fake", 8),
    ("llama-tiny", dict(regime="full", autocast="bf16", attention="eager"), "fake", 8),
    ("llama-tiny", dict(regime="prompt-tuning", autocast="bf16"), "fake", 8),
    ("llama-tiny", dict(regime="lora", autocast="bf16", checkpointing=True), "fake", 8),
    ("llama-tiny", dict(regime="full", dtype="bf16"), "fake", 24),
    ("gpt2-tiny", dict(regime="lora", autocast="bf16"), "cpu", 8),
    ("gpt2-tiny", dict(regime="full", autocast="bf16"), "fake", 131_064),
    ("gpt2-tiny", dict(regime="bitfit", autocast="bf16"), "fake", 8),
    ("gpt2-tiny", dict(regime="lora", autocast="fp16"), "fake", 8),
    ("llama-tiny", dict(regime="full", autocast="bf16") | HF, "fake", 72),
    ("llama-tiny", dict(regime="lora", autocast="bf16") | PEFT, "fake", 72),
    ("llama-tiny", dict(regime="lora-bf16", autocast="bf16") | PEFT, "fake", 8),
    ("gpt2-tiny", dict(regime="lora", autocast="bf16") | PEFT, "fake", 8),
]


@pytest.mark.parametrize("model,fields,device,slack", ROWS,
                         ids=[f"{m}-{'-'.join(str(v) for v in f.values())}-{d}"
                              for m, f, d, _ in ROWS])
def test_plan_matches_measurement(model: str, fields: dict, device: str, slack: int) -> None:
    spec = get_model(model)
    train = TrainSpec(batch=2, seq=32, **fields)
    planned = plan(spec, train, runtime=device).total_bytes
    measured = measure(spec, train, device=device, steps=1).peak_bytes
    assert abs(planned - measured) <= 0.01 * measured
    assert abs(planned - measured) <= slack, (planned, measured)


def _cache_bytes(monkeypatch: pytest.MonkeyPatch, model: str, regime: str) -> int:
    """What the cast cache holds when autocast exits, planning ``regime`` under bf16."""
    seen: list[int] = []
    real = ops.Autocast.exit

    def exit_(self: ops.Autocast, tape: Tape) -> None:
        seen.append(sum(t.nbytes for t in self.cache))
        real(self, tape)
    monkeypatch.setattr(ops.Autocast, "exit", exit_)
    plan(get_model(model), TrainSpec(regime=regime, batch=2, seq=32, autocast="bf16",
                                     loop="trainer"), runtime="cpu")
    return seen[0]


def test_cast_cache_is_one_bf16_copy_of_every_trainable_matmul_weight(monkeypatch) -> None:
    """Full fine-tuning: 2·Σ numel of every block linear (biases included) and of the head;
    GPT-2's tied head reads the embedding's one copy (the embedding itself casts nothing)."""
    for model in ("llama-tiny", "gpt2-tiny"):
        spec = get_model(model)
        block = sum(layer.params for layer in arch.profile_of(spec).linears(spec))
        expected = 2 * (spec.num_layers * block + spec.vocab_size * spec.hidden_size)
        assert _cache_bytes(monkeypatch, model, "full") == expected


def test_lora_caches_only_the_adapters(monkeypatch) -> None:
    """LoRA on an fp32 base: the frozen weights are cast per use, never cached. A and B are,
    where the input is fp32 (q, k, v, gate, up read the norms' output); o_proj and down_proj
    read bf16 (attention's, the SwiGLU product), so memplan's LoRALinear casts A and B itself,
    per forward, outside the cache."""
    spec = get_model("llama-tiny")
    rank = TrainSpec(regime="lora").lora.rank
    adapters = sum(rank * (layer.in_features + layer.out_features)
                   for layer in arch.profile_of(spec).linears(spec)
                   if layer.short_name not in ("o_proj", "down_proj"))
    assert _cache_bytes(monkeypatch, "llama-tiny", "lora") == 2 * spec.num_layers * adapters


def test_frozen_weight_copy_is_saved_iff_the_input_requires_grad() -> None:
    for rg in (False, True):
        tape, ac = Tape(), ops.Autocast(2)
        x = tape.alloc(tape.new(8 * 16, FP32, rg))
        ops.linear(tape, x, 32, 8, w_rg=False, ac=ac, weight_itemsize=FP32)
        ac.exit(tape)
        assert tape._kept == (2 * 16 * 32 if rg else 0)  # the bf16 copy of W (16 × 32)
        assert not ac.cache


def test_trainable_weight_copy_outlives_autocast_only_if_saved() -> None:
    """A trainable weight's cached copy is saved iff the input requires grad; either way the
    cache holds it until autocast exits. The input's bf16 copy is saved (for grad_W)."""
    for rg in (False, True):
        tape, ac = Tape(), ops.Autocast(2)
        x = tape.alloc(tape.new(8 * 16, FP32, rg))
        out = ops.linear(tape, x, 32, 8, w_rg=True, ac=ac, weight_itemsize=FP32)
        assert out.itemsize == 2
        assert len(ac.cache) == 1 and ac.cache[0].storage in tape.live
        ac.exit(tape)
        assert tape._kept == 2 * 8 * 16 + (2 * 16 * 32 if rg else 0)


def test_autocast_none_plans_unchanged_and_sixteen_bit_weights_cast_nothing() -> None:
    """lora-bf16 under autocast bf16: memplan's LoRALinear casts A and B itself, so autocast
    changes nothing (measured); an fp32 base's LoRA saves the frozen weights' copies."""
    spec = get_model("llama-tiny")

    def total(**fields) -> int:
        return plan(spec, TrainSpec(batch=2, seq=32, **fields), runtime="cpu").total_bytes

    assert total(regime="lora-bf16", autocast="bf16") == total(regime="lora-bf16")
    assert total(regime="lora", autocast="bf16") > total(regime="lora")


def test_cuda_upcasts_layer_norm_of_a_sixteen_bit_base() -> None:
    """CUDA's autocast runs layer_norm in fp32 (its fp32 list; the CPU's lacks it): a bf16
    GPT-2 base's norms copy their input up. Llama's RMSNorm upcasts explicitly: no change."""
    def total(model: str, runtime: str) -> int:
        train = TrainSpec(regime="lora-bf16", batch=2, seq=32, autocast="bf16")
        return plan(get_model(model), train, runtime=runtime).total_bytes

    assert total("gpt2-tiny", "cuda") > total("gpt2-tiny", "cpu")
    assert total("llama-tiny", "cuda") == total("llama-tiny", "cpu")
