"""LoRA adapters when serving: merged, resident, slotted (vLLM's layout) and in host RAM.

The LoRA notes list what small adapters make possible at inference: merge W + BA for zero
extra latency, keep many adapters on one base, cache them in host RAM and move them to the GPU
as requests need them, and stack them (adapters are additive). :func:`adapter_plan` plans the
bytes of each way for K adapters of rank R on one model; :func:`lora_paper_example` reproduces
the LoRA paper's GPT-3 checkpoint arithmetic. Pure arithmetic, no torch.

**One adapter** is R · (in + out) elements per targeted matrix in every block, PEFT's count
(:func:`memplan.params.lora_params`), in the adapters' dtype.

**Slotted, vLLM's layout (a plan only: vLLM runs nowhere here, so nothing of it is measured).**
vLLM preallocates, on the GPU and at start-up, stacked A and B buffers of ``max_loras`` slots
× ``max_lora_rank`` for *every* LoRA-capable module, whatever the adapters target and whatever
their rank; adapters of smaller rank are copied into the top-left corner of a slot. From
vLLM's source (github.com/vllm-project/vllm):

- ``vllm/lora/utils.py`` ``get_supported_lora_modules``: "In vLLM, all linear layers support
  LoRA" (every ``LinearBase``, every ``FusedMoE``) plus the model class's
  ``embedding_modules``; ``vllm/lora/model_manager.py`` ``LoRAModelManager._create_lora_modules``
  wraps each supported module (when ``LoRAConfig.target_modules`` is unset) through
  ``from_layer(module, self.lora_slots, ...)``, ``lora_slots = max_loras``.
- ``vllm/lora/layers/base_linear.py`` ``BaseLinearLayerWithLoRA.create_lora_weights``:
  ``lora_a_stacked`` (max_loras, 1, max_lora_rank, input_size) and ``lora_b_stacked``
  (max_loras, 1, output_size, max_lora_rank) per slice, dtype ``lora_config.lora_dtype``:
  R · (in + out) per slot for o_proj, down_proj (``RowParallelLinear``) and the others.
- ``vllm/lora/layers/column_parallel_linear.py``: the packed ``qkv_proj``
  (``MergedQKVParallelLinearWithLoRA``, 3 slices) and ``gate_up_proj``
  (``MergedColumnParallelLinearWithLoRA``, 2 slices) hold one A (R × hidden) and one B
  (slice out × R) per slice, so a packed module costs exactly what its unpacked q, k, v (or
  gate, up) do; a fused ``c_attn`` with one LoRA (``QKVParallelLinearWithLoRA``) is one slice
  of R · (h + q + 2 kv), which is how memplan lists gpt2's block.
- ``vllm/lora/layers/fused_moe.py`` ``FusedMoEWithLoRA``: ``w13_lora_a_stacked``
  (max_loras, experts, R, hidden) and ``w13_lora_b_stacked`` (max_loras, experts, moe_inter,
  R) for each of w1 and w3, ``w2_lora_a/b_stacked`` (…, R, moe_inter) and (…, hidden, R):
  3 · experts · R · (hidden + moe_inter) per slot and layer.
- ``vllm/lora/layers/vocal_parallel_embedding.py`` (``embed_tokens``: A (max_loras, vocab, R),
  B (max_loras, 1, hidden, R)) and ``vllm/lora/layers/logits_processor.py`` (``lm_head``:
  A (max_loras, 1, R, hidden), B (max_loras, 1, vocab, R)): R · (vocab + hidden) each, for the
  model classes whose ``embedding_modules`` name them (Llama's do). Gemma's classes
  (``vllm/model_executor/models/gemma.py``, ``gemma2.py``) declare ``embedding_modules = {}``
  ("Gemma does not apply LoRA to the embedding layer"): no embedding slots for that family.
- Host RAM: ``LoRAModelManager`` keeps every registered adapter in an LRU cache of
  ``capacity = max_cpu_loras`` (``_registered_adapters``), the GPU slots being a second LRU of
  ``max_loras`` (``_active_adapters``); ``vllm/config/lora.py`` refuses
  ``max_cpu_loras < max_loras``. An active adapter stays in the host cache too, so host RAM
  holds min(K, max_cpu_loras) adapters at their own rank; the others are read from disk when
  asked for. vLLM's own default is ``max_cpu_loras = max_loras``; here it defaults to K (all
  adapters cached), the setting that answers "how much RAM do K adapters need".

vLLM serves LoRA only on model classes that implement ``SupportsLoRA``; for a family whose
vLLM class does not (an encoder such as BERT), the slots are the layout it would have.

Not planned: the punica wrapper's index buffers (a few integers per batched token), tensor
parallelism (one GPU), and ``fully_sharded_loras``.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.errors import MemplanError
from memplan.params import lora_params, resolve_targets
from memplan.spec import LoraSpec, ModelSpec
from memplan.units import DTYPE_BYTES

# Families whose vLLM model classes declare ``embedding_modules = {}`` (no embedding slots).
NO_EMBEDDING_LORA = ("gemma",)
EXPERT_GROUPS = ("expert",)


@dataclass(frozen=True)
class AdapterPlan:
    """The bytes of K LoRA adapters served on one base, each way (integers, no GiB).

    - ``adapter_bytes``: one adapter, R · (in + out) per targeted matrix per block (PEFT).
    - ``merged_bytes``: 0, W + BA folded into the weights, one adapter at a time and no extra
      latency; ``merge_temp_bytes`` is the transient B·A of the largest targeted matrix that
      merging (or unmerging, to switch adapters) makes for one layer at a time.
    - ``resident_bytes``: the K adapters unmerged on the GPU (PEFT ``adapter_names=``).
    - ``adapter_slot_bytes``: vLLM's preallocated GPU slots (see the module docstring), of
      which ``embedding_slot_bytes`` are the embedding and lm_head slots; a plan only.
    - ``host_adapter_bytes``: the adapters vLLM caches in host RAM (``host_adapters`` of them,
      up to max_cpu_loras); ``disk_adapters`` are the rest.
    - ``stack_bytes``: a stack of ``stack`` adapters applied together (the additive
      hierarchy), planned resident on the GPU.
    """

    adapters: int
    rank: int
    targets: str
    dtype: str
    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int
    stack: int
    adapter_params: int
    adapter_bytes: int
    merged_bytes: int
    merge_temp_bytes: int
    resident_bytes: int
    adapter_slot_bytes: int
    embedding_slot_bytes: int
    host_adapters: int
    host_adapter_bytes: int
    disk_adapters: int
    stack_bytes: int

    @property
    def gpu_bytes(self) -> dict[str, int]:
        """GPU bytes the adapters add to the base, each way."""
        return {"merged": self.merged_bytes, "resident": self.resident_bytes,
                "slotted": self.adapter_slot_bytes, "stack": self.stack_bytes}


def _positive(name: str, value: object, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MemplanError(f"{name} must be a positive integer, got {value!r}; {fix}")
    return value


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise MemplanError(f"adapter dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}; "
                           "LoRA adapters are served unquantised, e.g. --dtype bf16")
    return DTYPE_BYTES[dtype]


def _targets_text(targets: str | tuple[str, ...] | list[str]) -> str:
    return targets if isinstance(targets, str) else ",".join(targets)


def slot_elements(spec: ModelSpec, max_lora_rank: int, embeddings: bool | None = None) -> \
        tuple[int, int]:
    """Elements of ONE vLLM slot at ``max_lora_rank``: (every LoRA-capable module, of which
    the embedding and lm_head). Linears: R · (in + out) each; fused experts:
    3 · experts · R · (hidden + moe_intermediate) per layer; embeddings: R · (vocab + hidden)
    for each of embed_tokens and lm_head (``embeddings=None``: unless the family is Gemma's).
    """
    r, h = max_lora_rank, spec.hidden_size
    per_block = 0
    experts_done = False
    for layer in resolve_targets(spec, "all"):
        if layer.group in EXPERT_GROUPS:
            if not experts_done:  # vLLM wraps the whole FusedMoE once
                experts = int(spec.extra("num_experts"))
                inter = int(spec.extra("moe_intermediate_size", spec.intermediate_size))
                per_block += 3 * experts * r * (h + inter)
                experts_done = True
            continue
        per_block += r * (layer.in_features + layer.out_features)
    if embeddings is None:
        embeddings = spec.family not in NO_EMBEDDING_LORA
    embed = 2 * r * (spec.vocab_size + h) if embeddings else 0
    return spec.num_layers * per_block + embed, embed


def adapter_plan(spec: ModelSpec, adapters: int, rank: int = 8,
                 targets: str | tuple[str, ...] | list[str] = "all", max_loras: int = 1,
                 max_lora_rank: int = 16, max_cpu_loras: int | None = None,
                 dtype: str = "bf16", stack: int | None = None,
                 embedding_slots: bool | None = None) -> AdapterPlan:
    """Plan ``adapters`` (K) LoRA adapters of ``rank`` on ``targets``, served three ways.

    ``max_loras``, ``max_lora_rank`` and ``max_cpu_loras`` are vLLM's options of the same names
    (``max_cpu_loras`` None: all K cached in host RAM); ``stack`` is the depth of the additive
    hierarchy (None: all K applied together); ``embedding_slots`` None follows the family (see
    :func:`slot_elements`). Bad input raises :class:`MemplanError` with one line.
    """
    k = _positive("--adapters", adapters, "e.g. --adapters 8")
    _positive("--rank", rank, "e.g. --rank 16")
    _positive("--max-loras", max_loras, "e.g. --max-loras 8")
    _positive("--max-lora-rank", max_lora_rank, "e.g. --max-lora-rank 16")
    if max_loras > k:
        raise MemplanError(f"--max-loras {max_loras} is above --adapters {k}: vLLM would keep "
                           f"slots no adapter fills; use --max-loras {k} or less")
    if rank > max_lora_rank:
        raise MemplanError(f"--rank {rank} is above --max-lora-rank {max_lora_rank}: the "
                           f"adapter does not fit vLLM's slots; use --max-lora-rank {rank}")
    cpu = k if max_cpu_loras is None else _positive("--max-cpu-loras", max_cpu_loras,
                                                     f"e.g. --max-cpu-loras {k}")
    if cpu < max_loras:
        raise MemplanError(f"--max-cpu-loras {cpu} is below --max-loras {max_loras} (vLLM "
                           f"refuses it); use --max-cpu-loras {max_loras} or more")
    depth = k if stack is None else _positive("--stack", stack, f"e.g. --stack {k}")
    if depth > k:
        raise MemplanError(f"--stack {depth} is above --adapters {k}; a stack applies adapters "
                           f"that exist: use --stack {k} or less")
    size = _dtype_bytes(dtype)
    lora = LoraSpec(rank=rank, targets=targets)
    params = lora_params(spec, lora)
    one = params * size
    largest = max(layer.in_features * layer.out_features
                  for layer in resolve_targets(spec, targets))
    slot, embed = slot_elements(spec, max_lora_rank, embedding_slots)
    host = min(k, cpu)
    return AdapterPlan(
        adapters=k, rank=rank, targets=_targets_text(targets), dtype=dtype,
        max_loras=max_loras, max_lora_rank=max_lora_rank, max_cpu_loras=cpu, stack=depth,
        adapter_params=params, adapter_bytes=one, merged_bytes=0,
        merge_temp_bytes=largest * size, resident_bytes=k * one,
        adapter_slot_bytes=max_loras * slot * size, embedding_slot_bytes=max_loras * embed * size,
        host_adapters=host, host_adapter_bytes=host * one, disk_adapters=k - host,
        stack_bytes=depth * one)


# ---- the LoRA paper's GPT-3 example (Hu et al. 2021, "LoRA", section 4.2) ----


@dataclass(frozen=True)
class PaperExample:
    """The LoRA paper's checkpoint arithmetic for GPT-3 175B (integers; bytes are decimal).

    The paper: "With r = 4 and only the query and value projection matrices being adapted, the
    checkpoint size is reduced by roughly 10,000× (from 350GB to 35MB)", and 100 adapted models
    need 350 GB + 100 × 35 MB ≈ 354 GB instead of 100 full copies (≈ 35 TB).
    """

    model: str
    rank: int
    models: int
    dtype: str
    per_layer_params: int   # r · (h + q) for Wq plus r · (h + kv) for Wv, one block
    adapter_params: int     # × layers
    adapter_bytes: int      # one adapted model's checkpoint
    base_params: int
    base_bytes: int
    shared_bytes: int       # one base + ``models`` adapters
    full_copies_bytes: int  # ``models`` full copies of the model

    @property
    def reduction(self) -> float:
        """How many times smaller the adapter is than the model."""
        return self.base_bytes / self.adapter_bytes


def lora_paper_example(spec: ModelSpec | None = None, rank: int = 4, models: int = 100,
                       dtype: str = "fp16") -> PaperExample:
    """Reproduce the LoRA paper's GPT-3 example: r = 4 on Wq and Wv, fp16, 100 models.

    GPT-3 has gpt2's layout (preset ``gpt3-175b``: 96 blocks, h = 12288), where Wq, Wk and Wv
    are fused into one ``c_attn`` (h × 3h). The paper adapts Wq and Wv only, so the count here
    is explicit and not PEFT's ``c_attn`` count (which would adapt the fused h × 3h matrix,
    r · (h + 3h)): Wq is h × q (q = heads · head_dim = h) and Wv is h × kv (kv = h without
    grouped-query attention), giving r · (h + h) for each, per block. (PEFT's ``c_attn``
    count, r · (h + 3h) = 4rh, happens to be the same number, 196,608 per block at r = 4, for
    another adapter: one A shared by Wq, Wk and Wv.)
    """
    from memplan.params import count_params
    from memplan.presets import get_model

    spec = spec or get_model("gpt3-175b")
    _positive("rank", rank, "the paper uses r = 4")
    _positive("models", models, "the paper uses 100")
    size = _dtype_bytes(dtype)
    h = spec.hidden_size
    per_layer = rank * (h + spec.q_dim) + rank * (h + spec.kv_dim)  # Wq, Wv
    adapter = spec.num_layers * per_layer
    base = count_params(spec)
    return PaperExample(
        model=spec.name, rank=rank, models=models, dtype=dtype, per_layer_params=per_layer,
        adapter_params=adapter, adapter_bytes=adapter * size, base_params=base,
        base_bytes=base * size, shared_bytes=base * size + models * adapter * size,
        full_copies_bytes=models * base * size)
