"""OLMo 2 (transformers ``Olmo2Config``, ``Olmo2ForCausalLM``): Llama with post-norms.

Differences from Llama (``Olmo2DecoderLayer``, ``Olmo2Attention``, ``Olmo2RMSNorm``): no input
norm; ``post_attention_layernorm`` normalises the attention output and
``post_feedforward_layernorm`` the MLP output, each before its residual add (so q/k/v and
gate/up read the residual stream itself). ``q_norm`` and ``k_norm`` are RMSNorms over the
whole projection width (nh·hd and nkv·hd) on q_proj's and k_proj's outputs, before rotary.
Every ``Olmo2RMSNorm`` multiplies its weight in fp32 and casts last (``(w * x̂32).to(dtype)``:
it keeps the fp32 x̂ where Llama keeps the cast one). The rotary tables stay fp32
(``Olmo2RotaryEmbedding`` does not cast them), so in bf16 the rotary products and their sum
are fp32, cast back once (``q_embed.to(q_type)``). q, k, v and o follow ``attention_bias``.

Config defaults for absent keys (``Olmo2Config``): ``vocab_size`` 50304, ``hidden_size``
4096, ``intermediate_size`` 11008, ``num_hidden_layers`` 32, ``num_attention_heads`` 32,
``num_key_value_heads`` = heads, ``hidden_act`` silu, ``max_position_embeddings`` 2048,
``attention_bias`` false, ``attention_dropout`` 0.0, ``tie_word_embeddings`` false,
``rms_norm_eps`` 1e-5, ``pad_token_id`` 1; no ``head_dim`` field (the modeling code reads
``getattr(config, "head_dim", hidden // heads)``, so a given one is honoured); the MLP is
never biased.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memplan import ops
from memplan.arch import parts
from memplan.arch.base import Job, Weight, linear_weights, norm_weights
from memplan.arch.keys import Keys
from memplan.arch.llama import Llama
from memplan.attention import attention
from memplan.autograd import ALIAS, FP32, Sym, Tape
from memplan.spec import LoraSpec, ModelSpec


def olmo2_rmsnorm(tape: Tape, x: Sym, dim: int, w_rg: bool) -> Sym:
    """Olmo2RMSNorm: ``(w * (x32 * rsqrt(x32.pow(2).mean(-1) + eps))).to(dtype)``.

    pow and the product keep x32, rsqrt its result; the weight multiply runs in fp32 and keeps
    the fp32 x̂ when w trains; the cast to the input's dtype comes last.
    """
    rows = x.numel // dim
    x32 = ops.cast(tape, x, FP32)
    sq = ops.unary(tape, x32, scratch=2 * x32.nbytes)  # pow(2) keeps x32
    var = ops.unary(tape, sq, saves_input=False, numel=rows)  # mean
    tape.free(sq)
    var_eps = tape.op(tape.new(rows, FP32, var.rg), [(var, ALIAS)])
    r = tape.new(rows, FP32, var_eps.rg)
    tape.op(r, [(var_eps, var_eps.nbytes)], [r] if r.rg else [])  # rsqrt keeps its result
    xhat = ops.mul(tape, x32, r)
    tape.free(var_eps, r, *([x32] if x32 is not x else []))
    out32 = ops.scale(tape, xhat, w_rg, dim)
    tape.free(xhat)
    out = ops.cast(tape, out32, x.itemsize)
    tape.free(var, *([out32] if out is not out32 else []))
    return out


class Olmo2(Llama):
    family = "olmo2"
    model_types = ("olmo2",)
    reference_model = False
    source = "transformers Olmo2ForCausalLM"
    default_positions = 2048
    defaults: dict[str, Any] = {
        "vocab_size": 50304, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32}

    # ---- config -------------------------------------------------------------------------
    def read(self, cfg: dict[str, Any], name: str, where: str) -> ModelSpec:
        present = {k: v for k, v in cfg.items() if v is not None}
        return super().read(self.defaults | present, name, where)

    def biases(self, keys: Keys) -> tuple[bool, bool, bool]:
        bias = keys.bool("attention_bias", False)
        return bias, bias, False

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        cfg = super().to_hf(spec)
        del cfg["mlp_bias"]
        if spec.head_dim == spec.hidden_size // spec.num_heads:
            del cfg["head_dim"]  # not an Olmo2Config field; given only when it differs
        return cfg

    # ---- inventory ----------------------------------------------------------------------
    def norm_names(self) -> tuple[str, ...]:
        return ("post_attention_layernorm", "post_feedforward_layernorm")

    def block_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        """Registration order: self_attn (q, k, v, o, q_norm, k_norm), mlp, the two norms."""
        attn = tuple(w for l in self.attention_linears(spec) for w in linear_weights(l))
        qk = norm_weights("self_attn.q_norm", spec.q_dim, False) + \
            norm_weights("self_attn.k_norm", spec.kv_dim, False)
        mlp = tuple(w for l in self.mlp_linears(spec) for w in linear_weights(l))
        return attn + qk + mlp + self.block_norms(spec)

    # ---- symbolic forward ---------------------------------------------------------------
    def rope_tables(self, tape: Tape, job: Job) -> list[Sym]:
        return parts.rope_tables(tape, replace(job, d=FP32))  # cos and sin stay fp32

    def norm(self, tape: Tape, job: Job, x: Sym, dim: int | None = None) -> Sym:
        return olmo2_rmsnorm(tape, x, dim or job.spec.hidden_size, job.full)

    def block(self, tape: Tape, job: Job, x: Sym, rope: list[Sym], layer: int) -> Sym:
        spec = job.spec
        linear = parts.block_linear(tape, job, self.linears(spec))

        def normed(name: str, dim: int) -> Sym:  # q_norm(q_proj(x)): the projection is a temp
            lin = linear(x, f"self_attn.{name}_proj")
            out = self.norm(tape, job, lin, dim)
            tape.free(lin)
            return out

        q_n, k_n = normed("q", spec.q_dim), normed("k", spec.kv_dim)
        v = linear(x, "self_attn.v_proj")
        q32, k32 = parts.rotary(tape, q_n, rope), parts.rotary(tape, k_n, rope)
        q, k = ops.cast(tape, q32, job.d), ops.cast(tape, k32, job.d)
        tape.free(q_n, k_n, *(t for t in (q32, k32) if t not in (q, k)))
        att = attention(tape, job, q, k, v, fused=False)
        o = linear(att, "self_attn.o_proj")
        tape.free(q, k, v, att)
        on = self.norm(tape, job, o)  # post_attention_layernorm; rebinding drops o
        tape.free(o)
        x2 = parts.residual(tape, x, on)
        dn = parts.gated_mlp(tape, x2, linear)
        dnn = self.norm(tape, job, dn)  # post_feedforward_layernorm
        tape.free(dn)
        out = parts.residual(tape, x2, dnn)
        tape.free(x2)
        return out


PROFILES = (Olmo2(),)

_HF = {"impl": "hf"}
_PEFT = {"impl": "hf", "lora_backend": "peft"}
HF_FAKE_ROWS = [
    ("olmo-2-7b", dict(regime="full", batch=1, seq=512) | _HF, {"num_layers": 4}),
    ("olmo-2-7b", dict(regime="lora-bf16", batch=2, seq=1024) | _PEFT, {}),
    ("olmo-2-7b", dict(regime="lora-bf16", batch=2, seq=2048, checkpointing=True) | _PEFT, {}),
    ("olmo-2-7b", dict(regime="lora", batch=1, seq=512, attention="eager") | _PEFT,
     {"num_layers": 4}),
]
HF_CPU_ROWS = [
    ("olmo2-tiny", dict(regime="full", batch=2, seq=128) | _HF, {}),
    ("olmo2-tiny", dict(regime="lora", batch=2, seq=128, lora=LoraSpec(rank=8)) | _PEFT, {}),
]
