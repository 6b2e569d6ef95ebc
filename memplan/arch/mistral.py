"""Mistral (transformers ``MistralConfig``): Llama's layout without any bias.

Differences from Llama's config: no ``attention_bias`` or ``mlp_bias`` keys (never biased),
``max_position_embeddings`` 131072 (4096 * 32), ``num_key_value_heads`` 8 by default;
``sliding_window`` 4096 by default (null: none), on every layer: a mask choice that training's
memory does not depend on below it, and the window a serving engine's KV cache keeps.
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

    def read_extras(self, keys: Keys) -> tuple[tuple[str, Any], ...]:
        window = keys.int("sliding_window", default=4096) if "sliding_window" not in keys.cfg \
            or keys.has("sliding_window") else None  # MistralConfig.sliding_window = 4096
        return (("sliding_window", window),)

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        cfg = super().to_hf(spec)
        del cfg["attention_bias"], cfg["mlp_bias"]
        return cfg | {"model_type": "mistral", "sliding_window": spec.extra("sliding_window")}

    def kv_windows(self, spec: ModelSpec) -> list[int | None]:
        """MistralAttention passes ``sliding_window`` to every layer."""
        return [spec.extra("sliding_window")] * spec.num_layers


PROFILES = (Mistral(),)
