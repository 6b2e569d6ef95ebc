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

from memplan import params as P
from memplan import ops
from memplan.autograd import ALIAS, FP32, INT64, Moment, Sym, Tape
from memplan.regimes import ModelState
from memplan.spec import ModelSpec, TrainSpec


@dataclass(frozen=True)
class ActivationPlan:
    """Activation bytes of one step, for the planner's phases (beyond the model states)."""

    saved_bytes: int          # saved for backward at the end of forward (with the batch)
    loss_forward_bytes: int   # what the loss (or a no-grad forward) holds on top, at its peak
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

    @property
    def tokens(self) -> int:
        return self.b * self.s




FULL_REGIMES = ("full", "mixed", "zero", "zero1", "zero2", "zero3")
LORA_REGIMES = ("lora", "lora-bf16", "qlora")


def plan_activations(spec: ModelSpec, train: TrainSpec, state: ModelState,
                     dropout_mask_bytes: int | None = 1) -> ActivationPlan:
    """Run one forward pass symbolically, then its backward; report both peaks."""
    assert train.batch is not None and train.seq is not None
    regime = train.regime
    tape = Tape(dropout_mask_bytes=dropout_mask_bytes, param_grads_temporary=regime == "mixed")
    prompt = train.prompt_tokens if regime == "prompt-tuning" else 0
    lora = regime in LORA_REGIMES
    job = _Job(spec, train, train.batch, train.seq + prompt, state.compute_bytes,
               full=regime in FULL_REGIMES, bitfit=regime == "bitfit",
               targeted={l.name for l in P.check_rank(spec, train.lora)} if lora else set())
    b, h, v, d, tokens = job.b, spec.hidden_size, spec.vocab_size, job.d, job.tokens
    if regime == "classifier":
        return _classifier(tape, job)

    batch = tape.new(2 * b * train.seq, INT64, False)  # input ids and labels
    tape.pin(batch)
    ids = tape.view(batch, numel=b * train.seq)
    embed_rg = job.full or (lora and train.lora.train_embeddings)
    tied = embed_rg and spec.tie_embeddings
    x = ops.embedding(tape, ids, b * train.seq, v, h, d, embed_rg, tied=tied)
    target: Sym = tape.view(batch, numel=b * train.seq)
    if regime == "input-adapter":  # embed(ids) + delta(ids), the delta trains
        x = ops.add(tape, x, ops.embedding(tape, ids, tokens, v, h, d, True))
    if regime == "prompt-tuning":  # cat(prompt.expand(B, P, h), embed(ids)); labels padded
        x = tape.op(tape.new(tokens * h, d, True), [], param_grad=4 * prompt * h)
        target = tape.new(tokens, INT64, False)
    if spec.learned_positions:
        positions = tape.new(job.s, INT64, False)
        pos = ops.embedding(tape, positions, job.s, spec.max_positions, h, d, job.full)
        x = ops.dropout(tape, ops.add(tape, x, pos), spec.dropout)
    rope = [tape.new(job.s * spec.head_dim, d, False) for _ in range(2)] \
        if spec.family == "llama" else []

    ckpt = train.checkpointing
    for i in range(spec.num_layers):
        if ckpt:  # non-reentrant checkpoint: keeps the block's inputs, recomputes the rest
            tape.begin_group(i, [x, *rope])
        x = _block(tape, job, x, rope)
        if ckpt:
            tape.end_group()

    if spec.norm == "layernorm":
        x = ops.layernorm(tape, x, tokens, h, job.full or job.bitfit)
    else:
        x = ops.rmsnorm(tape, x, tokens, h, job.full)
    head_rg = embed_rg
    logits = ops.linear(tape, x, v, tokens, w_rg=head_rg, tied=tied)
    loss, loss_forward = ops.cross_entropy(tape, logits, tokens, v, target)
    saved = tape.saved_bytes()
    notes = ("checkpointing: each block is recomputed in backward",) if ckpt else ()
    return ActivationPlan(saved, loss_forward, tape.backward(loss), notes)


def _block(tape: Tape, job: _Job, x: Sym, rope: list[Sym]) -> Sym:
    """One transformer block; returns its output."""
    spec, train, tokens = job.spec, job.train, job.tokens
    layers = {l.name: l for l in P.block_linears(spec)}
    cast = job.d != FP32 and train.regime in ("lora-bf16", "qlora")

    def linear(inp: Sym, name: str) -> Sym:
        layer = layers[name]
        rank = train.lora.rank if layer.name in job.targeted else 0
        return ops.linear(tape, inp, layer.out_features, tokens, w_rg=job.full,
                          b_rg=(job.full or job.bitfit) and layer.bias, lora_rank=rank,
                          lora_cast=cast, in_features=layer.in_features)

    h = spec.hidden_size
    if spec.family == "gpt2":
        y = ops.layernorm(tape, x, tokens, h, job.full or job.bitfit)
        qkv = linear(y, "attn.c_attn")
        q, k, v = (tape.view(qkv, numel=tokens * n) for n in (spec.q_dim, spec.kv_dim,
                                                                spec.kv_dim))
        tape.op(q, [(qkv, qkv.nbytes)], outputs=[q, k, v])  # split: its backward cats
        att = _attention(tape, job, q, k, v, fused=True)
        x = ops.add(tape, x, ops.dropout(tape, linear(att, "attn.c_proj"), spec.dropout))
        y = ops.layernorm(tape, x, tokens, h, job.full or job.bitfit)
        u = ops.unary(tape, linear(y, "mlp.c_fc"))  # GELU keeps its input
        return ops.add(tape, x, ops.dropout(tape, linear(u, "mlp.c_proj"), spec.dropout))

    y = ops.rmsnorm(tape, x, tokens, h, job.full)
    q, k = (_rotary(tape, linear(y, name), rope) for name in ("self_attn.q_proj",
                                                               "self_attn.k_proj"))
    v = linear(y, "self_attn.v_proj")
    att = _attention(tape, job, q, k, v, fused=False)
    x = ops.add(tape, x, linear(att, "self_attn.o_proj"))
    y = ops.rmsnorm(tape, x, tokens, h, job.full)
    if spec.gated_mlp:  # act(gate(y)) * up(y)
        u = ops.mul(tape, ops.unary(tape, linear(y, "mlp.gate_proj")), linear(y, "mlp.up_proj"))
    else:
        u = ops.unary(tape, linear(y, "mlp.up_proj"))
    return ops.add(tape, x, linear(u, "mlp.down_proj"))


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
    return ops.add(tape, a, ops.mul(tape, rot, sin))


def _attention(tape: Tape, job: _Job, q: Sym, k: Sym, v: Sym, fused: bool) -> Sym:
    """Causal attention; returns the (B, T, nh·hd) input of the output projection.

    ``fused``: q, k and v are column slices of one c_attn output (GPT-2); otherwise (Llama)
    rotated q and k are contiguous and v a transposed view of v_proj's output.
    """
    spec, d, b, s = job.spec, job.d, job.b, job.s
    nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    tokens = b * s
    rg = q.rg or k.rg or v.rg
    if job.train.attention != "eager":
        # Flash kernels (sdpa on CPU and CUDA) keep q, k, v, the output and an fp32
        # logsumexp per head and query; the output's layout makes the (B, T, nh·hd)
        # reshape a view. Their backward makes the gradients of q, k and v only.
        out = tape.new(tokens * nh * hd, d, rg)
        saves = [q, k, v, out, tape.new(b * nh * s, FP32, False)] if rg else []
        return tape.op(out, [(q, q.nbytes), (k, k.nbytes), (v, v.nbytes)], saves)

    def copy(t: Sym, numel: int, repeat: bool) -> Sym:
        """reshape of a strided view copies (its gradient is a view); repeat_kv's expand
        sums its gradient back to kv heads."""
        out = tape.new(numel, t.itemsize, t.rg)
        return tape.op(out, [(t, t.nbytes if repeat else ALIAS)])

    gqa = nkv != nh
    if fused:  # strided slices of c_attn's output: q, k^T and v are all copied by matmul
        q_r, k_r, v_r = (copy(t, tokens * nh * hd, False) for t in (q, k, v))
    else:  # rotary q is contiguous; k^T is a view unless repeated; v is copied or repeated
        q_r = q
        k_r = copy(k, tokens * nh * hd, True) if gqa else k
        v_r = copy(v, tokens * nh * hd, gqa)
    n_scores = b * nh * s * s
    scores = tape.new(n_scores, d, rg)
    tape.op(scores, [(q_r, q_r.nbytes), (k_r, k_r.nbytes)],
            ([k_r] if q_r.rg else []) + ([q_r] if k_r.rg else []))
    scaled = ops.unary(tape, scores, saves_input=False)
    mask = tape.new(s * s, 1, False)  # the causal mask, made per call
    masked = tape.new(n_scores, d, rg)
    tape.op(masked, [(scaled, scaled.nbytes)], [mask] if rg else [])
    x32 = ops.cast(tape, masked, FP32)
    probs32 = tape.new(n_scores, FP32, rg)
    tape.op(probs32, [(x32, x32.nbytes)], [probs32] if rg else [])  # softmax keeps its output
    probs = ops.dropout(tape, ops.cast(tape, probs32, d), spec.dropout)
    out = tape.new(tokens * nh * hd, d, rg)
    tape.op(out, [(probs, probs.nbytes), (v_r, v_r.nbytes)],
            ([v_r] if probs.rg else []) + ([probs] if v_r.rg else []))
    return copy(out, out.numel, False)  # transpose(1, 2).reshape copies


def _classifier(tape: Tape, job: _Job) -> ActivationPlan:
    """A frozen backbone under no_grad, then a trainable head on the last token.

    Nothing is saved inside the backbone. Its forward peaks in the MLP, where the block's
    input (still held by the caller's loop), the residual after attention, the norm's output
    and (SwiGLU) act(gate), up and their product live together: T·(3h + 3I); GPT-2's MLP
    holds c_fc's output and the GELU at once: T·(3h + 2I). Llama's rotary tables (2 · s ·
    head_dim) live through the whole forward. ``hidden[:, -1]`` is a view, so the head keeps
    the whole final hidden state (T·h) alive; a bf16 backbone's is cast to fp32 first, which
    copies just the B last tokens.
    """
    spec, train, d, tokens = job.spec, job.train, job.d, job.tokens
    b, h, i, c = job.b, spec.hidden_size, spec.intermediate_size, train.num_classes
    mlp_live = 3 * i if spec.gated_mlp else 2 * i
    rope = 2 * job.s * spec.head_dim * d if spec.family == "llama" else 0
    transient = tokens * (3 * h + mlp_live) * d + rope
    batch = 2 * b * train.seq * INT64 + b * INT64  # ids, labels, class labels
    head_in = tokens * h * d if d == FP32 else b * h * FP32
    saved = batch + head_in + b * c * FP32 + FP32  # + log-probabilities, nll's weight
    backward = Moment(activations=saved, gradients=4 * (h * c + c),
                      temporaries=2 * b * c * FP32)
    return ActivationPlan(batch, transient, backward)
