"""Parameter counting: N (model), M (LoRA), C (classifier head), E (input adapter), B (biases).

Counts are exact: they equal what transformers builds from the same config (tied weights once)
and what Hugging Face PEFT reports for the same LoRA config.
"""

from __future__ import annotations

from memplan import arch
from memplan.arch.base import LinearShape, Profile, Weight
from memplan.errors import MemplanError, suggest
from memplan.spec import LoraSpec, ModelSpec


def _profile(spec: ModelSpec) -> Profile:
    return arch.profile_of(spec)


def block_linears(spec: ModelSpec) -> tuple[LinearShape, ...]:
    """The linear layers of one block, with Hugging Face's module names."""
    return _profile(spec).linears(spec)


def block_weights(spec: ModelSpec) -> tuple[Weight, ...]:
    """Every parameter tensor of one block, in registration order."""
    return _profile(spec).block_weights(spec)


def root_weights(spec: ModelSpec) -> tuple[Weight, ...]:
    """The parameters outside the blocks (embedding, positions, final norm, untied head)."""
    return _profile(spec).root_weights(spec)


def _root(spec: ModelSpec, group: str) -> int:
    return sum(w.numel for w in root_weights(spec) if w.group == group)


def block_params(spec: ModelSpec) -> int:
    """Parameters of one transformer block."""
    return sum(w.numel for w in block_weights(spec))


def embedding_params(spec: ModelSpec) -> int:
    """E: the input token embedding, vocab × hidden."""
    return _root(spec, "embedding")


def position_params(spec: ModelSpec) -> int:
    """Learned position embeddings (GPT-2), max_positions × hidden; 0 for rotary."""
    return _root(spec, "position")


def lm_head_params(spec: ModelSpec) -> int:
    """The output projection, hidden × vocab; 0 when tied to the input embedding."""
    return _root(spec, "head")


def trainable_weights(spec: ModelSpec, biases_only: bool = False) -> list[Weight]:
    """Every parameter tensor of the model (or every bias), tied weights once, in the order
    the model registers them: the root's embeddings, the blocks, then the final norm and
    head."""
    root = root_weights(spec)
    early = [w for w in root if w.group in ("embedding", "position")]
    late = [w for w in root if w.group not in ("embedding", "position")]
    every = early + spec.num_layers * list(block_weights(spec)) + late
    return [w for w in every if w.bias] if biases_only else every


def param_tensor_sizes(spec: ModelSpec) -> list[int]:
    """Element counts of every parameter tensor of the model (:func:`trainable_weights`)."""
    return [w.numel for w in trainable_weights(spec)]


def count_params(spec: ModelSpec) -> int:
    """N: every parameter of the model, tied weights counted once."""
    return sum(w.numel for w in root_weights(spec)) \
        + spec.num_layers * sum(w.numel for w in block_weights(spec))


def buffer_bytes(spec: ModelSpec) -> int:
    """Non-parameter buffers of the model (rotary ``inv_freq``...)."""
    return _profile(spec).buffer_bytes(spec)


def bias_tensor_sizes(spec: ModelSpec) -> list[int]:
    """Element counts of every bias (linear and LayerNorm), what BitFit trains."""
    return [w.numel for w in trainable_weights(spec, biases_only=True)]


def bias_params(spec: ModelSpec) -> int:
    """B: bias elements (linear and LayerNorm biases), what BitFit trains."""
    return sum(bias_tensor_sizes(spec))


def classifier_params(spec: ModelSpec, num_classes: int) -> int:
    """C: a new linear head on the last hidden state, hidden × classes + classes."""
    return spec.hidden_size * num_classes + num_classes


def prompt_params(spec: ModelSpec, prompt_tokens: int) -> int:
    """Soft-prompt parameters: P tokens × hidden."""
    return prompt_tokens * spec.hidden_size


def target_names(spec: ModelSpec) -> tuple[str, ...]:
    """The module names LoRA can target in this model, in block order."""
    return tuple(dict.fromkeys(layer.short_name for layer in block_linears(spec)
                               if layer.targetable))


def resolve_targets(spec: ModelSpec, targets: str | tuple[str, ...] | list[str]
                    ) -> tuple[LinearShape, ...]:
    """The linear layers of one block that the LoRA targets select.

    ``all`` (every linear of the block), ``mlp``, ``attention``, or module names given as a
    comma list or a sequence; a name matches a layer's own name (``c_proj`` matches both of
    gpt2's) or its dotted name inside the block (``attn.c_proj``).
    """
    layers = tuple(layer for layer in block_linears(spec) if layer.targetable)
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
        elif name == "attention":
            matched = [layer for layer in layers if layer.group == "attention"]
        elif name == "mlp":  # the feed-forward: dense MLPs, experts and their router
            matched = [layer for layer in layers if layer.group in ("mlp", "expert", "router")]
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
    smallest = min(getattr(layer, "max_rank", min(layer.in_features, layer.out_features))
                   for layer in layers)  # max_rank: a PEFT ParamWrapper target (MoE) has none
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
    root = sum(lora.rank * (layer.in_features + layer.out_features)
               for layer in _profile(spec).root_lora_linears(spec, lora))
    return spec.num_layers * per_block + root


def lora_embedding_params(spec: ModelSpec, lora: LoraSpec) -> int:
    """Parameters of the full input and output embeddings trained beside LoRA, if asked."""
    if not lora.train_embeddings:
        return 0
    return embedding_params(spec) + lm_head_params(spec)
