"""Mistral (transformers ``MistralConfig``): Llama's layout without any bias.

Differences from Llama's config: no ``attention_bias`` or ``mlp_bias`` keys (never biased),
``max_position_embeddings`` 131072 (4096 * 32), ``num_key_value_heads`` 8 by default; the
sliding window is a mask choice that sdpa's and eager's memory do not depend on below it.
"""

from __future__ import annotations

from typing import Any

from memplan.arch.keys import Keys
from memplan.arch.llama import Llama
from memplan.spec import ModelSpec


class Mistral(Llama):
    model_types = ("mistral",)
    source = "transformers MistralForCausalLM"
    default_positions = 4096 * 32

    def biases(self, keys: Keys) -> tuple[bool, bool, bool]:
        return False, False, False

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        cfg = super().to_hf(spec)
        del cfg["attention_bias"], cfg["mlp_bias"]
        return cfg | {"model_type": "mistral"}


PROFILES = (Mistral(),)
