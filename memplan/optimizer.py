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
"""

from __future__ import annotations

from memplan import arch
from memplan import params as P
from memplan.spec import ModelSpec, TrainSpec

MIXED_STEP_COPIES = 2  # memplan.nn.optim.MixedAdamW: g32 and m32 of one parameter
STEP_COUNTER_BYTES = 4  # torch.optim.AdamW: state["step"], a 0-d fp32 tensor
# Bytes per trainable element of the optimizer state (fp32 unless the mixed recipe says bf16).
STATE_BYTES_FP32 = {"adamw": 8, "sgd": 0, "sgd-momentum": 4}   # m and v / momentum / nothing
STATE_BYTES_MIXED = {"adamw": 2 + 4, "sgd": 0, "sgd-momentum": 2}  # bf16 m, fp32 v


def trainable_tensors(spec: ModelSpec, train: TrainSpec) -> list[int]:
    """Element counts of every trainable tensor of the regime."""
    regime = train.regime
    h = spec.hidden_size
    if regime in ("lora", "lora-bf16", "qlora"):
        r = train.lora.rank
        per_block = [r * size for l in P.check_rank(spec, train.lora)
                     for size in (l.in_features, l.out_features)]
        sizes = spec.num_layers * per_block
        sizes += [r * size for l in arch.profile_of(spec).root_lora_linears(spec, train.lora)
                  for size in (l.in_features, l.out_features)]
        sizes *= train.adapters  # K adapters, each its own A and B tensors
        if train.lora.train_embeddings:
            sizes += [P.embedding_params(spec)] + ([P.lm_head_params(spec)]
                                                   if not spec.tie_embeddings else [])
        return sizes
    if regime == "classifier":
        return [h * train.num_classes, train.num_classes]
    if regime == "input-adapter":
        return [P.embedding_params(spec)]
    if regime == "prompt-tuning":
        return [P.prompt_params(spec, train.prompt_tokens)]
    if regime == "bitfit":
        return P.bias_tensor_sizes(spec)
    return P.param_tensor_sizes(spec)


def step_counter_bytes(spec: ModelSpec, train: TrainSpec) -> int:
    """torch.optim.AdamW's per-tensor step counters (none for SGD or MixedAdamW)."""
    if train.optimizer != "adamw" or train.regime == "mixed":
        return 0
    return STEP_COUNTER_BYTES * len(trainable_tensors(spec, train))


def step_temporary_bytes(spec: ModelSpec, train: TrainSpec, trainable_bytes: int,
                         itemsize: int = 4) -> int:
    """Peak bytes that ``optimizer.step()`` allocates beyond params, grads and states.

    ``trainable_bytes`` is the size of all trainable parameters in their own dtype, and
    ``itemsize`` the bytes per element of the largest one.
    """
    if train.optimizer != "adamw":
        return 0
    largest = max(trainable_tensors(spec, train))
    return step_temporaries(train, trainable_bytes, largest, itemsize * largest)


def step_temporaries(train: TrainSpec, trainable_bytes: int, largest_elements: int,
                     largest_bytes: int) -> int:
    """What ``optimizer.step()`` allocates, from the trainable tensors it steps (the whole
    model's, or one FSDP rank's local shards): all of them in bytes, the largest one in
    elements and in bytes."""
    if train.optimizer != "adamw":
        return 0
    if train.regime == "mixed":
        return MIXED_STEP_COPIES * 4 * largest_elements
    if train.optimizer_impl == "foreach":
        return trainable_bytes
    if train.optimizer_impl == "forloop":
        return 2 * largest_bytes
    return 0
