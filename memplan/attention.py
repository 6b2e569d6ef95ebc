"""Attention on the symbolic tape: what each PyTorch kernel keeps for backward.

``job`` is :class:`memplan.arch.base.Job` (the model, the job, batch, sequence, dtype, the
runtime and Hugging Face's materialised mask, if any).
"""

from __future__ import annotations

from typing import Any

from memplan import ops
from memplan.autograd import ALIAS, FP32, Sym, Tape


def attention(tape: Tape, job: Any, q: Sym, k: Sym, v: Sym, fused: bool) -> Sym:
    """Causal attention; returns the (B, T, nh·hd) input of the output projection.

    ``fused``: q, k and v are column slices of one c_attn output (GPT-2); otherwise (Llama)
    rotated q and k are contiguous and v a transposed view of v_proj's output.
    """
    spec, d, b, s = job.spec, job.mm, job.b, job.s
    nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    tokens = b * s
    cache = job.kv_cache  # an inference's KV cache write (plan_inference)
    if cache is not None:
        k, v = cache(tape, job, q, k, v)
    rg = q.rg or k.rg or v.rg
    ac = job.autocast
    if job.train.attention != "eager" and spec.dropout > 0 and job.runtime != "cuda":
        if ac is None:
            return _sdpa_math(tape, job, q, k, v, fused, rg)
        casts = [ac.operand(tape, t) for t in (q, k, v)]  # sdpa's autocast casts them first
        out = _sdpa_math(tape, job, *casts, fused, rg)
        tape.free(*(c for c, t in zip(casts, (q, k, v), strict=True) if c is not t))
        return out
    if job.train.attention != "eager":
        # Flash kernels (sdpa on CPU and CUDA) keep q, k, v, the output and an fp32
        # logsumexp per head and query; the output's layout makes the (B, T, nh·hd)
        # reshape a view. Their backward makes the gradients of q, k and v only.
        repeat = job.mask is not None and nkv != nh  # HF: no enable_gqa with a mask
        if repeat:  # one kv head (MQA): reshape of the expand is a view, nothing copied
            k, v = (tape.op(tape.new(tokens * nh * hd, t.itemsize, t.rg) if nkv > 1 else
                            tape.view(t, numel=tokens * nh * hd), [(t, t.nbytes)])
                    for t in (k, v))
        originals = (q, k, v)
        if ac is not None:  # autocast casts each operand of another dtype (rotated q, k)
            q, k, v = (ac.operand(tape, t) for t in originals)
        out = tape.new(tokens * nh * hd, d, rg)
        lse = tape.new(b * nh * s, FP32, False)
        # sdpa converts a bool mask to the query's dtype on every call, and keeps that copy
        masks = [tape.new(job.mask.numel, d, False)] if job.mask is not None else []
        tape.op(out, [(q, q.nbytes), (k, k.nbytes), (v, v.nbytes)],
                [q, k, v, out, lse, *masks] if rg else [])
        if ac is not None:
            tape.free(*(t for t, o in zip((q, k, v), originals, strict=True) if t is not o))
            q, k, v = originals
        if not rg:
            tape.alloc(lse)
            tape.free(lse)
        if repeat and (nkv > 1 or cache is None):  # a view of the cache frees nothing
            tape.free(k, v)
        return out

    def copy(t: Sym, numel: int, repeat: bool) -> Sym:
        """reshape of a strided view copies (its gradient is a view); repeat_kv's expand
        sums its gradient back to kv heads."""
        out = tape.new(numel, t.itemsize, t.rg)
        return tape.op(out, [(t, t.nbytes if repeat else ALIAS)])

    gqa = nkv != nh
    kv = job.kv_len or s  # keys: the cache's and the new tokens (inference)
    n_scores = b * nh * s * kv
    if gqa and not fused:  # repeat_kv rebinds k and v inside attend
        k = copy(k, b * kv * nh * hd, True)
        v = copy(v, b * kv * nh * hd, True)
    # matmul folds (B, nh) with reshape: q (GPT-2's strided slice) and k^T are copied unless
    # they are contiguous (Llama's rotary output, or a repeat_kv copy); the copies are temps.
    # A single sequence (B = 1) folds (1, nh) into nh with a view: nothing is copied.
    q_r = copy(q, q.numel, False) if fused and b > 1 else q
    k_r = copy(k, k.numel, False) if fused and b > 1 else k
    if ac is not None:  # matmul's autocast: its own copies of fp32 operands (rotated q, k)
        q_r, k_r = ac.operand(tape, q_r), ac.operand(tape, k_r)
    scores = tape.new(n_scores, d, rg)
    tape.op(scores, [(q_r, q_r.nbytes), (k_r, k_r.nbytes)],
            ([k_r] if q_r.rg else []) + ([q_r] if k_r.rg else []))
    tape.free(*(t for t in (q_r, k_r) if t not in (q, k)))
    scaled = ops.unary(tape, scores, saves_input=False)
    tape.free(scores)
    softcap = getattr(job.profile, "softcap_scores", None)  # Gemma 2: tanh soft-capping
    if softcap is not None:
        scaled = softcap(tape, job, scaled)
    if job.mask is not None:  # Hugging Face: scores + the model's additive float mask
        mask = None
        masked = ops.add(tape, scaled, job.mask)
    else:  # memplan: masked_fill with a bool mask made per call, kept for backward
        mask = tape.alloc(tape.new(s * s, 1, False))
        masked = tape.new(n_scores, scaled.itemsize if ac is not None else d, rg)
        tape.op(masked, [(scaled, scaled.nbytes)], [mask] if rg else [])
    tape.free(scaled)
    # softmax in fp32 (Llama; GPT-2 in Hugging Face's code: in the scores' dtype)
    # (CUDA's autocast runs softmax in fp32 too: its fp32 list)
    fp32 = not job.hf or job.profile.eager_softmax_fp32 or job.fp32_list
    x32 = ops.cast(tape, masked, FP32) if fp32 else masked
    probs32 = tape.new(n_scores, x32.itemsize, rg)
    tape.op(probs32, [(x32, x32.nbytes)], [probs32] if rg else [])  # softmax keeps its output
    if x32 is not masked:
        tape.free(x32)
    # ``.to(q.dtype)`` (Llama; memplan's models), ``.type(value.dtype)`` (HF's GPT-2): the
    # compute dtype, or under autocast that of q (fp32 once rotated) or of v (a matmul's)
    to = d if ac is None else q.itemsize if not job.hf or job.profile.eager_softmax_fp32 \
        else v.itemsize
    probs = ops.cast(tape, probs32, to)
    if probs is not probs32:
        tape.free(probs32)
    dropped = ops.dropout(tape, probs, spec.dropout)
    if dropped is not probs:
        tape.free(probs)
    # v: Llama's is a transposed view (copied by the reshape unless repeated); GPT-2's a slice
    v_r = copy(v, b * kv * nh * hd, False) if (fused or not gqa) and b > 1 else v
    p_r = dropped
    if ac is not None:  # matmul's autocast: copies of fp32 probabilities (and v)
        p_r, v_c = ac.operand(tape, dropped), ac.operand(tape, v_r)
        if v_c is not v_r:
            tape.free(*([v_r] if v_r is not v else []))
            v_r = v_c
    out = tape.new(tokens * nh * hd, d, rg)
    tape.op(out, [(p_r, p_r.nbytes), (v_r, v_r.nbytes)],
            ([v_r] if p_r.rg else []) + ([p_r] if v_r.rg else []))
    tape.free(*(t for t in (v_r, mask) if t is not v and t is not None), masked,
              *([p_r] if p_r is not dropped else []))
    held = job.block_locals  # inference: the layer's ``_`` keeps the weights
    if held is None:
        tape.free(dropped)
    else:
        held.append(dropped)
    if gqa and not fused:
        tape.free(k, v)
    flat = copy(out, out.numel, False)  # transpose(1, 2).reshape copies
    tape.free(out)
    return flat


def _sdpa_math(tape: Tape, job: Any, q: Sym, k: Sym, v: Sym, fused: bool, rg: bool) -> Sym:
    """sdpa with dropout on the CPU kernels (and so under FakeTensorMode on the CPU): the
    math fallback, ``_scaled_dot_product_attention_math``, autograd through its ops.

    With grouped-query heads, k and v are first repeated to every query head. q and k are
    each scaled by √scale (new tensors; GPT-2's strided slices then copied to
    fold the heads for bmm), a causal mask is made per call (bool ``tril``, then a float
    mask of the scores' dtype, alive to the end of the call), the scores get the mask added,
    ``_safe_softmax`` keeps its output, dropout keeps its mask and its output (bmm's input),
    and the output comes out (B, nh, s, hd), so the (B, T, nh·hd) reshape copies. CUDA runs a
    fused kernel instead (no s² tensor kept).
    """
    d, b, s = job.mm, job.b, job.s
    nh, nkv = job.spec.num_heads, job.spec.num_kv_heads
    n_scores = b * nh * s * s
    repeated = []
    if nkv != nh:  # enable_gqa: k and v repeat_interleave'd to every query head
        repeated = [tape.op(tape.new(t.numel * nh // nkv, t.itemsize, t.rg), [(t, t.nbytes)])
                    for t in (k, v)]
        k, v = repeated

    def folded(t: Sym) -> Sym:
        """``t * √scale``, then the copy ``bmm``'s reshape makes of a strided slice (none
        for a single sequence: folding (1, nh) is a view)."""
        scaled = ops.unary(tape, t, saves_input=False)
        if not fused or b == 1:
            return scaled
        flat = tape.op(tape.new(t.numel, t.itemsize, t.rg), [(scaled, ALIAS)])
        tape.free(scaled)
        return flat

    q_r, k_r = folded(q), folded(k)
    if job.mask is None:  # is_causal: ones(s, s).tril(), then where(mask, 0, -inf)
        causal = tape.alloc(tape.new(s * s, 1, False))
        mask = tape.alloc(tape.new(s * s, d, False))
        tape.free(causal)
    elif job.mask.itemsize == 1:  # a bool mask becomes a float one, per call
        mask = tape.alloc(tape.new(job.mask.numel, d, False))
    else:
        mask = job.mask
    scores = tape.new(n_scores, d, rg)
    tape.op(scores, [(q_r, q_r.nbytes), (k_r, k_r.nbytes)],
            ([k_r] if q_r.rg else []) + ([q_r] if k_r.rg else []))
    tape.free(q_r, k_r)
    masked = ops.add(tape, scores, mask)
    tape.free(scores)
    probs = tape.new(n_scores, d, rg)
    tape.op(probs, [(masked, masked.nbytes)], [probs] if rg else [])  # keeps its output
    tape.free(masked)
    dropped = ops.dropout(tape, probs, job.spec.dropout)
    tape.free(probs)
    v_r = v if b == 1 else \
        tape.op(tape.new(v.numel, v.itemsize, v.rg), [(v, ALIAS)])  # strided: copied
    out = tape.new(b * s * job.spec.num_heads * job.spec.head_dim, d, rg)
    tape.op(out, [(dropped, dropped.nbytes), (v_r, v_r.nbytes)],
            ([v_r] if dropped.rg else []) + ([dropped] if v_r.rg else []))
    tape.free(dropped, *([v_r] if v_r is not v else []), *repeated,
              *([mask] if mask is not job.mask else []))
    flat = tape.op(tape.new(out.numel, d, out.rg), [(out, ALIAS)])  # transpose + reshape
    tape.free(out)
    return flat
