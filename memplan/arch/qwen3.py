"""Qwen3 (transformers ``Qwen3Config``, ``Qwen3ForCausalLM``): Llama with q/k norms.

Differences from Llama: ``Qwen3Attention`` normalises each head of q and k with an RMSNorm
over head_dim (``q_norm``, ``k_norm``: weights of head_dim, fp32 inside) after the projection
and before rotary; o_proj follows ``attention_bias`` like q, k and v.

Config defaults (``Qwen3Config``): ``head_dim`` 128 (not hidden // heads),
``num_key_value_heads`` 32, ``attention_bias`` false, ``tie_word_embeddings`` false,
``max_position_embeddings`` 32768, ``attention_dropout`` 0.0; no MLP bias. Sliding windows
are off (``use_sliding_window`` false).
"""

from __future__ import annotations

from typing import Any

from memplan import ops
from memplan.arch import parts
from memplan.arch.base import Job, Weight, norm_weights
from memplan.arch.keys import Keys
from memplan.arch.llama import Llama
from memplan.autograd import Sym, Tape
from memplan.spec import LoraSpec, ModelSpec

QWEN3_HEAD_DIM = 128  # Qwen3Config.head_dim


class Qwen3(Llama):
    family = "qwen3"
    model_types = ("qwen3",)
    reference_model = False
    source = "transformers Qwen3ForCausalLM"
    default_positions = 32768

    def dims(self, keys: Keys) -> dict[str, int]:
        if not keys.has("head_dim"):
            keys = Keys(keys.cfg | {"head_dim": QWEN3_HEAD_DIM}, keys.where)
        return super().dims(keys)

    def biases(self, keys: Keys) -> tuple[bool, bool, bool]:
        bias = keys.bool("attention_bias", False)
        return bias, bias, False

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        cfg = super().to_hf(spec)
        del cfg["mlp_bias"]
        return cfg | {"model_type": "qwen3"}

    def block_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        qk = norm_weights("self_attn.q_norm", spec.head_dim, False) + \
            norm_weights("self_attn.k_norm", spec.head_dim, False)
        return super().block_weights(spec) + qk

    def qk_norm(self, tape: Tape, job: Job) -> Any:
        """``q_norm(q.view(B, T, heads, head_dim))``: RMSNorm over each head's head_dim."""
        hd = job.spec.head_dim

        def norm(t: Sym, which: str) -> Sym:
            return ops.rmsnorm(tape, t, t.numel // hd, hd, job.full)
        return norm

    def block(self, tape: Tape, job: Job, x: Sym, rope: list[Sym], layer: int) -> Sym:
        spec = job.spec
        linear = parts.block_linear(tape, job, self.linears(spec))
        y = self.norm(tape, job, x)
        o = parts.qkvo_attention(tape, job, y, linear, rope, self.qk_norm(tape, job))
        x2 = parts.residual(tape, x, o)
        y2 = self.norm(tape, job, x2)
        dn = parts.gated_mlp(tape, y2, linear)
        tape.free(y2)
        out = parts.residual(tape, x2, dn)
        tape.free(x2)
        return out


PROFILES = (Qwen3(),)

_PEFT = {"impl": "hf", "lora_backend": "peft"}
HF_FAKE_ROWS = [
    ("qwen3-8b", dict(regime="full", batch=1, seq=512, impl="hf"), {"num_layers": 4}),
    ("qwen3-8b", dict(regime="lora-bf16", batch=2, seq=1024) | _PEFT, {}),
    ("qwen3-8b", dict(regime="lora-bf16", batch=2, seq=2048, checkpointing=True) | _PEFT, {}),
    ("qwen3-0.6b", dict(regime="lora", batch=2, seq=512, attention="eager") | _PEFT, {}),
]
HF_CPU_ROWS = [
    ("qwen3-tiny", dict(regime="full", batch=2, seq=128, impl="hf"), {}),
    ("qwen3-tiny", dict(regime="lora", batch=2, seq=128, lora=LoraSpec(rank=8)) | _PEFT, {}),
]
