"""The architecture assumed for a bare parameter count (``memplan estimate --params 7e9``).

From 3e9 parameters up, the Llama-2 preset nearest by parameter count (7B, 13B or 70B): 7e9
means llama-2-7b's shape. Below that, a documented scaling of the Llama-2 family: head_dim
128, vocabulary 32,000, as many layers as heads (llama-2-7b: 32 and 32), SwiGLU width
``11008/4096 · h`` rounded to a multiple of 256, and the hidden size h (a multiple of 128)
whose parameter count is nearest to the one asked. N itself always stays what the user gave.
"""

from __future__ import annotations

from dataclasses import replace

from memplan.params import count_params
from memplan.presets import get_model
from memplan.spec import ModelSpec

LLAMA2 = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
SCALING_FLOOR = 3e9


def _scaled(hidden: int) -> ModelSpec:
    base = get_model("llama-2-7b")
    heads = hidden // 128
    inter = max(256, round(hidden * 11008 / 4096 / 256) * 256)
    return replace(base, name=f"llama-2-style-h{hidden}", hidden_size=hidden, num_layers=heads,
                   num_heads=heads, num_kv_heads=heads, intermediate_size=inter)


def shape_for_params(n: int) -> tuple[ModelSpec, str]:
    """The assumed architecture for ``n`` parameters, and a sentence saying which it is."""
    if n >= SCALING_FLOOR:
        name = min(LLAMA2, key=lambda p: abs(count_params(get_model(p)) - n))
        return get_model(name), f"the shape of {name}, the Llama-2 preset nearest to N"
    best = min((_scaled(128 * k) for k in range(1, 33)),
               key=lambda s: abs(count_params(s) - n))
    return best, (f"a Llama-2-style shape scaled down to N (hidden {best.hidden_size}, "
                  f"{best.num_layers} layers, {count_params(best):,} parameters as built)")
