"""GPT-NeoX and Pythia (transformers ``GPTNeoXConfig``, ``GPTNeoXForCausalLM``,
``GPTNeoXModel``, ``GPTNeoXLayer``, ``GPTNeoXAttention``, ``GPTNeoXMLP``).

Differences from Llama: LayerNorms with bias; a fused ``query_key_value`` whose output is
viewed (B, s, nh, 3·hd), transposed and chunked into q, k and v (one split: v stays a strided
view that keeps the whole fused output alive in sdpa); partial rotary (only the first
``rot = int(hd · partial_rotary_factor)`` channels of each head rotate, then
``cat([rotated, pass])`` makes q and k contiguous in (B, nh, s, hd)); the sdpa output follows
that layout, so ``transpose(1, 2).contiguous()`` copies before ``dense``; a plain GELU MLP
``dense_h_to_4h`` / ``dense_4h_to_h`` (biased); by default a parallel residual
``x + attn(ln1(x)) + mlp(ln2(x))`` (attn's output lives through the MLP); an untied
``lm_head`` without bias. Dropouts: ``attention_dropout`` in attention, ``hidden_dropout`` on
the embedding and on both sublayers' outputs.

Config defaults for absent keys (``GPTNeoXConfig``): vocab_size 50432, hidden_size 6144,
num_hidden_layers 44, num_attention_heads 64, intermediate_size 24576, hidden_act gelu,
attention_dropout 0.0, hidden_dropout 0.0, max_position_embeddings 2048,
tie_word_embeddings false, use_parallel_residual true, attention_bias true (qkv and dense; the
MLP is always biased), rotary_pct 0.25 and rotary_emb_base 10000 (folded into
``rope_parameters``: its ``partial_rotary_factor`` and ``rope_theta`` win over them).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memplan import ops
from memplan.arch import parts
from memplan.arch.base import Job, LinearShape, Weight, linear_weights
from memplan.arch.keys import Keys, show
from memplan.arch.llama import Llama
from memplan.attention import attention
from memplan.autograd import ALIAS, FP32, Sym, Tape
from memplan.errors import ConfigError
from memplan.spec import LoraSpec, ModelSpec

DEFAULTS = {"vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44,
            "num_attention_heads": 64, "intermediate_size": 24576}  # GPTNeoXConfig
ROTARY_PCT, ROTARY_BASE = 0.25, 10000.0


def slice_of(tape: Tape, t: Sym, numel: int) -> Sym:
    """``t[..., a:b]``: a view; its backward makes a zero tensor of t's size."""
    return tape.op(tape.view(t, numel=numel), [(t, t.nbytes)])


class GPTNeoX(Llama):
    family = "gpt_neox"
    model_types = ("gpt_neox",)
    reference_model = False
    body = "gpt_neox"
    source = "transformers GPTNeoXForCausalLM"
    default_positions = 2048

    # ---- config -------------------------------------------------------------------------
    def read(self, cfg: dict[str, Any], name: str, where: str) -> ModelSpec:
        keys = Keys(DEFAULTS | {k: v for k, v in cfg.items() if v is not None}, where)
        spec = super().read(keys.cfg, name, where)
        return replace(spec, gated_mlp=False, norm="layernorm",
                       activation=keys.name("hidden_act", "gelu"))

    def dims(self, keys: Keys) -> dict[str, int]:
        hidden, heads = keys.int("hidden_size"), keys.int("num_attention_heads")
        keys.divides("num_attention_heads", heads, "hidden_size", hidden, "transformers "
                     "requires it")
        if keys.has("head_dim") and keys.cfg["head_dim"] != hidden // heads:
            raise ConfigError(f"{keys.where}: head_dim {show(keys.cfg['head_dim'])} contradicts "
                              f"hidden_size / num_attention_heads = {hidden // heads}; "
                              "GPT-NeoX's attention has no head_dim: drop it")
        return {"hidden_size": hidden, "num_heads": heads, "num_kv_heads": heads,
                "head_dim": hidden // heads}

    def biases(self, keys: Keys) -> tuple[bool, bool, bool]:
        bias = keys.bool("attention_bias", True)
        return bias, bias, True

    def read_extras(self, keys: Keys) -> tuple[tuple[str, Any], ...]:
        rope = keys.cfg.get("rope_parameters") or keys.cfg.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{keys.where}: rope_parameters must be an object, got "
                              f"{show(rope)}")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ConfigError(f"{keys.where}: rope_type {show(rope.get('rope_type'))} is not "
                              "supported for gpt_neox; memplan plans the default rotary")
        extras: dict[str, Any] = {}
        for key, legacy, default in (("partial_rotary_factor", "rotary_pct", ROTARY_PCT),
                                     ("rope_theta", "rotary_emb_base", ROTARY_BASE)):
            inner = Keys(rope, f"{keys.where}: rope_parameters")
            value = inner.number(key, None)
            old = keys.number(legacy, None)
            if value is not None and old is not None and value != old:
                raise ConfigError(f"{keys.where}: rope_parameters.{key} {value} contradicts "
                                  f"{legacy} {old}; give one of the two")
            extras[key] = value if value is not None else old if old is not None else default
        head_dim = self.dims(keys)["head_dim"]
        rot = int(head_dim * extras["partial_rotary_factor"])
        if not (rot >= 1 and 2 * ((rot + 1) // 2) <= head_dim):
            raise ConfigError(f"{keys.where}: rotary_pct {extras['partial_rotary_factor']} "
                              f"rotates no channel or more than the {head_dim} of a head; "
                              "give a value in (0, 1]")
        extras["use_parallel_residual"] = keys.bool("use_parallel_residual", True)
        extras["hidden_dropout"] = keys.prob("hidden_dropout")
        return tuple(sorted(extras.items()))

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        return {"model_type": "gpt_neox", "vocab_size": spec.vocab_size,
                "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
                "num_attention_heads": spec.num_heads,
                "intermediate_size": spec.intermediate_size, "hidden_act": spec.activation,
                "max_position_embeddings": spec.max_positions,
                "attention_dropout": spec.dropout,
                "hidden_dropout": spec.extra("hidden_dropout", 0.0),
                "tie_word_embeddings": spec.tie_embeddings, "attention_bias": spec.qkv_bias,
                "use_parallel_residual": spec.extra("use_parallel_residual", True),
                "rotary_pct": spec.extra("partial_rotary_factor", ROTARY_PCT),
                "rotary_emb_base": spec.extra("rope_theta", ROTARY_BASE)}

    def rotary_dim(self, spec: ModelSpec) -> int:
        """Channels of each head that rotate: cos's width, 2·len(inv_freq) for
        ``int(hd · partial_rotary_factor)``."""
        rot = int(spec.head_dim * spec.extra("partial_rotary_factor", ROTARY_PCT))
        return 2 * ((rot + 1) // 2)

    # ---- inventory ----------------------------------------------------------------------
    def attention_linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        h = spec.hidden_size
        return (LinearShape("attention.query_key_value", "attention", h, 3 * h, spec.qkv_bias),
                LinearShape("attention.dense", "attention", h, h, spec.out_bias))

    def mlp_linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        h, i = spec.hidden_size, spec.intermediate_size
        return (LinearShape("mlp.dense_h_to_4h", "mlp", h, i, True),
                LinearShape("mlp.dense_4h_to_h", "mlp", i, h, True))

    def block_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        """Registration order: both LayerNorms, attention, mlp."""
        norms = self.block_norms(spec)
        return norms + tuple(w for l in self.linears(spec) for w in linear_weights(l))

    def buffer_bytes(self, spec: ModelSpec) -> int:
        return 2 * (self.rotary_dim(spec) // 2) * 4  # inv_freq, original_inv_freq (fp32)

    # ---- symbolic forward ---------------------------------------------------------------
    def embed(self, tape: Tape, job: Job, x: Sym, held: list[Sym]) -> Sym:
        """``emb_dropout(inputs_embeds)``: the identity at p = 0."""
        return ops.dropout(tape, x, job.spec.extra("hidden_dropout", 0.0))

    def rope_tables(self, tape: Tape, job: Job) -> list[Sym]:
        return parts.rope_tables(tape, job, self.rotary_dim(job.spec))

    def norm(self, tape: Tape, job: Job, x: Sym) -> Sym:
        """LayerNorm: native_layer_norm keeps its input, mean and rstd per token; those two
        are fp32 on CUDA but of the input's dtype on the CPU kernels (and so under
        FakeTensorMode) when input and weight share a low-precision dtype."""
        w_rg = job.full or job.bitfit
        if job.runtime == "cuda" or x.itemsize == FP32:
            return ops.layernorm(tape, x, job.tokens, job.spec.hidden_size, w_rg,
                                 upcast=job.fp32_list)
        out = tape.new(x.numel, x.itemsize, x.rg or w_rg)
        stats = [tape.new(job.tokens, x.itemsize, False) for _ in range(2)]
        return tape.op(out, [(x, x.nbytes)], [x, *stats] if out.rg else [],
                       param_grad=2 * 4 * job.spec.hidden_size * w_rg)

    def self_attention(self, tape: Tape, job: Job, y: Sym, linear: parts.Linear,
                       rope: list[Sym]) -> Sym:
        """GPTNeoXAttention on ln1(x): the fused projection, split, partial rotary,
        attention, the output copy, dense. Frees y."""
        spec, tokens = job.spec, job.tokens
        nh, hd, rd = spec.num_heads, spec.head_dim, self.rotary_dim(spec)
        qkv = linear(y, "attention.query_key_value")
        # view(B, s, nh, 3hd).transpose(1, 2): its backward reshapes a transposed gradient
        qkv_t = tape.op(tape.view(qkv), [(qkv, qkv.nbytes)])
        q, k, v = (tape.view(qkv_t, numel=tokens * nh * hd) for _ in range(3))
        tape.op(q, [(qkv_t, qkv.nbytes)], outputs=[q, k, v])  # chunk: its backward cats
        q_rot, q_pass = slice_of(tape, q, tokens * nh * rd), \
            slice_of(tape, q, tokens * nh * (hd - rd))
        k_rot, k_pass = slice_of(tape, k, tokens * nh * rd), \
            slice_of(tape, k, tokens * nh * (hd - rd))
        q_emb, k_emb = parts.rotary(tape, q_rot, rope), parts.rotary(tape, k_rot, rope)
        full = []
        for emb, rest in ((q_emb, q_pass), (k_emb, k_pass)):  # cat([emb, pass], -1)
            full.append(tape.op(tape.new(q.numel, q.itemsize, q.rg or emb.rg),
                                [(emb, ALIAS), (rest, ALIAS)]))
            tape.free(emb)
        q_full, k_full = full
        att = attention(tape, job, q_full, k_full, v, fused=False)
        flash = job.train.attention != "eager" and not (spec.dropout > 0
                                                         and job.runtime != "cuda")
        # The flash kernels' output follows q's (B, nh, s, hd) layout, so HF's
        # transpose(1, 2).contiguous() copies it (CUDA fp32 runs memory-efficient attention,
        # whose output is laid out (B, s, nh, hd): a view).
        if flash and (job.runtime != "cuda" or job.d != FP32):
            copied = tape.op(tape.new(att.numel, att.itemsize, att.rg), [(att, ALIAS)])
            tape.free(att)
            att = copied
        out = linear(att, "attention.dense")
        tape.free(att, qkv, q_full, k_full, y)
        return out

    def mlp(self, tape: Tape, job: Job, y: Sym, linear: parts.Linear) -> Sym:
        f = linear(y, "mlp.dense_h_to_4h")
        g = parts.gelu_new(tape, f) if job.spec.activation == "gelu_new" else \
            ops.unary(tape, f)
        tape.free(f)
        m = linear(g, "mlp.dense_4h_to_h")
        tape.free(g)
        return m

    def block(self, tape: Tape, job: Job, x: Sym, rope: list[Sym], layer: int) -> Sym:
        spec = job.spec
        p = spec.extra("hidden_dropout", 0.0)
        linear = parts.block_linear(tape, job, self.linears(spec))
        a = parts.dropout(tape, self.self_attention(tape, job, self.norm(tape, job, x),
                                                    linear, rope), p)
        if spec.extra("use_parallel_residual", True):  # mlp(ln2(x)) + attn + x
            y2 = self.norm(tape, job, x)
            m = parts.dropout(tape, self.mlp(tape, job, y2, linear), p)
            tape.free(y2)
            s = ops.add(tape, m, a)
            tape.free(m, a)
            out = ops.add(tape, s, x)
            tape.free(s)
            return out
        x2 = parts.residual(tape, x, a)  # attn + x, then mlp(ln2(.)) + it
        y2 = self.norm(tape, job, x2)
        m = parts.dropout(tape, self.mlp(tape, job, y2, linear), p)
        tape.free(y2)
        out = parts.residual(tape, x2, m)
        tape.free(x2)
        return out


PROFILES = (GPTNeoX(),)

_HF = {"impl": "hf"}
_PEFT = {"impl": "hf", "lora_backend": "peft"}
HF_FAKE_ROWS = [
    ("pythia-6.9b", dict(regime="full", batch=1, seq=512) | _HF, {"num_layers": 2}),
    ("pythia-6.9b", dict(regime="lora-bf16", batch=2, seq=1024) | _PEFT, {}),
    ("pythia-6.9b", dict(regime="lora-bf16", batch=2, seq=1024, checkpointing=True) | _PEFT,
     {}),
    ("pythia-160m", dict(regime="full", batch=2, seq=1024) | _HF, {}),
    ("pythia-160m", dict(regime="lora", batch=2, seq=512, attention="eager") | _PEFT, {}),
]
HF_CPU_ROWS = [
    ("gpt_neox-tiny", dict(regime="full", batch=2, seq=128) | _HF, {}),
    ("gpt_neox-tiny", dict(regime="lora", batch=2, seq=128, lora=LoraSpec(rank=8)) | _PEFT, {}),
]
