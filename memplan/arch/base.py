"""What an architecture profile is: the one place that knows a model family.

A :class:`Profile` says, for the model types it serves (Hugging Face ``model_type``):

- how a config.json is read into a :class:`~memplan.spec.ModelSpec`, with the transformers
  config class's defaults for absent keys (:meth:`Profile.read`), and back (:meth:`Profile.to_hf`);
- its parameter inventory in registration order (:meth:`Profile.block_weights`,
  :meth:`Profile.root_weights`): names as Hugging Face and PEFT spell them, shapes, groups;
- the linear layers LoRA can target (:meth:`Profile.linears`);
- the symbolic forward of its embedding, one block and its head on the tape;
- its quirks as data (allowed attention kernels, Conv1D, the softmax dtype of eager attention).

Counting, the trainable set, the optimizer's tensors, FSDP's units and the activations all read
the profile; nothing outside :mod:`memplan.arch` asks which family a model is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memplan.autograd import FP32, INT64

if TYPE_CHECKING:
    from memplan.autograd import Sym, Tape
    from memplan.spec import ModelSpec, TrainSpec

GROUPS = ("embedding", "position", "attention", "mlp", "expert", "router", "norm", "head")


@dataclass(frozen=True)
class LinearShape:
    """One linear layer of a block: its dotted name inside the block, group and shape.

    ``targetable``: PEFT's LoRA can wrap it (an ``nn.Linear`` or GPT-2's ``Conv1D``).
    """

    name: str          # e.g. "self_attn.q_proj" or "mlp.c_proj"
    group: str         # "attention", "mlp", "router" ...
    in_features: int
    out_features: int
    bias: bool
    targetable: bool = True

    @property
    def short_name(self) -> str:
        """The module's own name, as LoRA targets say it: ``q_proj``, ``c_proj``."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def params(self) -> int:
        """Weight plus bias elements."""
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Weight:
    """One parameter tensor, as ``named_parameters()`` lists it.

    ``name`` is relative to its block (``self_attn.q_proj.weight``) or to the model for the
    root's (``embed``, ``final_norm``, ``head``: the roles; Hugging Face's names differ per
    family). ``module`` is the linear it belongs to, if any (LoRA adapters join after it).
    """

    name: str
    shape: tuple[int, ...]
    group: str
    bias: bool = False
    module: str = ""

    @property
    def numel(self) -> int:
        out = 1
        for size in self.shape:
            out *= size
        return out

    @property
    def rows(self) -> int:
        """dim 0, the dimension FSDP shards."""
        return self.shape[0]


def linear_weights(layer: LinearShape) -> tuple[Weight, ...]:
    """The weight (out × in) and bias of a linear layer."""
    weight = Weight(f"{layer.name}.weight", (layer.out_features, layer.in_features),
                    layer.group, module=layer.name)
    if not layer.bias:
        return (weight,)
    return weight, Weight(f"{layer.name}.bias", (layer.out_features,), layer.group, True,
                          module=layer.name)


def norm_weights(name: str, size: int, bias: bool) -> tuple[Weight, ...]:
    """A norm's weight, and its bias for LayerNorm."""
    weight = Weight(f"{name}.weight", (size,), "norm")
    return (weight, Weight(f"{name}.bias", (size,), "norm", True)) if bias else (weight,)


@dataclass
class Job:
    """What the symbolic forward of one step needs to know (built by
    :func:`memplan.activations.plan_activations`)."""

    spec: ModelSpec
    train: TrainSpec
    profile: Profile
    b: int
    s: int
    d: int
    full: bool
    bitfit: bool
    targeted: set[str]
    runtime: str = "cuda"
    mask: Sym | None = None  # Hugging Face's materialised attention mask, one per forward
    bf16_policy: bool = False  # FSDP's MixedPrecisionPolicy: every parameter gathered in bf16
    adapters: int = 1  # LoRA adapters the linears run, each on its share of the batch
    # An inference (memplan.activations.plan_inference): the KV cache's write, called by every
    # attention with (tape, job, q, k, v) -> (k, v); the keys a decode step attends to (the
    # cache's and the new tokens); what a Hugging Face layer's locals keep until it returns.
    kv_cache: Any = None
    kv_len: int | None = None
    block_locals: list[Sym] | None = None
    # The manual loop: what the model returns beside the loss (its logits) stays referenced
    # by the caller through backward and the step; collected here instead of freed.
    keep_outputs: bool = False
    outputs: list[Sym] = field(default_factory=list)
    # torch.autocast over the forward and the loss (memplan.ops.Autocast), or None. ``d``
    # stays the dtype of the weights and of what the non-autocast ops compute in (the
    # embeddings, the residual stream, the norms); :attr:`mm` is what matmuls and attention
    # produce.
    autocast: Any = None

    def release_outputs(self, tape: Tape, *syms: Sym) -> None:
        """The model's outputs once the loss is computed: freed (the Trainer's loop drops
        them), or kept to the end of the step (a hand-written loop's ``out``)."""
        if self.keep_outputs:
            self.outputs.extend(syms)
            for sym in syms:  # referenced by the caller: never freed by the backward walk
                tape.pin(sym)
        else:
            tape.free(*syms)

    @property
    def hf(self) -> bool:
        """Hugging Face's model code runs (``--impl hf``, or a family memplan has no
        reference model of)."""
        return self.train.impl == "hf" or not self.profile.reference_model

    @property
    def tokens(self) -> int:
        return self.b * self.s

    @property
    def mm(self) -> int:
        """Bytes per element of what matmuls and attention produce: the autocast dtype's
        under autocast, else ``d``."""
        return self.autocast.itemsize if self.autocast is not None else self.d

    @property
    def fp32_list(self) -> bool:
        """CUDA's autocast runs its fp32 list (layer_norm, softmax, pow, rsqrt...) in fp32,
        casting a 16-bit input up; the CPU's list lacks them (and so fake tensors on the
        CPU): a difference only where such an op sees a 16-bit input (a 16-bit base)."""
        return self.autocast is not None and self.runtime == "cuda"


class Profile:
    """The base of every family's profile; subclasses override what differs.

    Class attributes are the family's quirks, as data.
    """

    family: str = ""                      # ModelSpec.family
    model_types: tuple[str, ...] = ()     # Hugging Face model_type values it serves
    attentions: tuple[str, ...] = ("sdpa", "eager", "flash")  # kernels it trains with
    conv1d: bool = False                  # linears are GPT-2's Conv1D (PEFT: fan_in_fan_out)
    reference_model: bool = False         # memplan.nn.models builds it (--impl memplan)
    # The classifier regime runs the backbone under no_grad in training mode; where that
    # forward was measured above its plan, the plan says it is an approximation.
    no_grad_forward_validated: bool = True
    eager_softmax_fp32: bool = True       # eager attention's softmax upcasts to fp32
    body: str = "model"                   # attribute of the causal LM holding the body
    hf_auto_class: str = "AutoModelForCausalLM"
    source: str = ""                      # the transformers classes it follows

    # ---- config -------------------------------------------------------------------------
    def read(self, cfg: dict[str, Any], name: str, where: str) -> ModelSpec:
        """A config dictionary of one of :attr:`model_types` as a ModelSpec."""
        raise NotImplementedError

    def to_hf(self, spec: ModelSpec) -> dict[str, Any]:
        """The Hugging Face config of ``spec`` (the inverse of :meth:`read`)."""
        raise NotImplementedError

    # ---- inventory ----------------------------------------------------------------------
    def linears(self, spec: ModelSpec) -> tuple[LinearShape, ...]:
        """The linear layers of one block, with Hugging Face's module names."""
        raise NotImplementedError

    def block_norms(self, spec: ModelSpec) -> tuple[Weight, ...]:
        """The norms' parameters of one block."""
        raise NotImplementedError

    def block_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        """Every parameter of one block in registration order."""
        return tuple(w for layer in self.linears(spec) for w in linear_weights(layer)) + \
            self.block_norms(spec)

    def root_weights(self, spec: ModelSpec) -> tuple[Weight, ...]:
        """The parameters outside the blocks: ``embed`` (first), learned ``positions``,
        the final norm, and the untied ``head``."""
        raise NotImplementedError

    def buffer_bytes(self, spec: ModelSpec) -> int:
        """Non-parameter buffers (rotary ``inv_freq``...)."""
        return 0

    def root_lora_linears(self, spec: ModelSpec, lora: Any) -> tuple[LinearShape, ...]:
        """Linears outside the blocks that LoRA wraps for these targets (none: PEFT's
        all-linear leaves a causal LM's head alone)."""
        return ()

    def peft_targets(self, names: list[str]) -> list[str] | str:
        """PEFT's ``target_modules`` for these dotted module names (PEFT matches suffixes)."""
        return names

    def check(self, spec: ModelSpec, train: TrainSpec) -> None:
        """Refuse a job this family cannot run (one clear line); called for every plan."""
        if train.has_activations and train.attention not in self.attentions:
            from memplan.errors import MemplanError

            raise MemplanError(f"{spec.name} ({spec.model_type or self.family}) trains with "
                               f"{' or '.join(self.attentions)} attention in transformers; "
                               f"use --attention {self.attentions[0]}")

    # ---- symbolic forward ---------------------------------------------------------------
    def embed(self, tape: Tape, job: Job, x: Sym, held: list[Sym]) -> Sym:
        """What follows the token embedding (positions, scaling...); ``held`` collects what
        the whole forward references."""
        return x

    def rope_tables(self, tape: Tape, job: Job) -> list[Sym]:
        """The rotary tables the blocks read (none without rotary positions)."""
        return []

    def hf_inputs(self, tape: Tape, job: Job, held: list[Sym]) -> None:
        """What Hugging Face's model code makes before the blocks and keeps for the whole
        forward: cache_position / position_ids, and the causal (B, 1, s, s) mask when it is
        materialised (always on the eager path; for sdpa only under FakeTensorMode, where
        ``_ignore_causal_mask_sdpa`` sees a fake cache_position as tracing and keeps it).
        Sets ``job.mask``."""
        if not job.hf:
            return
        held.append(tape.alloc(tape.new(job.s, INT64, False)))
        if job.train.attention == "eager" or job.runtime == "fake":  # eager: float; sdpa: bool
            itemsize = job.d if job.train.attention == "eager" else 1
            keys = job.kv_len or job.s  # an inference's cache adds keys
            job.mask = tape.alloc(tape.new(job.b * job.s * keys, itemsize, False))
            held.append(job.mask)

    def block_args(self, job: Job, rope: list[Sym], hf_inputs: list[Sym],
                   layer: int) -> list[Sym]:
        """What each block is called with besides its input: a checkpointed block keeps them
        alive until its backward. memplan's blocks take the rotary tables; Hugging Face's also
        the position ids and the mask (``hf_inputs``)."""
        return [*rope, *hf_inputs] if job.hf else list(rope)

    def kv_windows(self, spec: ModelSpec) -> list[int | None]:
        """Each layer's sliding window in tokens for the KV cache (None: full attention,
        every token kept); :mod:`memplan.serve` pages a windowed layer's cache by it."""
        return [None] * spec.num_layers

    def layer_key(self, spec: ModelSpec, layer: int) -> Any:
        """What makes block ``layer`` differ from the others beyond its ``block_args``
        (None: nothing). The planner walks one block of a run of equal keys and counts the
        rest; a block that differs in any other way must say so here."""
        return None

    def block(self, tape: Tape, job: Job, x: Sym, rope: list[Sym], layer: int) -> Sym:
        """One block's forward; returns its output (the input stays the caller's)."""
        raise NotImplementedError

    def final_norm(self, tape: Tape, job: Job, x: Sym) -> Sym:
        """The norm after the last block."""
        raise NotImplementedError

    def logits(self, tape: Tape, job: Job, logits: Sym) -> Sym:
        """What the head does to its logits before the loss (soft-capping)."""
        return logits

    def loss(self, tape: Tape, job: Job, hidden: Sym, target: Sym, tied: bool) -> Sym:
        """The LM head on the final hidden state and the cross-entropy loss; frees hidden.

        memplan's models: ``cross_entropy(logits.float(), labels)``; Hugging Face's
        ``ForCausalLMLoss``: ``logits.float()``, labels padded by one, ``shift_labels``
        made contiguous.
        """
        from memplan import ops

        spec, train = job.spec, job.train
        embed_rg = job.full or (train.recipe.lora and train.lora.train_embeddings)
        raw = ops.linear(tape, hidden, spec.vocab_size, job.tokens, w_rg=embed_rg, tied=tied,
                         ac=job.autocast, weight_itemsize=job.d)
        tape.free(hidden)
        logits = self.logits(tape, job, raw)
        if logits is not raw:
            tape.free(raw)
        if job.hf:
            x32 = ops.cast(tape, logits, FP32)
            padded = tape.alloc(tape.new(job.b * (train.seq + 1), INT64, False))
            target = tape.alloc(tape.new(job.tokens, INT64, False))
            loss = ops.cross_entropy(tape, x32, job.tokens, spec.vocab_size, target)
            tape.free(padded, target, *([x32] if x32 is not logits else []))
        else:
            loss = ops.cross_entropy(tape, logits, job.tokens, spec.vocab_size, target)
        job.release_outputs(tape, logits)
        return loss
