"""Serving: the inference memory of one model on one GPU, in the layout vLLM uses.

What a vLLM engine holds on its GPU (vLLM v1, ``vllm/v1/worker/gpu_worker.py``
``determine_available_memory``: weights loaded, one profiling forward of
``max_num_batched_tokens`` measured, and what is left of the budget goes to the KV cache):

- the weights in their dtype: fp32, bf16, fp16; int8 as bitsandbytes' LLM.int8 stores a
  ``Linear8bitLt`` (``Int8Params``: the int8 matrix ``CB`` and one fp32 absmax per output row,
  ``SCB``; bitsandbytes ``nn/modules.py``), NF4 as QLoRA's double-quantised blocks
  (:func:`memplan.regimes.nf4_bytes`); the quantised layers are the blocks' ``nn.Linear``
  layers (not the 3-D expert stacks, not the embeddings or head), everything else in the
  compute dtype (fp16 for int8, bf16 for NF4);
- the KV cache: per token ``2 · layers · kv_heads · head_dim · bytes``, allocated in pages of
  ``block_size`` tokens (``AttentionSpec.page_size_bytes = 2 · block_size · num_kv_heads ·
  head_size · dtype_size``, ``vllm/v1/kv_cache_interface.py``); a sliding-window layer keeps
  only ``sliding_window - 1 + max_num_batched_tokens`` tokens of a sequence, plus one block
  (``SlidingWindowSpec.max_memory_usage_bytes``, same file);
- the prefill activations of one chunk of ``max_num_batched_tokens`` tokens: the inference
  forward on memplan's symbolic tape (:func:`memplan.activations.plan_inference`, flash
  attention: no score matrix), nothing saved for backward;
- the logits of the sampled positions only (one row per sequence, ``logits_indices`` in
  ``gpu_model_runner.py``), cast to fp32 for the sampler;
- the runtime reserve (CUDA context, allocator, CUDA graphs): ``--reserve``, 1 GiB by default
  (:data:`memplan.planner.DEFAULT_RESERVE_BYTES`).

This is a plan of vLLM's layout; vLLM runs nowhere here. What the profiler measures is Hugging
Face's contiguous ``DynamicCache`` (:func:`plan_hf_inference`), a different layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan import params as P
from memplan.errors import MemplanError
from memplan.regimes import nf4_bytes
from memplan.spec import ModelSpec

SERVE_DTYPES = ("fp32", "bf16", "fp16", "int8", "nf4")
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 2, "nf4": 2}  # activations, KV
# memplan's defaults; vLLM's own depend on its version, usage context and GPU: give your
# engine's block_size, max_num_batched_tokens and max_num_seqs to match it
DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_BATCHED_TOKENS = 8192
DEFAULT_MAX_SEQS = 256


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def weight_bytes(spec: ModelSpec, dtype: str) -> int:
    """The weights (and buffers) as served in ``dtype``."""
    if dtype not in SERVE_DTYPES:
        raise MemplanError(f"--dtype {dtype!r} is not one of {', '.join(SERVE_DTYPES)}")
    total = P.count_params(spec)
    buffers = P.buffer_bytes(spec)
    if dtype in ("fp32", "bf16", "fp16"):
        return total * COMPUTE_BYTES[dtype] + buffers
    linears = [l for l in P.block_linears(spec) if l.group != "expert"]
    elems = spec.num_layers * sum(l.in_features * l.out_features for l in linears)
    if dtype == "int8":  # CB int8 (out × in) + SCB fp32 (out)
        quantised = spec.num_layers * sum(l.in_features * l.out_features + 4 * l.out_features
                                          for l in linears)
    else:
        quantised = spec.num_layers * sum(nf4_bytes(l.in_features * l.out_features)
                                          for l in linears)
    return quantised + 2 * (total - elems) + buffers


def kv_windows(spec: ModelSpec) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as the profile says."""
    from memplan import arch

    return list(arch.profile_of(spec).kv_windows(spec))


@dataclass(frozen=True)
class KVLayout:
    """The KV cache's pages: bytes of one page of one layer, and the windows."""

    page_bytes: int              # 2 · block_size · kv_heads · head_dim · bytes, one layer
    block_size: int
    windows: tuple[int | None, ...]
    chunk: int                   # max_num_batched_tokens (a window keeps W - 1 + chunk)

    def layer_blocks(self, seq: int, window: int | None) -> int:
        """Blocks one sequence of ``seq`` tokens holds in one layer."""
        if window is None or window - 1 + self.chunk >= seq:
            return cdiv(seq, self.block_size)
        return cdiv(window - 1 + self.chunk, self.block_size) + 1

    def sequence_bytes(self, seq: int) -> int:
        """KV bytes of one sequence of ``seq`` tokens, every layer."""
        return self.page_bytes * sum(self.layer_blocks(seq, w) for w in self.windows)


@dataclass(frozen=True)
class ServePlan:
    """The inference memory of one model on one GPU, integer bytes."""

    model: str
    dtype: str
    capacity_bytes: int
    reserve_bytes: int
    weights_bytes: int
    activations_bytes: int       # the prefill chunk's peak beyond weights (logits included)
    logits_bytes: int            # the sampled rows' fp32 logits (part of activations_bytes)
    adapter_gpu_bytes: int       # vLLM's adapter slots (LoRA and embedding), from the cache
    kv_bytes_per_token: int
    kv_budget_bytes: int         # what is left for the KV cache (may be negative)
    kv_cache_tokens: int         # tokens of KV cache that fit (whole blocks, every layer)
    block_size: int
    max_batched_tokens: int
    sampled_rows: int
    seq: int | None
    sequence_kv_bytes: int | None
    max_concurrent_sequences: int | None
    concurrent: int | None
    fits: bool | None            # with --concurrent: the N sequences' KV fits
    left_bytes: int | None       # with --concurrent: budget left after them
    windows: tuple[int | None, ...]

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["sliding_window_layers"] = sum(w is not None for w in self.windows)
        del out["windows"]
        return out


def kv_bytes_per_token(spec: ModelSpec, dtype: str) -> int:
    """2 · layers · kv_heads · head_dim · bytes: keys and values of one token, every layer."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * COMPUTE_BYTES[dtype]


def prefill_bytes(spec: ModelSpec, dtype: str, tokens: int, sampled: int) -> int:
    """The peak of one prefill chunk of ``tokens`` (beyond weights and KV cache): vLLM's
    flattened batch (one sequence of ``tokens``), flash attention, logits of ``sampled``
    rows."""
    from memplan.activations import plan_inference

    return plan_inference(spec, 1, tokens, COMPUTE_BYTES[dtype], sampled).forward_peak.total


def plan_serve(spec: ModelSpec, dtype: str, capacity: int, reserve: int,
               seq: int | None = None, concurrent: int | None = None,
               max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS,
               block_size: int = DEFAULT_BLOCK_SIZE, max_seqs: int = DEFAULT_MAX_SEQS,
               adapter_gpu_bytes: int = 0) -> ServePlan:
    """Plan serving ``spec`` in ``dtype`` on ``capacity`` bytes; bad input raises one line."""
    for flag, value in (("--max-batched-tokens", max_batched_tokens),
                        ("--block-size", block_size), ("--seq", seq),
                        ("--concurrent", concurrent), ("--max-seqs", max_seqs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):
            raise MemplanError(f"{flag} must be a positive integer, got {value!r}")
    if concurrent is not None and seq is None:
        raise MemplanError("--concurrent N needs --seq S (the tokens of each sequence)")
    if seq is not None and seq > spec.max_positions:
        raise MemplanError(f"--seq {seq} is beyond {spec.name}'s {spec.max_positions:,} "
                           f"positions (max_position_embeddings); use --seq "
                           f"{spec.max_positions} or less")
    if max_batched_tokens > 2**24:
        raise MemplanError(f"--max-batched-tokens {max_batched_tokens} is far beyond any real "
                           "chunk; try 8192")
    weights = weight_bytes(spec, dtype)
    if weights + reserve > capacity:
        from memplan.units import format_bytes

        raise MemplanError(f"the weights of {spec.name} in {dtype} ({format_bytes(weights)}) "
                           f"and the reserve ({format_bytes(reserve)}) do not fit in "
                           f"{format_bytes(capacity)} before any KV cache; try a smaller "
                           "--dtype (int8, nf4) or a larger GPU")
    sampled = concurrent if concurrent is not None else min(max_seqs, max_batched_tokens)
    sampled = min(sampled, max_batched_tokens)
    itemsize = COMPUTE_BYTES[dtype]
    activations = prefill_bytes(spec, dtype, max_batched_tokens, sampled)
    logits = 4 * sampled * spec.vocab_size
    budget = capacity - reserve - weights - activations - adapter_gpu_bytes
    per_token = kv_bytes_per_token(spec, dtype)
    windows = tuple(kv_windows(spec))
    layout = KVLayout(2 * block_size * spec.num_kv_heads * spec.head_dim * itemsize,
                      block_size, windows, max_batched_tokens)
    blocks = max(budget, 0) // (layout.page_bytes * spec.num_layers)
    seq_bytes = max_conc = fits = left = None
    if seq is not None:
        seq_bytes = layout.sequence_bytes(seq)
        max_conc = max(budget, 0) // seq_bytes
        if concurrent is not None:
            left = budget - concurrent * seq_bytes
            fits = left >= 0
    return ServePlan(spec.name, dtype, capacity, reserve, weights, activations, logits,
                     adapter_gpu_bytes, per_token, budget, blocks * block_size, block_size,
                     max_batched_tokens, sampled, seq, seq_bytes, max_conc, concurrent, fits,
                     left, windows)


# ---- Hugging Face's DynamicCache: what the profiler measures ------------------------------

@dataclass(frozen=True)
class HFInferencePlan:
    """Peak bytes of a Hugging Face generation loop under ``torch.no_grad``: a prefill of
    ``batch`` × ``prompt`` then ``decode_steps`` single-token steps, the weights included."""

    weights_bytes: int
    cache_bytes: int             # the DynamicCache at the end (prompt + decode_steps tokens)
    prefill_peak_bytes: int
    decode_peak_bytes: int

    @property
    def peak_bytes(self) -> int:
        return max(self.prefill_peak_bytes, self.decode_peak_bytes)


class _DynamicCache:
    """What ``DynamicLayer.update`` does (transformers ``cache_utils.py``): the first call
    makes empty ``keys``/``values``, every call rebinds them to
    ``torch.cat([self.keys, key_states], dim=-2)``: a new contiguous tensor holding the old
    tokens and the new ones, the old one freed once rebound (keys first, then values). The
    returned cache tensors are what attention reads; the caller's k and v are dropped (Llama
    style: the rotated k is its own tensor, v a view of ``v_proj``'s output, referenced by
    nothing else once rebound)."""

    def __init__(self, spec: ModelSpec, itemsize: int) -> None:
        self.spec, self.itemsize = spec, itemsize
        self.layers: dict[int, list] = {}
        self.calls = 0

    def __call__(self, tape, job, q, k, v):
        layer = self.calls % self.spec.num_layers
        self.calls += 1
        old = self.layers.get(layer)
        new_tokens = job.b * job.s * self.spec.num_kv_heads * self.spec.head_dim
        out = []
        for i in range(2):
            prev = old[i] if old else None
            numel = new_tokens + (prev.numel if prev is not None else 0)
            cat = tape.alloc(tape.new(numel, self.itemsize, False))
            if prev is not None:
                tape.free(prev)
            out.append(cat)
        self.layers[layer] = out
        for t in (k, v):
            if t.storage != q.storage:  # GPT-2's fused c_attn output stays, q views it
                tape.free(t)
        return out[0], out[1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for pair in self.layers.values() for t in pair)


def plan_hf_inference(spec: ModelSpec, batch: int, prompt: int, decode_steps: int,
                      dtype: str, runtime: str = "fake", adapters: int = 0,
                      rank: int = 16) -> HFInferencePlan:
    """Plan what :mod:`memplan.profile.serve_measure` measures: Hugging Face's model (sdpa
    where the family has it) under ``torch.no_grad`` and FakeTensorMode or the CPU, a prefill
    of ``batch`` × ``prompt`` tokens with ``logits_to_keep=1``, then ``decode_steps`` steps of
    one token each, the cache a :class:`_DynamicCache` growing by ``torch.cat``. ``runtime``:
    ``fake`` or ``cpu`` (a real CPU run does not materialise sdpa's causal mask).

    ``adapters`` K > 0: K PEFT LoRA adapters of rank ``rank`` on memplan's targets of the
    family, resident and unmerged in ``dtype`` (R · (in + out) per targeted matrix each), and
    a mixed-adapter batch of K equal shares (``adapter_names=``)."""
    from memplan.activations import plan_inference
    from memplan.spec import LoraSpec

    itemsize = COMPUTE_BYTES[dtype]
    weights = weight_bytes(spec, dtype)
    lora = None
    if adapters:
        if adapters < 2:
            raise MemplanError(f"--adapters {adapters} is not a mixed-adapter batch; use 2 or "
                               "more (one adapter serves merged, at the base's bytes)")
        if batch % adapters:
            raise MemplanError(f"a mixed-adapter batch of {batch} does not split into "
                               f"{adapters} equal shares; use a batch that is a multiple of "
                               f"{adapters}")
        lora = LoraSpec(rank=rank, alpha=2.0 * rank)
        weights += adapters * P.lora_params(spec, lora) * itemsize
    cache = _DynamicCache(spec, itemsize)
    tape = plan_inference(spec, batch, prompt, itemsize, batch, hf=True, runtime=runtime,
                          kv_cache=cache, lora=lora, adapters=adapters)
    prefill = tape.forward_peak.total
    decode = 0
    for step in range(decode_steps):
        from memplan.autograd import Moment

        tape.forward_peak, tape._peak_total = Moment(), 0
        tape = plan_inference(spec, batch, 1, itemsize, batch, hf=True, runtime=runtime,
                              tape=tape, kv_cache=cache, past=prompt + step, lora=lora,
                              adapters=adapters)
        decode = max(decode, tape.forward_peak.total)
    return HFInferencePlan(weights, cache.nbytes, weights + prefill,
                           weights + decode if decode_steps else 0)
