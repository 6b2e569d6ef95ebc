"""Qwen2-MoE (transformers ``Qwen2MoeConfig``, ``Qwen2MoeForCausalLM``): Qwen2 with a routed MLP
and a gated shared expert.

Differences from Llama (shared MoE parts in :mod:`memplan.arch.moe`): q, k and v biased
(``qkv_bias``), o not. The MLP is ``Qwen2MoeSparseMoeBlock``, in this order: the shared expert
(a SwiGLU of width ``shared_expert_intermediate_size``), the router (softmax in fp32, top-k,
renormalised only with ``norm_topk_prob``, weights cast back to the compute dtype), the experts
(``moe_intermediate_size`` each), then ``sigmoid(shared_expert_gate(x)) * shared`` added to the
experts' output. ``Qwen2MoeModel`` always builds both the causal and the sliding-window mask and
holds them for the whole forward; with ``use_sliding_window`` false the sliding one is a
(B, 1, s, s) mask that no layer reads (bool for sdpa, the float dtype for eager).

Config defaults (``Qwen2MoeConfig``): ``vocab_size`` 151936, ``hidden_size`` 2048,
``num_hidden_layers`` 24, ``num_attention_heads`` 16, ``num_experts`` 60, ``num_experts_per_tok`` 4,
``moe_intermediate_size`` 1408, ``shared_expert_intermediate_size`` 5632,
``intermediate_size`` 5632 (dense layers only), ``norm_topk_prob`` false,
``decoder_sparse_step`` 1, ``mlp_only_layers`` [] (every layer sparse: memplan plans models
whose blocks are all alike, and refuses dense layers), ``qkv_bias`` true,
``num_key_value_heads`` = heads, ``max_position_embeddings`` 32768, ``tie_word_embeddings``
false, ``attention_dropout`` 0.0, ``output_router_logits`` false.

PEFT all-linear: PEFT has no v4→v5 conversion for qwen2_moe (it is no key of
``_MODEL_TO_CONVERSION_PATTERN``), so it wraps q, k, v, o, the shared expert's three linears and
``shared_expert_gate`` (h → 1); the router and the expert stacks stay untouched.
"""

from __future__ import annotations

from typing import Any

from memplan import ops
from memplan.arch import parts
from memplan.arch.base import Job, LinearShape, Weight, linear_weights
from memplan.arch.keys import Keys
from memplan.arch.moe import MoE, Stacked
from memplan.autograd import Sym, Tape
from memplan.errors import ConfigError
from memplan.spec import LoraSpec, ModelSpec


class Qwen2Moe(MoE):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    source = "transformers Qwen2MoeForCausalLM"
    default_positions = 32768
    default_experts, default_top_k = 60, 4
    peft_converts = False
    defaults = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
                "num_hidden_layers": 24, "num_attention_heads": 16}

    def biases(self, keys: Keys) -> tuple[bool, bool, bool]:
        return keys.bool("qkv_bias", True), False, False

    def read_extras(self, keys: Keys) -> tuple[tuple[str, Any], ...]:
        moe = self.read_moe(keys, keys.int("moe_intermediate_size", default=1408))
        step = keys.int("decoder_sparse_step", default=1)
        dense = keys.cfg.get("mlp_only_layers") or []
        if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
            raise ConfigError(f"{keys.where}: mlp_only_layers must be a list of layer indices, "
                              f"got {dense!r}"[:200])
        if step != 1 or dense:
            raise ConfigError(f"{keys.where}: decoder_sparse_step {step} and mlp_only_layers "
                              f"{dense} make some layers dense MLPs; memplan plans models whose "
                              "blocks are all alike (decoder_sparse_step 1, mlp_only_layers [])")
        moe |= {"shared_expert_intermediate_size":
                keys.int("shared_expert_intermediate_size", default=5632),
                "decoder_sparse_step": step, "mlp_only_layers": tuple(dense),
                "use_sliding_window": keys.bool("use_sliding_window", False)}
        return tuple(sorted(moe.items()))


    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        cfg = super().to_hf(spec)
        del cfg["attention_bias"], cfg["mlp_bias"]
        return cfg | self.moe_to_hf(spec) | {
            "model_type": "qwen2_moe", "qkv_bias": spec.qkv_bias,
            "moe_intermediate_size": spec.extra("moe_intermediate_size"),
            "shared_expert_intermediate_size": spec.extra("shared_expert_intermediate_size"),
            "norm_topk_prob": spec.extra("norm_topk_prob"),
            "decoder_sparse_step": spec.extra("decoder_sparse_step"),
            "mlp_only_layers": list(spec.extra("mlp_only_layers")),
            "use_sliding_window": spec.extra("use_sliding_window")}

    # ---- inventory ----------------------------------------------------------------------
    def shared_linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        h, i = spec.hidden_size, spec.extra("shared_expert_intermediate_size")
        return (LinearShape("mlp.shared_expert.gate_proj", "mlp", h, i, False),
                LinearShape("mlp.shared_expert.up_proj", "mlp", h, i, False),
                LinearShape("mlp.shared_expert.down_proj", "mlp", i, h, False),
                Stacked("mlp.shared_expert_gate", "mlp", h, 1, False))

    def mlp_linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        return super().mlp_linears(spec) + self.shared_linears(spec)

    def expert_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        return super().expert_weights(spec) + tuple(
            w for lin in self.shared_linears(spec) for w in linear_weights(lin))

    # ---- symbolic forward ---------------------------------------------------------------
    def hf_inputs(self, tape: Tape, job: Job, held: list[Sym]) -> None:
        """Llama's, and the sliding-window mask: held by the model's forward until it returns
        (after the final norm), but no block's argument (checkpoints do not keep it)."""
        super().hf_inputs(tape, job, held)
        itemsize = job.d if job.train.attention == "eager" else 1
        job.sliding_mask = tape.alloc(tape.new(job.b * job.s * job.s, itemsize, False))

    def final_norm(self, tape: Tape, job: Job, x: Sym) -> Sym:
        out = super().final_norm(tape, job, x)
        mask = getattr(job, "sliding_mask", None)  # set by hf_inputs (Hugging Face's code)
        if mask is not None:
            tape.free(mask)
            job.sliding_mask = None
        return out

    def moe_block(self, tape: Tape, job: Job, y: Sym, linear: parts.Linear) -> Sym:
        shared = parts.gated_mlp(tape, y, linear, "mlp.shared_expert")
        experts = self.experts(tape, job, y, *self.router(tape, job, y))
        g = linear(y, "mlp.shared_expert_gate")
        sig = tape.new(g.numel, g.itemsize, g.rg)
        tape.op(sig, [(g, g.nbytes)], [sig] if sig.rg else [])  # sigmoid keeps its output
        tape.free(g)
        gated = ops.mul(tape, sig, shared)
        tape.free(sig, shared)
        out = ops.add(tape, experts, gated)
        tape.free(experts, gated)
        return out


PROFILES = (Qwen2Moe(),)

_PEFT = {"impl": "hf", "lora_backend": "peft"}
HF_FAKE_ROWS = [
    ("qwen2_moe-tiny", dict(regime="full", batch=4, seq=512, impl="hf"), {}),
    ("qwen1.5-moe-a2.7b", dict(regime="full", batch=1, seq=256, impl="hf"), {"num_layers": 2}),
    ("qwen1.5-moe-a2.7b", dict(regime="lora-bf16", batch=2, seq=1024) | _PEFT, {}),
    ("qwen1.5-moe-a2.7b", dict(regime="lora-bf16", batch=2, seq=1024, checkpointing=True)
     | _PEFT, {"num_layers": 4}),
    ("qwen2_moe-tiny", dict(regime="lora", batch=2, seq=256, attention="eager") | _PEFT, {}),
]
HF_CPU_ROWS = [
    ("qwen2_moe-tiny", dict(regime="full", batch=2, seq=128, impl="hf"), {}),
    ("qwen2_moe-tiny", dict(regime="lora", batch=2, seq=128, lora=LoraSpec(rank=4)) | _PEFT,
     {}),
]
