"""Activations: what one training step keeps from its forward pass, and its backward peak.

The reference models' forward pass, written op by op on a symbolic tape
(:mod:`memplan.autograd`): each op says what it saves for backward (PyTorch's
``derivatives.yaml``) and what its backward allocates. For GPT-style layers this reproduces the
terms of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", section 4.1: ``sbh(34 + 5as/h)`` bytes in fp16 with dropout); the Llama-style layer
(RMSNorm, rotary, SwiGLU, grouped-query attention) is derived the same way.

Per Llama block, full fine-tuning, T = batch × seq tokens, in elements of the compute dtype:
    2 RMSNorms  2 × (3h + 1)  input, normalised x, its weighted output; one fp32 rsqrt per token
    attention   2q + 2kv + nh  rotated q and k, v, the sdpa output, fp32 logsumexp per head
    SwiGLU      4I             gate, act(gate), up, their product
The eager path adds the s² score matrices; frozen weights drop the inputs only they needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memplan import ops
from memplan import params as P
from memplan.attention import attention
from memplan.autograd import ALIAS, FP32, INT64, Moment, Sym, Tape
from memplan.regimes import ModelState
from memplan.spec import PAPER_STAGES, ModelSpec, TrainSpec


@dataclass(frozen=True)
class ActivationPlan:
    """Activation bytes of one step, for the planner's phases (beyond the model states)."""

    forward: Moment           # the largest moment of the forward pass
    backward: Moment          # the largest moment of the backward pass
    notes: tuple[str, ...] = ()


@dataclass
class _Job:
    """What the ops of one forward need to know."""

    spec: ModelSpec
    train: TrainSpec
    b: int
    s: int
    d: int
    full: bool
    bitfit: bool
    targeted: set[str]
    runtime: str = "cuda"
    mask: Sym | None = None  # Hugging Face's materialised attention mask, one per forward
    bf16_policy: bool = False  # FSDP's MixedPrecisionPolicy: every parameter gathered in bf16

    @property
    def hf(self) -> bool:
        """Hugging Face's model code (``--impl hf``) rather than memplan's reference models."""
        return self.train.impl == "hf"

    @property
    def tokens(self) -> int:
        return self.b * self.s




FULL_REGIMES = ("full", "mixed", "zero", *PAPER_STAGES)
LORA_REGIMES = ("lora", "lora-bf16", "qlora")


def plan_activations(spec: ModelSpec, train: TrainSpec, state: ModelState,
                     runtime: str = "cuda", fsdp: Any = None) -> ActivationPlan:
    """Run one forward pass symbolically, then its backward; report both peaks.

    ``runtime``: ``cuda`` plans a real run; ``cpu`` and ``fake`` plan a run measured by
    memplan's tracker (CPU kernels keep dropout masks in the input's dtype, and any active
    TorchDispatchMode makes autograd add gradients out of place). ``fsdp``: a
    :class:`memplan.fsdp.Schedule` when the model is sharded; its buffers join every moment.
    """
    assert train.batch is not None and train.seq is not None
    regime = train.regime
    bf16_policy = fsdp is not None and train.param_dtype == "bf16"  # gathered and run in bf16
    compute = 2 if bf16_policy else state.compute_bytes
    tape = Tape(dropout_mask_bytes=1 if runtime == "cuda" else None,
                # the mixed recipe's hooks move each gradient out at once, and so do ZeRO-2
                # and -3 (reduce-scattered bucket by bucket) into their sharded buffers
                param_grads_temporary=regime in ("mixed", "zero2", "zero3") and fsdp is None,
                grad_itemsize=compute if regime in PAPER_STAGES or bf16_policy else FP32,
                inplace_accumulation=runtime == "cuda", fsdp=fsdp)
    prompt = train.prompt_tokens if regime == "prompt-tuning" else 0
    lora = regime in LORA_REGIMES
    job = _Job(spec, train, train.batch, train.seq + prompt, compute,
               full=regime in FULL_REGIMES, bitfit=regime == "bitfit",
               targeted={l.name for l in P.check_rank(spec, train.lora)} if lora else set(),
               runtime=runtime, bf16_policy=bf16_policy)
    b, h, v, d, tokens = job.b, spec.hidden_size, spec.vocab_size, job.d, job.tokens

    batch = tape.new(2 * b * train.seq, INT64, False)  # input ids and labels
    tape.pin(batch)
    tape.begin_forward()
    ids = tape.view(batch, numel=b * train.seq)
    embed_rg = job.full or (lora and train.lora.train_embeddings)
    tied = embed_rg and spec.tie_embeddings
    x = ops.embedding(tape, ids, b * train.seq, v, h, d, embed_rg, tied=tied)
    target: Sym = tape.view(batch, numel=b * train.seq)
    if regime == "input-adapter":  # embed(ids) + delta(ids), the delta trains
        delta = ops.embedding(tape, ids, tokens, v, h, d, True)
        base, x = x, ops.add(tape, x, delta)
        tape.free(base, delta)
    if regime == "prompt-tuning":  # cat(prompt.expand(B, P, h), embed(ids)); labels padded
        base, x = x, tape.op(tape.new(tokens * h, d, True), [], param_grad=4 * prompt * h)
        tape.free(base)
        target = tape.alloc(tape.new(tokens, INT64, False))
    # Referenced for the whole forward: GPT-2's position ids, Llama's rotary tables, and the
    # input embeddings when they come in as ``inputs_embeds`` (the adapters' regimes) or, in
    # Hugging Face's models, as the body's ``inputs_embeds`` (and GPT-2's position_embeds).
    held = [x] if job.hf or regime in ("input-adapter", "prompt-tuning") else []
    if spec.learned_positions:
        positions = tape.alloc(tape.new(job.s, INT64, False))
        pos = ops.embedding(tape, positions, job.s, spec.max_positions, h, d, job.full)
        summed = ops.add(tape, x, pos)
        if not held:
            tape.free(x)
        held = [*held, positions] + ([pos] if job.hf else [])
        if not job.hf:
            tape.free(pos)
        x = ops.dropout(tape, summed, spec.dropout)
        if x is not summed:
            tape.free(summed)
    rope = _rope_tables(tape, job) if spec.family == "llama" else []
    held += rope
    if job.hf:  # cache_position / position_ids, and a (B, 1, s, s) mask when materialised:
        # always on the eager path; for sdpa only under FakeTensorMode, where transformers'
        # _ignore_causal_mask_sdpa sees a fake cache_position as tracing and keeps the mask
        held.append(tape.alloc(tape.new(job.s, INT64, False)))
        if train.attention == "eager" or runtime == "fake":  # eager: float; sdpa: bool
            itemsize = d if train.attention == "eager" else 1
            job.mask = tape.alloc(tape.new(b * job.s * job.s, itemsize, False))
            held.append(job.mask)

    ckpt = train.checkpointing
    for i in range(spec.num_layers):
        tape.enter_block(i, x)
        if ckpt:  # non-reentrant checkpoint: keeps the block's inputs, recomputes the rest
            tape.begin_group(i, [x, *rope])
        x_in, x = x, _block(tape, job, x, rope)
        if ckpt:
            tape.end_group()
        tape.exit_block(i)
        if x_in not in held:
            tape.free(x_in)

    if spec.norm == "layernorm":
        hidden = ops.layernorm(tape, x, tokens, h, job.full or job.bitfit)
    else:
        hidden = ops.rmsnorm(tape, x, tokens, h, job.full)
    tape.free(x, *held)
    if regime == "classifier":
        return _classifier_head(tape, job, hidden)
    logits = ops.linear(tape, hidden, v, tokens, w_rg=embed_rg, tied=tied)
    tape.free(hidden)
    padded = None
    if job.hf:  # ForCausalLMLoss: logits.float(), pad labels by one, shift_labels contiguous
        x32 = ops.cast(tape, logits, FP32)
        padded = tape.alloc(tape.new(b * (train.seq + 1), INT64, False))
        target = tape.alloc(tape.new(tokens, INT64, False))
        loss = ops.cross_entropy(tape, x32, tokens, v, target)
        tape.free(padded, target, *([x32] if x32 is not logits else []))
    else:
        loss = ops.cross_entropy(tape, logits, tokens, v, target)
    tape.free(logits)
    tape.end_forward()
    notes = ("checkpointing: each block is recomputed in backward",) if ckpt else ()
    return ActivationPlan(tape.forward_peak, tape.backward(loss), notes)


def _rope_tables(tape: Tape, job: _Job) -> list[Sym]:
    """cos and sin (s × head_dim), computed in fp32 from positions and inv_freq."""
    s, hd, d = job.s, job.spec.head_dim, job.d
    temps = [tape.alloc(tape.new(n, FP32, False)) for n in (s, s * hd // 2, s * hd)]
    tables = []
    for _ in range(2):  # emb.cos().to(dtype), emb.sin().to(dtype)
        t32 = tape.alloc(tape.new(s * hd, FP32, False))
        if d != FP32:
            tables.append(tape.alloc(tape.new(s * hd, d, False)))
            tape.free(t32)
        else:
            tables.append(t32)
    tape.free(*temps)
    return tables


def _block(tape: Tape, job: _Job, x: Sym, rope: list[Sym]) -> Sym:
    """One transformer block; returns its output."""
    spec, train, tokens = job.spec, job.train, job.tokens
    layers = {l.name: l for l in P.block_linears(spec)}
    # a bf16 base with fp32 adapters casts the input for them (not under FSDP's bf16 policy,
    # which gathers the adapters in bf16 too)
    cast = job.d != FP32 and train.regime in ("lora-bf16", "qlora") and not job.bf16_policy

    def linear(inp: Sym, name: str) -> Sym:
        layer = layers[name]
        rank = train.lora.rank if layer.name in job.targeted else 0
        return ops.linear(tape, inp, layer.out_features, tokens, w_rg=job.full,
                          b_rg=(job.full or job.bitfit) and layer.bias, lora_rank=rank,
                          lora_cast=cast, in_features=layer.in_features,
                          peft=train.lora_backend == "peft")

    h = spec.hidden_size
    if spec.family == "gpt2":
        y = ops.layernorm(tape, x, tokens, h, job.full or job.bitfit)
        qkv = linear(y, "attn.c_attn")
        q, k, v = (tape.view(qkv, numel=tokens * n) for n in (spec.q_dim, spec.kv_dim,
                                                                spec.kv_dim))
        tape.op(q, [(qkv, qkv.nbytes)], outputs=[q, k, v])  # split: its backward cats
        att = attention(tape, job, q, k, v, fused=True)
        proj = _dropout(tape, linear(att, "attn.c_proj"), spec.dropout)
        tape.free(qkv, att, y)  # attn's locals, and its argument ln_1(x)
        x2 = ops.add(tape, x, proj)
        tape.free(proj)
        y2 = ops.layernorm(tape, x2, tokens, h, job.full or job.bitfit)
        f = linear(y2, "mlp.c_fc")
        u = _gelu_new(tape, f) if job.hf and spec.activation == "gelu_new" else \
            ops.unary(tape, f)  # GELU keeps its input
        tape.free(f)
        m = _dropout(tape, linear(u, "mlp.c_proj"), spec.dropout)
        tape.free(u, y2)
        out = ops.add(tape, x2, m)
        tape.free(m, x2)
        return out

    y = ops.rmsnorm(tape, x, tokens, h, job.full)
    q_lin, k_lin, v = (linear(y, f"self_attn.{n}_proj") for n in "qkv")
    q = _rotary(tape, q_lin, rope)
    k = _rotary(tape, k_lin, rope)
    tape.free(q_lin, k_lin)  # apply_rotary's results rebind q and k
    att = attention(tape, job, q, k, v, fused=False)
    o = linear(att, "self_attn.o_proj")
    tape.free(q, k, v, att, y)
    x2 = ops.add(tape, x, o)
    tape.free(o)
    y2 = ops.rmsnorm(tape, x2, tokens, h, job.full)
    if spec.gated_mlp:  # act(gate(y)) * up(y)
        g = linear(y2, "mlp.gate_proj")
        a = ops.unary(tape, g)
        tape.free(g)
        up = linear(y2, "mlp.up_proj")
        u = ops.mul(tape, a, up)
        tape.free(a, up)
    else:
        up = linear(y2, "mlp.up_proj")
        u = ops.unary(tape, up)
        tape.free(up)
    dn = linear(u, "mlp.down_proj")
    tape.free(u, y2)
    out = ops.add(tape, x2, dn)
    tape.free(dn, x2)
    return out


def _gelu_new(tape: Tape, x: Sym) -> Sym:
    """Hugging Face's NewGELUActivation, op by op:
    ``0.5 * x * (1.0 + tanh(sqrt(2/pi) * (x + 0.044715 * x.pow(3))))``. It keeps x, tanh's
    output, 0.5·x and 1 + tanh: four tensors where ``F.gelu(approximate="tanh")`` keeps one."""
    half = ops.unary(tape, x, saves_input=False)  # 0.5 * x
    cube = ops.unary(tape, x, scratch=2 * x.nbytes)  # pow(x, 3) keeps x
    small = ops.unary(tape, cube, saves_input=False)
    tape.free(cube)
    inner = ops.add(tape, x, small)
    tape.free(small)
    scaled = ops.unary(tape, inner, saves_input=False)
    tape.free(inner)
    th = tape.new(x.numel, x.itemsize, x.rg)
    tape.op(th, [(scaled, scaled.nbytes)], [th] if th.rg else [])  # tanh keeps its output
    tape.free(scaled)
    one_plus = tape.op(tape.new(x.numel, x.itemsize, x.rg), [(th, ALIAS)])
    tape.free(th)
    out = ops.mul(tape, half, one_plus)
    tape.free(half, one_plus)
    return out


def _dropout(tape: Tape, x: Sym, p: float) -> Sym:
    """Residual dropout; its input is dropped once it has run."""
    out = ops.dropout(tape, x, p)
    if out is not x:
        tape.free(x)
    return out


def _rotary(tape: Tape, t: Sym, rope: list[Sym]) -> Sym:
    """``t·cos + rotate_half(t)·sin``, rotate_half = cat(-t[..., h/2:], t[..., :h/2]).

    The products keep the tables, not t. In backward each slice's gradient is a full-size
    zero tensor with the slice copied in, and the negation makes one more half.
    """
    cos, sin = rope
    a = ops.mul(tape, t, cos)
    half = t.numel // 2
    upper, lower = tape.view(t, numel=half), tape.view(t, numel=half)
    tape.op(upper, [(t, t.nbytes)])
    tape.op(lower, [(t, t.nbytes)])
    neg = ops.unary(tape, upper, saves_input=False)
    rot = tape.new(t.numel, t.itemsize, t.rg)
    tape.op(rot, [(neg, ALIAS), (lower, ALIAS)])  # cat: its gradient's halves are views
    tape.free(neg)
    b = ops.mul(tape, rot, sin)
    tape.free(rot)
    out = ops.add(tape, a, b)
    tape.free(a, b)
    return out


def _classifier_head(tape: Tape, job: _Job, hidden: Sym) -> ActivationPlan:
    """The head on the last token of a backbone run under no_grad (nothing above is saved).

    ``hidden[:, -1]`` is a view: in fp32 the head keeps the whole final hidden state (T·h)
    alive; a bf16 backbone's view is cast to fp32 first, which copies only the B last tokens,
    but the view keeps the bf16 hidden state alive until the loss returns.
    """
    b, h, c = job.b, job.spec.hidden_size, job.train.num_classes
    labels = tape.new(b, INT64, False)
    tape.pin(labels)
    last = hidden if job.d == FP32 else tape.alloc(tape.new(b * h, FP32, False))
    logits = tape.new(b * c, FP32, True)
    tape.op(logits, [], [last], param_grad=4 * (h * c + c))
    loss = ops.cross_entropy(tape, logits, b, c, labels)
    tape.free(logits, last, hidden)
    return ActivationPlan(tape.forward_peak, tape.backward(loss))
