"""A training job as separate choices, and the regime names as presets of them.

This is the one module that reads a regime's name. :func:`resolve` turns a
:class:`~memplan.spec.TrainSpec` into a :class:`Recipe`: what trains, the dtype the weights
are stored in, the dtype the forward computes in, the optimizer and the state it keeps, the
gradient accumulation and the loop. The planner, the profiler, ``advise`` and the plots read
the recipe, never the regime string.

The choices:

- what trains: every weight, LoRA adapters, a new head, an input embedding, a soft prompt or
  the biases (``--regime``);
- the weights' dtype (``--dtype fp32|bf16|fp16``); new parameters (adapters, heads, prompts)
  stay fp32 on a 16-bit base, as PEFT keeps them;
- autocast (``--autocast none|bf16|fp16``): ``torch.autocast`` over the forward, as the Hugging
  Face Trainer's ``bf16=True`` / ``fp16=True`` and Lightning's ``bf16-mixed`` run it;
- the optimizer (``--optimizer``) and its implementation (``--optimizer-impl``);
- gradient accumulation steps (``--grad-accum K``);
- the loop (``--loop manual|trainer``): ``manual`` keeps the model's outputs (the logits)
  through backward and the step, ``trainer`` drops them before backward;
- sharding (``--gpus``, ``--shard``, ``--param-dtype``).

A regime name fixes what trains and, for some, more: ``lora-bf16`` is LoRA on a bf16 base,
``qlora`` LoRA on an NF4 base computing in bf16, ``mixed`` the notes' own recipe (fp32 weights,
bf16 gradients and momentum), ``zero`` full fine-tuning sharded with FSDP, ``zero1``-``zero3``
the ZeRO paper's stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memplan.errors import MemplanError

if TYPE_CHECKING:
    from memplan.spec import TrainSpec

DTYPES = ("fp32", "bf16", "fp16")
AUTOCASTS = ("none", "bf16", "fp16")
LOOPS = ("manual", "trainer")
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
EIGHT_BIT = ("adamw-8bit", "paged-adamw-8bit")
TRAINS = ("all", "lora", "head", "input-embedding", "prompt", "biases")


@dataclass(frozen=True)
class Preset:
    """What a regime name fixes: what trains, the weights' dtype and the notes' or the ZeRO
    paper's own accounting where it names one."""

    trains: str
    dtype: str = "fp32"
    nf4: bool = False          # QLoRA: the block linears stored as NF4
    notes_mixed: bool = False  # the notes' mixed recipe: bf16 gradients and momentum
    stage: int = 0             # the ZeRO paper's stage 1-3 (fp16 weights, fp32 masters)
    fsdp: bool = False         # sharded with FSDP over the GPUs without --shard (zero)
    symbol: str = ""           # the notes' letter for what trains

    @property
    def lora(self) -> bool:
        """LoRA adapters train."""
        return self.trains == "lora"

    @property
    def shardable(self) -> bool:
        """FSDP can shard it: the trainable parameters live inside the model, the base is not
        NF4, and it is not one of the paper's stages (sharded already)."""
        return self.trains in ("all", "lora", "biases") and not self.nf4 and not self.stage


PRESETS = {
    "full": Preset("all", symbol="N"),
    "mixed": Preset("all", notes_mixed=True, symbol="N"),
    "zero": Preset("all", fsdp=True, symbol="N"),
    "lora": Preset("lora", symbol="M"),
    "classifier": Preset("head", symbol="C"),
    "input-adapter": Preset("input-embedding", symbol="E"),
    "lora-bf16": Preset("lora", dtype="bf16", symbol="M"),
    "qlora": Preset("lora", dtype="bf16", nf4=True, symbol="M"),
    "bitfit": Preset("biases", symbol="B"),
    "prompt-tuning": Preset("prompt", symbol="P"),
    "zero1": Preset("all", dtype="fp16", stage=1, symbol="N"),
    "zero2": Preset("all", dtype="fp16", stage=2, symbol="N"),
    "zero3": Preset("all", dtype="fp16", stage=3, symbol="N"),
}


@dataclass(frozen=True)
class Recipe:
    """A job resolved: what trains, in which dtypes, with which optimizer state.

    ``dtype`` is the dtype the model's weights are stored in (QLoRA's non-quantised ones);
    ``compute`` the dtype its matmuls and activations run in (the autocast dtype under
    autocast); ``grad_itemsize`` the bytes per element of a gradient of an existing weight.
    """

    regime: str
    trains: str
    dtype: str
    autocast: str
    optimizer: str
    optimizer_impl: str
    grad_accum: int
    loop: str
    nf4: bool
    notes_mixed: bool
    stage: int
    fsdp: bool
    symbol: str

    @property
    def full(self) -> bool:
        """Every weight of the model trains."""
        return self.trains == "all"

    @property
    def lora(self) -> bool:
        """LoRA adapters train (on an fp32, 16-bit or NF4 base)."""
        return self.trains == "lora"

    @property
    def bitfit(self) -> bool:
        """The biases train."""
        return self.trains == "biases"

    @property
    def adds_params(self) -> bool:
        """The trainable set is new parameters (adapters, a head, an embedding, a prompt)."""
        return self.trains in ("lora", "head", "input-embedding", "prompt")

    @property
    def weight_itemsize(self) -> int:
        """Bytes per element of the model's stored (non-quantised) weights."""
        return ITEMSIZE[self.dtype]

    @property
    def compute(self) -> str:
        """The dtype of the forward's matmuls: the autocast dtype, else the weights'."""
        return self.autocast if self.autocast != "none" else self.dtype

    @property
    def compute_itemsize(self) -> int:
        """Bytes per element of the forward's activations (a 16-bit base under its own
        dtype, the autocast dtype, or fp32)."""
        return ITEMSIZE[self.compute]

    @property
    def sixteen_bit_base(self) -> bool:
        """New fp32 parameters (adapters, heads) on a 16-bit or NF4 base."""
        return self.dtype != "fp32" and not self.full

    @property
    def paper_stage(self) -> bool:
        """The ZeRO paper's accounting (stages 1-3)."""
        return self.stage > 0

    @property
    def shardable(self) -> bool:
        """FSDP can shard it (:attr:`Preset.shardable`: what trains and the base decide)."""
        return PRESETS[self.regime].shardable

    @property
    def eight_bit(self) -> bool:
        """bitsandbytes' 8-bit AdamW (paged or not)."""
        return self.optimizer in EIGHT_BIT

    @property
    def keeps_outputs(self) -> bool:
        """The loop keeps the model's outputs through backward and the step."""
        return self.loop == "manual"



@dataclass(frozen=True)
class Named:
    """A recipe by the name its users know it by, and the choices that plan it."""

    name: str
    how: str
    choices: tuple[tuple[str, object], ...]

    @property
    def flags(self) -> str:
        """The command-line flags of the choices."""
        return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in self.choices)


def _named(name: str, how: str, **choices: object) -> Named:
    return Named(name, how, tuple(choices.items()))


# The recipes people run, by the names they know them by. The Trainer's loop drops the outputs
# before backward (``compute_loss`` returns the loss alone); torchtune's recipes ``del logits``
# before backward too; a hand-written loop keeps them.
NAMED_RECIPES = (
    _named("the notes' full fine-tuning", "fp32 weights, gradients and AdamW states",
           regime="full"),
    _named("the notes' mixed precision", "fp32 weights, bf16 gradients and momentum",
           regime="mixed"),
    _named("Trainer bf16=True", "Hugging Face Trainer: autocast over fp32 weights",
           regime="full", autocast="bf16", loop="trainer"),
    _named("Trainer fp16=True", "autocast fp16 and a gradient scaler",
           regime="full", autocast="fp16", loop="trainer"),
    _named("Trainer bf16=True, optim=adamw_bnb_8bit", "bitsandbytes' 8-bit AdamW states",
           regime="full", autocast="bf16", optimizer="adamw-8bit", loop="trainer"),
    _named("Trainer optim=adafactor", "factored second moments, fp32 weights",
           regime="full", optimizer="adafactor", loop="trainer"),
    _named("torchtune full bf16", "pure bf16: weights, gradients and AdamW states",
           regime="full", dtype="bf16", loop="trainer"),
    _named("PEFT LoRA, fp32 base", "the notes' LoRA, a hand-written loop", regime="lora"),
    _named("PEFT LoRA, bf16 base, Trainer bf16=True", "fp32 adapters under autocast",
           regime="lora", dtype="bf16", autocast="bf16", loop="trainer"),
    _named("QLoRA, paged_adamw_8bit", "NF4 base, bf16 compute, paged 8-bit states",
           regime="qlora", optimizer="paged-adamw-8bit", loop="trainer"),
)


def choices_text(train: TrainSpec, dtype: str | None = None, autocast: str | None = None
                 ) -> str:
    """The job's choices beyond the regime, for a plan's title: the weights' dtype when
    given, autocast, the optimizer (with its implementation for torch's AdamW), accumulation
    and the loop. ``dtype``, ``autocast``: those of rows planned with them applied."""
    dtype = dtype or train.dtype
    autocast = autocast or train.autocast
    parts = [f"{dtype} weights"] if dtype else []
    if autocast != "none":
        parts.append(f"autocast {autocast}")
    parts.append(train.optimizer + (f", {train.optimizer_impl}"
                                    if train.optimizer in ("adamw", "sgd", "sgd-momentum")
                                    else ""))
    if train.grad_accum > 1:
        parts.append(f"{train.grad_accum} micro-batches per step")
    if train.has_activations:
        parts.append(f"{train.loop} loop")
    return ", ".join(parts)


def preset(regime: str) -> Preset:
    """The choices a regime name fixes."""
    if regime not in PRESETS:
        from memplan.errors import unknown

        raise unknown("regime", regime, tuple(PRESETS))
    return PRESETS[regime]


def resolve(train: TrainSpec) -> Recipe:
    """The one reading of a job's regime and choices; refuses what no implementation runs."""
    p = preset(train.regime)
    dtype = train.dtype or p.dtype
    recipe = Recipe(
        regime=train.regime, trains=p.trains, dtype=dtype, autocast=train.autocast,
        optimizer=train.optimizer, optimizer_impl=train.optimizer_impl,
        grad_accum=train.grad_accum, loop=train.loop, nf4=p.nf4, notes_mixed=p.notes_mixed,
        stage=p.stage, fsdp=p.fsdp, symbol=p.symbol)
    _check(train, p, recipe)
    return recipe


def _check(train: TrainSpec, p: Preset, r: Recipe) -> None:
    """One clear line for each combination that does not exist."""
    for what, value, choices in (("dtype", r.dtype, DTYPES), ("autocast", r.autocast, AUTOCASTS),
                                 ("loop", r.loop, LOOPS)):
        if value not in choices:
            from memplan.errors import unknown

            raise unknown(what, value, choices)
    k = r.grad_accum
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= 2**24:
        raise MemplanError(f"--grad-accum must be a positive integer (1: no accumulation), "
                           f"got {k!r}; try --grad-accum 4")
    if train.dtype and train.dtype != p.dtype and (p.dtype != "fp32" or p.notes_mixed
                                                   or p.fsdp):
        instead = {"lora-bf16": f"--regime lora --dtype {train.dtype}",
                   "qlora": f"--regime lora --dtype {train.dtype}",
                   "mixed": f"--regime full --dtype {train.dtype} (pure 16-bit)",
                   "zero": "--regime full --shard full-shard"}.get(train.regime, "")
        raise MemplanError(
            f"--regime {train.regime} fixes its dtype ({p.dtype}"
            f"{' weights, bf16 gradients' if p.notes_mixed else ''}); drop --dtype"
            + (f", or use {instead}" if instead else ""))
    if r.dtype != "fp32" and r.trains in ("input-embedding", "prompt"):
        raise MemplanError(f"--dtype {r.dtype} with --regime {r.regime} is not planned yet "
                           "(a 16-bit backbone under a new fp32 module); use --dtype fp32, "
                           "or --regime lora")
    if r.autocast != "none":
        if p.notes_mixed:
            raise MemplanError("--regime mixed is the notes' own bf16 recipe and runs without "
                               "autocast; for the Trainer's bf16=True use --regime full "
                               f"--autocast {r.autocast}")
        if r.stage:
            raise MemplanError(f"--regime {r.regime} is the ZeRO paper's fp16 accounting, "
                               "with no autocast; drop --autocast")
        if r.dtype != "fp32" and r.dtype != r.autocast:
            raise MemplanError(f"--autocast {r.autocast} over {r.dtype} weights: autocast "
                               f"casts fp32 only, so {r.dtype} ops would stay {r.dtype}; use "
                               f"--autocast {r.dtype} (or --dtype fp32)")
        if r.dtype == r.autocast and r.full:
            raise MemplanError(f"--autocast {r.autocast} over {r.dtype} weights that all train "
                               "casts nothing; drop --autocast (pure "
                               f"{r.dtype} training)")
        if train.param_dtype != "fp32":
            raise MemplanError("--param-dtype bf16 is FSDP's own mixed precision; drop "
                               "--autocast, or use --param-dtype fp32")
    opt = r.optimizer
    if p.notes_mixed and opt not in ("adamw", "sgd", "sgd-momentum"):
        raise MemplanError(f"--regime mixed keeps bf16 momentum in its own AdamW or SGD; "
                           f"--optimizer {opt} needs --regime full (with --autocast bf16 for "
                           "a Trainer-style bf16 run)")
    if r.stage and opt != "adamw":
        raise MemplanError(f"{r.regime} follows the ZeRO paper's Adam accounting; "
                           "use --optimizer adamw")
    sharded = train.gpus > 1 and (p.fsdp or train.shard != "none")
    if sharded and r.eight_bit:
        raise MemplanError(f"--optimizer {opt} with FSDP: bitsandbytes' 8-bit optimizers "
                           "step plain local tensors, not FSDP2's sharded DTensors; use "
                           "--optimizer adamw, or one GPU")
    if sharded and opt == "adafactor":
        raise MemplanError("--optimizer adafactor with FSDP: its factored row and column "
                           "moments need the whole matrix, not FSDP2's row shards; use "
                           "--optimizer adamw, or one GPU")
    if k > 1 and (sharded or r.stage):
        raise MemplanError(f"--grad-accum {k} with sharding is not planned yet (FSDP and "
                           "ZeRO reduce each micro-batch's gradients); use --grad-accum 1")
    if opt in EIGHT_BIT or opt == "adafactor":
        if train.optimizer_impl != "fused":
            raise MemplanError(f"--optimizer {opt} has one implementation; drop "
                               "--optimizer-impl")
