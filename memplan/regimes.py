"""What each training regime keeps in memory: which parameters train, in which dtypes, sharded how.

The notes' regimes (N = model parameters, M = LoRA parameters, C = head, E = input embedding):

    full           16N        fp32 weights 4N, fp32 grads 4N, Adam m and v 8N
    mixed          12N        fp32 weights 4N, bf16 grads 2N, bf16 m 2N, fp32 v 4N
    zero           16N/G      the full recipe, every state sharded over G GPUs (ZeRO-3 / FSDP)
    lora           4N + 16M   frozen fp32 base; fp32 adapters with grads and Adam states
    classifier     4N + 16C   frozen backbone, a new head
    input-adapter  4N + 16E   frozen model, a new additive input embedding of E parameters

Beyond the notes: lora-bf16 (2N + 16M), qlora (NF4 base with double quantisation, Dettmers et
al. 2023), bitfit (biases only, Ben Zaken et al. 2022: 4N + 12B), prompt-tuning (P soft-prompt
vectors, Lester et al. 2021) and ZeRO stages 1-3 in the ZeRO paper's mixed-precision accounting
(Rajbhandari et al. 2020, section 3.1: fp16 params 2Ψ, fp16 grads 2Ψ, optimizer states KΨ with
K = 12: fp32 master weights, momentum and variance).

These are the regimes' own choices. A job's other choices (:mod:`memplan.recipe`) move the
bytes term by term: the weights' dtype (``--dtype bf16`` with ``full``: 2N + 2N + 4N = 8N),
the optimizer's state (:mod:`memplan.optimizer`: 8-bit AdamW's uint8 moments, Adafactor's
factored ones), read from the resolved recipe, never from the regime's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan import arch
from memplan import optimizer as O
from memplan import params as P
from memplan.errors import MemplanError
from memplan.fsdp import check_shardable
from memplan.spec import ModelSpec, TrainSpec

# QLoRA's NF4 storage (Dettmers et al. 2023, QLoRA, section 3): 4-bit codes, one 8-bit absmax
# per block of 64 weights, and with double quantisation one fp32 absmax per 256 such blocks:
# 4 + 8/64 + 32/(64·256) = 4.127 bits per weight.
NF4_BLOCK = 64
NF4_BLOCK2 = 256


@dataclass(frozen=True)
class ModelState:
    """Model-state bytes of a regime, per GPU, with what produced them.

    ``trainable`` is the count of trainable elements, ``new_params`` how many of them were added
    to the model (adapters, heads), ``grad_bytes`` the bytes per trainable element of its
    gradient, ``compute_bytes`` the bytes per element the forward computes in (the autocast
    dtype under autocast), ``weight_itemsize`` those the model's weights are stored in.
    """

    regime: str
    formula: str
    weights_bytes: int
    gradients_bytes: int
    optimizer_states_bytes: int
    master_weights_bytes: int
    trainable: int
    new_params: int
    grad_bytes: int
    compute_bytes: int
    weight_itemsize: int
    backprop_backbone: bool
    symbols: dict[str, int]

    @property
    def total_bytes(self) -> int:
        """Weights, gradients, optimizer states and master weights together."""
        return (self.weights_bytes + self.gradients_bytes + self.optimizer_states_bytes
                + self.master_weights_bytes)


def _coef(x: float) -> str:
    return f"{x:g}"


def nf4_bytes(elements: int) -> int:
    """Bytes of one weight matrix stored as NF4 with double quantisation (QLoRA)."""
    blocks = -(-elements // NF4_BLOCK)
    blocks2 = -(-blocks // NF4_BLOCK2)
    return elements // 2 + blocks + 4 * blocks2


def qlora_base_bytes(spec: ModelSpec) -> int:
    """The QLoRA base: block linear weights in NF4; embeddings, norms, biases, head in bf16."""
    linears = P.block_linears(spec)
    quantised = spec.num_layers * sum(nf4_bytes(l.in_features * l.out_features) for l in linears)
    quantised_elems = spec.num_layers * sum(l.in_features * l.out_features for l in linears)
    return quantised + 2 * (P.count_params(spec) - quantised_elems)


def trainable_count(spec: ModelSpec, train: TrainSpec, params: int | None = None
                    ) -> tuple[int, int, str]:
    """(trainable elements, of which newly added, symbol) of a job; ``params`` overrides N."""
    n = params or P.count_params(spec)
    trains = train.recipe.trains
    if trains == "all":
        return n, 0, "N"
    if trains == "lora":
        m = P.lora_params(spec, train.lora) * train.adapters  # K adapters of M each
        return m + P.lora_embedding_params(spec, train.lora), m, "M"
    if trains == "head":
        c = P.classifier_params(spec, train.num_classes)
        return c, c, "C"
    if trains == "input-embedding":
        e = P.embedding_params(spec)
        return e, e, "E"
    if trains == "prompt":
        p = P.prompt_params(spec, train.prompt_tokens)
        return p, p, "P"
    b = P.bias_params(spec)
    if b == 0:
        raise MemplanError(f"{spec.name} has no bias parameters, so bitfit trains nothing; "
                           "pick another regime such as lora")
    return b, 0, "B"


def check_job(spec: ModelSpec, train: TrainSpec) -> None:
    """Refuse combinations that no implementation runs (one clear line each)."""
    if train.lora_backend == "peft" and train.impl != "hf":
        raise MemplanError("--lora-backend peft wraps Hugging Face models; add --impl hf")
    if train.adapters > 1 and arch.profile_of(spec).root_lora_linears(spec, train.lora):
        raise MemplanError(f"--adapters {train.adapters}: {spec.name} has LoRA targets outside "
                           "its blocks, which memplan plans for one adapter only; use "
                           "--adapters 1")
    check_shardable(train)
    profile = arch.profile_of(spec)
    profile.check(spec, train)
    if (train.impl == "hf" and profile.conv1d and train.lora_backend == "memplan"
            and train.recipe.lora):
        raise MemplanError("Hugging Face GPT-2 uses Conv1D layers, which memplan's LoRALinear "
                           "does not wrap; use " + ("--impl memplan" if train.adapters > 1
                                                    else "--lora-backend peft"))


def model_state(spec: ModelSpec, train: TrainSpec, params: int | None = None) -> ModelState:
    """The model-state bytes of the job on ``spec``, per GPU.

    ``params`` overrides N (``estimate --params``); the shape still gives M, C, E and B, and
    the optimizer state of N elements is the shape's scaled to N.
    """
    check_job(spec, train)
    r = train.recipe
    count = P.count_params(spec)
    n = params or count
    trainable, new, sym = trainable_count(spec, train, n)
    gpus = train.gpus
    symbols = {"N": n, sym: trainable}
    if train.adapters > 1:  # K adapters of M each (spec.py refuses embeddings beside them)
        symbols |= {"M": trainable // train.adapters, "K": train.adapters}
        sym = "·K·M"  # the formula reads 4N + 16·K·M
    if new and sym == "M" and trainable != new:
        symbols["M"] = new
        symbols["E"] = trainable - new  # the embeddings trained beside the adapters
    tensors = O.trainable_tensors(spec, train)
    states = O.state_bytes(train, tensors)
    w = r.weight_itemsize
    compute = r.compute_itemsize

    if r.stage:  # the ZeRO paper: fp16 weights and grads, fp32 masters, m and v
        stage = r.stage
        wb = 2 * n // (gpus if stage >= 3 else 1)
        g = 2 * n // (gpus if stage >= 2 else 1)
        master, states = 4 * n // gpus, 8 * n // gpus
        formula = {1: "2N + 2N + 12N/G", 2: "2N + 14N/G", 3: "16N/G"}[stage]
        return ModelState(r.regime, formula, wb, g, states, master, trainable, 0, 2, 2, 2, True,
                          symbols | {"M": gpus, "G": gpus})  # "M": the old key, kept
    if r.full:
        if params:
            states = states * n // count
        g = 2 if r.notes_mixed else w  # the notes' bf16 gradient buffers; else .grad
        shard = gpus if r.fsdp else 1
        formula = f"{_coef(w + g + O.state_coefficient(train, w))}N" + ("/G" if r.fsdp else "")
        formula += O.state_formula_term(train)
        return ModelState(r.regime, formula, w * n // shard, g * n // shard, states // shard,
                          0, trainable, 0, g, compute, w, True,
                          symbols | ({"M": gpus, "G": gpus} if shard > 1 else {}))

    # Frozen base, a small trainable set. New parameters (adapters, heads, prompts) are fp32 with
    # fp32 grads and states; existing ones that train (LoRA's embeddings, BitFit's biases) keep
    # the base's dtype, and torch.optim keeps their states in that dtype too.
    if r.nf4:
        base = qlora_base_bytes(spec) * n // count
    else:
        base = w * n
    existing = trainable - new
    base_text = f"{base / n:.4g}N"
    if new:
        formula = f"{base_text} + {_coef(4 + 4 + O.state_coefficient(train, 4))}{sym}"
        if existing:
            formula += f" + {_coef(w + O.state_coefficient(train, w))}E"
    else:
        formula = f"{base_text} + {_coef(w + O.state_coefficient(train, w))}{sym}"
    formula += O.state_formula_term(train)
    return ModelState(
        r.regime, formula,
        weights_bytes=base + 4 * new,
        gradients_bytes=4 * new + w * existing,
        optimizer_states_bytes=states,
        master_weights_bytes=0,
        trainable=trainable, new_params=new, grad_bytes=4, compute_bytes=compute,
        weight_itemsize=w, backprop_backbone=r.trains != "head",
        symbols=symbols,
    )
