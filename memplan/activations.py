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

import copy
from dataclasses import dataclass, replace
from typing import Any

from memplan import arch, ops
from memplan import params as P
from memplan.arch.base import Job
from memplan.autograd import FP32, INT64, Moment, NotPeriodic, Sym, Tape
from memplan.regimes import ModelState
from memplan.spec import ModelSpec, TrainSpec


@dataclass(frozen=True)
class ActivationPlan:
    """Activation bytes of one step, for the planner's phases (beyond the model states)."""

    forward: Moment           # the largest moment of the forward pass
    backward: Moment          # the largest moment of the backward pass
    notes: tuple[str, ...] = ()
    outputs_bytes: int = 0    # the manual loop's kept outputs (logits), live into the step
    inputs_bytes: int = 0     # the batch (input ids, labels), held by the loop to the end


def plan_activations(spec: ModelSpec, train: TrainSpec, state: ModelState,
                     runtime: str = "cuda", fsdp: Any = None,
                     reuse: bool = True) -> ActivationPlan:
    """Run one forward pass symbolically, then its backward; report both peaks.

    ``runtime``: ``cuda`` plans a real run; ``cpu`` and ``fake`` plan a run measured by
    memplan's tracker (CPU kernels keep dropout masks in the input's dtype, and any active
    TorchDispatchMode makes autograd add gradients out of place). ``fsdp``: a
    :class:`memplan.fsdp.Schedule` when the model is sharded; its buffers join every moment.
    ``reuse``: walk one copy of identical blocks and count the others
    (:meth:`memplan.autograd.Tape.repeat`), to the same bytes; where the walked copies
    disagree, every block is walked. False walks every block.
    """
    if reuse:
        try:  # on a copy of the schedule: a walk that stops half way leaves it as it was
            return _walk(spec, train, state, runtime, copy.deepcopy(fsdp), True)
        except NotPeriodic:
            pass
    return _walk(spec, train, state, runtime, fsdp, False)


def layer_keys(profile: Any, job: Job, rope: list[Sym],
               hf_inputs: list[Sym]) -> tuple[list[Any], list[tuple[int, ...]]]:
    """For each block, what makes it differ from the others in memory: the profile's own
    ``layer_key(spec, i)`` where it has one, and the sizes of what the block is called with
    besides its input (masks, rotary tables); and the storages of those, which blocks share
    (Gemma's sliding and global layers read tables and masks of their kind)."""
    keys, shared = [], []
    for i in range(job.spec.num_layers):
        args = profile.block_args(job, rope, hf_inputs, i)
        keys.append((profile.layer_key(job.spec, i),
                     tuple((t.numel, t.itemsize, t.held, t.rg) for t in args)))
        shared.append(tuple(t.storage for t in args))
    return keys, shared


def _walk(spec: ModelSpec, train: TrainSpec, state: ModelState, runtime: str, fsdp: Any,
          reuse: bool) -> ActivationPlan:
    """:func:`plan_activations`, walking one copy of identical blocks when ``reuse``."""
    assert train.batch is not None and train.seq is not None
    r = train.recipe
    bf16_policy = fsdp is not None and train.param_dtype == "bf16"  # gathered and run in bf16
    # torch.autocast (not under FSDP's bf16 policy, which runs everything in bf16 already):
    # the forward computes in the weights' dtype, its matmuls and attention in autocast's
    autocast = ops.Autocast(r.compute_itemsize) if r.autocast != "none" and not bf16_policy \
        else None
    compute = 2 if bf16_policy else r.weight_itemsize if autocast else state.compute_bytes
    tape = Tape(dropout_mask_bytes=1 if runtime == "cuda" else None,
                # the mixed recipe's hooks move each gradient out at once, and so do ZeRO-2
                # and -3 (reduce-scattered bucket by bucket) into their sharded buffers
                param_grads_temporary=(r.notes_mixed or r.stage >= 2) and fsdp is None,
                # a weight's gradient has its dtype; adapters, heads and prompts are fp32
                grad_itemsize=compute if r.stage or bf16_policy else
                r.weight_itemsize if r.full else FP32,
                inplace_accumulation=runtime == "cuda", fsdp=fsdp,
                # later micro-batches add their gradients into the earlier ones' (not the
                # mixed recipe's hooks, whose bf16 buffers stay anyway)
                accumulating=r.grad_accum > 1 and not r.notes_mixed)
    prompt = train.prompt_tokens if r.trains == "prompt" else 0
    lora = r.lora
    profile = arch.profile_of(spec)
    job = Job(spec, train, profile, train.step_batch, train.seq + prompt, compute,
              full=r.full, bitfit=r.bitfit,
              targeted={l.name for l in P.check_rank(spec, train.lora)} if lora else set(),
              runtime=runtime, bf16_policy=bf16_policy, adapters=train.adapters,
              keep_outputs=r.keeps_outputs, autocast=autocast)
    b, h, v, d, tokens = job.b, spec.hidden_size, spec.vocab_size, job.d, job.tokens

    batch = tape.new(2 * b * train.seq, INT64, False)  # input ids and labels
    tape.pin(batch)
    tape.begin_forward()
    ids = tape.view(batch, numel=b * train.seq)
    embed_rg = job.full or (lora and train.lora.train_embeddings)
    tied = embed_rg and spec.tie_embeddings
    x = ops.embedding(tape, ids, b * train.seq, v, h, d, embed_rg, tied=tied)
    if ckpt_peft(train) and not x.rg:  # PEFT's enable_input_require_grads: the embedding
        x = tape.view(x, rg=True)      # output requires grad, so block 0 saves like the rest,
        tape.pin(x)                    # and autograd's AccumulateGrad node keeps it to the end
    target: Sym = tape.view(batch, numel=b * train.seq)
    if r.trains == "input-embedding":  # embed(ids) + delta(ids), the delta trains
        delta = ops.embedding(tape, ids, tokens, v, h, d, True)
        base, x = x, ops.add(tape, x, delta)
        tape.free(base, delta)
    if r.trains == "prompt":  # cat(prompt.expand(B, P, h), embed(ids)); labels padded
        base, x = x, tape.op(tape.new(tokens * h, d, True), [], param_grad=4 * prompt * h)
        tape.free(base)
        target = tape.alloc(tape.new(tokens, INT64, False))
    # Referenced for the whole forward: GPT-2's position ids, Llama's rotary tables, and the
    # input embeddings when they come in as ``inputs_embeds`` (the adapters' regimes) or, in
    # Hugging Face's models, as the body's ``inputs_embeds`` (and GPT-2's position_embeds).
    held = [x] if job.hf or r.trains in ("input-embedding", "prompt") else []
    x = profile.embed(tape, job, x, held)
    rope = profile.rope_tables(tape, job)
    held += rope
    n_held = len(held)
    profile.hf_inputs(tape, job, held)
    hf_inputs = held[n_held:]

    ckpt = train.checkpointing
    if reuse:
        tape.repeat(*layer_keys(profile, job, rope, hf_inputs))
    for i in range(spec.num_layers):
        if not tape.walks(i, x):
            continue  # alike a walked block: the tape counts it
        tape.enter_block(i, x)
        if ckpt:  # non-reentrant checkpoint: keeps the block's inputs, recomputes the rest;
            # Hugging Face's blocks take the mask and position tensors as arguments too, so
            # the checkpoint keeps them alive until that block's backward
            tape.begin_group(i, [x, *profile.block_args(job, rope, hf_inputs, i)])
        x_in, x = x, profile.block(tape, job, x, rope, i)
        if ckpt:
            tape.end_group()
        tape.exit_block(i)
        if x_in not in held:
            tape.free(x_in)

    hidden = profile.final_norm(tape, job, x)
    tape.free(x, *held)
    if r.trains == "head":
        head = getattr(profile, "classifier_head", _classifier_head)(tape, job, hidden)
        head = replace(head, inputs_bytes=batch.nbytes)
        if not profile.no_grad_forward_validated or spec.dropout > 0:
            why = "with dropout" if spec.dropout > 0 else f"on {spec.family}"
            head = replace(head, notes=(*head.notes, (
                f"approximation: the classifier regime {why} runs its backbone without "
                "grad in training mode, a forward memplan has measured above this plan; "
                "check it with `memplan profile`")))
        return head
    loss = profile.loss(tape, job, hidden, target, embed_rg and spec.tie_embeddings)
    if autocast is not None:
        autocast.exit(tape)
        loss = _scaled(tape, r.autocast, loss)
    tape.end_forward()
    notes = ("checkpointing: each block is recomputed in backward",) if ckpt else ()
    return ActivationPlan(tape.forward_peak, tape.backward(loss), notes,
                          outputs_bytes=sum(t.nbytes for t in job.outputs),
                          inputs_bytes=batch.nbytes)


def _scaled(tape: Tape, dtype: str, loss: Sym) -> Sym:
    """fp16 autocast's GradScaler (``torch.amp.GradScaler``): its state (an fp32 scale and an
    int32 growth tracker, made at the warm-up's first ``scale``) lives through the step, and
    backward starts from ``scale(loss)``, a scalar product alive until backward returns."""
    if dtype != "fp16":
        return loss
    tape.pin(tape.new(2, FP32, False))
    scaled = tape.op(tape.new(1, FP32, True), [(loss, loss.nbytes)])
    tape.pin(scaled)
    return scaled


def ckpt_peft(train: TrainSpec) -> bool:
    """PEFT wrapping a model with gradient checkpointing on calls
    ``enable_input_require_grads``: a forward hook makes the input embeddings' output require
    grad (for reentrant checkpoints), so the first block saves what the others save."""
    return (train.checkpointing and train.lora_backend == "peft"
            and train.recipe.lora)


def _classifier_head(tape: Tape, job: Job, hidden: Sym) -> ActivationPlan:
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
    tape.free(last, hidden)
    job.release_outputs(tape, logits)
    return ActivationPlan(tape.forward_peak, tape.backward(loss),
                          outputs_bytes=sum(t.nbytes for t in job.outputs))


def plan_inference(spec: ModelSpec, batch: int, seq: int, itemsize: int, sampled: int,
                   hf: bool = False, runtime: str = "cuda", tape: Tape | None = None,
                   kv_cache: Any = None, past: int = 0, lora: Any = None,
                   adapters: int = 0) -> Tape:
    """One inference forward (``torch.no_grad``) of ``batch`` × ``seq`` new tokens on the
    tape, the head run on ``sampled`` rows only (one per sequence: vLLM's ``logits_indices``,
    Hugging Face's ``logits_to_keep=1``) and cast to fp32 as vLLM's sampler does; returns the
    tape (its ``forward_peak`` is the peak beyond the weights, the KV cache included when
    ``kv_cache`` writes it). Nothing requires grad, so no op saves anything: what is live is
    what the model's Python references keep, as in training's forward.

    ``kv_cache(tape, job, q, k, v) -> (k, v)``: the cache's write, called by every attention
    (:func:`memplan.attention.attention`); none for vLLM's paged cache, preallocated and
    written in place. ``tape``: continue on it (a decode step after a prefill); ``past``:
    the tokens already cached (eager attention's scores and masks span them). Training
    plans never call this.

    ``lora`` (a :class:`~memplan.spec.LoraSpec`) with ``adapters`` K > 0: K PEFT adapters
    resident and unmerged on its targets, the batch a mixed-adapter batch of K equal shares
    (PEFT's ``adapter_names=``; :func:`memplan.ops.linear`'s inference branch).
    """
    impl = "hf" if hf else "memplan"
    profile = arch.profile_of(spec)
    # eval mode: every dropout is the identity (and sdpa never falls back to its math path)
    spec = replace(spec, dropout=0.0).with_extras(
        **{k: 0.0 for k in ("resid_pdrop", "hidden_dropout") if spec.extra(k) is not None})
    attention = "sdpa" if "sdpa" in profile.attentions or not hf else "eager"
    train = TrainSpec(regime="lora", batch=batch, seq=seq, impl=impl, attention=attention)
    targeted: set[str] = set()
    if adapters:  # PEFT's mixed batch: the K adapters ride on the Job, not on the TrainSpec,
        # which refuses PEFT with K > 1 for training
        train = TrainSpec(regime="lora", batch=batch, seq=seq, impl=impl, attention=attention,
                          lora=lora, lora_backend="peft")
        targeted = {layer.name for layer in P.check_rank(spec, lora)}
    # Hugging Face's sdpa mask: called without an attention mask, inference skips it for the
    # is_causal kernel under FakeTensorMode too (measured), as a real CPU run does
    job = Job(spec, train, profile, batch, seq, itemsize, full=False, bitfit=False,
              targeted=targeted, runtime="cpu" if runtime == "fake" else runtime,
              adapters=adapters or 1, kv_cache=kv_cache,
              # a decode step: attention reads the ``past`` cached keys and the new ones
              kv_len=past + seq if past else None,
              # what a Hugging Face layer's locals keep until it returns (eager's weights...)
              block_locals=[] if hf else None)
    tape = tape or Tape(dropout_mask_bytes=1 if runtime == "cuda" else None,
                        inplace_accumulation=runtime == "cuda")
    ids = tape.alloc(tape.new(batch * seq, INT64, False))
    x = ops.embedding(tape, ids, batch * seq, spec.vocab_size, spec.hidden_size, itemsize,
                      False)
    held = [x] if job.hf else []
    x = profile.embed(tape, job, x, held)
    rope = profile.rope_tables(tape, job)
    held += rope
    profile.hf_inputs(tape, job, held)
    for i in range(spec.num_layers):
        x_in, x = x, profile.block(tape, job, x, rope, i)
        if hf:
            tape.free(*job.block_locals)
            job.block_locals.clear()
        if x_in not in held:
            tape.free(x_in)
    hidden = profile.final_norm(tape, job, x)
    tape.free(x, *held)
    if hf:  # hidden_states[:, -1:, :], a view: the head reads it, hidden stays till then
        rows = hidden
    else:   # vLLM's hidden_states[logits_indices]: a gathered copy
        rows = tape.alloc(tape.new(sampled * spec.hidden_size, itemsize, False))
        tape.free(hidden)
    raw = ops.linear(tape, rows, spec.vocab_size, sampled, w_rg=False,
                     in_features=spec.hidden_size)
    tape.free(rows)
    logits = profile.logits(tape, job, raw)
    if logits is not raw:
        tape.free(raw)
    x32 = logits if hf else ops.cast(tape, logits, FP32)  # HF returns them in the dtype
    tape.free(logits, x32, ids)
    return tape
