"""Mixtral (transformers ``MixtralConfig``, ``MixtralForCausalLM``): Mistral with a routed MLP.

Differences from Llama (shared MoE parts in :mod:`memplan.arch.moe`): the MLP is
``MixtralSparseMoeBlock``: ``MixtralTopKRouter`` (``mlp.gate.weight`` (E, h); logits
``.float()``, softmax, top-k, ALWAYS renormalised; the routing weights stay fp32, so in bf16
the weighted (S, h) pairs and their sum are fp32 and cast back once) and ``MixtralExperts``
(``gate_up_proj`` (E, 2I, h), ``down_proj`` (E, h, I), I = ``intermediate_size`` per expert).
No biases anywhere; every layer is sparse; no shared expert.

Config defaults (``MixtralConfig``): ``vocab_size`` 32000, ``hidden_size`` 4096,
``intermediate_size`` 14336, ``num_hidden_layers`` 32, ``num_attention_heads`` 32,
``num_local_experts`` 8 (``num_experts`` is an alias),
``num_experts_per_tok`` 2, ``num_key_value_heads`` 8, ``head_dim`` hidden // heads,
``hidden_act`` silu, ``max_position_embeddings`` 131072 (4096 * 32), ``tie_word_embeddings``
false, ``attention_dropout`` 0.0, ``sliding_window`` null (one causal mask either way),
``output_router_logits`` false, ``router_jitter_noise`` 0.0. There is no ``norm_topk_prob`` key.

PEFT all-linear: q, k, v, o; the router and both expert stacks (v4 names ``gate``, ``w1`` +
``w3`` fused into gate_up at rank 2r, ``w2``).
"""

from __future__ import annotations

from typing import Any

from memplan.arch.keys import Keys
from memplan.arch.moe import MoE
from memplan.errors import ConfigError
from memplan.spec import LoraSpec, ModelSpec


class Mixtral(MoE):
    family = "mixtral"
    model_types = ("mixtral",)
    source = "transformers MixtralForCausalLM"
    default_positions = 4096 * 32
    default_experts, default_top_k = 8, 2
    experts_key = "num_local_experts"
    renormalise = True
    fp32_routing = True
    v4_names = {"mlp.experts.gate_up_proj": ("mlp.experts.w1", "mlp.experts.w3"),
                "mlp.experts.down_proj": ("mlp.experts.w2",)}
    defaults = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}

    def biases(self, keys: Keys) -> tuple[bool, bool, bool]:
        return False, False, False

    def read_extras(self, keys: Keys) -> tuple[tuple[str, Any], ...]:
        keys = self.with_alias(keys, "num_experts")
        if keys.cfg.get("router_jitter_noise"):
            raise ConfigError(f"{keys.where}: router_jitter_noise "
                              f"{keys.cfg['router_jitter_noise']!r} multiplies the hidden states "
                              "in place in training, which memplan does not plan; set it 0")
        moe = self.read_moe(keys, keys.int("intermediate_size"))
        return tuple(sorted(moe.items()))

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        cfg = super().to_hf(spec)
        del cfg["attention_bias"], cfg["mlp_bias"]
        return cfg | self.moe_to_hf(spec) | {"model_type": "mixtral"}


PROFILES = (Mixtral(),)

_PEFT = {"impl": "hf", "lora_backend": "peft"}
_L2 = {"num_layers": 2}
HF_FAKE_ROWS = [
    ("mixtral-tiny", dict(regime="full", batch=4, seq=512, impl="hf"), {}),
    ("mixtral-8x7b", dict(regime="full", batch=1, seq=256, impl="hf"), _L2),
    ("mixtral-8x7b", dict(regime="lora-bf16", batch=1, seq=512) | _PEFT, _L2),
    ("mixtral-8x7b", dict(regime="lora-bf16", batch=2, seq=1024, checkpointing=True) | _PEFT,
     _L2),
    ("mixtral-8x7b", dict(regime="lora-bf16", batch=1, seq=512,
                          lora=LoraSpec(targets="attention")) | _PEFT, _L2),
    ("mixtral-tiny", dict(regime="lora", batch=2, seq=256, attention="eager") | _PEFT, {}),
]
HF_CPU_ROWS = [
    ("mixtral-tiny", dict(regime="full", batch=2, seq=128, impl="hf"), {}),
    ("mixtral-tiny", dict(regime="lora", batch=2, seq=128, lora=LoraSpec(rank=4)) | _PEFT, {}),
]
