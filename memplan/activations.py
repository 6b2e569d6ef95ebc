"""Activations: what autograd keeps from the forward pass, and the loss temporaries.

The plan follows the computation op by op, as a symbolic forward pass over tensor *sizes*
(never tensors): each op below creates its outputs and saves for backward exactly what its
derivative formula in PyTorch's ``tools/autograd/derivatives.yaml`` needs, and only for the
inputs that require grad (autograd's generated code skips the rest). Storages, not tensors,
are counted, so that a view saved by two ops is counted once. For GPT-style layers this
reproduces the terms of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", section 4.1: ``sbh(34 + 5as/h)`` bytes in fp16 with dropout); the
Llama-style layer (RMSNorm, rotary, SwiGLU, grouped-query attention) is derived the same way.

Per Llama block, full fine-tuning, T = batch × seq tokens, in elements of the compute dtype:
    2 RMSNorms  2 × (3h + 1)  input, normalised x, its weighted output; one fp32 rsqrt per token
    attention   2q + 2kv + nh  rotated q and k, v, the sdpa output, fp32 logsumexp per head
    SwiGLU      4I             gate, act(gate), up, their product
which is what ``memplan profile`` measures; the eager path adds the s² score matrices.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from memplan import params as P
from memplan.regimes import ModelState
from memplan.spec import ModelSpec, TrainSpec

FP32, INT64, BOOL = 4, 8, 1


@dataclass
class Sym:
    """A symbolic tensor: element count, bytes per element, requires-grad, its storage."""

    numel: int
    itemsize: int
    rg: bool
    storage: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class Tape:
    """Creates symbolic tensors and records the storages saved for backward."""

    dropout_mask_bytes: int | None = None  # None: a mask in the input's dtype (CPU kernels)
    saved: dict[int, int] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    def new(self, numel: int, itemsize: int, rg: bool) -> Sym:
        return Sym(numel, itemsize, rg, next(self._ids))

    def save(self, t: Sym) -> None:
        self.saved[t.storage] = t.nbytes

    def saved_bytes(self) -> int:
        return sum(self.saved.values())

    # ---- ops: each saves what its backward needs, for the inputs that require grad ----------
    def linear(self, x: Sym, out_features: int, tokens: int, w_rg: bool, b_rg: bool = False,
               lora_rank: int = 0, lora_cast: bool = False, in_features: int = 0) -> Sym:
        """``x W^T + b`` (addmm/mm: grad_W needs x) plus LoRA's ``s·B(A(x))`` when ranked."""
        if w_rg:
            self.save(x)
        if lora_rank:
            self.save(x)  # lora_A's weight trains, so its input is kept
            if lora_cast and x.rg:  # bf16 base: A is cast per forward; grad_x needs the copy
                self.save(self.new(lora_rank * in_features, x.itemsize, True))
            a = self.new(tokens * lora_rank, x.itemsize, True)
            self.save(a)  # lora_B's weight trains
            if lora_cast:
                self.save(self.new(lora_rank * out_features, x.itemsize, True))
        rg = x.rg or w_rg or b_rg or bool(lora_rank)
        return self.new(tokens * out_features, x.itemsize, rg)

    def mul(self, a: Sym, b: Sym) -> Sym:
        """Elementwise product: grad_a needs b, grad_b needs a."""
        if a.rg:
            self.save(b)
        if b.rg:
            self.save(a)
        return self.new(max(a.numel, b.numel), a.itemsize, a.rg or b.rg)

    def add(self, a: Sym, b: Sym) -> Sym:
        """Elementwise sum: saves nothing."""
        return self.new(max(a.numel, b.numel), a.itemsize, a.rg or b.rg)

    def pointwise(self, x: Sym) -> Sym:
        """silu / gelu: the backward needs the input."""
        if x.rg:
            self.save(x)
        return self.new(x.numel, x.itemsize, x.rg)

    def cast(self, x: Sym, itemsize: int) -> Sym:
        """``.to(dtype)``: a no-op view in the same dtype, else a copy; saves nothing."""
        return x if itemsize == x.itemsize else self.new(x.numel, itemsize, x.rg)

    def dropout(self, x: Sym, p: float) -> Sym:
        """Dropout keeps its mask: bool on CUDA, the input's dtype on the CPU kernels."""
        if p <= 0:
            return x
        if x.rg:
            size = self.dropout_mask_bytes or x.itemsize
            self.save(self.new(x.numel, size, False))
        return self.new(x.numel, x.itemsize, x.rg)

    def rmsnorm(self, x: Sym, tokens: int, hidden: int, w_rg: bool) -> Sym:
        """HF LlamaRMSNorm: ``w · (x32 · rsqrt(mean(x32²) + eps)).to(dtype)``."""
        x32 = self.cast(x, FP32)
        if x32.rg:
            self.save(x32)  # pow(2)
        r = self.new(tokens, FP32, x32.rg)
        if x32.rg:
            self.save(r)  # rsqrt saves its result
        xhat = self.mul(x32, r)
        return self.mul(self.cast(xhat, x.itemsize), Sym(hidden, x.itemsize, w_rg, -1))

    def layernorm(self, x: Sym, tokens: int, w_rg: bool) -> Sym:
        """native_layer_norm saves its input and the fp32 mean and rstd per token."""
        rg = x.rg or w_rg
        if rg:
            self.save(x)
            self.save(self.new(tokens, FP32, False))
            self.save(self.new(tokens, FP32, False))
        return self.new(x.numel, x.itemsize, rg)

    def cross_entropy(self, logits: Sym, tokens: int, vocab: int) -> tuple[int, int]:
        """``cross_entropy(logits.float())``: log_softmax saves its fp32 output, nll_loss a
        scalar weight. Returns (bytes alive at the peak of the loss beyond saved ones, the
        fp32 copy size)."""
        x32 = self.cast(logits, FP32)
        if x32.rg:
            self.save(self.new(tokens * vocab, FP32, True))  # log-probabilities
            self.save(self.new(1, FP32, False))  # total_weight
        copy = x32.nbytes if x32 is not logits else 0
        return logits.nbytes + copy, copy


@dataclass(frozen=True)
class ActivationPlan:
    """Activation and loss bytes of one step, for the planner's phases.

    ``backward_moments`` are the candidate peaks at the start of backward, each as
    (activations, gradients, temporaries) bytes on top of the model states.
    """

    saved_bytes: int              # saved for backward at the end of forward (with the batch)
    loss_forward_bytes: int       # logits (and their fp32 copy) while the loss is computed
    backward_moments: tuple[tuple[int, int, int], ...]
    backward_end_bytes: int       # the gradient flowing into the embedding, at the very end
    notes: tuple[str, ...] = ()


def _lora_rank(train: TrainSpec, targeted: set[str], layer: P.LinearShape) -> int:
    return train.lora.rank if layer.name in targeted else 0


def plan_activations(spec: ModelSpec, train: TrainSpec, state: ModelState,
                     dropout_mask_bytes: int | None = BOOL) -> ActivationPlan:
    """Walk one forward pass symbolically and report what it keeps for backward."""
    assert train.batch is not None and train.seq is not None
    tape = Tape(dropout_mask_bytes=dropout_mask_bytes)
    regime = train.regime
    d = state.compute_bytes
    b = train.batch
    s = train.seq + (train.prompt_tokens if regime == "prompt-tuning" else 0)
    tokens, h, v = b * s, spec.hidden_size, spec.vocab_size
    full = regime in ("full", "mixed", "zero", "zero1", "zero2", "zero3")
    lora = regime in ("lora", "lora-bf16", "qlora")
    bitfit = regime == "bitfit"
    targeted = {l.name for l in P.check_rank(spec, train.lora)} if lora else set()
    embed_rg = full or (lora and train.lora.train_embeddings)
    grad = state.backprop_backbone

    batch = tape.new(2 * b * train.seq, INT64, False)  # input ids and labels
    tape.save(batch)
    ids = batch
    x = tape.new(tokens * h, d, embed_rg)  # token embedding
    if embed_rg:
        tape.save(ids)
    if regime == "input-adapter":
        tape.save(ids)
        x = tape.add(x, tape.new(tokens * h, d, True))
    if regime == "prompt-tuning":
        x = tape.new(tokens * h, d, True)  # cat(prompt, embeddings)
        tape.save(tape.new(tokens, INT64, False))  # cat(-100 padding, labels), nll's target

    ckpt = train.checkpointing and grad
    if not grad:
        x.rg = False
    if spec.learned_positions:
        x = tape.dropout(tape.add(x, tape.new(s * h, d, full)), spec.dropout)
        if full:
            tape.save(tape.new(s, INT64, False))  # position ids, for wpe's gradient
    rope = [tape.new(s * spec.head_dim, d, False) for _ in range(2)] if spec.family == "llama"\
        else []

    block_saved = 0
    for _ in range(spec.num_layers):
        before = tape.saved_bytes()
        if ckpt:  # non-reentrant checkpoint keeps only the block's inputs
            tape.save(x)
            scratch = Tape(dropout_mask_bytes, _ids=tape._ids)  # recomputed, not kept
            x = _block(scratch, spec, train, x, tokens, b, s, d, full, bitfit, targeted, rope)
        else:
            x = _block(tape, spec, train, x, tokens, b, s, d, full, bitfit, targeted, rope)
        block_saved = tape.saved_bytes() - before
    if ckpt:
        for t in rope:
            tape.save(t)

    w_rg = full or bitfit
    x = (tape.layernorm(x, tokens, w_rg) if spec.norm == "layernorm"
         else tape.rmsnorm(x, tokens, h, full))
    if regime == "classifier":
        return _classifier(tape, spec, train, tokens, d)
    head_rg = full or (lora and train.lora.train_embeddings)
    logits = tape.linear(x, v, tokens, w_rg=head_rg)
    fwd, copy = tape.cross_entropy(logits, tokens, v)
    saved = tape.saved_bytes()

    # Backward of the loss. nll_loss_backward makes the gradient of the log-probabilities
    # (dense T × V fp32); log_softmax_backward the gradient of its input (T × V fp32), after
    # which the saved log-probabilities are freed. A bf16 model then copies that gradient back
    # to bf16 (ToCopyBackward); the head's backward makes the gradient of its input (T × h)
    # and, when it trains, of its weight (V × h, made fp32 for the mixed recipe too).
    tv = tokens * v * FP32
    head_grad = spec.hidden_size * v * 4 if head_rg else 0
    moments = [(saved, 0, 2 * tv)]
    if copy:
        moments.append((saved - tv, 0, tv + logits.nbytes))
    moments.append((saved - tv, head_grad, (logits.nbytes if copy else tv) + tokens * h * d))
    # At the very end, the gradient reaching the embedding (T × h) is alive while the
    # embedding's weight gradient is made; a tied embedding already has one (from the head),
    # so the new one is a temporary added into it.
    # Both contributions to a tied embedding's gradient meet in autograd's input buffer, which
    # adds them out of place: the head's (V × h, held since the start), the embedding's and
    # their sum are alive at once.
    end = tokens * h * d
    if full and spec.tie_embeddings:
        end = max(end + v * spec.hidden_size * 4, 2 * v * spec.hidden_size * 4)
    notes = []
    if ckpt:
        notes.append(f"checkpointing: one block's {block_saved} bytes are recomputed in backward")
    return ActivationPlan(saved, fwd, tuple(moments), end, tuple(notes))


def _block(tape: Tape, spec: ModelSpec, train: TrainSpec, x: Sym, tokens: int, b: int, s: int,
           d: int, full: bool, bitfit: bool, targeted: set[str], rope: list[Sym]) -> Sym:
    """One transformer block; returns its output."""
    layers = {l.name: l for l in P.block_linears(spec)}
    cast = d != FP32 and train.regime in ("lora-bf16", "qlora")

    def linear(inp: Sym, name: str) -> Sym:
        layer = layers[name]
        return tape.linear(inp, layer.out_features, tokens, w_rg=full,
                           b_rg=(full or bitfit) and layer.bias,
                           lora_rank=_lora_rank(train, targeted, layer), lora_cast=cast,
                           in_features=layer.in_features)

    h = spec.hidden_size
    if spec.family == "gpt2":
        y = tape.layernorm(x, tokens, full or bitfit)
        qkv = linear(y, "attn.c_attn")
        att = _attention(tape, spec, train, qkv, qkv, qkv, b, s, d, fused=True)
        out = tape.dropout(linear(att, "attn.c_proj"), spec.dropout)
        x = tape.add(x, out)
        y = tape.layernorm(x, tokens, full or bitfit)
        u = tape.pointwise(linear(y, "mlp.c_fc"))
        out = tape.dropout(linear(u, "mlp.c_proj"), spec.dropout)
        return tape.add(x, out)

    y = tape.rmsnorm(x, tokens, h, full)
    q = linear(y, "self_attn.q_proj")
    k = linear(y, "self_attn.k_proj")
    val = linear(y, "self_attn.v_proj")
    q, k = (_rotary(tape, t, rope) for t in (q, k))
    att = _attention(tape, spec, train, q, k, val, b, s, d, fused=False)
    x = tape.add(x, linear(att, "self_attn.o_proj"))
    y = tape.rmsnorm(x, tokens, h, full)
    if spec.gated_mlp:
        g = linear(y, "mlp.gate_proj")
        u = tape.mul(tape.pointwise(g), linear(y, "mlp.up_proj"))
    else:
        u = tape.pointwise(linear(y, "mlp.up_proj"))
    return tape.add(x, linear(u, "mlp.down_proj"))


def _rotary(tape: Tape, t: Sym, rope: list[Sym]) -> Sym:
    """``t·cos + rotate_half(t)·sin``: each product keeps the table, not t."""
    cos, sin = rope
    a = tape.mul(t, cos)
    rot = tape.new(t.numel, t.itemsize, t.rg)  # cat(-t2, t1), saves nothing
    return tape.add(a, tape.mul(rot, sin))


def _attention(tape: Tape, spec: ModelSpec, train: TrainSpec, q: Sym, k: Sym, v: Sym, b: int,
               s: int, d: int, fused: bool) -> Sym:
    """Causal attention; returns the (B, T, nh·hd) input of the output projection.

    ``fused``: q, k and v are column slices of one c_attn output (GPT-2), so they share its
    storage; otherwise (Llama) rotated q and k are contiguous and v a transposed view.
    """
    nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    tokens = b * s
    rg = q.rg or k.rg or v.rg
    if train.attention != "eager":
        # Flash kernels (sdpa on CPU and CUDA): q, k, v, the output and an fp32 logsumexp per
        # head and query; the output's layout makes the (B, T, nh·hd) reshape a view.
        out = tape.new(tokens * nh * hd, d, rg)
        if rg:
            for t in (q, k, v, out):
                tape.save(t)
            tape.save(tape.new(b * nh * s, FP32, False))
        return out
    # Eager: matmul folds (B, nh, ...) into one batch dimension with reshape, which copies a
    # non-contiguous operand; the copy is what is saved.
    if fused:  # strided slices of c_attn's output: q, k^T and v are all copied
        q_r = tape.new(tokens * nh * hd, d, q.rg)
        k_r = tape.new(tokens * nh * hd, d, k.rg)
        v_r = tape.new(tokens * nh * hd, d, v.rg)
    else:
        q_r = q  # rotary output, contiguous: reshape is a view
        # repeat_kv copies (GQA); without it k (contiguous) needs no copy for k^T, while v,
        # a transposed view of v_proj's output, is copied by the reshape.
        k_r = tape.new(tokens * nh * hd, d, k.rg) if nkv != nh else k
        v_r = tape.new(tokens * nh * hd, d, v.rg)
    scores_numel = b * nh * s * s
    if q_r.rg:
        tape.save(k_r)
    if k_r.rg:
        tape.save(q_r)
    scores = tape.new(scores_numel, d, rg)
    if rg:
        tape.save(tape.new(s * s, BOOL, False))  # the causal mask, made per call
    probs32 = tape.new(scores_numel, FP32, rg)
    if rg:
        tape.save(probs32)  # softmax saves its output
    probs = tape.dropout(tape.cast(probs32, d), spec.dropout)
    del scores
    if probs.rg:
        tape.save(v_r)
    if v_r.rg:
        tape.save(probs)
    return tape.new(tokens * nh * hd, d, rg)  # transpose(1, 2).reshape copies


def _classifier(tape: Tape, spec: ModelSpec, train: TrainSpec, tokens: int, d: int
                ) -> ActivationPlan:
    """A frozen backbone under no_grad, then a trainable head on the last token.

    Nothing is saved inside the backbone. Its forward peaks in the MLP, where the block's
    input (still held by the caller's loop), the residual after attention, the norm's output
    and (SwiGLU) act(gate), up and their product live together: T·(3h + 3I); GPT-2's MLP
    holds c_fc's output and the GELU at once: T·(3h + 2I). Llama's rotary tables (2 · s ·
    head_dim) live through the whole forward.
    ``hidden[:, -1]`` is a view, so the head keeps the whole final hidden state (T·h) alive;
    a bf16 backbone's is cast to fp32 first, which copies just the B last tokens.
    """
    b, h, i, c = train.batch, spec.hidden_size, spec.intermediate_size, train.num_classes
    mlp_live = 3 * i if spec.gated_mlp else 2 * i
    rope = 2 * train.seq * spec.head_dim * d if spec.family == "llama" else 0
    transient = tokens * (3 * h + mlp_live) * d + rope
    head_in = tokens * h * d if d == FP32 else b * h * FP32
    tape.save(tape.new(b, INT64, False))  # class labels
    during_backbone = tape.saved_bytes()
    tape.save(tape.new(head_in, 1, False))
    logits = tape.new(b * c, FP32, True)
    tape.cross_entropy(logits, b, c)
    saved = tape.saved_bytes()
    return ActivationPlan(during_backbone, transient, ((saved, 0, 2 * b * c * FP32),), 0)
