"""Frozen dataclasses that describe what is planned: the model, the LoRA adapters, the job.

Variants are made with :func:`dataclasses.replace`; nothing here is ever mutated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from memplan.errors import MemplanError
from memplan.recipe import PRESETS, Recipe, resolve

# the six of the notes first, then lora-bf16, qlora, bitfit, prompt-tuning, zero1-3
REGIMES = tuple(PRESETS)
NOTES_REGIMES = REGIMES[:6]
PAPER_STAGES = tuple(n for n, p in PRESETS.items() if p.stage)  # the ZeRO paper's accounting
DRY_RUN_REGIMES = ("full", "lora", "lora-bf16")  # measured on a model type with no profile
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "adafactor", "sgd", "sgd-momentum")
OPTIMIZER_IMPLS = ("fused", "foreach", "forloop")
ATTENTIONS = ("sdpa", "eager", "flash")
# Upper bound of the job's sizes (batch, seq, GPUs, classes, prompt tokens): no real job comes
# near 16,777,216 of any, and bounded sizes keep every tensor a profile builds within int64.
MAX_JOB_SIZE = 2**24
IMPLS = ("memplan", "hf")          # whose model code runs: memplan's reference models or HF's
LORA_BACKENDS = ("memplan", "peft")
SHARDS = ("none", "full-shard", "shard-grad-op")  # FSDP's FULL_SHARD and SHARD_GRAD_OP
PARAM_DTYPES = ("fp32", "bf16")  # FSDP's MixedPrecisionPolicy: bf16 gathers, fp32 reduces


@dataclass(frozen=True)
class ModelSpec:
    """A transformer, as much of it as memory depends on.

    ``family`` names the architecture profile (:mod:`memplan.arch`) that owns its layout,
    inventory and forward; ``model_type`` is the Hugging Face type it was read as. The common
    sizes are fields; what only some families have (experts, soft-capping, q/k norms...) is in
    ``extras``, read with :meth:`extra`. ``approximation`` is non-empty when the model was
    planned as another family on request (``--as``): it says so, and every output repeats it.
    """

    name: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    gated_mlp: bool = True
    activation: str = "silu"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    norm: str = "rmsnorm"
    tie_embeddings: bool = False
    learned_positions: bool = False
    max_positions: int = 4096
    dropout: float = 0.0
    model_type: str = ""
    extras: tuple[tuple[str, Any], ...] = ()
    approximation: str = ""

    def __post_init__(self) -> None:
        from memplan.arch import families

        if self.family not in families():
            raise MemplanError(f"model family {self.family!r} is not one of "
                               f"{', '.join(families())}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise MemplanError(f"{name} of model {self.name!r} must be a positive integer, "
                                   f"got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise MemplanError(
                f"num_heads {self.num_heads} of model {self.name!r} is not a multiple of "
                f"num_kv_heads {self.num_kv_heads}"
            )
        if self.norm not in ("rmsnorm", "layernorm"):
            raise MemplanError(f"norm {self.norm!r} must be rmsnorm or layernorm")
        if not 0.0 <= self.dropout < 1.0:
            raise MemplanError(f"dropout {self.dropout!r} must be in [0, 1)")

    def extra(self, key: str, default: Any = None) -> Any:
        """A family-specific value from ``extras``."""
        return dict(self.extras).get(key, default)

    def with_extras(self, **values: Any) -> ModelSpec:
        """A copy with ``extras`` updated."""
        from dataclasses import replace

        return replace(self, extras=tuple(sorted((dict(self.extras) | values).items())))

    @property
    def q_dim(self) -> int:
        """Width of the query projection, heads × head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of the key and value projections (GQA: kv_heads × head_dim)."""
        return self.num_kv_heads * self.head_dim

    @property
    def norm_bias(self) -> bool:
        """LayerNorm carries a bias; RMSNorm does not."""
        return self.norm == "layernorm"


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters: rank R, scaling alpha/R, which linear layers, and optional embeddings."""

    rank: int = 8
    alpha: float = 16.0
    targets: str | tuple[str, ...] = "all"
    train_embeddings: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise MemplanError(f"LoRA rank must be a positive integer, got {self.rank!r}; "
                               "try --rank 8")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) \
                or not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise MemplanError(f"LoRA alpha must be a positive finite number, got "
                               f"{self.alpha!r}; try --alpha 16")


@dataclass(frozen=True)
class TrainSpec:
    """The training job: regime, shapes, optimizer and the memory-saving options.

    ``batch`` is the micro-batch per GPU. Without ``batch`` and ``seq`` the plan holds model
    states only (the notes' formulas) and says that activations are excluded.

    ``gpus`` (M) and ``shard``: regime ``zero`` and any regime with ``shard`` set are planned
    per rank of FSDP over M GPUs (``zero`` alone means FULL_SHARD); other regimes hold
    everything on every GPU (data parallel). One GPU shards nothing. ``param_dtype="bf16"``
    is FSDP's ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: parameters are
    gathered, computed with and differentiated in bf16; gradients are reduced in fp32.

    The job's other choices (:mod:`memplan.recipe` resolves them, with the regime, into
    :attr:`recipe`): ``dtype`` the weights are stored in (None: the regime's own), ``autocast``
    over the forward and loss, ``optimizer`` and ``optimizer_impl``, ``grad_accum`` K
    micro-batches per step, and the ``loop``: ``manual`` keeps the model's outputs through
    backward and the step (the larger, so the default), ``trainer`` drops them.
    """

    regime: str = "full"
    batch: int | None = None
    seq: int | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)
    num_classes: int = 2
    prompt_tokens: int = 20
    gpus: int = 1
    optimizer: str = "adamw"
    optimizer_impl: str = "fused"
    checkpointing: bool = False
    attention: str = "sdpa"
    impl: str = "memplan"
    lora_backend: str = "memplan"
    shard: str = "none"
    param_dtype: str = "fp32"
    adapters: int = 1
    dtype: str | None = None
    autocast: str = "none"
    grad_accum: int = 1
    loop: str = "manual"

    def __post_init__(self) -> None:
        checks = (
            ("regime", self.regime, REGIMES),
            ("implementation", self.impl, IMPLS),
            ("LoRA backend", self.lora_backend, LORA_BACKENDS),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("optimizer implementation", self.optimizer_impl, OPTIMIZER_IMPLS),
            ("attention", self.attention, ATTENTIONS),
            ("sharding", self.shard, SHARDS),
            ("FSDP parameter dtype", self.param_dtype, PARAM_DTYPES),
        )
        for what, value, choices in checks:
            if value not in choices:
                from memplan.errors import unknown

                raise unknown(what, value, choices)
        for name, flag in (("batch", "--batch"), ("seq", "--seq"), ("gpus", "--gpus"),
                           ("num_classes", "--classes"), ("prompt_tokens", "--prompt-tokens")):
            value = getattr(self, name)
            if value is None and name in ("batch", "seq"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise MemplanError(f"{flag} must be a positive integer, got {value!r}")
            if value > MAX_JOB_SIZE:
                raise MemplanError(f"{flag} {value} is far beyond any real job; the limit is "
                                   f"{MAX_JOB_SIZE:,}")
        if (self.batch is None) != (self.seq is None):
            raise MemplanError("give both --batch and --seq to plan activations, or neither")
        _check_adapters(self)
        # resolved once, here: a combination that does not exist is refused when made
        object.__setattr__(self, "_recipe", resolve(self))

    @property
    def recipe(self) -> Recipe:
        """The job resolved into what trains, in which dtypes, with which optimizer state
        (:func:`memplan.recipe.resolve`, run once when the spec is made)."""
        return self._recipe

    @property
    def step_batch(self) -> int | None:
        """Samples in one step: ``adapters × batch`` (``batch`` is per adapter)."""
        return None if self.batch is None else self.batch * self.adapters

    @property
    def has_activations(self) -> bool:
        """Whether batch and sequence length were given, so activations are planned."""
        return self.batch is not None and self.seq is not None


def _check_adapters(train: TrainSpec) -> None:
    """``adapters`` (K): K LoRA adapters on one frozen base, ``batch`` samples each."""
    k = train.adapters
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= MAX_JOB_SIZE:
        raise MemplanError(f"--adapters must be a positive integer up to {MAX_JOB_SIZE:,}, "
                           f"got {k!r}; try --adapters 2")
    if k == 1:
        return
    preset = PRESETS[train.regime]
    if not preset.lora or preset.nf4:
        raise MemplanError(f"--adapters {k} trains K LoRA adapters; use --regime lora or "
                           f"lora-bf16, not {train.regime}")
    if train.lora_backend == "peft":
        raise MemplanError(f"--adapters {k} runs memplan's LoRALinear only; drop "
                           "--lora-backend peft")
    if train.lora.train_embeddings:
        raise MemplanError(f"--adapters {k} trains adapters only; drop --train-embeddings")
    if train.shard != "none":
        raise MemplanError(f"--adapters {k} is planned without FSDP; drop --shard")
