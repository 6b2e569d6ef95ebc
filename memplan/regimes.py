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
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan import arch
from memplan import params as P
from memplan.errors import MemplanError
from memplan.fsdp import check_shardable
from memplan.optimizer import STATE_BYTES_FP32, STATE_BYTES_MIXED
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
    gradient, ``weight_dtype_bytes`` the bytes per element the frozen weights compute in.
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
    """(trainable elements, of which newly added, symbol) for a regime; ``params`` overrides N."""
    n = params or P.count_params(spec)
    regime = train.regime
    if regime in ("full", "mixed", "zero", "zero1", "zero2", "zero3"):
        return n, 0, "N"
    if regime in ("lora", "lora-bf16", "qlora"):
        m = P.lora_params(spec, train.lora) * train.adapters  # K adapters of M each
        return m + P.lora_embedding_params(spec, train.lora), m, "M"
    if regime == "classifier":
        c = P.classifier_params(spec, train.num_classes)
        return c, c, "C"
    if regime == "input-adapter":
        e = P.embedding_params(spec)
        return e, e, "E"
    if regime == "prompt-tuning":
        p = P.prompt_params(spec, train.prompt_tokens)
        return p, p, "P"
    if regime == "bitfit":
        b = P.bias_params(spec)
        if b == 0:
            raise MemplanError(f"{spec.name} has no bias parameters, so bitfit trains nothing; "
                               "pick another regime such as lora")
        return b, 0, "B"
    raise MemplanError(f"unknown regime {regime!r}")


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
            and train.regime in ("lora", "lora-bf16", "qlora")):
        raise MemplanError("Hugging Face GPT-2 uses Conv1D layers, which memplan's LoRALinear "
                           "does not wrap; use " + ("--impl memplan" if train.adapters > 1
                                                    else "--lora-backend peft"))


def model_state(spec: ModelSpec, train: TrainSpec, params: int | None = None) -> ModelState:
    """The model-state bytes of ``train.regime`` on ``spec``, per GPU.

    ``params`` overrides N (``estimate --params``); the shape still gives M, C, E and B.
    """
    check_job(spec, train)
    n = params or P.count_params(spec)
    trainable, new, sym = trainable_count(spec, train, n)
    gpus = train.gpus
    opt = train.optimizer
    symbols = {"N": n, sym: trainable}
    if train.adapters > 1:  # K adapters of M each (spec.py refuses embeddings beside them)
        symbols |= {"M": trainable // train.adapters, "K": train.adapters}
        sym = "·K·M"  # the formula reads 4N + 16·K·M
    if new and sym == "M" and trainable != new:
        symbols["M"] = new
        symbols["E"] = trainable - new  # the embeddings trained beside the adapters

    regime = train.regime
    if regime in ("full", "zero"):
        s = STATE_BYTES_FP32[opt]
        shard = gpus if regime == "zero" else 1
        formula = f"{_coef(8 + s)}N" + ("/G" if regime == "zero" else "")
        return ModelState(regime, formula, 4 * n // shard, 4 * n // shard, s * n // shard, 0,
                          trainable, 0, 4, 4, True,
                          symbols | ({"M": gpus, "G": gpus} if shard > 1 else {}))
    if regime == "mixed":
        s = STATE_BYTES_MIXED[opt]
        return ModelState(regime, f"{_coef(6 + s)}N", 4 * n, 2 * n, s * n, 0, trainable, 0, 2,
                          4, True, symbols)
    if regime in ("zero1", "zero2", "zero3"):
        if opt != "adamw":
            raise MemplanError(f"{regime} follows the ZeRO paper's Adam accounting; "
                               "use --optimizer adamw")
        stage = int(regime[-1])
        w = 2 * n // (gpus if stage >= 3 else 1)
        g = 2 * n // (gpus if stage >= 2 else 1)
        master, states = 4 * n // gpus, 8 * n // gpus
        formula = {1: "2N + 2N + 12N/G", 2: "2N + 14N/G", 3: "16N/G"}[stage]
        return ModelState(regime, formula, w, g, states, master, trainable, 0, 2, 2, True,
                          symbols | {"M": gpus, "G": gpus})  # "M": the old key, kept

    # Frozen base, a small trainable set. New parameters (adapters, heads, prompts) are fp32 with
    # fp32 grads and states; existing ones that train (LoRA's embeddings, BitFit's biases) keep
    # the base's dtype, and torch.optim keeps their states in that dtype too.
    s = STATE_BYTES_FP32[opt]
    if regime == "lora-bf16":
        base, compute = 2 * n, 2
    elif regime == "qlora":
        base, compute = qlora_base_bytes(spec) * n // P.count_params(spec), 2
    else:
        base, compute = 4 * n, 4
    existing = trainable - new
    base_text = f"{base / n:.4g}N"
    if new:
        formula = f"{base_text} + {_coef(4 + 4 + s)}{sym}"
        if existing:
            formula += f" + {_coef(compute + compute * s // 4)}E"
    else:
        formula = f"{base_text} + {_coef(compute + compute * s // 4)}{sym}"
    return ModelState(
        regime, formula,
        weights_bytes=base + 4 * new,
        gradients_bytes=4 * new + compute * existing,
        optimizer_states_bytes=s * new + (compute * s // 4) * existing,
        master_weights_bytes=0,
        trainable=trainable, new_params=new, grad_bytes=4, compute_bytes=compute,
        backprop_backbone=regime != "classifier",
        symbols=symbols,
    )
