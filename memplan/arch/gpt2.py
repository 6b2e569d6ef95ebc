"""GPT-2 (transformers ``GPT2Config``, ``GPT2LMHeadModel``).

LayerNorms with bias, learned positions (``wpe``) added to the token embedding and dropped
out, a fused ``c_attn`` split into q, k and v, GELU MLP ``c_fc``/``c_proj``, every linear
biased, the head tied to ``wte``. Hugging Face implements the linears as ``Conv1D``
(PEFT wraps them with ``fan_in_fan_out``) and writes ``gelu_new`` out op by op.

Config defaults (``GPT2Config.__init__``): ``n_inner`` None (4 × n_embd), ``activation_function``
gelu_new, ``resid_pdrop``, ``embd_pdrop`` and ``attn_pdrop`` 0.1, ``n_positions`` 1024,
``tie_word_embeddings`` true.
"""

from __future__ import annotations

from typing import Any

from memplan import ops
from memplan.arch import parts
from memplan.arch.base import Job, LinearShape, Profile, Weight, linear_weights, norm_weights
from memplan.arch.keys import MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, Keys
from memplan.autograd import INT64, Sym, Tape
from memplan.spec import ModelSpec

# GPT2Config's default for each of its three dropouts.
DEFAULT_PDROP = 0.1


class GPT2(Profile):
    family = "gpt2"
    no_grad_forward_validated = False  # classifier, Hugging Face's: measured 1.1% above
    model_types = ("gpt2",)
    conv1d = True
    reference_model = True
    eager_softmax_fp32 = False  # HF's eager softmax runs in the scores' dtype
    body = "transformer"
    source = "transformers GPT2LMHeadModel"

    def read(self, cfg: dict[str, Any], name: str, where: str) -> ModelSpec:
        keys = Keys(cfg, where)
        hidden = keys.int("n_embd")
        heads = keys.int("n_head")
        keys.divides("n_head", heads, "n_embd", hidden)
        return ModelSpec(
            name=name, family="gpt2", model_type="gpt2",
            vocab_size=keys.int("vocab_size", upper=MAX_VOCAB),
            hidden_size=hidden,
            num_layers=keys.int("n_layer", upper=MAX_LAYERS),
            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
            intermediate_size=keys.int("n_inner", default=4 * hidden),
            gated_mlp=False, activation=keys.name("activation_function", "gelu_new"),
            qkv_bias=True, out_bias=True, mlp_bias=True, norm="layernorm",
            tie_embeddings=keys.bool("tie_word_embeddings", True),
            learned_positions=True,
            max_positions=keys.int("n_positions", default=1024, upper=MAX_POSITIONS),
            dropout=keys.prob("resid_pdrop", DEFAULT_PDROP),
        )

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        return {"model_type": "gpt2", "vocab_size": spec.vocab_size, "n_embd": spec.hidden_size,
                "n_layer": spec.num_layers, "n_head": spec.num_heads,
                "n_inner": spec.intermediate_size, "n_positions": spec.max_positions,
                "activation_function": spec.activation,
                "resid_pdrop": spec.dropout, "embd_pdrop": spec.dropout,
                "attn_pdrop": spec.dropout, "tie_word_embeddings": spec.tie_embeddings}

    def linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        h, i = spec.hidden_size, spec.intermediate_size
        return (
            LinearShape("attn.c_attn", "attention", h, spec.q_dim + 2 * spec.kv_dim, True),
            LinearShape("attn.c_proj", "attention", spec.q_dim, h, True),
            LinearShape("mlp.c_fc", "mlp", h, i, True),
            LinearShape("mlp.c_proj", "mlp", i, h, True),
        )

    def block_norms(self, spec: ModelSpec) -> tuple[Weight, ...]:
        return norm_weights("ln_1", spec.hidden_size, True) + \
            norm_weights("ln_2", spec.hidden_size, True)

    def block_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        attn, mlp = self.linears(spec)[:2], self.linears(spec)[2:]
        h = spec.hidden_size
        return (*norm_weights("ln_1", h, True), *(w for l in attn for w in linear_weights(l)),
                *norm_weights("ln_2", h, True), *(w for l in mlp for w in linear_weights(l)))

    def root_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        v, h = spec.vocab_size, spec.hidden_size
        head = () if spec.tie_embeddings else (Weight("head", (v, h), "head"),)
        return (Weight("embed", (v, h), "embedding"),
                Weight("positions", (spec.max_positions, h), "position"),
                *norm_weights("final_norm", h, True), *head)

    # ---- symbolic forward ---------------------------------------------------------------
    def embed(self, tape: Tape, job: Job, x: Sym, held: list[Sym]) -> Sym:
        """``drop(wte(ids) + wpe(position_ids))``."""
        spec, h = job.spec, job.spec.hidden_size
        positions = tape.alloc(tape.new(job.s, INT64, False))
        pos = ops.embedding(tape, positions, job.s, spec.max_positions, h, job.d, job.full)
        summed = ops.add(tape, x, pos)
        if not held:
            tape.free(x)
        held += [positions] + ([pos] if job.hf else [])
        job.position_ids = positions
        if not job.hf:
            tape.free(pos)
        out = ops.dropout(tape, summed, spec.dropout)
        if out is not summed:
            tape.free(summed)
        return out

    def block_args(self, job: Job, rope: list[Sym], hf_inputs: list[Sym],
                   layer: int) -> list[Sym]:
        """GPT2Block(hidden_states, cache, causal_mask, ..., position_ids=position_ids)."""
        if not job.hf:
            return []
        return [job.position_ids, *([job.mask] if job.mask is not None else [])]

    def norm(self, tape: Tape, job: Job, x: Sym) -> Sym:
        return ops.layernorm(tape, x, job.tokens, job.spec.hidden_size, job.full or job.bitfit,
                             upcast=job.fp32_list)

    def block(self, tape: Tape, job: Job, x: Sym, rope: list[Sym], layer: int) -> Sym:
        spec, tokens = job.spec, job.tokens
        linear = parts.block_linear(tape, job, self.linears(spec))
        from memplan.attention import attention

        y = self.norm(tape, job, x)
        qkv = linear(y, "attn.c_attn")
        q, k, v = (tape.view(qkv, numel=tokens * n) for n in (spec.q_dim, spec.kv_dim,
                                                                spec.kv_dim))
        tape.op(q, [(qkv, qkv.nbytes)], outputs=[q, k, v])  # split: its backward cats
        att = attention(tape, job, q, k, v, fused=True)
        proj = parts.dropout(tape, linear(att, "attn.c_proj"), spec.dropout)
        tape.free(qkv, att, y)  # attn's locals, and its argument ln_1(x)
        held = job.block_locals  # inference: GPT2Block's ``attn_output``
        if held is None:
            x2 = parts.residual(tape, x, proj)
        else:  # local lives until the block returns (training saves what outlives it anyway)
            x2 = ops.add(tape, x, proj)
            held.append(proj)
        y2 = self.norm(tape, job, x2)
        f = linear(y2, "mlp.c_fc")
        u = parts.gelu_new(tape, f) if job.hf and spec.activation == "gelu_new" else \
            ops.unary(tape, f)  # GELU keeps its input
        tape.free(f)
        m = parts.dropout(tape, linear(u, "mlp.c_proj"), spec.dropout)
        tape.free(u, y2)
        out = parts.residual(tape, x2, m)
        tape.free(x2)
        return out

    def final_norm(self, tape: Tape, job: Job, x: Sym) -> Sym:
        return self.norm(tape, job, x)


PROFILES = (GPT2(),)
