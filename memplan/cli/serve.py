"""``memplan serve``: the inference memory of one model on one GPU (vLLM's layout).

Exit 0 when at least one sequence (or, with --concurrent, all N) fits; 1 when not; 2 on bad
input.
"""

from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli import options as o
from memplan.cli.app import command


@command("serve")
def serve(
    params: o.Params = None, model: o.Model = None, config: o.Config = None,
    as_family: o.AsFamily = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="A GPU of `memplan gpus`.")] = None,
    memory: Annotated[str | None, typer.Option(
        "--memory", help="Capacity instead of --gpu, e.g. 24GiB or 80GB.")] = None,
    reserve: o.Reserve = None,
    dtype: Annotated[str, typer.Option(
        "--dtype", help="Weights: fp32, bf16, fp16, int8 (LLM.int8) or nf4 (QLoRA's NF4); "
        "the KV cache and activations are in fp32, or 16-bit for the others.")] = "bf16",
    seq: Annotated[int | None, typer.Option(
        "--seq", "-s", help="Tokens per sequence (prompt + output): answers how many "
        "concurrent sequences fit.")] = None,
    concurrent: Annotated[int | None, typer.Option(
        "--concurrent", help="N sequences of --seq: do they fit, and what is left.")] = None,
    max_batched_tokens: Annotated[int, typer.Option(
        "--max-batched-tokens", help="Tokens of one prefill chunk (vLLM's "
        "max_num_batched_tokens).")] = 8192,
    block_size: Annotated[int, typer.Option(
        "--block-size", help="Tokens per KV cache page (vLLM's block_size).")] = 16,
    max_seqs: Annotated[int, typer.Option(
        "--max-seqs", help="Sequences sampled per step, one logits row each (vLLM's "
        "max_num_seqs), when --concurrent is not given.")] = 256,
    adapters: Annotated[int | None, typer.Option(
        "--adapters", help="K LoRA adapters served over the base (vLLM's slots).")] = None,
    rank: Annotated[int, typer.Option("--rank", "-r", help="The adapters' rank.")] = 8,
    targets: o.Targets = "all",
    max_loras: Annotated[int, typer.Option(
        "--max-loras", help="Adapter slots on the GPU (vLLM's max_loras).")] = 1,
    max_lora_rank: Annotated[int | None, typer.Option(
        "--max-lora-rank", help="The slots' rank (vLLM's max_lora_rank; default: "
        "max(16, --rank)).")] = None,
    max_cpu_loras: Annotated[int | None, typer.Option(
        "--max-cpu-loras", help="Adapters cached in host RAM (default: all K).")] = None,
    json_out: o.Json = False,
) -> None:
    """How many tokens of KV cache fit, how many sequences of --seq, or whether
    --concurrent N of them fit: weights, KV cache pages, one prefill chunk, the sampled
    logits, the reserve (and, with --adapters, vLLM's adapter slots)."""
    from memplan.report import print_json
    from memplan.serve import plan_serve

    capacity, label, _ = o.resolve_device(gpu, memory, "l4")
    spec, _, assumed = o.resolve_model(params, model, config, as_family)
    reserve_bytes = o.parse_reserve(reserve)
    lora = None
    if adapters is not None:
        from memplan.serve_adapters import adapter_plan

        lora_dtype = dtype if dtype in ("fp32", "bf16", "fp16") else \
            "fp16" if dtype == "int8" else "bf16"
        lora = adapter_plan(spec, adapters, rank, targets, max_loras,
                            max(16, rank) if max_lora_rank is None else max_lora_rank,
                            max_cpu_loras, lora_dtype)
    slots = lora.adapter_slot_bytes + lora.embedding_slot_bytes if lora else 0
    result = plan_serve(spec, dtype, capacity, reserve_bytes, seq, concurrent,
                        max_batched_tokens, block_size, max_seqs, slots)
    ok = (result.fits if concurrent is not None else
          (result.max_concurrent_sequences or 0) >= 1 if seq is not None else
          result.kv_cache_tokens > 0)
    if json_out:
        extra = {}
        if lora is not None:
            extra = {k: getattr(lora, k) for k in (
                "adapters", "rank", "max_loras", "max_lora_rank", "max_cpu_loras",
                "adapter_bytes", "adapter_slot_bytes", "embedding_slot_bytes",
                "host_adapter_bytes", "resident_bytes", "merged_bytes")}
        print_json(result.to_dict() | extra | {"gpu": label, "assumed": assumed, "ok": ok})
    else:
        _print(result, lora, label)
    raise typer.Exit(0 if ok else 1)


def _print(r, lora, label: str) -> None:
    from memplan.report import console
    from memplan.units import format_bytes as f

    out = console()
    if r.concurrent is not None:
        head = (f"{r.concurrent} × {r.seq} tokens fit, {f(r.left_bytes)} left" if r.fits else
                f"{r.concurrent} × {r.seq} tokens do not fit, {f(-r.left_bytes)} short; "
                f"{r.max_concurrent_sequences} fit")
    elif r.seq is not None:
        head = f"{r.max_concurrent_sequences} concurrent sequences of {r.seq} tokens fit"
    else:
        head = f"{r.kv_cache_tokens:,} tokens of KV cache fit"
    out.print(f"{r.model} in {r.dtype} on {label}: {head}", markup=False)
    out.print(f"KV cache: {r.kv_bytes_per_token:,} B per token (2 · layers · kv_heads · "
              f"head_dim · bytes), pages of {r.block_size} tokens: {r.kv_cache_tokens:,} "
              f"tokens in {f(max(r.kv_budget_bytes, 0))}", markup=False)
    if r.sequence_kv_bytes is not None:
        out.print(f"one sequence of {r.seq} tokens: {f(r.sequence_kv_bytes)} of KV cache",
                  markup=False)
    out.print(f"weights {f(r.weights_bytes)} + prefill chunk of {r.max_batched_tokens} tokens "
              f"{f(r.activations_bytes)} (logits of {r.sampled_rows} rows "
              f"{f(r.logits_bytes)}) + reserve {f(r.reserve_bytes)}"
              + (f" + adapter slots {f(r.adapter_gpu_bytes)}" if r.adapter_gpu_bytes else "")
              + f" of {f(r.capacity_bytes)}", markup=False)
    windows = sum(w is not None for w in r.windows)
    if windows:
        out.print(f"{windows} of {len(r.windows)} layers keep a sliding window of the cache",
                  markup=False)
    if lora is not None:
        out.print(f"adapters: {lora.adapters} of rank {lora.rank}, {f(lora.adapter_bytes)} each; "
                  f"GPU slots ({lora.max_loras} × rank {lora.max_lora_rank}) "
                  f"{f(lora.adapter_slot_bytes + lora.embedding_slot_bytes)}; host RAM "
                  f"{f(lora.host_adapter_bytes)} ({lora.host_adapters} adapters); merged: 0 B, "
                  "one adapter at a time", markup=False)
    out.print("a plan of vLLM's paged layout (vLLM runs nowhere here)", markup=False)
