"""Qwen2 (transformers ``Qwen2Config``): Llama's layout with q, k and v biased, o not.

``Qwen2Attention`` builds q_proj, k_proj and v_proj with ``bias=True`` and o_proj with
``bias=False`` whatever the config says; ``tie_word_embeddings`` defaults to false,
``max_position_embeddings`` to 32768.
"""

from __future__ import annotations

from typing import Any

from memplan.arch.keys import Keys
from memplan.arch.llama import Llama
from memplan.spec import ModelSpec


class Qwen2(Llama):
    model_types = ("qwen2",)
    source = "transformers Qwen2ForCausalLM"
    default_positions = 32768

    def biases(self, keys: Keys) -> tuple[bool, bool, bool]:
        return True, False, False

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        cfg = super().to_hf(spec)
        del cfg["attention_bias"], cfg["mlp_bias"]
        return cfg | {"model_type": "qwen2"}


PROFILES = (Qwen2(),)
