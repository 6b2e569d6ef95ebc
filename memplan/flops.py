"""Compute per trained token: the FLOPs of one training step's forward, backward and recompute.

The accounting is the one of model FLOPs utilization (MFU): Chowdhery et al. 2022, "PaLM:
Scaling Language Modeling with Pathways", appendix B (arXiv:2204.02311), and nanoGPT's
``GPT.estimate_mfu`` (Karpathy, ``model.py``), which writes it as::

    flops_per_token = 6*N + 12*L*H*Q*T

with N the parameters the matmuls use, L layers, H attention heads, Q the head dimension and
T the sequence length. The 6N is 2N for the forward (a multiply and an add per weight per
token, Kaplan et al. 2020, section 2.1) and 4N for the backward: 2N for the gradients of the
activations and 2N for those of the weights. The 12·L·H·Q·T is attention's two matmuls
(Q·Kᵀ and the weights times V, 2·Q·T each per head and token: 4·L·H·Q·T forward) and their
backward (gradients of both operands, which are activations: twice the forward). Like PaLM and
nanoGPT it counts every key position (no halving for the causal mask) and leaves out norms,
softmax and the element-wise ops.

memplan splits the same terms by what trains, which is what the accounting leaves to the reader:

- forward: 2·(N_mm + M) + 4·L·H·Q·T per token, with N_mm the weights of the matmuls a token
  runs through (every block linear; of a mixture of experts, the routed experts' share
  top-k/E; the output head, which is the token embedding when tied; never the embedding
  lookup or the position table) and M the LoRA adapters (x·A, then ·B);
- backward, activations' gradients: 2·(N_mm + M) + 8·L·H·Q·T when the loss is backpropagated
  through the network (every regime but the classifier, whose frozen backbone sees none);
- backward, weights' gradients: 2·(the trainable matmul weights): N_mm for full fine-tuning,
  M (and the head with ``--train-embeddings``) for LoRA, C for a classifier head, 0 for biases,
  prompts and an input adapter, whose gradients are sums and scatters, not matmuls;
- recomputation: activation checkpointing runs each block's forward once more in the backward
  (the head is not checkpointed), when the backward goes through the blocks.

A full fine-tuning step is 6·N_mm + 12·L·H·Q·T, the formula above; a LoRA step on a frozen
base is 4·N_mm + 6·M + 12·L·H·Q·T (the frozen base's backward is one forward, not two).
FLOPs are not time: fp32 matmuls run at a lower rate than bf16 ones, and QLoRA dequantises each
NF4 weight on every use, which this count leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan import params as P
from memplan.spec import ModelSpec, TrainSpec


@dataclass(frozen=True)
class Flops:
    """FLOPs per trained token of one step, by part, with the symbols that produced them."""

    forward: int
    backward_inputs: int
    backward_weights: int
    recompute: int
    symbols: dict[str, int]

    @property
    def total(self) -> int:
        """Forward, backward and recomputation together."""
        return self.forward + self.backward_inputs + self.backward_weights + self.recompute

    def to_dict(self) -> dict:
        """The JSON form: integers per token."""
        return {"forward": self.forward, "backward_inputs": self.backward_inputs,
                "backward_weights": self.backward_weights, "recompute": self.recompute,
                "total": self.total, "symbols": dict(self.symbols)}


def _matmul_params(spec: ModelSpec) -> tuple[int, int]:
    """(block matmul weights a token runs through, of one block; the output head's)."""
    experts = spec.extra("num_experts")
    block = 0
    for w in P.block_weights(spec):
        if len(w.shape) < 2:
            continue  # norms and biases: element-wise
        share = w.numel
        if w.group == "expert" and experts:  # a token runs through its top-k experts only
            share = w.numel * spec.extra("experts_per_token") // experts
        block += share
    head = sum(w.numel for w in P.root_weights(spec) if w.group == "head" and len(w.shape) >= 2)
    if spec.tie_embeddings:
        head += P.embedding_params(spec)  # the tied embedding is the output projection
    return block, head


def flops_per_token(spec: ModelSpec, train: TrainSpec, params: int | None = None) -> Flops:
    """The FLOPs of one trained token of ``train`` on ``spec`` (see the module doc).

    ``params`` (N given without a shape, ``--params``) scales the matmul weights by N over the
    shape's count, as the memory plan scales the model states. T is the sequence length, plus
    the soft prompt under prompt-tuning.
    """
    # Bind the symbols.
    block, head = _matmul_params(spec)
    layers = spec.num_layers
    r = train.recipe
    if r.trains == "head":  # a new head on the last hidden state, no LM head
        head = P.classifier_params(spec, train.num_classes) - train.num_classes
    blocks = layers * block
    if params:
        blocks, head = (x * params // P.count_params(spec) for x in (blocks, head))
    n_mm = blocks + head
    lora = r.lora
    m = P.lora_params(spec, train.lora) if lora else 0
    t = (train.seq or 0) + (train.prompt_tokens if r.trains == "prompt" else 0)
    attention = layers * spec.num_heads * spec.head_dim * t  # L·H·Q·T
    through_blocks = r.trains != "head"

    # Forward: 2 FLOPs per weight per token, and attention's two matmuls.
    forward = 2 * (n_mm + m) + 4 * attention
    # Backward, activations' gradients: the forward's matmuls again, attention's twice.
    backward_inputs = 2 * (n_mm + m) + 8 * attention if through_blocks else 0
    # Backward, weights' gradients: only what trains.
    if r.full:
        trained = n_mm
    elif lora:
        trained = m + (head if train.lora.train_embeddings else 0)
    elif r.trains == "head":
        trained = head
    else:  # bitfit, prompt-tuning, input-adapter: sums and scatters
        trained = 0
    backward_weights = 2 * trained
    # Checkpointing: each block's forward once more.
    block_forward = 2 * (blocks + m) + 4 * attention
    recompute = block_forward if train.checkpointing and through_blocks else 0
    symbols = {"N_mm": n_mm, "M": m, "L": layers, "H": spec.num_heads, "Q": spec.head_dim,
               "T": t}
    return Flops(forward, backward_inputs, backward_weights, recompute, symbols)
