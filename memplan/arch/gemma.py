"""Gemma, Gemma 2 and Gemma 3 text (transformers ``GemmaForCausalLM``, ``Gemma2ForCausalLM``,
``Gemma3ForCausalLM``): Llama with Gemma's norms, a scaled embedding and, from Gemma 2, a
sandwich of four norms per block, soft-capping and alternating sliding/global layers.

Differences from Llama, all three: ``GemmaRMSNorm`` computes ``x32 · rsqrt(..) · (1 + w32)``
in fp32 and casts last (it keeps an fp32 normalised x where Llama keeps the cast one, and a
new (dim,) fp32 ``1 + w``); the embedding is multiplied by sqrt(hidden) (``inputs_embeds`` is
a new tensor, held through the forward); the MLP is ``down(gelu_tanh(gate) * up)``; q, k, v
and o follow ``attention_bias``, the MLP is never biased; the head is tied by default.
Gemma 2 and 3: ``post_attention_layernorm`` on the attention output and
``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` around the MLP; both the full
and the sliding-window causal masks are built every forward (``layer_types`` picks one per
layer). Gemma 2: eager attention only (transformers refuses sdpa: no soft-capping there),
``tanh`` soft-capping of the scores (``attn_logit_softcapping``) and of the logits
(``final_logit_softcapping``). Gemma 3: per-head ``q_norm``/``k_norm`` (GemmaRMSNorm over
head_dim) before rotary, one rotary table pair per layer type (local θ and global θ), no
score soft-capping (the value is never passed to attention), logit soft-capping if set.

Config defaults for absent keys:
- GemmaConfig: vocab_size 256000, hidden_size 3072, intermediate_size 24576,
  num_hidden_layers 28, num_attention_heads 16, num_key_value_heads 16, head_dim 256,
  hidden_act gelu_pytorch_tanh (a legacy "gelu" is rewritten to it), max_position_embeddings
  8192, attention_bias false, attention_dropout 0.0, tie_word_embeddings true.
- Gemma2Config: vocab_size 256000, hidden_size 2304, intermediate_size 9216,
  num_hidden_layers 26, num_attention_heads 8, num_key_value_heads 4, head_dim 256,
  hidden_activation gelu_pytorch_tanh (the MLP reads this key, not hidden_act),
  max_position_embeddings 8192, query_pre_attn_scalar 256, sliding_window 4096, layer_types
  alternating from sliding (layer i is full iff (i+1) % 2 == 0), attn_logit_softcapping 50.0,
  final_logit_softcapping 30.0, attention_bias false, tie_word_embeddings true.
- Gemma3TextConfig: as Gemma2Config except vocab_size 262208, max_position_embeddings
  131072, layer_types from sliding_window_pattern 6 (layer i is full iff (i+1) % 6 == 0),
  attn_logit_softcapping None (ignored anyway), final_logit_softcapping None,
  use_bidirectional_attention false (true is refused here).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memplan import ops
from memplan.arch import parts
from memplan.arch.base import Job, Weight, linear_weights, norm_weights
from memplan.arch.keys import Keys, show
from memplan.arch.llama import Llama
from memplan.autograd import ALIAS, FP32, INT64, Sym, Tape
from memplan.errors import ConfigError
from memplan.spec import LoraSpec, ModelSpec

FULL, SLIDING = "full_attention", "sliding_attention"


def gemma_rmsnorm(tape: Tape, x: Sym, dim: int, w_rg: bool, w_fp32: bool) -> Sym:
    """GemmaRMSNorm: ``(x32 * rsqrt(x32.pow(2).mean(-1) + eps) * (1 + w.float())).type_as(x)``.

    Keeps x32 (pow and the product), rsqrt's result, ``1 + w`` (for x̂'s gradient) and, when
    w trains, the fp32 x̂ (for w's). The ``_norm`` temporaries die inside the expression.
    """
    rows = x.numel // dim
    x32 = ops.cast(tape, x, FP32)
    sq = ops.unary(tape, x32, scratch=2 * x32.nbytes)  # pow(2) keeps x32
    var = ops.unary(tape, sq, saves_input=False, numel=rows)  # mean
    tape.free(sq)
    var_eps = tape.op(tape.new(rows, FP32, var.rg), [(var, ALIAS)])
    tape.free(var)
    r = tape.new(rows, FP32, var_eps.rg)
    tape.op(r, [(var_eps, var_eps.nbytes)], [r] if r.rg else [])  # rsqrt keeps its result
    tape.free(var_eps)
    xhat = ops.mul(tape, x32, r)
    tape.free(r, *([x32] if x32 is not x else []))
    w32 = [] if w_fp32 else [tape.alloc(tape.new(dim, FP32, False))]  # weight.float()
    p = tape.op(tape.new(dim, FP32, w_rg), [], param_grad=4 * dim * w_rg)  # 1.0 + w
    tape.free(*w32)
    out = ops.mul(tape, xhat, p)
    tape.free(xhat, p)
    y = ops.cast(tape, out, x.itemsize)
    if y is not out:
        tape.free(out)
    return y


def softcap(tape: Tape, x: Sym) -> Sym:
    """``tanh(x / cap) * cap``: tanh keeps its output; the division and the product are
    temporaries. Frees x."""
    scaled = ops.unary(tape, x, saves_input=False)
    tape.free(x)
    th = tape.new(x.numel, x.itemsize, x.rg)
    tape.op(th, [(scaled, scaled.nbytes)], [th] if th.rg else [])
    tape.free(scaled)
    out = ops.unary(tape, th, saves_input=False)
    tape.free(th)
    return out


class Gemma(Llama):
    family = "gemma"
    model_types = ("gemma",)
    reference_model = False
    source = "transformers GemmaForCausalLM"
    default_positions = 8192
    act_key = "hidden_act"  # the key the MLP reads
    defaults: dict[str, Any] = {
        "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
        "head_dim": 256}

    # ---- config -------------------------------------------------------------------------
    def read(self, cfg: dict[str, Any], name: str, where: str) -> ModelSpec:
        filled = {k: v for k, v in self.defaults.items() if cfg.get(k) is None}
        keys = Keys(cfg | filled, where)  # a null softcap stays null (disabled)
        if keys.bool("use_bidirectional_attention", False):
            raise ConfigError(f"{where}: use_bidirectional_attention true (an encoder) is not "
                              "supported; memplan plans causal language models")
        spec = super().read(keys.cfg, name, where)
        act = keys.name(self.act_key, "gelu_pytorch_tanh")
        return replace(spec, activation="gelu_pytorch_tanh" if act == "gelu" else act)

    def biases(self, keys: Keys) -> tuple[bool, bool, bool]:
        bias = keys.bool("attention_bias", False)
        return bias, bias, False

    def tied(self, keys: Keys) -> bool:
        return keys.bool("tie_word_embeddings", True)

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        cfg = super().to_hf(spec)
        del cfg["mlp_bias"], cfg["hidden_act"]
        return cfg | {"model_type": self.model_types[0], self.act_key: spec.activation}

    # ---- inventory ----------------------------------------------------------------------
    def attention_norms(self, spec: ModelSpec) -> tuple[Weight, ...]:
        return ()

    def block_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        """Registration order: self_attn (its linears, then q/k norms), mlp, the norms."""
        attn = tuple(w for l in self.attention_linears(spec) for w in linear_weights(l))
        mlp = tuple(w for l in self.mlp_linears(spec) for w in linear_weights(l))
        return attn + self.attention_norms(spec) + mlp + self.block_norms(spec)

    def rope_types(self, spec: ModelSpec) -> int:
        """How many rotary tables (inv_freq buffers, cos/sin pairs) the model has."""
        return 1

    def buffer_bytes(self, spec: ModelSpec) -> int:
        # inv_freq and original_inv_freq (fp32) per rotary table, the 0-d embed_scale
        return self.rope_types(spec) * 2 * (spec.head_dim // 2) * 4 + 4

    # ---- symbolic forward ---------------------------------------------------------------
    def embed(self, tape: Tape, job: Job, x: Sym, held: list[Sym]) -> Sym:
        """``embed_tokens(ids) * embed_scale``: a new tensor, the body's ``inputs_embeds``
        (the regimes that pass inputs_embeds in call the embedding module themselves)."""
        if job.train.recipe.trains in ("input-embedding", "prompt"):
            return x
        out = tape.op(tape.new(x.numel, x.itemsize, x.rg), [(x, x.nbytes)])  # saves a 0-d
        held[:] = [out if t is x else t for t in held]
        tape.free(x)
        return out

    def norm(self, tape: Tape, job: Job, x: Sym, dim: int | None = None) -> Sym:
        return gemma_rmsnorm(tape, x, dim or job.spec.hidden_size, job.full, job.d == FP32)


class Gemma2(Gemma):
    family = "gemma"
    no_grad_forward_validated = False  # classifier: measured 1.6% above on gemma2-tiny
    model_types = ("gemma2",)
    attentions = ("eager",)
    source = "transformers Gemma2ForCausalLM"
    act_key = "hidden_activation"
    defaults = {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
                "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                "head_dim": 256}
    pattern = 2                # every pattern-th layer is full
    attn_softcap_default: float | None = 50.0
    final_softcap_default: float | None = 30.0

    # ---- config -------------------------------------------------------------------------
    def dims(self, keys: Keys) -> dict[str, int]:
        dims = super().dims(keys)  # Gemma2Config.validate_architecture
        keys.divides("num_attention_heads", dims["num_heads"], "hidden_size",
                     dims["hidden_size"], "transformers requires it")
        return dims

    def read_extras(self, keys: Keys) -> tuple[tuple[str, Any], ...]:
        layers = keys.int("num_hidden_layers")
        pattern = self.read_pattern(keys)
        types = keys.cfg.get("layer_types")
        if types is not None:
            if not isinstance(types, list) or any(t not in (FULL, SLIDING) for t in types):
                raise ConfigError(f"{keys.where}: layer_types must be a list of "
                                  f"'{FULL}' and '{SLIDING}', got {show(types)}")
            if len(types) != layers:
                raise ConfigError(f"{keys.where}: layer_types has {len(types)} entries but "
                                  f"num_hidden_layers is {layers}; give one per layer")
            types = tuple(types)
        else:  # the config class's default, resolved (so that to_hf round-trips)
            types = tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(layers))
        extras = {
            "attn_logit_softcapping": keys.number("attn_logit_softcapping",
                                                  self.attn_softcap_default),
            "final_logit_softcapping": keys.number("final_logit_softcapping",
                                                   self.final_softcap_default),
            "query_pre_attn_scalar": keys.int("query_pre_attn_scalar", 256),
            "sliding_window": keys.int("sliding_window", 4096, upper=2**24),
            "layer_types": types, "sliding_window_pattern": pattern,
        }
        return tuple(sorted(extras.items()))

    def read_pattern(self, keys: Keys) -> int:
        return self.pattern

    def layer_types(self, spec: ModelSpec) -> tuple[str, ...]:
        """Each layer's attention type: the config's (resolved) list, else, when num_layers
        was changed since, the pattern's."""
        given = spec.extra("layer_types")
        if given is not None and len(given) == spec.num_layers:
            return tuple(given)
        pattern = spec.extra("sliding_window_pattern", self.pattern)
        return tuple(FULL if (i + 1) % pattern == 0 else SLIDING
                     for i in range(spec.num_layers))

    def kv_windows(self, spec: ModelSpec) -> list[int | None]:
        """Sliding layers keep their window of the KV cache; full layers every token."""
        window = spec.extra("sliding_window")
        return [window if kind == SLIDING else None for kind in self.layer_types(spec)]

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        keep = ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                "sliding_window")
        return super().to_hf(spec) | {k: spec.extra(k) for k in keep} | \
            {"layer_types": list(self.layer_types(spec))} | self.pattern_key(spec)

    def pattern_key(self, spec: ModelSpec) -> dict[str, Any]:
        return {}

    # ---- inventory ----------------------------------------------------------------------
    def norm_names(self) -> tuple[str, ...]:
        return ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")

    # ---- symbolic forward ---------------------------------------------------------------
    def softcap_scores(self, tape: Tape, job: Job, scores: Sym) -> Sym:
        """The hook of eager attention (memplan.attention): the scores' soft-capping."""
        if job.spec.extra("attn_logit_softcapping") is None:
            return scores
        return softcap(tape, scores)

    def logits(self, tape: Tape, job: Job, logits: Sym) -> Sym:
        if job.spec.extra("final_logit_softcapping") is None:
            return logits
        return softcap(tape, logits)

    def mask(self, tape: Tape, job: Job, kind: str) -> Sym | None:
        """One of the two masks the model builds: eager's float (B, 1, s, s); sdpa's bool,
        materialised under FakeTensorMode (tracing), and on a real run only for a sliding
        window the sequence reaches (a (1, 1, s, s) storage expanded over the batch)."""
        b, s = job.b, job.s
        if job.train.attention == "eager":  # (B, 1, s, keys): an inference's keys are more
            return tape.alloc(tape.new(b * s * (job.kv_len or s), job.d, False))
        if job.runtime == "fake":
            return tape.alloc(tape.new(b * s * s, 1, False))
        if kind == SLIDING and s >= job.spec.extra("sliding_window"):
            return tape.view(tape.alloc(tape.new(s * s, 1, False)), numel=b * s * s)
        return None

    def hf_inputs(self, tape: Tape, job: Job, held: list[Sym]) -> None:
        held.append(tape.alloc(tape.new(job.s, INT64, False)))  # position_ids
        masks = {kind: self.mask(tape, job, kind) for kind in (FULL, SLIDING)}
        held += [m for m in masks.values() if m is not None]
        job.gemma_masks = masks  # picked per layer by block()

    def layer_rope(self, job: Job, rope: list[Sym], kind: str) -> list[Sym]:
        return rope

    def block_args(self, job: Job, rope: list[Sym], hf_inputs: list[Sym],
                   layer: int) -> list[Sym]:
        """A layer gets the position ids, the mask and the rotary tables of its own type."""
        kind = self.layer_types(job.spec)[layer]
        mask = job.gemma_masks[kind]
        return [hf_inputs[0], *([mask] if mask is not None else []),
                *self.layer_rope(job, rope, kind)]

    def qk_norm(self, tape: Tape, job: Job) -> Any:
        return None

    def block(self, tape: Tape, job: Job, x: Sym, rope: list[Sym], layer: int) -> Sym:
        kind = self.layer_types(job.spec)[layer]
        job.mask = job.gemma_masks[kind]
        linear = parts.block_linear(tape, job, self.linears(job.spec))
        y = self.norm(tape, job, x)
        o = parts.qkvo_attention(tape, job, y, linear, self.layer_rope(job, rope, kind),
                                 self.qk_norm(tape, job))
        a = self.norm(tape, job, o)  # post_attention_layernorm
        tape.free(o)
        x2 = parts.residual(tape, x, a)
        y2 = self.norm(tape, job, x2)  # pre_feedforward_layernorm
        m = parts.gated_mlp(tape, y2, linear)
        tape.free(y2)
        f = self.norm(tape, job, m)  # post_feedforward_layernorm
        tape.free(m)
        out = parts.residual(tape, x2, f)
        tape.free(x2)
        return out


class Gemma3(Gemma2):
    model_types = ("gemma3_text",)
    attentions = ("sdpa", "eager")
    source = "transformers Gemma3ForCausalLM"
    default_positions = 131072
    defaults = Gemma2.defaults | {"vocab_size": 262208}
    pattern = 6
    attn_softcap_default = None
    final_softcap_default = None

    def read_pattern(self, keys: Keys) -> int:
        return keys.int("sliding_window_pattern", self.pattern)

    def pattern_key(self, spec: ModelSpec) -> dict[str, Any]:
        return {"sliding_window_pattern": spec.extra("sliding_window_pattern", self.pattern)}

    def attention_norms(self, spec: ModelSpec) -> tuple[Weight, ...]:
        return norm_weights("self_attn.q_norm", spec.head_dim, False) + \
            norm_weights("self_attn.k_norm", spec.head_dim, False)

    def rope_kinds(self, spec: ModelSpec) -> list[str]:
        return sorted(set(self.layer_types(spec)))

    def rope_types(self, spec: ModelSpec) -> int:
        return len(self.rope_kinds(spec))

    def rope_tables(self, tape: Tape, job: Job) -> list[Sym]:
        """One (cos, sin) pair per layer type present (local θ, global θ)."""
        return [t for _ in self.rope_kinds(job.spec) for t in parts.rope_tables(tape, job)]

    def layer_rope(self, job: Job, rope: list[Sym], kind: str) -> list[Sym]:
        i = self.rope_kinds(job.spec).index(kind)
        return rope[2 * i:2 * i + 2]

    def softcap_scores(self, tape: Tape, job: Job, scores: Sym) -> Sym:
        return scores  # Gemma3Attention never passes attn_logit_softcapping on

    def qk_norm(self, tape: Tape, job: Job) -> Any:
        """``q_norm(q.view(B, T, heads, hd).transpose(1, 2))``: GemmaRMSNorm per head."""
        hd = job.spec.head_dim

        def norm(t: Sym, which: str) -> Sym:
            return self.norm(tape, job, t, hd)
        return norm


PROFILES = (Gemma(), Gemma2(), Gemma3())

_HF = {"impl": "hf"}
_PEFT = {"impl": "hf", "lora_backend": "peft"}
HF_FAKE_ROWS = [
    ("gemma-2b", dict(regime="full", batch=1, seq=512) | _HF, {"num_layers": 4}),
    ("gemma-2b", dict(regime="lora-bf16", batch=2, seq=1024) | _PEFT, {}),
    ("gemma-2-9b", dict(regime="full", batch=1, seq=512, attention="eager") | _HF,
     {"num_layers": 2}),
    ("gemma-2-9b", dict(regime="lora-bf16", batch=1, seq=1024, attention="eager") | _PEFT, {}),
    ("gemma-2-9b", dict(regime="lora-bf16", batch=2, seq=1024, attention="eager",
                        checkpointing=True) | _PEFT, {}),
    ("gemma-3-1b", dict(regime="full", batch=1, seq=1024) | _HF, {}),
    ("gemma-3-1b", dict(regime="lora-bf16", batch=2, seq=1024) | _PEFT, {}),
    ("gemma-3-1b", dict(regime="lora", batch=2, seq=512, attention="eager") | _PEFT, {}),
    ("gemma-3-1b", dict(regime="lora-bf16", batch=2, seq=1024, checkpointing=True) | _PEFT, {}),
]
HF_CPU_ROWS = [
    ("gemma2-tiny", dict(regime="full", batch=2, seq=128, attention="eager") | _HF, {}),
    ("gemma2-tiny", dict(regime="lora", batch=2, seq=128, attention="eager",
                         lora=LoraSpec(rank=8)) | _PEFT, {}),
]
