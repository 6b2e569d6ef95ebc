"""Optimizer temporaries and bookkeeping: what ``optimizer.step()`` holds beyond its states.

Measured facts on torch 2.13 and the code of torch.optim:
- AdamW, foreach: ``torch._foreach_sqrt(exp_avg_sqs)`` makes one copy of every second moment,
  i.e. the size of all trainable parameters, alive for the whole update.
- AdamW, for-loop: ``exp_avg_sq.sqrt() / bias_correction2_sqrt`` makes two tensors the size of
  one parameter at once, so twice the largest trainable tensor.
- AdamW, fused: none. SGD with or without momentum updates in place: none.
- torch's AdamW keeps a ``step`` counter per parameter tensor as a 0-d fp32 tensor.
- memplan's MixedAdamW (the notes' mixed recipe) loops over parameters one at a time and holds
  two fp32 copies of the parameter being updated (its gradient and momentum upcast).

bitsandbytes' 8-bit AdamW (``adamw-8bit``, ``paged-adamw-8bit``; bitsandbytes >= 0.44, the
layout of :mod:`memplan.nn.optim8bit`):
- a parameter of n >= 4096 elements keeps uint8 m and v and one fp32 absmax per 256-element
  block of each: ``2n + 8*ceil(n/256)`` bytes; a smaller one keeps fp32 m and v, ``8n``, whatever
  its dtype; the step counter is a Python int;
- once per optimizer, two 256-entry fp32 quantisation maps (2048 bytes), on the device once a
  parameter is 8-bit;
- the Hugging Face Trainer (``optim="adamw_bnb_8bit"`` / ``"paged_adamw_8bit"``, both
  ``bitsandbytes.optim.AdamW(optim_bits=8)``) registers every ``nn.Embedding`` weight with
  bitsandbytes' ``GlobalOptimManager`` as ``optim_bits=32`` (transformers 5.24
  ``Trainer.create_optimizer``): those keep fp32 m and v, ``8n``. Planned when the recipe's loop
  is ``trainer`` (the Trainer's own optimizer), not under ``manual``;
- step temporaries: none on CUDA (one fused kernel per parameter); on cpu/fake memplan measures
  its plain-torch reference, which dequantises 256 blocks at a time (exact formula in
  :func:`memplan.nn.optim8bit.step_temporary_bytes`, repeated here without torch);
- paged: bitsandbytes puts m and v of parameters of >= 100 000 elements in CUDA unified memory
  (``cudaMallocManaged``), outside PyTorch's caching allocator: the plan keeps them in the
  optimizer states (on the GPU while paged in) and says so (:func:`paged_note`).

transformers' Adafactor as the Trainer builds it (``optim="adafactor"``: ``Adafactor(lr,
scale_parameter=False, relative_step=False)``, beta1 None, no first moment), states fp32 for
any parameter dtype:
- a tensor of ndim >= 2: a row and a column second moment, ``4*(R + C)`` bytes with
  ``R = n / shape[-1]``, ``C = n / shape[-2]``; a 1-D tensor: a full one, ``4n``; plus the 0-d fp32
  ``RMS`` of every tensor, 4 bytes; the step counter is a Python int;
- step temporaries (the same code on every device), parameters stepped in order k with
  ``c = 1`` for 16-bit ones: ``max_k (8 + 8c)*n_k + max(4*n_(k-1), 4*(R_k + C_k) if factored)``:
  ``grad**2 + eps`` and the update (fp32, n each), the fp32 copies of a 16-bit grad and param,
  the factored row and column factors, and the previous parameter's update, still referenced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memplan import arch
from memplan import params as P
from memplan.spec import ModelSpec, TrainSpec

MIXED_STEP_COPIES = 2  # memplan.nn.optim.MixedAdamW: g32 and m32 of one parameter
STEP_COUNTER_BYTES = 4  # torch.optim.AdamW: state["step"], a 0-d fp32 tensor
# Bytes per trainable fp32 element of the optimizer state (torch.optim keeps its states in
# the parameter's dtype: half of these for a 16-bit parameter).
STATE_BYTES_FP32 = {"adamw": 8, "sgd": 0, "sgd-momentum": 4}   # m and v / momentum / nothing
STATE_BYTES_MIXED = {"adamw": 2 + 4, "sgd": 0, "sgd-momentum": 2}  # bf16 m, fp32 v

# bitsandbytes' block-wise 8-bit AdamW (memplan.nn.optim8bit has the same constants, with torch)
BNB_BLOCK = 256            # elements per absmax block (bitsandbytes >= 0.44.0)
BNB_MIN_8BIT_SIZE = 4096   # smaller tensors keep fp32 m and v
BNB_PAGED_MIN_NUMEL = 100_000  # get_state_buffer pages tensors of at least 1e5 elements
BNB_QMAP_BYTES = 2 * 256 * 4   # the two shared fp32 maps, once per optimizer
BNB_MIDS_BYTES = 2 * 255 * 4   # the reference's midpoint tables, during a step
BNB_CHUNK_BLOCKS = 4096    # blocks the reference dequantises at a time
ADAFACTOR_RMS_BYTES = 4    # state["RMS"]: a 0-d fp32 tensor per parameter


# The weight groups of memplan.arch that are nn.Embedding modules (tokens, positions, types).
EMBEDDING_GROUPS = ("embedding", "position")


@dataclass(frozen=True, order=True)
class TrainTensor:
    """One trainable tensor: its shape, the bytes per element it is stored in, and whether it
    is the weight of an ``nn.Embedding`` (the Hugging Face Trainer keeps those in 32-bit
    states under bitsandbytes' 8-bit optimizers)."""

    shape: tuple[int, ...]
    itemsize: int
    embedding: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def trainable_tensors(spec: ModelSpec, train: TrainSpec) -> list[TrainTensor]:
    """Every trainable tensor of the job, in the order the model registers them. New
    parameters (adapters, heads, prompts, input adapters) are fp32; existing ones keep the
    weights' dtype."""
    r = train.recipe
    w = r.weight_itemsize
    h = spec.hidden_size
    if r.lora:
        rank = train.lora.rank

        def adapters(layers: tuple) -> list[tuple[int, int]]:  # each layer's A, then B
            return [shape for l in layers
                    for shape in ((rank, l.in_features), (l.out_features, rank))]

        shapes = spec.num_layers * adapters(P.check_rank(spec, train.lora)) \
            + adapters(arch.profile_of(spec).root_lora_linears(spec, train.lora))
        out = [TrainTensor(s, 4) for s in shapes * train.adapters]  # K adapters' own A, B
        if train.lora.train_embeddings:
            out += [TrainTensor(x.shape, w, x.group in EMBEDDING_GROUPS)
                    for x in P.root_weights(spec)
                    if x.group == "embedding" or (x.group == "head"
                                                  and not spec.tie_embeddings)]
        return out
    if r.trains == "head":
        return [TrainTensor((train.num_classes, h), 4), TrainTensor((train.num_classes,), 4)]
    if r.trains == "input-embedding":  # an nn.Embedding added to the input embeddings
        return [TrainTensor((spec.vocab_size, h), 4, True)]
    if r.trains == "prompt":
        return [TrainTensor((train.prompt_tokens, h), 4)]
    weights = P.trainable_weights(spec, biases_only=r.bitfit)
    return [TrainTensor(x.shape, w, x.group in EMBEDDING_GROUPS) for x in weights]


def _blocks(n: int) -> int:
    return -(-n // BNB_BLOCK)


def fp32_states_8bit(train: TrainSpec, t: TrainTensor) -> bool:
    """Whether bitsandbytes' 8-bit AdamW keeps fp32 m and v for ``t``: a tensor under 4096
    elements, or an ``nn.Embedding`` weight under the Hugging Face Trainer (its
    ``create_optimizer`` overrides them to ``optim_bits=32``)."""
    return t.numel < BNB_MIN_8BIT_SIZE or (t.embedding and train.recipe.loop == "trainer")


def _adafactor_state(t: TrainTensor) -> tuple[int, int]:
    """(state bytes, row + column factor bytes) of Adafactor for one tensor."""
    if len(t.shape) >= 2:
        rows, cols = t.numel // t.shape[-1], t.numel // t.shape[-2]
        factors = 4 * (rows + cols)
        return factors + ADAFACTOR_RMS_BYTES, factors
    return 4 * t.numel + ADAFACTOR_RMS_BYTES, 0


def state_bytes(train: TrainSpec, tensors: list[TrainTensor]) -> int:
    """Bytes of the optimizer state kept for ``tensors`` (torch's step counters apart)."""
    r = train.recipe
    if r.notes_mixed:  # MixedAdamW / MixedSGD: bf16 momentum, fp32 second moment
        return sum(STATE_BYTES_MIXED[r.optimizer] * t.numel for t in tensors)
    if r.eight_bit:
        quantised = [t for t in tensors if not fp32_states_8bit(train, t)]
        return (sum(2 * t.numel + 8 * _blocks(t.numel) for t in quantised)
                + sum(8 * t.numel for t in tensors if fp32_states_8bit(train, t))
                + (BNB_QMAP_BYTES if quantised else 0))
    if r.optimizer == "adafactor":
        return sum(_adafactor_state(t)[0] for t in tensors)
    per = STATE_BYTES_FP32[r.optimizer] // 4
    return sum(per * t.nbytes for t in tensors)


def state_coefficient(train: TrainSpec, itemsize: int) -> float:
    """Optimizer-state bytes per trainable element stored in ``itemsize`` bytes (for the
    formulas; :func:`state_bytes` is exact).

    8-bit AdamW: 2.03 (uint8 m and v, an fp32 absmax per 256 of each; small tensors and the
    Trainer's embeddings hold 8). Adafactor: 0, its factored states are per row and column,
    not per element: the formula names them with :func:`state_formula_term`.
    """
    r = train.recipe
    if r.notes_mixed:
        return STATE_BYTES_MIXED[r.optimizer]
    if r.eight_bit:
        return round(2 + 2 * 4 / BNB_BLOCK, 2)
    if r.optimizer == "adafactor":
        return 0
    return STATE_BYTES_FP32[r.optimizer] // 4 * itemsize


def state_formula_term(train: TrainSpec) -> str:
    """What a model-state formula adds for states with no per-element coefficient: Adafactor's
    factored second moments (a row and a column per matrix, fp32 per element of vectors)."""
    return " + factored" if train.recipe.optimizer == "adafactor" else ""


def paged_note(spec: ModelSpec, train: TrainSpec, runtime: str) -> str | None:
    """The plan's note for ``paged-adamw-8bit`` on CUDA (None otherwise): the states that
    bitsandbytes allocates in CUDA unified memory, outside PyTorch's allocator."""
    if train.recipe.optimizer != "paged-adamw-8bit" or runtime != "cuda":
        return None
    paged = [t for t in trainable_tensors(spec, train) if t.numel >= BNB_PAGED_MIN_NUMEL]
    nbytes = sum((8 if fp32_states_8bit(train, t) else 2) * t.numel for t in paged)
    if not paged:
        return ("paged-adamw-8bit: no tensor reaches 100,000 elements, so bitsandbytes pages "
                "nothing (an ordinary 8-bit AdamW)")
    from memplan.units import format_bytes

    return (f"paged-adamw-8bit: {format_bytes(nbytes)} of the optimizer states (m and v of the "
            f"{len(paged)} tensors of >= 100,000 elements) are in CUDA unified memory, outside "
            "PyTorch's allocator: counted here, as they occupy the GPU while paged in, but "
            "torch.cuda.max_memory_allocated does not see them, and the driver may evict them "
            "to host memory under pressure")


def step_counter_bytes(spec: ModelSpec, train: TrainSpec) -> int:
    """torch.optim.AdamW's per-tensor step counters (none for SGD or MixedAdamW; bitsandbytes
    and Adafactor count steps in Python ints)."""
    if train.optimizer != "adamw" or train.recipe.notes_mixed:
        return 0
    return STEP_COUNTER_BYTES * len(trainable_tensors(spec, train))


def step_temporary_bytes(spec: ModelSpec, train: TrainSpec, trainable_bytes: int,
                         itemsize: int = 4, runtime: str = "cuda") -> int:
    """Peak bytes that ``optimizer.step()`` allocates beyond params, grads and states.

    ``trainable_bytes`` is the size of all trainable parameters in their own dtype, and
    ``itemsize`` the bytes per element of the largest one. ``runtime`` (``cuda``, ``cpu``,
    ``fake``) picks the 8-bit AdamW that runs: bitsandbytes' fused kernel on CUDA (no
    temporaries), memplan's reference elsewhere (:mod:`memplan.nn.optim8bit`).
    """
    r = train.recipe
    if r.eight_bit:
        return adamw_8bit_temporaries(train, trainable_tensors(spec, train), runtime)
    if r.optimizer == "adafactor":
        return adafactor_temporaries(trainable_tensors(spec, train))
    if train.optimizer != "adamw":
        return 0
    largest = max(t.numel for t in trainable_tensors(spec, train))
    return step_temporaries(train, trainable_bytes, largest, itemsize * largest)


def adamw_8bit_temporaries(train: TrainSpec, tensors: list[TrainTensor],
                           runtime: str = "cuda") -> int:
    """The step temporaries of the 8-bit AdamW that runs on ``runtime``: none for
    bitsandbytes' fused kernel on CUDA; on cpu/fake memplan's reference
    (:class:`memplan.nn.optim8bit.AdamW8bit`), per chunk of e elements 12e (8-bit: fp32 m, v
    and the denominator or an int32 index) or 4e (32-bit: the denominator), + 4e for the fp32
    copy of a 16-bit parameter; the largest chunk, + the midpoint tables if any is 8-bit."""
    if runtime == "cuda":
        return 0
    step = BNB_CHUNK_BLOCKS * BNB_BLOCK
    peak, any8 = 0, False
    for t in tensors:
        n, c16 = t.numel, t.itemsize < 4
        if fp32_states_8bit(train, t):
            e, per = min(n, step), 4
        else:
            any8 = True
            full = n // BNB_BLOCK * BNB_BLOCK
            e, per = max(min(full, step), n - full), 12
        peak = max(peak, (per + 4 * c16) * e)
    return peak + (BNB_MIDS_BYTES if any8 else 0)


def adafactor_temporaries(tensors: list[TrainTensor]) -> int:
    """transformers' Adafactor step (beta1 None, the Trainer's), tensors in stepping order:
    ``max_k (8 + 8c)*n_k + max(4*n_(k-1), 4*(R_k + C_k))`` (module docstring)."""
    peak, previous = 0, 0
    for t in tensors:
        c16 = t.itemsize < 4
        peak = max(peak, (8 + 8 * c16) * t.numel + max(previous, _adafactor_state(t)[1]))
        previous = 4 * t.numel  # this tensor's update, alive while the next one starts
    return peak


def step_temporaries(train: TrainSpec, trainable_bytes: int, largest_elements: int,
                     largest_bytes: int) -> int:
    """What torch's AdamW or MixedAdamW's ``step()`` allocates, from the trainable tensors it
    steps (the whole model's, or one FSDP rank's local shards): all of them in bytes, the
    largest one in elements and in bytes. 0 for the other optimizers (SGD updates in place;
    8-bit AdamW and Adafactor, refused under FSDP, are in :func:`step_temporary_bytes`)."""
    if train.optimizer != "adamw":
        return 0
    if train.recipe.notes_mixed:
        return MIXED_STEP_COPIES * 4 * largest_elements
    if train.optimizer_impl == "foreach":
        return trainable_bytes
    if train.optimizer_impl == "forloop":
        return 2 * largest_bytes
    return 0
