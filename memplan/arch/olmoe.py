"""OLMoE (transformers ``OlmoeConfig``, ``OlmoeForCausalLM``): Llama with q/k norms and a routed
MLP.

Differences from Llama (shared MoE parts in :mod:`memplan.arch.moe`): ``OlmoeAttention``
normalises q and k with an RMSNorm over the whole projection width (``q_norm`` (heads·head_dim),
``k_norm`` (kv_heads·head_dim), fp32 inside) before the head split and rotary;
``attention_bias`` covers q, k, v and o. The MLP is ``OlmoeSparseMoeBlock``: the router
(softmax in fp32, top-k, renormalised only with ``norm_topk_prob``, weights cast back to the
compute dtype) and ``OlmoeExperts`` (``intermediate_size`` per expert); no shared expert.

Config defaults (``OlmoeConfig``): ``vocab_size`` 50304, ``hidden_size`` 2048,
``num_hidden_layers`` 16, ``num_attention_heads`` 16, ``num_experts`` 64
(``num_local_experts`` is an alias), ``num_experts_per_tok`` 8, ``intermediate_size`` 2048,
``norm_topk_prob`` false,
``num_key_value_heads`` = heads, ``attention_bias`` false, ``clip_qkv`` null (a value clamps
q, k and v in place: refused), ``max_position_embeddings`` 4096, ``tie_word_embeddings`` false,
``attention_dropout`` 0.0, ``output_router_logits`` false.

PEFT all-linear: PEFT converts olmoe with qwen2_moe's v4 names: q, k, v, o, the router
(``gate``) and both expert stacks (``gate_proj`` + ``up_proj`` fused into gate_up at rank 2r,
``down_proj``).
"""

from __future__ import annotations

from typing import Any

from memplan import ops
from memplan.arch.base import Job, Weight, linear_weights
from memplan.arch.keys import Keys
from memplan.arch.moe import MoE
from memplan.autograd import Sym, Tape
from memplan.errors import ConfigError
from memplan.spec import LoraSpec, ModelSpec


class Olmoe(MoE):
    family = "olmoe"
    model_types = ("olmoe",)
    source = "transformers OlmoeForCausalLM"
    default_positions = 4096
    default_experts, default_top_k = 64, 8
    v4_names = {"mlp.experts.gate_up_proj": ("mlp.experts.gate_proj", "mlp.experts.up_proj")}
    defaults = {"vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048,
                "num_hidden_layers": 16, "num_attention_heads": 16}


    def read_extras(self, keys: Keys) -> tuple[tuple[str, Any], ...]:
        keys = self.with_alias(keys, "num_local_experts")
        if keys.has("clip_qkv"):
            raise ConfigError(f"{keys.where}: clip_qkv {keys.cfg['clip_qkv']!r} clamps q, k and "
                              "v in place, which memplan does not plan; set it null")
        return tuple(sorted(self.read_moe(keys, keys.int("intermediate_size")).items()))

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        cfg = super().to_hf(spec)
        del cfg["mlp_bias"]
        return cfg | self.moe_to_hf(spec) | {"model_type": "olmoe",
                                             "norm_topk_prob": spec.extra("norm_topk_prob")}

    def block_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        norms = tuple(Weight(f"{n}.weight", (spec.hidden_size,), "norm")
                      for n in self.norm_names())
        attn = tuple(w for lin in self.attention_linears(spec) for w in linear_weights(lin))
        qk = (Weight("self_attn.q_norm.weight", (spec.q_dim,), "norm"),
              Weight("self_attn.k_norm.weight", (spec.kv_dim,), "norm"))
        return (*attn, *qk, *self.expert_weights(spec), *norms)

    def qk_norm(self, tape: Tape, job: Job) -> Any:
        """``q_norm(q_proj(x))``: RMSNorm over the whole projection width."""
        def norm(t: Sym, which: str) -> Sym:
            return ops.rmsnorm(tape, t, job.tokens, t.numel // job.tokens, job.full)
        return norm


PROFILES = (Olmoe(),)

_PEFT = {"impl": "hf", "lora_backend": "peft"}
HF_FAKE_ROWS = [
    ("olmoe-tiny", dict(regime="full", batch=4, seq=512, impl="hf"), {}),
    ("olmoe-1b-7b", dict(regime="full", batch=1, seq=256, impl="hf"), {"num_layers": 2}),
    ("olmoe-1b-7b", dict(regime="lora-bf16", batch=2, seq=1024) | _PEFT, {}),
    ("olmoe-1b-7b", dict(regime="lora-bf16", batch=2, seq=1024, checkpointing=True) | _PEFT,
     {"num_layers": 4}),
    ("olmoe-tiny", dict(regime="lora", batch=2, seq=256, attention="eager") | _PEFT, {}),
]
HF_CPU_ROWS = [
    ("olmoe-tiny", dict(regime="full", batch=2, seq=128, impl="hf"), {}),
    ("olmoe-tiny", dict(regime="lora", batch=2, seq=128, lora=LoraSpec(rank=4)) | _PEFT, {}),
]
