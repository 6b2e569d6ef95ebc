"""Shared parts of the families' symbolic forwards: the pieces a profile composes.

Each part records on the tape what the PyTorch code it follows allocates and saves
(:mod:`memplan.ops` holds the single ops; these are the multi-op modules: rotary tables and
their application, Hugging Face's tanh-GELU written out, a block's linear with its LoRA
branch, the attention sublayer of q/k/v/o projections, the gated MLP).
"""

from __future__ import annotations

from collections.abc import Callable

from memplan import ops
from memplan.arch.base import Job, LinearShape
from memplan.attention import attention
from memplan.autograd import ALIAS, FP32, Sym, Tape

Linear = Callable[[Sym, str], Sym]


def block_linear(tape: Tape, job: Job, layers: tuple[LinearShape, ...]) -> Linear:
    """``linear(x, name)``: the block's linear ``name`` applied to x, LoRA included when
    targeted. A bf16 base with fp32 adapters casts the input for them (not under FSDP's bf16
    policy, which gathers the adapters in bf16 too)."""
    by_name = {layer.name: layer for layer in layers}
    train = job.train
    cast = job.d != FP32 and train.recipe.sixteen_bit_base and not job.bf16_policy

    def linear(inp: Sym, name: str) -> Sym:
        layer = by_name[name]
        rank = train.lora.rank if layer.name in job.targeted else 0
        return ops.linear(tape, inp, layer.out_features, job.tokens, w_rg=job.full,
                          b_rg=(job.full or job.bitfit) and layer.bias, lora_rank=rank,
                          lora_cast=cast, in_features=layer.in_features,
                          peft=train.lora_backend == "peft", adapters=job.adapters,
                          ac=job.autocast, bias=layer.bias, weight_itemsize=job.d)
    return linear


def rope_tables(tape: Tape, job: Job, head_dim: int | None = None) -> list[Sym]:
    """cos and sin (s × head_dim), computed in fp32 from positions and inv_freq."""
    s, d = job.s, job.d
    hd = head_dim or job.spec.head_dim
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


def rotary(tape: Tape, t: Sym, rope: list[Sym]) -> Sym:
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


def gelu_new(tape: Tape, x: Sym) -> Sym:
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


def dropout(tape: Tape, x: Sym, p: float) -> Sym:
    """Residual dropout; its input is dropped once it has run."""
    out = ops.dropout(tape, x, p)
    if out is not x:
        tape.free(x)
    return out


def residual(tape: Tape, x: Sym, y: Sym) -> Sym:
    """``x + y``; the sublayer's output y is dropped (x stays the caller's)."""
    out = ops.add(tape, x, y)
    tape.free(y)
    return out


def qkvo_attention(tape: Tape, job: Job, y: Sym, linear: Linear, rope: list[Sym],
                   qk_norm: Callable[[Sym, str], Sym] | None = None) -> Sym:
    """Llama-style attention on a normalised input y: q, k, v projections, optional q/k
    norms (``qk_norm(t, "q")``), rotary on q and k, attention, o_proj. Frees y."""
    q_lin, k_lin, v = (linear(y, f"self_attn.{n}_proj") for n in "qkv")
    if qk_norm is not None:
        q_n, k_n = qk_norm(q_lin, "q"), qk_norm(k_lin, "k")
        tape.free(q_lin, k_lin)
        q_lin, k_lin = q_n, k_n
    if rope:
        q = rotary(tape, q_lin, rope)
        k = rotary(tape, k_lin, rope)
        tape.free(q_lin, k_lin)  # apply_rotary's results rebind q and k
    else:
        q, k = q_lin, k_lin
    att = attention(tape, job, q, k, v, fused=False)
    o = linear(att, "self_attn.o_proj")
    tape.free(q, k, v, att, y)
    return o


def gated_mlp(tape: Tape, y: Sym, linear: Linear, prefix: str = "mlp") -> Sym:
    """``down(act(gate(y)) * up(y))``; y stays the caller's."""
    g = linear(y, f"{prefix}.gate_proj")
    a = ops.unary(tape, g)
    tape.free(g)
    up = linear(y, f"{prefix}.up_proj")
    u = ops.mul(tape, a, up)
    tape.free(a, up)
    dn = linear(u, f"{prefix}.down_proj")
    tape.free(u)
    return dn
