"""Phi-3 (transformers ``Phi3Config``, ``Phi3ForCausalLM``): Llama with fused projections.

Differences from Llama (``Phi3Attention``, ``Phi3MLP``, ``Phi3DecoderLayer``): one
``qkv_proj`` (hidden → q + 2·kv) cut into q, k and v by three basic slices (views: a saved v
keeps the whole qkv output alive, and each slice's backward is a zero-filled qkv-sized
gradient); one ``gate_up_proj`` (hidden → 2·intermediate) cut by ``chunk(2, -1)`` (one split,
whose backward cats); ``apply_rotary_pos_emb`` of the partial-rotary kind: ``q[..., :rd]``
(an alias when rd = head_dim) and ``q[..., rd:]`` (a slice, empty then, whose backward still
makes a full-size zero gradient) are rotated and passed, then ``cat`` makes q and k anew,
contiguous head-major, so sdpa's output (laid out like q on the CPU kernels and CUDA's flash)
is copied by ``transpose(1, 2).contiguous()`` before o_proj; ``resid_pdrop`` dropout on
both sublayer outputs (a no-op at 0.0); o_proj is registered before qkv_proj. No biases.
A ``sliding_window`` makes the sliding causal mask, which sdpa materialises once the
sequence reaches the window.

Config defaults for absent keys (``Phi3Config``): ``vocab_size`` 32064, ``hidden_size``
3072, ``intermediate_size`` 8192, ``num_hidden_layers`` 32, ``num_attention_heads`` 32,
``num_key_value_heads`` = heads, ``hidden_act`` silu, ``max_position_embeddings`` 4096,
``resid_pdrop`` 0.0, ``embd_pdrop`` 0.0 (never read), ``attention_dropout`` 0.0,
``tie_word_embeddings`` false, ``sliding_window`` None, ``partial_rotary_factor`` 1.0 (in
``rope_parameters``/``rope_scaling``, or top-level), ``pad_token_id`` 32000 (the profiler
builds with None: a tiny vocabulary cannot hold it), ``rms_norm_eps`` 1e-5; no
``head_dim`` field (``getattr(config, "head_dim", hidden // heads)``: a given one is
honoured) and no bias keys (``attention_bias``/``mlp_bias`` are ignored).
"""

from __future__ import annotations

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


class Phi3(Llama):
    family = "phi3"
    model_types = ("phi3",)
    reference_model = False
    source = "transformers Phi3ForCausalLM"
    default_positions = 4096
    defaults: dict[str, Any] = {
        "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 32}

    # ---- config -------------------------------------------------------------------------
    def read(self, cfg: dict[str, Any], name: str, where: str) -> ModelSpec:
        present = {k: v for k, v in cfg.items() if v is not None}
        return super().read(self.defaults | present, name, where)

    def biases(self, keys: Keys) -> tuple[bool, bool, bool]:
        return False, False, False

    def read_extras(self, keys: Keys) -> tuple[tuple[str, Any], ...]:
        rope = keys.cfg.get("rope_parameters") or keys.cfg.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{keys.where}: rope_parameters must be a dictionary, got "
                              f"{show(rope)}")
        factor = rope.get("partial_rotary_factor", keys.cfg.get("partial_rotary_factor", 1.0))
        if isinstance(factor, bool) or not isinstance(factor, int | float) \
                or not 0 < factor <= 1:
            raise ConfigError(f"{keys.where}: partial_rotary_factor must be in (0, 1], got "
                              f"{show(factor)}")
        window = keys.int("sliding_window", upper=2**24) if keys.has("sliding_window") else None
        extras = {"resid_pdrop": keys.prob("resid_pdrop"), "sliding_window": window,
                  "partial_rotary_factor": float(factor)}
        return tuple(sorted(extras.items()))

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        cfg = super().to_hf(spec)
        del cfg["attention_bias"], cfg["mlp_bias"]
        if spec.head_dim == spec.hidden_size // spec.num_heads:
            del cfg["head_dim"]  # not a Phi3Config field; given only when it differs
        return cfg | {k: spec.extra(k, v) for k, v in (
            ("resid_pdrop", 0.0), ("sliding_window", None), ("partial_rotary_factor", 1.0))}

    def kv_windows(self, spec: ModelSpec) -> list[int | None]:
        """A ``sliding_window`` applies to every layer (Phi3Attention passes it to each)."""
        return [spec.extra("sliding_window")] * spec.num_layers

    def rotary_dim(self, spec: ModelSpec) -> int:
        """The rotated width of a head: the tables' (cat of two inv_freq halves)."""
        return 2 * ((int(spec.head_dim * spec.extra("partial_rotary_factor", 1.0)) + 1) // 2)

    # ---- inventory ----------------------------------------------------------------------
    def attention_linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        h, q = spec.hidden_size, spec.q_dim
        return (LinearShape("self_attn.qkv_proj", "attention", h, q + 2 * spec.kv_dim, False),
                LinearShape("self_attn.o_proj", "attention", q, h, False))

    def mlp_linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        h, i = spec.hidden_size, spec.intermediate_size
        return (LinearShape("mlp.gate_up_proj", "mlp", h, 2 * i, False),
                LinearShape("mlp.down_proj", "mlp", i, h, False))

    def block_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        """Registration order: o_proj, qkv_proj, gate_up_proj, down_proj, the two norms."""
        qkv, o = self.attention_linears(spec)
        layers = (o, qkv, *self.mlp_linears(spec))
        return tuple(w for l in layers for w in linear_weights(l)) + self.block_norms(spec)

    def buffer_bytes(self, spec: ModelSpec) -> int:
        return self.rotary_dim(spec) // 2 * 4  # inv_freq, fp32 (as Llama counts it)

    # ---- symbolic forward ---------------------------------------------------------------
    def rope_tables(self, tape: Tape, job: Job) -> list[Sym]:
        return parts.rope_tables(tape, job, self.rotary_dim(job.spec))

    def hf_inputs(self, tape: Tape, job: Job, held: list[Sym]) -> None:
        """Llama's, and on a real sdpa run the sliding-window mask once the sequence reaches
        the window: a (1, 1, s, s) bool expanded over the batch."""
        super().hf_inputs(tape, job, held)
        window = job.spec.extra("sliding_window")
        if job.mask is None and window is not None and job.s >= window:
            mask = tape.alloc(tape.new(job.s * job.s, 1, False))
            job.mask = tape.view(mask, numel=job.b * job.s * job.s)
            held.append(job.mask)

    def output_copied(self, job: Job) -> bool:
        """sdpa's output is laid out like the (contiguous, head-major) q on the CPU flash
        kernel and CUDA's flash kernel, so ``transpose(1, 2).contiguous()`` copies it; eager
        and the math fallback copy already, CUDA's memory-efficient kernel (fp32, or with a
        mask) writes (B, s, nh, hd) (unverified on a GPU)."""
        if job.train.attention == "eager":
            return False
        if job.runtime != "cuda":
            return job.spec.dropout <= 0
        return job.d != FP32 and job.mask is None

    def qkvo(self, tape: Tape, job: Job, y: Sym, linear: parts.Linear, rope: list[Sym]) -> Sym:
        spec, t = job.spec, job.tokens
        hd, rd = spec.head_dim, self.rotary_dim(spec)
        qkv = linear(y, "self_attn.qkv_proj")
        q, k, v = (tape.view(qkv, numel=t * n) for n in (spec.q_dim, spec.kv_dim, spec.kv_dim))
        for part in (q, k, v):  # three slices, each backward a zero-filled qkv gradient
            tape.op(part, [(qkv, qkv.nbytes)])
        cut = []
        for part, heads in ((q, spec.num_heads), (k, spec.num_kv_heads)):
            rot = tape.view(part, numel=t * heads * rd)  # an alias when rd == hd
            tape.op(rot, [(part, ALIAS if rd == hd else part.nbytes)])
            passed = tape.view(part, numel=t * heads * (hd - rd))
            tape.op(passed, [(part, part.nbytes)])
            cut.append((rot, passed))
        embedded = []
        for rot, passed in cut:  # cat([rot·cos + rotate_half(rot)·sin, pass]): a new tensor
            r = parts.rotary(tape, rot, rope)
            out = tape.new(r.numel + passed.numel, r.itemsize, r.rg or passed.rg)
            embedded.append(tape.op(out, [(r, ALIAS), (passed, ALIAS)]))
            tape.free(r)
        q, k = embedded
        att = attention(tape, job, q, k, v, fused=False)
        if self.output_copied(job):
            flat = tape.op(tape.new(att.numel, att.itemsize, att.rg), [(att, ALIAS)])
            tape.free(att)
            att = flat
        o = linear(att, "self_attn.o_proj")
        tape.free(q, k, att, qkv)  # qkv: a local of the attention's forward
        return o

    def gate_up_mlp(self, tape: Tape, job: Job, y: Sym, linear: parts.Linear) -> Sym:
        """``down(up * act(gate))``, gate and up the two halves of gate_up_proj's output."""
        gu = linear(y, "mlp.gate_up_proj")
        n = job.tokens * job.spec.intermediate_size
        gate, up = tape.view(gu, numel=n), tape.view(gu, numel=n)
        tape.op(gate, [(gu, gu.nbytes)], outputs=[gate, up])  # chunk: its backward cats
        a = ops.unary(tape, gate)
        u = ops.mul(tape, up, a)
        tape.free(a)
        dn = linear(u, "mlp.down_proj")
        tape.free(u, gu)
        return dn

    def residual(self, tape: Tape, job: Job, x: Sym, o: Sym) -> Sym:
        """``x + resid_dropout(o)``: o stays bound through the add."""
        dropped = ops.dropout(tape, o, job.spec.extra("resid_pdrop", 0.0))
        out = ops.add(tape, x, dropped)
        tape.free(o, dropped)
        return out

    def block(self, tape: Tape, job: Job, x: Sym, rope: list[Sym], layer: int) -> Sym:
        linear = parts.block_linear(tape, job, self.linears(job.spec))
        y = self.norm(tape, job, x)
        o = self.qkvo(tape, job, y, linear, rope)
        tape.free(y)
        x2 = self.residual(tape, job, x, o)
        y2 = self.norm(tape, job, x2)
        dn = self.gate_up_mlp(tape, job, y2, linear)
        tape.free(y2)
        out = self.residual(tape, job, x2, dn)
        tape.free(x2)
        return out


PROFILES = (Phi3(),)

_HF = {"impl": "hf"}
_PEFT = {"impl": "hf", "lora_backend": "peft"}
HF_FAKE_ROWS = [
    ("phi-3-mini", dict(regime="full", batch=1, seq=512) | _HF, {"num_layers": 4}),
    ("phi-3-mini", dict(regime="lora-bf16", batch=2, seq=1024) | _PEFT, {}),
    ("phi-3-mini", dict(regime="lora-bf16", batch=2, seq=2048, checkpointing=True) | _PEFT, {}),
    ("phi-3-mini", dict(regime="lora", batch=1, seq=512, attention="eager") | _PEFT,
     {"num_layers": 4}),
]
HF_CPU_ROWS = [
    ("phi3-tiny", dict(regime="full", batch=2, seq=128) | _HF, {}),
    ("phi3-tiny", dict(regime="lora", batch=2, seq=128, lora=LoraSpec(rank=8)) | _PEFT, {}),
]
