"""BERT (transformers ``BertConfig``, ``BertForSequenceClassification``) and RoBERTa
(``RobertaConfig``, ``RobertaForSequenceClassification``): post-LN encoders with a
sequence-classification head, built with ``AutoModelForSequenceClassification``.

Embeddings: ``dropout(LayerNorm(word(ids) + token_type(tt) + position(pos)))``; BERT's
position ids are a slice of a buffer, RoBERTa's are made from the ids (``cumsum`` of
``ids != pad``, offset by ``pad_token_id``, so at most ``max_position_embeddings - pad - 1``
tokens). Layer: q, k, v projections, bidirectional attention (no mask tensor without an
``attention_mask``) with dropout ``attention_probs_dropout_prob``, then
``LN(x + drop(dense(attn)))``, ``LN(a + drop(out(gelu(inter(a)))))``; every linear and norm
has a bias and there is no final norm. Heads on the first token: BERT ``classifier(drop(
tanh(pooler.dense(h[:, 0]))))``; RoBERTa ``out_proj(drop(tanh(dense(drop(h[:, 0])))))``.
The loss is ``CrossEntropyLoss`` on the logits in their own dtype (no fp32 upcast).

Config defaults (``BertConfig``): vocab_size 30522, hidden_size 768, num_hidden_layers 12,
num_attention_heads 12, intermediate_size 3072, hidden_act gelu, hidden_dropout_prob 0.1,
attention_probs_dropout_prob 0.1, max_position_embeddings 512, type_vocab_size 2,
layer_norm_eps 1e-12, pad_token_id 0, classifier_dropout None (hidden_dropout_prob),
is_decoder false. ``RobertaConfig``: the same but vocab_size 50265, pad_token_id 1.
``PreTrainedConfig``: num_labels 2 (or ``len(id2label)``).

Training step under memplan: full fine-tuning and LoRA feed class labels (B,) to the model
(:attr:`Bert.sequence_classifier`); LoRA is PEFT's without a task_type (see
:meth:`Bert.root_lora_linears`); the classifier regime runs the encoder under no_grad and a
new head on the last token (:meth:`Bert.classifier_head`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from memplan import ops
from memplan.arch import parts
from memplan.arch.base import Job, LinearShape, Profile, Weight, linear_weights, norm_weights
from memplan.arch.keys import MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, Keys
from memplan.autograd import ALIAS, BOOL, FP32, INT64, Sym, Tape
from memplan.errors import ConfigError, MemplanError
from memplan.spec import LoraSpec, ModelSpec

if TYPE_CHECKING:
    from memplan.activations import ActivationPlan

PDROP = 0.1  # BertConfig / RobertaConfig: hidden_dropout_prob, attention_probs_dropout_prob
INT32 = 4


class Bert(Profile):
    family = "bert"
    model_types = ("bert",)
    body = "bert"
    hf_auto_class = "AutoModelForSequenceClassification"
    sequence_classifier = True  # the model takes class labels (B,), not token labels
    eager_softmax_fp32 = False
    source = "transformers BertForSequenceClassification"
    defaults = {"vocab_size": 30522, "pad_token_id": 0, "max_position_embeddings": 512,
                "type_vocab_size": 2, "layer_norm_eps": 1e-12}
    head_names = ("pooler.dense", "classifier")  # the root's linears, in forward order

    # ---- config -------------------------------------------------------------------------
    def read(self, cfg: dict[str, Any], name: str, where: str) -> ModelSpec:
        keys, dflt = Keys(cfg, where), self.defaults
        for flag in ("is_decoder", "add_cross_attention"):
            if keys.bool(flag, False):
                raise ConfigError(f"{where}: {flag} is true; memplan plans the {self.family} "
                                  "encoder with a sequence-classification head only")
        hidden = keys.int("hidden_size", 768)
        heads = keys.int("num_attention_heads", 12)
        keys.divides("num_attention_heads", heads, "hidden_size", hidden)
        vocab = keys.int("vocab_size", dflt["vocab_size"], upper=MAX_VOCAB)
        pad = keys.int("pad_token_id", dflt["pad_token_id"], lower=0, upper=MAX_VOCAB)
        if pad >= vocab:
            raise ConfigError(f"{where}: pad_token_id {pad} is not below vocab_size {vocab}")
        positions = keys.int("max_position_embeddings", dflt["max_position_embeddings"],
                             upper=MAX_POSITIONS)
        labels = keys.int("num_labels", 2, upper=MAX_VOCAB)
        id2label = cfg.get("id2label")
        if isinstance(id2label, dict) and id2label:
            if keys.has("num_labels") and len(id2label) != labels:
                raise ConfigError(f"{where}: num_labels {labels} contradicts id2label, which "
                                  f"has {len(id2label)} labels; drop one of the two keys")
            labels = len(id2label)
        hidden_p = keys.prob("hidden_dropout_prob", PDROP)
        classifier_p = keys.prob("classifier_dropout", hidden_p) if keys.has(
            "classifier_dropout") else None
        eps = keys.number("layer_norm_eps", dflt["layer_norm_eps"])
        return ModelSpec(
            name=name, family=self.family, model_type=self.model_types[0],
            vocab_size=vocab, hidden_size=hidden,
            num_layers=keys.int("num_hidden_layers", 12, upper=MAX_LAYERS),
            num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
            intermediate_size=keys.int("intermediate_size", 3072),
            gated_mlp=False, activation=keys.name("hidden_act", "gelu"),
            qkv_bias=True, out_bias=True, mlp_bias=True, norm="layernorm",
            tie_embeddings=False, learned_positions=True, max_positions=positions,
            dropout=hidden_p,
            extras=(("attention_dropout", keys.prob("attention_probs_dropout_prob", PDROP)),
                    ("classifier_dropout", classifier_p), ("layer_norm_eps", eps),
                    ("num_labels", labels), ("pad_token_id", pad),
                    ("type_vocab_size", keys.int("type_vocab_size", dflt["type_vocab_size"]))),
        )

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        return {"model_type": self.model_types[0], "vocab_size": spec.vocab_size,
                "hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
                "num_attention_heads": spec.num_heads,
                "intermediate_size": spec.intermediate_size, "hidden_act": spec.activation,
                "max_position_embeddings": spec.max_positions,
                "hidden_dropout_prob": spec.dropout,
                "attention_probs_dropout_prob": spec.extra("attention_dropout", PDROP),
                "classifier_dropout": spec.extra("classifier_dropout"),
                "layer_norm_eps": spec.extra("layer_norm_eps", self.defaults["layer_norm_eps"]),
                "type_vocab_size": spec.extra("type_vocab_size"),
                "pad_token_id": spec.extra("pad_token_id", self.defaults["pad_token_id"]),
                "num_labels": self.num_labels(spec)}

    def num_labels(self, spec: ModelSpec) -> int:
        return spec.extra("num_labels", 2)

    def max_seq(self, spec: ModelSpec) -> int:
        """The longest sequence the position table serves."""
        return spec.max_positions

    def check(self, spec: ModelSpec, train: Any) -> None:
        super().check(spec, train)
        labels = self.num_labels(spec)
        if train.seq is not None and train.seq > self.max_seq(spec):
            raise MemplanError(f"--seq {train.seq} is longer than {spec.name}'s "
                               f"{self.max_seq(spec)} positions; use --seq "
                               f"{self.max_seq(spec)} or less")
        if train.recipe.trains != "head" and train.num_classes != labels:
            raise MemplanError(f"--classes {train.num_classes} contradicts {spec.name}'s head "
                               f"of num_labels {labels}; set num_labels in its config.json")
        if labels < 2 and train.recipe.trains != "head":
            raise MemplanError(f"{spec.name} has num_labels 1 (a regression head, MSE loss), "
                               "which memplan does not plan; use num_labels 2 or more")
        if train.recipe.lora and train.lora.train_embeddings:
            raise MemplanError(f"{spec.name} is a sequence classifier with no LM head; "
                               "drop --train-embeddings")

    # ---- inventory ----------------------------------------------------------------------
    def linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        h, i = spec.hidden_size, spec.intermediate_size
        return (
            LinearShape("attention.self.query", "attention", h, h, True),
            LinearShape("attention.self.key", "attention", h, h, True),
            LinearShape("attention.self.value", "attention", h, h, True),
            LinearShape("attention.output.dense", "attention", h, h, True),
            LinearShape("intermediate.dense", "mlp", h, i, True),
            LinearShape("output.dense", "mlp", i, h, True),
        )

    def block_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        h = spec.hidden_size
        lin = [linear_weights(layer) for layer in self.linears(spec)]
        return (*(w for ws in lin[:4] for w in ws), *norm_weights("attention.output.LayerNorm",
                                                                  h, True),
                *(w for ws in lin[4:] for w in ws), *norm_weights("output.LayerNorm", h, True))

    def head_linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        """The root's linears: BERT's pooler and classifier."""
        h = spec.hidden_size
        return (LinearShape("pooler.dense", "head", h, h, True),
                LinearShape("classifier", "head", h, self.num_labels(spec), True))

    def root_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        v, h, p = spec.vocab_size, spec.hidden_size, spec.max_positions
        return (Weight("embed", (v, h), "embedding"),
                Weight("positions", (p, h), "position"),
                Weight("token_types", (spec.extra("type_vocab_size"), h), "position"),
                *norm_weights("embeddings.LayerNorm", h, True),
                *(w for layer in self.head_linears(spec) for w in linear_weights(layer)))

    def buffer_bytes(self, spec: ModelSpec) -> int:
        return 2 * spec.max_positions * INT64  # position_ids and token_type_ids, (1, P) int64

    def root_lora_linears(self, spec: ModelSpec, lora: LoraSpec) -> tuple[LinearShape, ...]:
        """The root's linears LoRA wraps: PEFT's ``all-linear`` on a sequence classifier
        without a task_type wraps the pooler and the classifier too (their base weights stay
        frozen). PEFT's ``task_type="SEQ_CLS"`` would instead train a copy of the classifier
        (``modules_to_save``); memplan does not plan that. Other target sets stay in the
        blocks."""
        targets = lora.targets.split(",") if isinstance(lora.targets, str) else lora.targets
        return self.head_linears(spec) if "all" in {t.strip() for t in targets} else ()

    def peft_targets(self, names: list[str]) -> str:
        """A regex PEFT full-matches: by suffix, ``output.dense`` would also wrap
        ``attention.output.dense``."""
        block = {layer.name for layer in self.linears_any()}
        inner = "|".join(re.escape(n) for n in names if n in block)
        root = "|".join(re.escape(n) for n in names if n not in block)
        alts = ([rf".*\.layer\.\d+\.(?:{inner})"] if inner else []) + \
            ([rf"(?:.*\.)?(?:{root})"] if root else [])
        return "|".join(alts)

    def linears_any(self) -> tuple[LinearShape, ...]:
        """The block's linears of any shape (names only)."""
        spec = ModelSpec("names", self.family, 8, 8, 1, 1, 1, 8, 8)
        return self.linears(spec)

    # ---- symbolic forward ---------------------------------------------------------------
    def positions(self, tape: Tape, job: Job) -> tuple[Sym, int]:
        """(position ids, their rows). BERT's are a (1, s) view of a buffer: no new bytes."""
        return tape.new(0, INT64, False), 1

    def token_types(self, tape: Tape, job: Job, rows: int) -> Sym:
        """``gather(token_type_ids buffer, position_ids)``: a new (rows, s) int64."""
        return tape.alloc(tape.new(rows * job.s, INT64, False))

    def embed(self, tape: Tape, job: Job, x: Sym, held: list[Sym]) -> Sym:
        """``dropout(LN(word + token_type + position))``; the word embedding is a local of
        the embeddings' forward, the output is kept by the model for the whole encoder."""
        spec, h, d = job.spec, job.spec.hidden_size, job.d
        if x in held:
            held.remove(x)
        pos_ids, rows = self.positions(tape, job)
        types = self.token_types(tape, job, rows)
        tt = ops.embedding(tape, types, job.tokens, spec.extra("type_vocab_size"), h, d,
                           job.full)
        s1 = ops.add(tape, x, tt)
        pos = ops.embedding(tape, pos_ids, rows * job.s, spec.max_positions, h, d, job.full)
        s2 = ops.add(tape, s1, pos)
        tape.free(s1)
        y = self.layernorm(tape, job, s2)
        tape.free(s2)
        out = self.dropout(tape, y, spec.dropout)
        tape.free(*([y] if out is not y else []), x, tt, pos, types, pos_ids)
        held.append(out)
        return out

    def hf_inputs(self, tape: Tape, job: Job, held: list[Sym]) -> None:
        """No attention_mask: ``create_bidirectional_mask`` returns None (no tensor)."""

    def layernorm(self, tape: Tape, job: Job, x: Sym) -> Sym:
        """native_layer_norm: saves its input, mean and rstd (fp32 on CUDA; in the input's
        dtype on the CPU kernels, and so under FakeTensorMode)."""
        w_rg = job.full or job.bitfit
        out = tape.new(x.numel, x.itemsize, x.rg or w_rg)
        stat = FP32 if job.runtime == "cuda" else x.itemsize
        saves = [x, tape.new(job.tokens, stat, False), tape.new(job.tokens, stat, False)] \
            if out.rg else []
        return tape.op(out, [(x, x.nbytes)], saves,
                       param_grad=2 * 4 * job.spec.hidden_size * w_rg)

    def dropout(self, tape: Tape, x: Sym, p: float) -> Sym:
        """Dropout; its mask (the input's dtype on the CPU kernels, bool on CUDA) is made
        under no_grad too and dropped after."""
        if p <= 0:
            return x
        mask = tape.alloc(tape.new(x.numel, tape.dropout_mask_bytes or x.itemsize, False))
        out = tape.op(tape.new(x.numel, x.itemsize, x.rg), [(x, x.nbytes)],
                      [mask] if x.rg else [])
        tape.free(mask)
        return out

    def dropped(self, tape: Tape, x: Sym, p: float) -> Sym:
        """Dropout on a temporary, which is dropped once it has run."""
        out = self.dropout(tape, x, p)
        if out is not x:
            tape.free(x)
        return out

    def attention(self, tape: Tape, job: Job, q: Sym, k: Sym, v: Sym) -> tuple[Sym, Sym | None]:
        """Bidirectional attention, no mask; returns (the (B, T, h) output, eager's attention
        weights that the layer keeps to its end, or None)."""
        p = job.spec.extra("attention_dropout", PDROP)
        eager = job.train.attention == "eager"
        if not eager and (p == 0 or job.runtime == "cuda"):  # fused kernels
            from memplan.attention import attention

            return attention(tape, job, q, k, v, fused=False), None  # job.mask is None
        spec, d, b, s = job.spec, job.d, job.b, job.s
        rg = q.rg or k.rg or v.rg
        n_scores = b * spec.num_heads * s * s
        # sdpa's math fallback (CPU, dropout) computes in fp32 from bf16 inputs
        acc = FP32 if not eager else d
        ups = [ops.cast(tape, t, acc) for t in (q, k, v)]
        qa, ka, va = ups

        def fold(t: Sym) -> Sym:
            """bmm's reshape of a (B, nh, s, hd) view laid out (B, s, nh, hd) copies."""
            if b == 1:
                return t
            return tape.op(tape.new(t.numel, t.itemsize, t.rg), [(t, ALIAS)])

        if eager:  # matmul(q, k^T) * scaling
            q_r, k_r = fold(qa), fold(ka)
            raw = tape.new(n_scores, acc, rg)
            tape.op(raw, [(q_r, q_r.nbytes), (k_r, k_r.nbytes)],
                    ([k_r] if q_r.rg else []) + ([q_r] if k_r.rg else []))
            tape.free(*(t for t in (q_r, k_r) if t not in (qa, ka)))
            scores = ops.unary(tape, raw, saves_input=False)
            tape.free(raw)
            qs = None
        else:  # matmul(q * √scale, k^T * √scale)
            qs = ops.unary(tape, qa, saves_input=False)
            ks = ops.unary(tape, ka, saves_input=False)
            q_r, k_r = fold(qs), fold(ks)
            scores = tape.new(n_scores, acc, rg)
            tape.op(scores, [(q_r, q_r.nbytes), (k_r, k_r.nbytes)],
                    ([k_r] if q_r.rg else []) + ([q_r] if k_r.rg else []))
            tape.free(*(t for t in (q_r, k_r) if t not in (qs, ks)), ks)
        probs = tape.new(n_scores, acc, rg)
        tape.op(probs, [(scores, scores.nbytes)], [probs] if rg else [])  # keeps its output
        tape.free(scores)
        dropped = self.dropout(tape, probs, p)
        tape.free(probs)
        v_r = fold(va)
        out = tape.new(b * s * spec.hidden_size, acc, rg)
        tape.op(out, [(dropped, dropped.nbytes), (v_r, v_r.nbytes)],
                ([v_r] if dropped.rg else []) + ([dropped] if v_r.rg else []))
        tape.free(*(t for t in (v_r,) if t is not va))
        low = ops.cast(tape, out, d)
        weights = None
        if eager:
            weights = dropped
        else:
            w = ops.cast(tape, dropped, d)  # the math kernel also returns attn.to(dtype)
            tape.free(dropped, w, *(t for t in (qs,) if t is not None))
            tape.free(*(t for t, src in zip(ups, (q, k, v), strict=True) if t is not src))
        if low is not out:
            tape.free(out)
        flat = tape.op(tape.new(low.numel, d, low.rg), [(low, ALIAS)])  # transpose + contiguous
        tape.free(low)
        return flat, weights

    def ffn_act(self, tape: Tape, job: Job, f: Sym) -> Sym:
        if job.spec.activation == "gelu_new":
            return parts.gelu_new(tape, f)
        return ops.unary(tape, f)  # GELU keeps its input

    def block(self, tape: Tape, job: Job, x: Sym, rope: list[Sym], layer: int) -> Sym:
        spec = job.spec
        linear = parts.block_linear(tape, job, self.linears(spec))
        q, k, v = (linear(x, f"attention.self.{n}") for n in ("query", "key", "value"))
        att, weights = self.attention(tape, job, q, k, v)
        tape.free(q, k, v)
        o = self.dropped(tape, linear(att, "attention.output.dense"), spec.dropout)
        tape.free(att)
        s1 = ops.add(tape, o, x)
        tape.free(o)
        a = self.layernorm(tape, job, s1)
        tape.free(s1)
        f = linear(a, "intermediate.dense")
        g = self.ffn_act(tape, job, f)
        tape.free(f)
        m = self.dropped(tape, linear(g, "output.dense"), spec.dropout)
        tape.free(g)
        s2 = ops.add(tape, m, a)
        tape.free(m, a)
        out = self.layernorm(tape, job, s2)
        tape.free(s2, *([weights] if weights is not None else []))
        return out

    def final_norm(self, tape: Tape, job: Job, x: Sym) -> Sym:
        return x  # post-LN: each layer ends in its norm

    # ---- heads --------------------------------------------------------------------------
    def head_linear(self, tape: Tape, job: Job) -> Any:
        """``linear(x, name)`` for the root's linears, LoRA included when targeted."""
        targeted = {layer.name for layer in self.root_lora_linears(job.spec, job.train.lora)} \
            if job.train.recipe.lora else set()
        by_name = {layer.name: layer for layer in self.head_linears(job.spec)}
        cast = job.d != FP32 and job.train.recipe.sixteen_bit_base

        def linear(x: Sym, name: str) -> Sym:
            layer = by_name[name]
            return ops.linear(tape, x, layer.out_features, job.b, w_rg=job.full,
                              b_rg=job.full or job.bitfit,
                              lora_rank=job.train.lora.rank if name in targeted else 0,
                              lora_cast=cast, in_features=layer.in_features,
                              peft=job.train.lora_backend == "peft")
        return linear

    def classify(self, tape: Tape, job: Job, hidden: Sym) -> Sym:
        """BERT: ``classifier(dropout(tanh(pooler.dense(h[:, 0]))))``; the pooler's input
        is a view, which keeps the whole final hidden state."""
        linear = self.head_linear(tape, job)
        first = self.first_token(tape, job, hidden)
        dense = linear(first, "pooler.dense")
        pooled = self.tanh(tape, dense)
        tape.free(dense)
        dropped = self.dropout(tape, pooled, self.classifier_p(job.spec))
        logits = linear(dropped, "classifier")
        tape.free(pooled, dropped)
        return logits

    def first_token(self, tape: Tape, job: Job, hidden: Sym) -> Sym:
        """``hidden[:, 0]``: a view; its backward (select_backward) makes a zero (B, s, h)
        gradient with the slice copied in."""
        first = tape.view(hidden, numel=job.b * job.spec.hidden_size)
        return tape.op(first, [(hidden, hidden.nbytes)])

    def classifier_p(self, spec: ModelSpec) -> float:
        p = spec.extra("classifier_dropout")
        return spec.dropout if p is None else p

    def tanh(self, tape: Tape, x: Sym) -> Sym:
        out = tape.new(x.numel, x.itemsize, x.rg)
        return tape.op(out, [(x, x.nbytes)], [out] if out.rg else [])  # keeps its output

    def loss(self, tape: Tape, job: Job, hidden: Sym, target: Sym, tied: bool) -> Sym:
        """The head on the first token, then ``CrossEntropyLoss`` in the logits' dtype."""
        tape.alloc(hidden)  # the encoder's output, still the model's
        logits = self.classify(tape, job, hidden)
        c = self.num_labels(job.spec)
        logp = tape.new(job.b * c, logits.itemsize, logits.rg)
        tape.op(logp, [(logits, logits.nbytes)], [logp] if logp.rg else [])
        weight = tape.new(1, logits.itemsize, False)
        loss = tape.new(1, logits.itemsize, logp.rg)
        tape.op(loss, [(logp, logp.nbytes)], [weight])
        tape.free(logp, hidden)
        job.release_outputs(tape, logits)
        return loss

    def classifier_head(self, tape: Tape, job: Job, hidden: Sym) -> ActivationPlan:
        """memplan's classifier regime: the encoder (and BERT's pooler) under no_grad, then
        a new fp32 head on the last token (a view keeping the final hidden state)."""
        from memplan.activations import _classifier_head

        tape.alloc(hidden)
        self.no_grad_pool(tape, job)
        return _classifier_head(tape, job, hidden)

    def no_grad_pool(self, tape: Tape, job: Job) -> None:
        """BertModel's pooler runs in the body's forward: dense and tanh, (B, h) each."""
        a = tape.alloc(tape.new(job.b * job.spec.hidden_size, job.d, False))
        tape.alloc(tape.new(job.b * job.spec.hidden_size, job.d, False))
        tape.free(a)


class Roberta(Bert):
    """RoBERTa: BERT with position ids made from the input ids, no pooler, and a two-layer
    classification head."""

    family = "roberta"
    model_types = ("roberta",)
    body = "roberta"
    source = "transformers RobertaForSequenceClassification"
    defaults = Bert.defaults | {"vocab_size": 50265, "pad_token_id": 1}
    head_names = ("classifier.dense", "classifier.out_proj")

    def max_seq(self, spec: ModelSpec) -> int:
        return spec.max_positions - spec.extra("pad_token_id", 1) - 1

    def head_linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        h = spec.hidden_size
        return (LinearShape("classifier.dense", "head", h, h, True),
                LinearShape("classifier.out_proj", "head", h, self.num_labels(spec), True))

    def root_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        embed, positions, types, *rest = super().root_weights(spec)
        return (embed, types, *rest[:2], positions, *rest[2:])

    def positions(self, tape: Tape, job: Job) -> tuple[Sym, int]:
        """``(cumsum(ids.ne(pad).int(), 1).type_as(mask) + 0) * mask`` then ``.long() + pad``:
        int32 temporaries, a (B, s) int64 result."""
        n = job.tokens
        ne = tape.alloc(tape.new(n, BOOL, False))
        mask = tape.alloc(tape.new(n, INT32, False))
        tape.free(ne)
        prev = None
        for itemsize in (INT64, INT32, INT32, INT32, INT64, INT64):  # cumsum, type_as, + 0,
            # * mask, long(), + pad
            t = tape.alloc(tape.new(n, itemsize, False))
            if prev is not None:
                tape.free(prev)
            prev = t
        tape.free(mask)
        return prev, job.b

    def classify(self, tape: Tape, job: Job, hidden: Sym) -> Sym:
        """``out_proj(drop(tanh(dense(drop(h[:, 0])))))``."""
        linear, p = self.head_linear(tape, job), self.classifier_p(job.spec)
        first = self.first_token(tape, job, hidden)
        d1 = self.dropout(tape, first, p)
        dense = linear(d1, "classifier.dense")
        tape.free(d1)
        t = self.tanh(tape, dense)
        tape.free(dense)
        d2 = self.dropout(tape, t, p)
        tape.free(t)
        logits = linear(d2, "classifier.out_proj")
        tape.free(d2)
        return logits

    def no_grad_pool(self, tape: Tape, job: Job) -> None:
        """No pooler (``add_pooling_layer=False``)."""


PROFILES = (Bert(), Roberta())

_PEFT = {"impl": "hf", "lora_backend": "peft"}
_ROBERTA_TINY = {"num_layers": 2, "hidden_size": 128, "num_heads": 4, "num_kv_heads": 4,
                 "head_dim": 32, "intermediate_size": 512, "vocab_size": 4096}
HF_FAKE_ROWS = [
    ("bert-base-uncased", dict(regime="full", batch=2, seq=512, impl="hf"), {}),
    ("bert-base-uncased", dict(regime="full", batch=2, seq=512, attention="eager", impl="hf"),
     {}),
    ("bert-base-uncased", dict(regime="full", batch=2, seq=512, checkpointing=True, impl="hf"),
     {}),
    ("bert-base-uncased", dict(regime="lora-bf16", batch=2, seq=512) | _PEFT, {}),
    ("bert-base-uncased", dict(regime="classifier", batch=4, seq=512, impl="hf"), {}),
    ("roberta-large", dict(regime="full", batch=1, seq=512, impl="hf"), {}),
    ("roberta-large", dict(regime="lora-bf16", batch=2, seq=512) | _PEFT, {}),
    ("roberta-large", dict(regime="lora-bf16", batch=2, seq=512, checkpointing=True) | _PEFT,
     {}),
    ("roberta-large", dict(regime="classifier", batch=2, seq=512, impl="hf"), {}),
]
HF_CPU_ROWS = [
    ("bert-tiny", dict(regime="full", batch=2, seq=128, impl="hf"), {}),
    ("bert-tiny", dict(regime="lora", batch=2, seq=128, lora=LoraSpec(rank=8)) | _PEFT, {}),
    ("bert-tiny", dict(regime="classifier", batch=2, seq=128, impl="hf"), {}),
    ("roberta-large", dict(regime="full", batch=2, seq=128, impl="hf"), _ROBERTA_TINY),
]
