"""The ops of the reference models on the symbolic tape (:mod:`memplan.autograd`).

Each function creates its output, saves what the op's derivative needs (PyTorch's
``tools/autograd/derivatives.yaml``) for the inputs that require grad, and records what its
backward allocates. Where a backward allocates more than the gradients it returns, the
``scratch`` says so (measured per op by ``memplan.profile`` trackers; e.g. ``pow`` builds
``2·x`` and its product with the gradient before returning).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memplan.autograd import ALIAS, FP32, Sym, Tape


@dataclass
class Autocast:
    """``torch.autocast`` over the forward and the loss (``aten/src/ATen/autocast_mode.cpp``).

    Its lower-precision ops (linear, matmul, addmm, sdpa...) run in ``itemsize`` (bf16 or
    fp16): every floating operand of another dtype is cast by its own copy first, and the
    output has the autocast dtype. Everything else runs in its inputs' dtype, so fp32 weights
    keep the residual stream, norms and rotary products in fp32. The copies:

    - an activation (:meth:`operand`): a fresh copy per op, never cached; the op saves the
      copy where it saves its input, and the original is no longer saved by it;
    - a trainable fp32 leaf (:meth:`weight`): one cached copy per parameter, held by the cast
      cache (:attr:`cache`) until the outermost autocast exits, and beyond iff an op saved it;
      its ToCopyBackward turns the copy's gradient into the fp32 ``.grad``;
    - a frozen parameter: a fresh copy per use, saved iff the op's other operand requires
      grad, else dropped with the op.
    """

    itemsize: int
    cache: list[Sym] = field(default_factory=list)

    def operand(self, tape: Tape, t: Sym) -> Sym:
        """``t`` as a lower-precision op reads it: itself in the autocast dtype, else a copy
        (its backward casts the gradient back to t's dtype)."""
        return t if t.itemsize == self.itemsize else unary(tape, t, False, self.itemsize)

    def weight(self, tape: Tape, numel: int, itemsize: int, trainable: bool,
               tied: bool = False) -> Sym | None:
        """A parameter of ``itemsize`` as a lower-precision op reads it: None when it has the
        autocast dtype (the op reads the parameter itself), else its copy: cached (the fp32
        gradient of ``4·numel`` made by the copy's backward) for a trainable one, fresh for a
        frozen one (the caller drops it after the op)."""
        if itemsize == self.itemsize:
            return None
        if not trainable:
            return tape.alloc(tape.new(numel, self.itemsize, False))
        copy = tape.op(tape.new(numel, self.itemsize, True), [], param_grad=4 * numel,
                       tied=tied)
        self.cache.append(copy)
        return copy

    def exit(self, tape: Tape) -> None:
        """The outermost autocast exits: the cast cache lets go of its copies."""
        tape.free(*self.cache)
        self.cache.clear()


def linear(tape: Tape, x: Sym, out_features: int, tokens: int, w_rg: bool, b_rg: bool = False,
           lora_rank: int = 0, lora_cast: bool = False, in_features: int = 0,
           tied: bool = False, peft: bool = False, adapters: int = 1,
           ac: Autocast | None = None, bias: bool = False, weight_itemsize: int = FP32) -> Sym:
    """``x W^T + b`` (grad_W needs x), plus LoRA's ``s·B(A(x))`` when ranked.

    LoRA's branch: A's and B's weights train, so x and A's rank-R output are kept. On a bf16
    base memplan's LoRALinear casts A and B down per forward (kept when the other operand needs
    a gradient); PEFT (``peft``) casts x up to its fp32 adapters instead, adds in fp32 and
    casts the sum back. ``adapters`` K > 1: K adapters, each on its own equal share of the
    batch (:func:`_mixed_lora`).

    ``ac``: under autocast (:class:`Autocast`), the base weight stored in ``weight_itemsize``
    (its bias, if ``bias``, too), and LoRA's fp32 adapters, are cast as autocast casts them
    (:func:`autocast_linear`).
    """
    in_features = in_features or x.numel // tokens
    if ac is not None and adapters == 1:
        return _autocast_lora(tape, ac, x, out_features, tokens, w_rg, b_rg, lora_rank,
                              in_features, tied, peft, bias, weight_itemsize)
    base = tape.new(tokens * out_features, x.itemsize, x.rg or w_rg or b_rg)
    tape.op(base, [(x, x.nbytes)], [x] if w_rg else [],
            param_grad=4 * in_features * out_features * w_rg + 4 * out_features * b_rg,
            tied=tied)
    if not lora_rank:
        return base
    if peft and adapters > 1:  # inference only: TrainSpec refuses PEFT with K > 1
        return _peft_mixed_inference(tape, x, base, lora_rank, in_features, out_features,
                                     tokens, adapters)
    if peft:
        return _peft_lora(tape, x, base, lora_rank, in_features, out_features, tokens)
    if adapters > 1:
        return _mixed_lora(tape, x, base, lora_rank, lora_cast, in_features, out_features,
                           tokens, adapters)
    saves_a = [x] + ([tape.new(lora_rank * in_features, x.itemsize, True)]
                     if lora_cast and x.rg else [])
    a = tape.op(tape.new(tokens * lora_rank, x.itemsize, True), [(x, x.nbytes)], saves_a,
                param_grad=4 * lora_rank * in_features)
    saves_b = [a] + ([tape.new(lora_rank * out_features, x.itemsize, True)] if lora_cast else [])
    bo = tape.op(tape.new(tokens * out_features, x.itemsize, True), [(a, a.nbytes)], saves_b,
                 param_grad=4 * lora_rank * out_features)
    tape.free(a, *saves_a[1:], *saves_b[1:])
    scaled = tape.op(tape.new(bo.numel, x.itemsize, True), [(bo, bo.nbytes)])
    out = add(tape, base, scaled)  # ``out + adapted * s``: base and B's output are locals
    tape.free(base, bo, scaled)
    return out


def autocast_linear(tape: Tape, ac: Autocast, x: Sym, in_features: int, out_features: int,
                     tokens: int, w_rg: bool, b_rg: bool = False, bias: bool = False,
                     itemsize: int = FP32, tied: bool = False) -> Sym:
    """``linear(x, W, b)`` under autocast: x, W and b cast (:class:`Autocast`), the output in
    the autocast dtype. mm saves x's copy iff W trains and W's copy iff x requires grad;
    addmm never saves the bias (its gradient is a sum of the incoming one)."""
    xc = ac.operand(tape, x)
    wc = ac.weight(tape, in_features * out_features, itemsize, w_rg, tied)
    bc = ac.weight(tape, out_features, itemsize, b_rg) if bias or b_rg else None
    out = tape.new(tokens * out_features, ac.itemsize, x.rg or w_rg or b_rg)
    saves = ([xc] if w_rg else []) + ([wc] if x.rg and wc is not None else [])
    tape.op(out, [(t, t.nbytes) for t in (xc, wc, bc) if t is not None], saves,
            param_grad=4 * in_features * out_features * (w_rg and wc is None)
            + 4 * out_features * (b_rg and bc is None), tied=tied and wc is None)
    tape.free(*(t for t in (wc, bc) if t is not None and not t.rg),
              *([xc] if xc is not x else []))
    return out


def _autocast_lora(tape: Tape, ac: Autocast, x: Sym, out_features: int, tokens: int,
                   w_rg: bool, b_rg: bool, rank: int, in_features: int, tied: bool, peft: bool,
                   bias: bool, itemsize: int) -> Sym:
    """:func:`linear` under autocast, LoRA's branch on its fp32 adapters included.

    memplan's LoRALinear: on an fp32 input, ``lora_B(lora_A(x))``, two autocast linears (A
    copies x again for itself, A's and B's weights are cached); on an input in the autocast
    dtype, the explicit per-forward casts of A and B (as on a 16-bit base, unchanged by
    autocast). PEFT: ``x.to(fp32)`` (a copy of a 16-bit input, dropped once the branch has
    run), then A and B as autocast linears, the branch's output in the autocast dtype.
    """
    base = autocast_linear(tape, ac, x, in_features, out_features, tokens, w_rg, b_rg, bias,
                            itemsize, tied)
    if not rank:
        return base
    if not peft and x.itemsize == ac.itemsize:
        saves_a = [x] + ([tape.new(rank * in_features, x.itemsize, True)] if x.rg else [])
        a = tape.op(tape.new(tokens * rank, x.itemsize, True), [(x, x.nbytes)], saves_a,
                    param_grad=4 * rank * in_features)
        cast_b = tape.new(rank * out_features, x.itemsize, True)
        bo = tape.op(tape.new(tokens * out_features, x.itemsize, True), [(a, a.nbytes)],
                     [a, cast_b], param_grad=4 * rank * out_features)
        tape.free(a, *saves_a[1:], cast_b)
    else:
        xa = cast(tape, x, FP32) if peft else x
        a = autocast_linear(tape, ac, xa, in_features, rank, tokens, True)
        bo = autocast_linear(tape, ac, a, rank, out_features, tokens, True)
        tape.free(a)
    scaled = tape.op(tape.new(bo.numel, bo.itemsize, True), [(bo, bo.nbytes)])
    if peft:  # ``lora_B(...) * scaling`` inside the sum: B's output is a temporary
        tape.free(bo)
    out = add(tape, base, scaled)
    tape.free(base, bo, scaled)
    if peft and xa is not x:  # PEFT's rebound x lives until the layer returns
        tape.free(xa)
    return out


def _mixed_lora(tape: Tape, x: Sym, base: Sym, rank: int, lora_cast: bool, in_features: int,
                out_features: int, tokens: int, adapters: int) -> Sym:
    """K adapters over one batch, as :class:`memplan.nn.lora.LoRALinear` runs them (PEFT's
    ``_mixed_batch_forward``): per adapter, the gather ``x[rows]`` (a copy; its backward
    scatters into a zero tensor the size of x), ``A`` and ``B`` on the copy (A keeps it, B
    keeps A's output), ``· s``, and ``out.index_put((rows,), ·, accumulate=True)``, out of
    place, which keeps only the rows: its backward passes the gradient through to ``out`` and
    gathers the rows' part for the adapter."""
    sub_tokens = tokens // adapters
    out = base
    for _ in range(adapters):
        sub = tape.op(tape.new(sub_tokens * in_features, x.itemsize, x.rg), [(x, x.nbytes)])
        saves_a = [sub] + ([tape.new(rank * in_features, x.itemsize, True)]
                           if lora_cast and sub.rg else [])
        a = tape.op(tape.new(sub_tokens * rank, x.itemsize, True), [(sub, sub.nbytes)],
                    saves_a, param_grad=4 * rank * in_features)
        saves_b = [a] + ([tape.new(rank * out_features, x.itemsize, True)] if lora_cast else [])
        bo = tape.op(tape.new(sub_tokens * out_features, x.itemsize, True), [(a, a.nbytes)],
                     saves_b, param_grad=4 * rank * out_features)
        tape.free(a, *saves_a[1:], *saves_b[1:])
        scaled = tape.op(tape.new(bo.numel, x.itemsize, True), [(bo, bo.nbytes)])
        tape.free(sub, bo)
        new = tape.op(tape.new(out.numel, out.itemsize, True),
                      [(out, ALIAS), (scaled, scaled.nbytes)])
        tape.free(out, scaled)
        out = new
    return out


def _peft_mixed_inference(tape: Tape, x: Sym, base: Sym, rank: int, in_features: int,
                          out_features: int, tokens: int, adapters: int) -> Sym:
    """PEFT's ``_mixed_batch_forward`` under ``torch.no_grad`` (``peft/tuners/lora/layer.py``),
    adapters in the base's dtype, K equal shares of the batch. Per adapter: ``sub_batch =
    x[rows]`` (a copy), ``lora_output = lora_B(lora_A(sub_batch)) * scaling`` (A's output
    freed once B has run, B's once scaled), then ``result[rows] += lora_output``: a gathered
    copy of the rows, added to in place and written back in place (``index_put_``), freed.
    ``sub_batch`` and ``lora_output`` are locals: each lives until the next adapter's
    replaces it, the last until the function returns."""
    sub_tokens = tokens // adapters
    sub = out = None
    for _ in range(adapters):
        new_sub = tape.alloc(tape.new(sub_tokens * in_features, x.itemsize, False))
        if sub is not None:
            tape.free(sub)
        sub = new_sub
        a = tape.alloc(tape.new(sub_tokens * rank, x.itemsize, False))
        bo = tape.alloc(tape.new(sub_tokens * out_features, x.itemsize, False))
        tape.free(a)
        new_out = tape.alloc(tape.new(sub_tokens * out_features, x.itemsize, False))
        tape.free(bo)
        if out is not None:
            tape.free(out)
        out = new_out
        rows = tape.alloc(tape.new(sub_tokens * out_features, base.itemsize, False))
        tape.free(rows)
    tape.free(sub, out)
    return base


def add(tape: Tape, a: Sym, b: Sym) -> Sym:
    """Elementwise sum: saves nothing; its gradient passes through to both inputs (cast or
    summed down for an input of another dtype or a broadcast one)."""
    out = tape.new(max(a.numel, b.numel), max(a.itemsize, b.itemsize), a.rg or b.rg)
    return tape.op(out, [(t, ALIAS if t.numel == out.numel and t.itemsize == out.itemsize
                          else t.nbytes) for t in (a, b)])


def _peft_lora(tape: Tape, x: Sym, base: Sym, rank: int, in_features: int, out_features: int,
               tokens: int) -> Sym:
    """PEFT's ``result + lora_B(lora_A(x.to(fp32))) * scaling``, then ``.to(result.dtype)``."""
    xa = cast(tape, x, FP32)
    a = tape.op(tape.new(tokens * rank, FP32, True), [(xa, xa.nbytes)], [xa],
                param_grad=4 * rank * in_features)
    bo = tape.op(tape.new(tokens * out_features, FP32, True), [(a, a.nbytes)], [a],
                 param_grad=4 * rank * out_features)
    tape.free(a)
    scaled = tape.op(tape.new(bo.numel, FP32, True), [(bo, bo.nbytes)])
    tape.free(bo)
    summed = add(tape, base, scaled)
    tape.free(base, scaled)
    out = cast(tape, summed, base.itemsize)
    if out is not summed:
        tape.free(summed)
    if xa is not x:
        tape.free(xa)
    return out


def mul(tape: Tape, a: Sym, b: Sym) -> Sym:
    """Elementwise product: grad_a needs b, grad_b needs a. A broadcast operand's gradient
    is the full product ``g·other`` summed down (a full-size temporary)."""
    out = tape.new(max(a.numel, b.numel), max(a.itemsize, b.itemsize), a.rg or b.rg)
    saves = ([b] if a.rg else []) + ([a] if b.rg else [])
    scratch = sum(out.nbytes for t in (a, b) if t.rg and t.numel < out.numel)
    return tape.op(out, [(a, a.nbytes), (b, b.nbytes)], saves, scratch=scratch)


def scale(tape: Tape, x: Sym, w_rg: bool, hidden: int) -> Sym:
    """``weight · x`` with a per-channel weight: its gradient reduces ``g · x`` over tokens."""
    out = tape.new(x.numel, x.itemsize, x.rg or w_rg)
    return tape.op(out, [(x, x.nbytes)], [x] if w_rg else [], param_grad=4 * hidden * w_rg,
                   scratch=x.nbytes if w_rg else 0)


def unary(tape: Tape, x: Sym, saves_input: bool = True, itemsize: int | None = None,
          numel: int | None = None, scratch: int = 0) -> Sym:
    """A one-input op whose backward makes one gradient of the input's size."""
    out = tape.new(x.numel if numel is None else numel, itemsize or x.itemsize, x.rg)
    return tape.op(out, [(x, x.nbytes)], [x] if saves_input and x.rg else [], scratch=scratch)


def cast(tape: Tape, x: Sym, itemsize: int) -> Sym:
    """``.to(dtype)``: the same tensor in its own dtype, else a copy (saves nothing)."""
    return x if itemsize == x.itemsize else unary(tape, x, False, itemsize)


def dropout(tape: Tape, x: Sym, p: float) -> Sym:
    """Dropout keeps its mask (bool on CUDA, the input's dtype on the CPU kernels)."""
    if p <= 0:
        return x
    mask = tape.new(x.numel, tape.dropout_mask_bytes or x.itemsize, False)
    out = tape.new(x.numel, x.itemsize, x.rg)
    return tape.op(out, [(x, x.nbytes)], [mask] if x.rg else [])


def rmsnorm(tape: Tape, x: Sym, tokens: int, hidden: int, w_rg: bool) -> Sym:
    """HF LlamaRMSNorm: ``w · (x32 · rsqrt(mean(x32²) + eps)).to(dtype)``."""
    x32 = cast(tape, x, FP32)
    sq = unary(tape, x32, scratch=2 * x32.nbytes)  # pow(2): grad 2·x·g, two temporaries
    var = unary(tape, sq, saves_input=False, numel=tokens)  # mean
    tape.free(sq)
    var_eps = tape.op(tape.new(tokens, FP32, var.rg), [(var, ALIAS)])
    r = tape.new(tokens, FP32, var_eps.rg)
    tape.op(r, [(var_eps, var_eps.nbytes)], [r] if r.rg else [])  # rsqrt saves its result
    xhat = mul(tape, x32, r)
    tape.free(var_eps, r, *([x32] if x32 is not x else []))
    low = cast(tape, xhat, x.itemsize)
    out = scale(tape, low, w_rg, hidden)
    tape.free(var, xhat, low)
    return out


def layernorm(tape: Tape, x: Sym, tokens: int, hidden: int, w_rg: bool,
              upcast: bool = False) -> Sym:
    """native_layer_norm saves its input and the fp32 mean and rstd per token.

    ``upcast``: CUDA's autocast (layer_norm on its fp32 list) runs it on an fp32 copy of a
    16-bit input, which it saves instead, and returns fp32."""
    x32 = cast(tape, x, FP32) if upcast else x
    out = tape.new(x.numel, x32.itemsize, x.rg or w_rg)
    saves = [x32, tape.new(tokens, FP32, False), tape.new(tokens, FP32, False)] \
        if out.rg else []
    tape.op(out, [(x32, x32.nbytes)], saves, param_grad=2 * 4 * hidden * w_rg)
    if x32 is not x:
        tape.free(x32)
    return out


def cross_entropy(tape: Tape, logits: Sym, tokens: int, vocab: int, target: Sym | None) -> Sym:
    """``cross_entropy(logits.float())``: log_softmax saves its fp32 output, nll_loss the
    target and a scalar weight."""
    x32 = cast(tape, logits, FP32)
    logp = tape.new(tokens * vocab, FP32, x32.rg)
    tape.op(logp, [(x32, x32.nbytes)], [logp] if logp.rg else [])  # keeps its output
    weight = tape.new(1, FP32, False)
    loss = tape.new(1, FP32, logp.rg)
    tape.op(loss, [(logp, logp.nbytes)], [weight] + ([target] if target else []))
    tape.free(logp, *([x32] if x32 is not logits else []))
    return loss


def embedding(tape: Tape, ids: Sym, tokens: int, rows: int, hidden: int, d: int, w_rg: bool,
              tied: bool = False) -> Sym:
    """A table lookup: its weight's gradient (rows × hidden, fp32) needs the ids."""
    out = tape.new(tokens * hidden, d, w_rg)
    return tape.op(out, [], [ids] if w_rg else [], param_grad=4 * rows * hidden * w_rg,
                   tied=tied)
