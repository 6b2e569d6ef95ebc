"""Llama (transformers ``LlamaConfig``, ``LlamaForCausalLM``): the parent of most decoders.

Block: ``x + o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))``, then
``x + down(act(gate(n2(x))) * up(n2(x)))`` with RMSNorm computed in fp32. Grouped-query
attention, rotary positions, untied head unless ``tie_word_embeddings``.

Config defaults (``LlamaConfig.__init__``): ``num_key_value_heads`` = heads, ``head_dim`` =
hidden // heads, ``hidden_act`` silu, ``attention_bias`` and ``mlp_bias`` false (the former
covers q, k, v and o), ``tie_word_embeddings`` false, ``attention_dropout`` 0.0,
``max_position_embeddings`` 2048.
"""

from __future__ import annotations

from typing import Any

from memplan import ops
from memplan.arch import parts
from memplan.arch.base import Job, LinearShape, Profile, Weight, norm_weights
from memplan.arch.keys import MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, Keys
from memplan.autograd import Sym, Tape
from memplan.spec import ModelSpec


class Llama(Profile):
    """Llama and the families that differ from it only in their config's defaults."""

    family = "llama"
    model_types = ("llama",)
    reference_model = True
    source = "transformers LlamaForCausalLM"
    default_positions = 2048

    # ---- config -------------------------------------------------------------------------
    def biases(self, keys: Keys) -> tuple[bool, bool, bool]:
        """(q/k/v bias, o bias, MLP bias) as the config says them."""
        attention = keys.bool("attention_bias", False)
        return attention, attention, keys.bool("mlp_bias", False)

    def tied(self, keys: Keys) -> bool:
        return keys.bool("tie_word_embeddings", False)

    def dims(self, keys: Keys) -> dict[str, int]:
        """Hidden size, heads, kv heads and head_dim, checked against each other."""
        hidden = keys.int("hidden_size")
        heads = keys.int("num_attention_heads")
        kv_heads = keys.int("num_key_value_heads", default=heads)
        if not keys.has("head_dim"):
            keys.divides("num_attention_heads", heads, "hidden_size", hidden, "give head_dim")
        head_dim = keys.int("head_dim", default=hidden // heads)
        keys.divides("num_key_value_heads", kv_heads, "num_attention_heads", heads)
        return {"hidden_size": hidden, "num_heads": heads, "num_kv_heads": kv_heads,
                "head_dim": head_dim}

    def read(self, cfg: dict[str, Any], name: str, where: str) -> ModelSpec:
        keys = Keys(cfg, where)
        dims = self.dims(keys)
        qkv_bias, out_bias, mlp_bias = self.biases(keys)
        return ModelSpec(
            name=name, family=self.family, model_type=str(cfg.get("model_type")),
            vocab_size=keys.int("vocab_size", upper=MAX_VOCAB),
            num_layers=keys.int("num_hidden_layers", upper=MAX_LAYERS),
            intermediate_size=keys.int("intermediate_size"),
            gated_mlp=True, activation=keys.name("hidden_act", "silu"),
            qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=mlp_bias, norm="rmsnorm",
            tie_embeddings=self.tied(keys), learned_positions=False,
            max_positions=keys.int("max_position_embeddings", default=self.default_positions,
                                   upper=MAX_POSITIONS),
            dropout=keys.prob("attention_dropout"),
            extras=self.read_extras(keys),
            **dims,
        )

    def read_extras(self, keys: Keys) -> tuple[tuple[str, Any], ...]:
        """Family-specific values for ``ModelSpec.extras``."""
        return ()

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        return {"model_type": self.model_types[0], "vocab_size": spec.vocab_size,
                "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
                "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
                "head_dim": spec.head_dim, "intermediate_size": spec.intermediate_size,
                "hidden_act": spec.activation, "max_position_embeddings": spec.max_positions,
                "attention_dropout": spec.dropout, "tie_word_embeddings": spec.tie_embeddings,
                "attention_bias": spec.qkv_bias, "mlp_bias": spec.mlp_bias}

    # ---- inventory ----------------------------------------------------------------------
    def attention_linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        h = spec.hidden_size
        return (
            LinearShape("self_attn.q_proj", "attention", h, spec.q_dim, spec.qkv_bias),
            LinearShape("self_attn.k_proj", "attention", h, spec.kv_dim, spec.qkv_bias),
            LinearShape("self_attn.v_proj", "attention", h, spec.kv_dim, spec.qkv_bias),
            LinearShape("self_attn.o_proj", "attention", spec.q_dim, h, spec.out_bias),
        )

    def mlp_linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        h, i, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        gate = (LinearShape("mlp.gate_proj", "mlp", h, i, bias),) if spec.gated_mlp else ()
        return gate + (LinearShape("mlp.up_proj", "mlp", h, i, bias),
                       LinearShape("mlp.down_proj", "mlp", i, h, bias))

    def linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        return self.attention_linears(spec) + self.mlp_linears(spec)

    def norm_names(self) -> tuple[str, ...]:
        return ("input_layernorm", "post_attention_layernorm")

    def block_norms(self, spec: ModelSpec) -> tuple[Weight, ...]:
        return tuple(w for n in self.norm_names()
                     for w in norm_weights(n, spec.hidden_size, spec.norm_bias))

    def block_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        from memplan.arch.base import linear_weights

        first, second = (norm_weights(n, spec.hidden_size, spec.norm_bias)
                         for n in self.norm_names()[:2])
        rest = tuple(w for n in self.norm_names()[2:]
                     for w in norm_weights(n, spec.hidden_size, spec.norm_bias))
        attn = tuple(w for l in self.attention_linears(spec) for w in linear_weights(l))
        mlp = tuple(w for l in self.mlp_linears(spec) for w in linear_weights(l))
        return first + attn + second + mlp + rest

    def root_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        v, h = spec.vocab_size, spec.hidden_size
        head = () if spec.tie_embeddings else (Weight("head", (v, h), "head"),)
        return (Weight("embed", (v, h), "embedding"),
                *norm_weights("final_norm", h, spec.norm_bias), *head)

    def buffer_bytes(self, spec: ModelSpec) -> int:
        return spec.head_dim // 2 * 4  # rotary inv_freq, fp32

    # ---- symbolic forward ---------------------------------------------------------------
    def rope_tables(self, tape: Tape, job: Job) -> list[Sym]:
        return parts.rope_tables(tape, job)

    def norm(self, tape: Tape, job: Job, x: Sym) -> Sym:
        """The block's norm: HF LlamaRMSNorm, fp32 inside."""
        return ops.rmsnorm(tape, x, job.tokens, job.spec.hidden_size, job.full)

    def block(self, tape: Tape, job: Job, x: Sym, rope: list[Sym], layer: int) -> Sym:
        spec = job.spec
        linear = parts.block_linear(tape, job, self.linears(spec))
        y = self.norm(tape, job, x)
        o = parts.qkvo_attention(tape, job, y, linear, rope)
        x2 = parts.residual(tape, x, o)
        y2 = self.norm(tape, job, x2)
        if spec.gated_mlp:  # act(gate(y)) * up(y)
            dn = parts.gated_mlp(tape, y2, linear)
        else:
            up = linear(y2, "mlp.up_proj")
            u = ops.unary(tape, up)
            tape.free(up)
            dn = linear(u, "mlp.down_proj")
            tape.free(u)
        tape.free(y2)
        out = parts.residual(tape, x2, dn)
        tape.free(x2)
        return out

    def final_norm(self, tape: Tape, job: Job, x: Sym) -> Sym:
        return self.norm(tape, job, x)


PROFILES = (Llama(),)
