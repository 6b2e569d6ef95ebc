"""Parameter counting: N (model), M (LoRA), C (classifier head), E (input adapter), B (biases).

Counts are exact: they equal what transformers builds from the same config (tied weights once)
and what Hugging Face PEFT reports for the same LoRA config.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.errors import MemplanError, suggest
from memplan.spec import LoraSpec, ModelSpec


@dataclass(frozen=True)
class LinearShape:
    """One linear layer of a transformer block: its dotted name inside the block, and shape."""

    name: str          # e.g. "self_attn.q_proj" or "mlp.c_proj"
    group: str         # "attention" or "mlp"
    in_features: int
    out_features: int
    bias: bool

    @property
    def short_name(self) -> str:
        """The module's own name, as LoRA targets say it: ``q_proj``, ``c_proj``."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def params(self) -> int:
        """Weight plus bias elements."""
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


def block_linears(spec: ModelSpec) -> tuple[LinearShape, ...]:
    """The linear layers of one block, with Hugging Face's module names."""
    h, i = spec.hidden_size, spec.intermediate_size
    if spec.family == "gpt2":
        return (
            LinearShape("attn.c_attn", "attention", h, spec.q_dim + 2 * spec.kv_dim, True),
            LinearShape("attn.c_proj", "attention", spec.q_dim, h, True),
            LinearShape("mlp.c_fc", "mlp", h, i, True),
            LinearShape("mlp.c_proj", "mlp", i, h, True),
        )
    attention = (
        LinearShape("self_attn.q_proj", "attention", h, spec.q_dim, spec.qkv_bias),
        LinearShape("self_attn.k_proj", "attention", h, spec.kv_dim, spec.qkv_bias),
        LinearShape("self_attn.v_proj", "attention", h, spec.kv_dim, spec.qkv_bias),
        LinearShape("self_attn.o_proj", "attention", spec.q_dim, h, spec.out_bias),
    )
    if spec.gated_mlp:
        mlp = (
            LinearShape("mlp.gate_proj", "mlp", h, i, spec.mlp_bias),
            LinearShape("mlp.up_proj", "mlp", h, i, spec.mlp_bias),
            LinearShape("mlp.down_proj", "mlp", i, h, spec.mlp_bias),
        )
    else:
        mlp = (
            LinearShape("mlp.up_proj", "mlp", h, i, spec.mlp_bias),
            LinearShape("mlp.down_proj", "mlp", i, h, spec.mlp_bias),
        )
    return attention + mlp


def norm_params(spec: ModelSpec) -> int:
    """Elements of one norm layer: a weight, plus a bias for LayerNorm."""
    return spec.hidden_size * (2 if spec.norm_bias else 1)


def block_params(spec: ModelSpec) -> int:
    """Parameters of one transformer block: its linears and its two norms."""
    return sum(layer.params for layer in block_linears(spec)) + 2 * norm_params(spec)


def embedding_params(spec: ModelSpec) -> int:
    """E: the input token embedding, vocab × hidden."""
    return spec.vocab_size * spec.hidden_size


def position_params(spec: ModelSpec) -> int:
    """Learned position embeddings (GPT-2), max_positions × hidden; 0 for rotary."""
    return spec.max_positions * spec.hidden_size if spec.learned_positions else 0


def lm_head_params(spec: ModelSpec) -> int:
    """The output projection, hidden × vocab; 0 when tied to the input embedding."""
    return 0 if spec.tie_embeddings else spec.vocab_size * spec.hidden_size


def block_tensor_sizes(spec: ModelSpec) -> list[int]:
    """Element counts of each parameter tensor of one block (weights, biases, norms)."""
    sizes = []
    for layer in block_linears(spec):
        sizes.append(layer.in_features * layer.out_features)
        if layer.bias:
            sizes.append(layer.out_features)
    norm = [spec.hidden_size] * (2 if spec.norm_bias else 1)
    return sizes + 2 * norm


def param_tensor_sizes(spec: ModelSpec) -> list[int]:
    """Element counts of every parameter tensor of the model, tied weights once."""
    sizes = [embedding_params(spec)]
    if spec.learned_positions:
        sizes.append(position_params(spec))
    sizes += spec.num_layers * block_tensor_sizes(spec)
    sizes += [spec.hidden_size] * (2 if spec.norm_bias else 1)  # the final norm
    if not spec.tie_embeddings:
        sizes.append(lm_head_params(spec))
    return sizes


def count_params(spec: ModelSpec) -> int:
    """N: every parameter of the model, tied weights counted once."""
    return sum(param_tensor_sizes(spec))


def buffer_bytes(spec: ModelSpec) -> int:
    """Non-parameter buffers of the reference model: rotary ``inv_freq`` (head_dim/2, fp32)."""
    return 0 if spec.learned_positions else spec.head_dim // 2 * 4


def bias_params(spec: ModelSpec) -> int:
    """B: bias elements (linear and LayerNorm biases), what BitFit trains."""
    per_block = sum(layer.out_features for layer in block_linears(spec) if layer.bias)
    norm_biases = spec.hidden_size if spec.norm_bias else 0
    return spec.num_layers * (per_block + 2 * norm_biases) + norm_biases


def classifier_params(spec: ModelSpec, num_classes: int) -> int:
    """C: a new linear head on the last hidden state, hidden × classes + classes."""
    return spec.hidden_size * num_classes + num_classes


def prompt_params(spec: ModelSpec, prompt_tokens: int) -> int:
    """Soft-prompt parameters: P tokens × hidden."""
    return prompt_tokens * spec.hidden_size


def target_names(spec: ModelSpec) -> tuple[str, ...]:
    """The module names LoRA can target in this model, in block order."""
    return tuple(dict.fromkeys(layer.short_name for layer in block_linears(spec)))


def resolve_targets(spec: ModelSpec, targets: str | tuple[str, ...] | list[str]
                    ) -> tuple[LinearShape, ...]:
    """The linear layers of one block that the LoRA targets select.

    ``all`` (every linear of the block), ``mlp``, ``attention``, or module names given as a
    comma list or a sequence; a name matches a layer's own name (``c_proj`` matches both of
    gpt2's) or its dotted name inside the block (``attn.c_proj``).
    """
    layers = block_linears(spec)
    if isinstance(targets, str):
        names = [t.strip() for t in targets.split(",") if t.strip()]
    else:
        names = [str(t).strip() for t in targets]
    if not names:
        raise MemplanError("LoRA targets are empty; use all, mlp, attention or module names")
    chosen: list[LinearShape] = []
    for name in names:
        if name == "all":
            matched = list(layers)
        elif name in ("mlp", "attention"):
            matched = [layer for layer in layers if layer.group == name]
        else:
            matched = [layer for layer in layers if name in (layer.short_name, layer.name)]
        if not matched:
            known = ("all", "mlp", "attention", *target_names(spec))
            raise MemplanError(
                f"LoRA target {name!r} matches no linear layer of {spec.name}"
                f"{suggest(name, known)}; known: {', '.join(known)}"
            )
        chosen.extend(layer for layer in matched if layer not in chosen)
    return tuple(layer for layer in layers if layer in chosen)


def check_rank(spec: ModelSpec, lora: LoraSpec) -> tuple[LinearShape, ...]:
    """Resolve the targets and check that the rank fits every targeted matrix."""
    layers = resolve_targets(spec, lora.targets)
    smallest = min(min(layer.in_features, layer.out_features) for layer in layers)
    if lora.rank > smallest:
        raise MemplanError(
            f"LoRA rank {lora.rank} is larger than the smallest targeted dimension {smallest}; "
            f"use --rank {smallest} or less"
        )
    return layers


def lora_params(spec: ModelSpec, lora: LoraSpec) -> int:
    """M: adapter parameters, R · (in + out) per targeted matrix in every block (PEFT's count).

    The optional full input and output embeddings (``train_embeddings``) are not included;
    see :func:`lora_embedding_params`.
    """
    layers = check_rank(spec, lora)
    per_block = sum(lora.rank * (layer.in_features + layer.out_features) for layer in layers)
    return spec.num_layers * per_block


def lora_embedding_params(spec: ModelSpec, lora: LoraSpec) -> int:
    """Parameters of the full input and output embeddings trained beside LoRA, if asked."""
    if not lora.train_embeddings:
        return 0
    return embedding_params(spec) + lm_head_params(spec)
