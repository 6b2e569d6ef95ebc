"""Shared parts of the mixture-of-experts families (mixtral, qwen2_moe, olmoe): no profile here.

transformers 5.24 keeps each block's experts in one ``<Model>Experts`` module with two 3-D
parameters, ``gate_up_proj`` (E, 2I, h) and ``down_proj`` (E, h, I), and routes with a
``<Model>TopKRouter`` (a bare (E, h) ``weight`` used by ``F.linear``), softmax in fp32, top-k.
The experts run ``integrations/moe.py grouped_mm_experts_forward`` (the default
``experts_implementation``): one sort of the S = T·k (token, expert) pairs, one (S, h) gather,
two ``aten._grouped_mm`` over every expert with int32 offsets, the routing weights applied,
the pairs put back in token order and summed over k.

What the plan assumes: the grouped_mm implementation (the default for ``from_config`` on every
device; eager's per-expert loop and batched_mm are not planned). Under it every tensor's shape
depends on T, k and E only: how many tokens each expert gets lives only in the offsets' values,
so the plan is exact for any routing (balanced or not). No auxiliary loss
(``output_router_logits`` false, every config's default) and no router jitter.

LoRA (PEFT ``all-linear``): on mixtral and olmoe PEFT's v4→v5 conversion targets the router
(``mlp.gate``, a ParamWrapper on its weight: r·(h + E)) and both expert stacks (ParamWrappers:
``gate_up_proj`` at rank 2r, 2r·E·(h + 2I); ``down_proj`` r·E·(I + h)). The inventory describes
each stack as one :class:`Stacked` linear whose in/out give PEFT's two factors at rank r (the
factor 2 of gate_up's rank is folded in), so counts, optimizer tensors and targets stay those of
:mod:`memplan.params`. On every forward each wrapper folds its factors into a full copy of the
parameter (``baddbmm``), which grouped_mm then keeps for backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memplan import ops
from memplan.arch import parts
from memplan.arch.base import Job, LinearShape, Weight, linear_weights
from memplan.arch.keys import Keys
from memplan.arch.llama import Llama
from memplan.autograd import ALIAS, FP32, INT64, Sym, Tape
from memplan.errors import ConfigError, MemplanError
from memplan.spec import ModelSpec

INT32 = 4
MAX_RANK = 2**31


@dataclass(frozen=True)
class Stacked(LinearShape):
    """A LoRA target that is not an ``nn.Linear``: a router weight or a 3-D expert stack
    wrapped by PEFT's ParamWrapper. ``in_features``/``out_features`` are chosen so that rank R
    gives PEFT's lora_A (R·in) and lora_B (R·out) elements; PEFT sets no rank limit."""

    max_rank: int = MAX_RANK


class MoE(Llama):
    no_grad_forward_validated = False  # classifier: measured 4% above on mixtral-tiny
    """A Llama-style decoder whose MLP is a routed mixture of experts (see the module doc)."""

    reference_model = False
    attentions = ("sdpa", "eager")
    renormalise = False        # the top-k weights are always renormalised (Mixtral)
    fp32_routing = False       # the routing weights stay fp32 (Mixtral: no cast back)
    peft_converts = True       # PEFT's v4→v5 conversion targets the router and expert stacks
    v4_names: dict[str, tuple[str, ...]] = {}  # stack → the v4 names PEFT's conversion takes
    experts_key = "num_experts"
    grouped_mm_fake = True     # memplan.nn.hf registers the any-dtype fake grouped_mm

    # ---- config -------------------------------------------------------------------------
    defaults: dict[str, Any] = {}  # the config class's values for absent or null keys

    def read(self, cfg: dict[str, Any], name: str, where: str) -> ModelSpec:
        present = {key: value for key, value in cfg.items() if value is not None}
        return super().read(self.defaults | present, name, where)

    def with_alias(self, keys: Keys, alias: str) -> Keys:
        """``keys`` with ``alias`` read as :attr:`experts_key` (Mixtral's config takes
        ``num_experts`` for ``num_local_experts``, OLMoE's the reverse); both given and
        different is one ConfigError naming them."""
        key = self.experts_key
        if keys.has(alias) and keys.has(key) and keys.cfg[alias] != keys.cfg[key]:
            raise ConfigError(f"{keys.where}: {alias} {keys.cfg[alias]!r} and {key} "
                              f"{keys.cfg[key]!r} disagree (the first is an alias of the "
                              "second); keep one")
        if not keys.has(key) and keys.has(alias):
            return Keys(keys.cfg | {key: keys.cfg[alias]}, keys.where)
        return keys

    def read_moe(self, keys: Keys, expert_size: int) -> dict[str, Any]:
        """The experts' extras, checked against each other (one ConfigError naming the keys)."""
        experts = keys.int(self.experts_key, default=self.default_experts)
        top_k = keys.int("num_experts_per_tok", default=self.default_top_k)
        if top_k > experts:
            raise ConfigError(f"{keys.where}: num_experts_per_tok {top_k} is more than "
                              f"{self.experts_key} {experts}; a token cannot pick more experts "
                              "than there are")
        if keys.bool("output_router_logits", False):
            raise ConfigError(f"{keys.where}: output_router_logits true adds the auxiliary "
                              "load-balancing loss, which memplan does not plan; set it false")
        return {"num_experts": experts, "experts_per_token": top_k,
                "moe_intermediate_size": expert_size,
                "norm_topk_prob": self.renormalise or keys.bool("norm_topk_prob", False)}

    def moe_to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        return {self.experts_key: spec.extra("num_experts"),
                "num_experts_per_tok": spec.extra("experts_per_token"),
                "output_router_logits": False}

    # ---- inventory ----------------------------------------------------------------------
    def router_linear(self, spec: ModelSpec) -> LinearShape:
        return Stacked("mlp.gate", "router", spec.hidden_size, spec.extra("num_experts"), False,
                       self.peft_converts)

    def expert_linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        """The two stacks as PEFT's factors: gate_up (rank 2r) and down (rank r)."""
        h, e, i = spec.hidden_size, spec.extra("num_experts"), spec.extra("moe_intermediate_size")
        t = self.peft_converts
        return (Stacked("mlp.experts.gate_up_proj", "expert", 2 * e * h, 4 * e * i, False, t),
                Stacked("mlp.experts.down_proj", "expert", e * i, e * h, False, t))

    def expert_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        h, e, i = spec.hidden_size, spec.extra("num_experts"), spec.extra("moe_intermediate_size")
        return (Weight("mlp.gate.weight", (e, h), "router", module="mlp.gate"),
                Weight("mlp.experts.gate_up_proj", (e, 2 * i, h), "expert"),
                Weight("mlp.experts.down_proj", (e, h, i), "expert"))

    def mlp_linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        return (self.router_linear(spec), *self.expert_linears(spec))

    def block_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        first, second = (w for n in self.norm_names() for w in self.block_norms_of(spec, n))
        attn = tuple(w for lin in self.attention_linears(spec) for w in linear_weights(lin))
        return (*attn, *self.expert_weights(spec), first, second)

    def block_norms_of(self, spec: ModelSpec, name: str) -> tuple[Weight, ...]:
        return (Weight(f"{name}.weight", (spec.hidden_size,), "norm"),)

    def peft_targets(self, names: list[str]) -> list[str]:
        """The names PEFT's conversion takes for the planner's targets (v4 names for the
        stacks, whose fused gate_up needs both halves)."""
        out: list[str] = []
        for name in names:
            out.extend(self.v4_names.get(name, (name,)))
        return sorted(set(out))

    def check(self, spec: ModelSpec, train: Any) -> None:
        super().check(spec, train)
        if train.recipe.nf4:
            raise MemplanError(f"{spec.name}: QLoRA's NF4 base quantises nn.Linear layers, "
                               "not the 3-D expert stacks; use lora-bf16")
        from memplan.fsdp import is_sharded
        from memplan.params import check_rank

        lora = train.recipe.lora
        if lora and is_sharded(train) and any(
                l.group in ("expert", "router") for l in check_rank(spec, train.lora)):
            raise MemplanError(f"{spec.name}: FSDP with LoRA on the router and expert stacks is "
                               "not planned (PEFT's ParamWrapper adapters); shard LoRA on "
                               "--targets attention, or plan one GPU")
        if lora and train.lora_backend != "peft":
            raise MemplanError(f"{spec.name} is a mixture of experts: its router and expert "
                               "stacks are PEFT ParamWrapper targets; use --lora-backend peft")

    # ---- symbolic forward ---------------------------------------------------------------
    def moe_block(self, tape: Tape, job: Job, y: Sym, linear: parts.Linear) -> Sym:
        """The sparse MoE block on the normalised input y (T, h); y stays the caller's."""
        return self.experts(tape, job, y, *self.router(tape, job, y))

    def _peft(self, job: Job, name: str) -> bool:
        return name in job.targeted

    def router(self, tape: Tape, job: Job, y: Sym) -> tuple[Sym, Sym, Sym]:
        """``<Model>TopKRouter``: logits, fp32 softmax, top-k, [renormalise], [cast back].
        Returns (logits, weights (T, k), indices (T, k))."""
        spec, t, d = job.spec, job.tokens, job.d
        e, k = spec.extra("num_experts"), spec.extra("experts_per_token")
        lora = job.train.lora.rank if self._peft(job, "mlp.gate") else 0
        w_rg = job.full
        extra: list[Sym] = []
        if lora:  # _LoraParameterProxy: delta = (B @ A) * s in fp32, cast; W' = W + delta
            delta32 = tape.alloc(tape.new(e * spec.hidden_size, FP32, True))
            tape.op(delta32, [], param_grad=4 * lora * (spec.hidden_size + e))
            delta = ops.cast(tape, delta32, d)
            check = tape.alloc(tape.new(e * spec.hidden_size, d, True))
            tape.free(check)
            wp = tape.alloc(tape.new(e * spec.hidden_size, d, True))
            tape.op(wp, [(delta, delta.nbytes)])
            extra = [wp]
            w_rg = True
        if job.autocast is not None and not lora:  # F.linear under autocast; the experts'
            # _grouped_mm is on no autocast list: they run in the weights' dtype
            logits = ops.autocast_linear(tape, job.autocast, y, spec.hidden_size, e, t, w_rg,
                                         itemsize=d)
        elif job.autocast is not None:  # W' (PEFT's) is no leaf: copied per use, uncached
            ac = job.autocast
            yc, wc = ac.operand(tape, y), ac.operand(tape, extra[0])
            logits = tape.op(tape.new(t * e, ac.itemsize, True), [(yc, yc.nbytes),
                             (wc, wc.nbytes)], [yc] + ([wc] if y.rg else []))
            tape.free(*(c for c, o in ((yc, y), (wc, extra[0])) if c is not o))
        else:
            logits = tape.new(t * e, d, y.rg or w_rg)
            tape.op(logits, [(y, y.nbytes)] + [(w, w.nbytes) for w in extra],
                    ([y] if w_rg else []) + (extra if y.rg else []),
                    param_grad=0 if lora else 4 * e * spec.hidden_size * job.full)
        l32 = ops.cast(tape, logits, FP32)
        probs = tape.new(t * e, FP32, l32.rg)
        tape.op(probs, [(l32, l32.nbytes)], [probs] if probs.rg else [])
        if l32 is not logits:
            tape.free(l32)
        vals = tape.new(t * k, FP32, probs.rg)
        idx = tape.alloc(tape.new(t * k, INT64, False))
        mode = job.runtime != "cuda"  # topk backward: zeros + scatter, out of place under a mode
        tape.op(vals, [(probs, probs.nbytes)], [idx], outputs=[vals, idx],
                scratch=t * e * FP32 if mode else 0)
        if spec.extra("norm_topk_prob"):  # values /= values.sum(-1, keepdim=True)
            total = tape.op(tape.new(t, FP32, vals.rg), [(vals, ALIAS)])
            clone = tape.new(t * k, FP32, False)
            out = tape.view(vals)
            tape.op(out, [(vals, vals.nbytes), (total, total.nbytes)],
                    [clone, total] if vals.rg else [], scratch=4 * t * k * FP32)
            tape.free(total)
            vals = out
        weights = vals if self.fp32_routing else ops.cast(tape, vals, d)
        if weights is not vals:
            tape.free(vals)
        for w in extra:
            tape.free(w)
        if job.block_locals is not None:  # inference: nothing saved them
            tape.free(probs)
        return logits, weights, idx

    def experts(self, tape: Tape, job: Job, x: Sym, logits: Sym, weights: Sym,
                idx: Sym) -> Sym:
        """``grouped_mm_experts_forward`` (transformers/integrations/moe.py) op by op."""
        spec, t, d = job.spec, job.tokens, job.d
        h, e = spec.hidden_size, spec.extra("num_experts")
        k, i = spec.extra("experts_per_token"), spec.extra("moe_intermediate_size")
        s = t * k
        mode = job.runtime != "cuda"
        rw = weights.itemsize
        wo = max(d, rw)
        gu_peft = self._peft(job, "mlp.experts.gate_up_proj")
        dn_peft = self._peft(job, "mlp.experts.down_proj")
        rank = job.train.lora.rank
        locals_: list[Sym] = []

        def local(numel: int, itemsize: int) -> Sym:
            out = tape.alloc(tape.new(numel, itemsize, False))
            locals_.append(out)
            return out

        # PEFT: the wrappers register their parametrizations (down's first) before the forward,
        # each evaluated once and thrown away
        dn_f = self.factors(tape, job, e, rank, i, h) if dn_peft else []
        if dn_peft:
            self.peft_check(tape, job, e * h * i)
        gu_f = self.factors(tape, job, e, 2 * rank, h, 2 * i) if gu_peft else []
        if gu_peft:
            self.peft_check(tape, job, e * 2 * i * h)
        local(s, INT64)  # the sorted expert ids
        perm = local(s, INT64)
        tok = tape.alloc(tape.new(s, INT64, False))  # perm // k
        sel = tape.new(s * h, d, x.rg)
        tape.op(sel, [(x, t * h * d)], [tok] if x.rg else [],
                scratch=t * h * d if mode else 0)  # index backward: zeros + index_put
        tape.free(tok)
        sw = tape.new(s, rw, weights.rg)
        tape.op(sw, [(weights, weights.nbytes)], [perm] if weights.rg else [],
                scratch=s * rw if mode else 0)
        local(s, FP32)  # histc input: expert ids as float (CPU) or int32 (CUDA)
        local(e, FP32)  # histc
        offs = local(e, INT32)
        gu_w = self.peft_weight(tape, job, e * 2 * i * h, gu_f, e, 2 * rank, h, 2 * i) \
            if gu_peft else None
        up = self.grouped_mm(tape, job, sel, s * 2 * i, e * 2 * i * h, offs, gu_w)
        if job.block_locals is None:
            tape.free(sel)
        else:  # inference: nothing saves it, and the function's local lives to its return
            locals_.append(sel)
        gate, upv = tape.view(up, numel=s * i), tape.view(up, numel=s * i)
        tape.op(gate, [(up, up.nbytes)], outputs=[gate, upv])  # chunk: cat in backward
        act = ops.unary(tape, gate)
        prod = ops.mul(tape, act, upv)
        tape.free(act, up)
        dn_w = self.peft_weight(tape, job, e * h * i, dn_f, e, rank, i, h) if dn_peft else None
        down = self.grouped_mm(tape, job, prod, s * h, e * h * i, offs, dn_w)
        tape.free(prod)
        weighted = tape.new(s * h, wo, down.rg or sw.rg)
        saves = ([sw] if down.rg else []) + ([down] if sw.rg else [])
        cast_back = s * h * wo if wo != d and down.rg else 0  # grad_proj cast to d
        tape.op(weighted, [(down, down.nbytes), (sw, sw.nbytes)], saves,
                scratch=(s * h * wo if sw.rg else 0) + cast_back)
        tape.free(sw)
        inv = local(s, INT64)
        arange = tape.alloc(tape.new(s, INT64, False))
        tape.free(arange)
        back = tape.new(s * h, wo, weighted.rg)
        tape.op(back, [(weighted, weighted.nbytes)], [inv] if weighted.rg else [],
                scratch=s * h * wo if mode else 0)
        tape.free(weighted)
        summed = tape.new(t * h, wo, back.rg)
        tape.op(summed, [(back, back.nbytes)])  # sum over k: its gradient is an (S, h) copy
        tape.free(back)
        out = ops.cast(tape, summed, d)
        if out is not summed:
            tape.free(summed)
        tape.free(down, *locals_, *(w for w in (gu_w, dn_w) if w is not None), *gu_f, *dn_f,
                  logits, idx, weights)
        return out

    def grouped_mm(self, tape: Tape, job: Job, a: Sym, out_numel: int, w_numel: int,
                   offs: Sym, wp: Sym | None) -> Sym:
        """``_grouped_mm(a, W.transpose(-2, -1), offs)``: saves a when W needs a gradient,
        W (a parameter, or PEFT's W') when a does, and the offsets."""
        w_rg = job.full or wp is not None
        out = tape.new(out_numel, job.d, a.rg or w_rg)
        saves = ([a] if w_rg else []) + ([wp] if wp is not None and a.rg else []) + [offs]
        inputs = [(a, a.nbytes)] + ([(wp, wp.nbytes)] if wp is not None else [])
        return tape.op(out, inputs, saves, param_grad=4 * w_numel * job.full)

    def factors(self, tape: Tape, job: Job, e: int, r: int, a: int, b: int) -> list[Sym]:
        """get_delta_factors, once per forward in ``_activate_lora``: lhs (E, a, r) and rhs
        (E, r, b) in the param dtype, kept by the proxy. On a bf16 base they are casts of the
        fp32 factors (their backward makes the factors' fp32 gradients); in fp32 they are views
        of the factors (none here: the fold's node makes the gradients)."""
        if job.d == FP32:
            return []
        return [tape.op(tape.new(n, job.d, True), [], param_grad=4 * n)
                for n in (e * a * r, e * r * b)]

    def peft_check(self, tape: Tape, job: Job, numel: int) -> None:
        """register_parametrization evaluates the proxy once: a throwaway W'."""
        tape.free(tape.alloc(tape.new(numel, job.d, True)))

    def peft_weight(self, tape: Tape, job: Job, numel: int, factors: list[Sym],
                    e: int, r: int, a: int, b: int) -> Sym:
        """The cached W' = baddbmm(W, lhs, rhs, alpha=s): saves lhs and rhs."""
        wp = tape.new(numel, job.d, True)
        return tape.op(wp, [(f, f.nbytes) for f in factors], factors,
                       param_grad=0 if factors else 4 * e * r * (a + b))

    def block(self, tape: Tape, job: Job, x: Sym, rope: list[Sym], layer: int) -> Sym:
        linear = parts.block_linear(tape, job, self.linears(job.spec))
        y = self.norm(tape, job, x)
        o = parts.qkvo_attention(tape, job, y, linear, rope, self.qk_norm(tape, job))
        x2 = parts.residual(tape, x, o)
        y2 = self.norm(tape, job, x2)
        dn = self.moe_block(tape, job, y2, linear)
        tape.free(y2)
        out = parts.residual(tape, x2, dn)
        tape.free(x2)
        return out

    def qk_norm(self, tape: Tape, job: Job) -> Any:
        return None

    def buffer_bytes(self, spec: ModelSpec) -> int:
        return 2 * (spec.head_dim // 2) * 4  # rotary inv_freq and original_inv_freq, fp32
