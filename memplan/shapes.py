"""The architecture assumed for a bare parameter count (``memplan estimate --params 7e9``).

A Llama-2-style shape that follows N continuously, so that plans never jump from one preset's
shape to the next. Each size is a function of N, rounded as the Llama models round it:

* **hidden size h**: log h is linear in log N between the widths of real Llama models (the
  anchors, :data:`WIDTH_ANCHORS`: TinyLlama 1.1B at 2048, Llama 2 7B, 13B and 70B at 4096,
  5120 and 8192, Llama 3.1 405B at 16384), and continues each end's slope beyond them;
  rounded to the nearest multiple of 128, since the Llamas' head_dim is 128 (of 256 from
  :data:`GQA_FROM`, so that the heads group in at least pairs: Llama 2 70B's 8192, Llama 3.1
  405B's 16384). Small N also keeps the two embeddings (input and output, 2·V·h) to at most
  half of N, as real small models do (GPT-2 124M: 32%; Pythia-160M: 48%). At least 128.
* **heads** = h / 128 (head_dim 128). **KV heads**: all of them (multi-head attention) below
  :data:`GQA_FROM`, as Llama 2 7B and 13B; from there grouped-query attention with 8 KV heads,
  as Llama 2 34B and 70B (Touvron et al. 2023, "Llama 2", §2.2 and Table 1), or the largest
  divisor of the heads below 8 when 8 does not divide them (at least 2, since the
  heads are even there: a KV width of 256 or more).
* **intermediate size** (SwiGLU): Llama's own rule (``llama/model.py``, ``FeedForward``):
  ``int(2·4h/3)``, times ``ffn_dim_multiplier``, rounded up to ``multiple_of``. Multi-head
  models: multiplier 1, multiple of 256 (Llama 2 7B: 11008; 13B: 13824). Grouped-query models
  widen the MLP to make up for the smaller attention (Llama 2 paper, §A.2.1): multiplier 1.3,
  multiple of 1024 (Llama 2 70B and Llama 3 8B/70B: 28672 at h = 8192; 14336 at 4096).
* **vocabulary** V = 32,000 (Llama 2's tokenizer, every size); untied embeddings; RMSNorm;
  4096 positions.
* **layers** L: N ≈ L·(block parameters) + 2·V·h + h (≈ 12·L·h² + 2·V·h) solved for L with
  the rounded h, to the nearest integer, at least 1.

Real sizes land on their real shapes: ``count_params(llama-2-7b)``, 13b and 70b give exactly
those presets' sizes (7e9 gives hidden 4096 and 33 layers; 70e9, 8192 and 81). N itself always
stays what the user gave (the planner scales the model states to it); the shape gives the
activations, the LoRA shapes and FSDP's units. Beyond :data:`SHAPE_MAX` the shape stops
growing and N scales the model states alone (and keeps every plan quick).

Each step of h or L moves a plan a little, never from one preset's shape to another's: over
N = 1e9 to 1e12 in steps of 1%, FSDP's per-GPU plan over 8 GPUs (``--regime zero --gpus 8``)
never moves more than 3.9% beyond N's own step, and over 64 GPUs from 1e10 not more than 5.4%
(``tests/test_shapes.py``). Below that, FSDP gathers the embeddings whole, and they are a
large part of a small model: each 128 of h moves its plan more.
"""

from __future__ import annotations

import math
from dataclasses import replace

from memplan.params import block_params, count_params
from memplan.presets import get_model
from memplan.spec import ModelSpec

# (N, hidden size) of real Llama-architecture models. TinyLlama 1.1B (Llama 2's architecture
# and tokenizer) and Llama 2 7B, 13B, 70B: N as memplan counts its presets, from the models'
# config.json. Llama 3.1 405B: config.json of meta-llama/Llama-3.1-405B (hidden 16384, 126
# layers, 128 heads, 8 KV heads, intermediate 53248, vocab 128256, untied): 405,853,388,800.
WIDTH_ANCHORS = ((1_100_048_384, 2048), (6_738_415_616, 4096), (13_015_864_320, 5120),
                 (68_976_648_192, 8192), (405_853_388_800, 16384))
HEAD_DIM = 128
VOCAB = 32_000
GQA_FROM = 20_000_000_000  # between Llama 2 13B (multi-head) and 34B (grouped-query)
GQA_KV_HEADS = 8
EMBEDDING_SHARE = 0.5  # the most of N the two embeddings may take
SHAPE_MAX = 10**12  # beyond 1 T (2.5 times the largest Llama), N scales the model states only


def width(n: float) -> float:
    """The hidden size before rounding: log h linear in log N through :data:`WIDTH_ANCHORS`
    (each end's slope continued beyond it), and 2·V·h at most half of N."""
    logs = [(math.log(a), math.log(h)) for a, h in WIDTH_ANCHORS]
    x = math.log(n)
    i = max(0, min(len(logs) - 2, sum(1 for a, _ in logs[1:-1] if x >= a)))
    (x0, y0), (x1, y1) = logs[i], logs[i + 1]
    h = math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return min(h, EMBEDDING_SHARE * n / (2 * VOCAB))


def intermediate(hidden: int, grouped: bool) -> int:
    """Llama's SwiGLU width: int(2·4h/3) × ffn_dim_multiplier, rounded up to multiple_of."""
    multiplier, multiple = (1.3, 1024) if grouped else (1.0, 256)
    inner = int(multiplier * int(2 * 4 * hidden / 3))
    return -(-inner // multiple) * multiple


def kv_heads(heads: int, grouped: bool) -> int:
    """All heads (multi-head), or the largest divisor of ``heads`` up to 8 (grouped-query)."""
    if not grouped:
        return heads
    return max(d for d in range(1, GQA_KV_HEADS + 1) if heads % d == 0)


def shape(n: int) -> ModelSpec:
    """The Llama-2-style ModelSpec for ``n`` parameters (the rule of the module docstring)."""
    n = min(n, SHAPE_MAX)
    grouped = n >= GQA_FROM
    multiple = 2 * HEAD_DIM if grouped else HEAD_DIM
    hidden = max(multiple, round(width(n) / multiple) * multiple)
    heads = hidden // HEAD_DIM
    one = replace(get_model("llama-2-7b"), hidden_size=hidden, num_layers=1, num_heads=heads,
                  num_kv_heads=kv_heads(heads, grouped), head_dim=HEAD_DIM,
                  intermediate_size=intermediate(hidden, grouped), vocab_size=VOCAB)
    block = block_params(one)
    root = count_params(one) - block
    layers = max(1, round((n - root) / block))
    return replace(one, name=f"llama-2-style-h{hidden}-l{layers}", num_layers=layers)


def describe(spec: ModelSpec) -> str:
    """The shape in words, for the line that says what was assumed."""
    kv = "multi-head" if spec.num_kv_heads == spec.num_heads else f"{spec.num_kv_heads} KV heads"
    layers = f"{spec.num_layers} layer" + ("s" if spec.num_layers > 1 else "")
    return (f"a Llama-2-style shape scaled to N (hidden {spec.hidden_size}, {layers}, "
            f"{spec.num_heads} heads of {spec.head_dim}, {kv}, MLP {spec.intermediate_size}, "
            f"vocab {spec.vocab_size:,}; {count_params(spec):,} parameters as built)")


def shape_for_params(n: int) -> tuple[ModelSpec, str]:
    """The assumed architecture for ``n`` parameters, and a sentence saying which it is."""
    spec = shape(n)
    if n > SHAPE_MAX:
        return spec, describe(spec) + ", the shape of N = 1e12, the largest assumed"
    return spec, describe(spec)
