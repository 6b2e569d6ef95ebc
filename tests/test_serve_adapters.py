"""Adapters when serving: merged, resident, vLLM's slots, host RAM, and the LoRA paper's GPT-3."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from memplan.cli.app import load_commands
from memplan.errors import MemplanError
from memplan.params import lora_params
from memplan.presets import get_gpu, get_model
from memplan.serve_adapters import adapter_plan, lora_paper_example, slot_elements
from memplan.spec import LoraSpec

APP = load_commands()
LLAMA3 = get_model("llama-3-8b")  # h 4096, kv 1024, inter 14336, vocab 128256, 32 layers


def cli(*args: str):
    return CliRunner(env={"COLUMNS": "200", "MEMPLAN_DEBUG": ""}).invoke(APP, list(args))


def test_one_adapter_is_peft_count_in_its_dtype():
    plan = adapter_plan(LLAMA3, 100, 16, "all", 8, 16, dtype="bf16")
    # q 4096+4096, k 4096+1024, v 4096+1024, o 4096+4096, gate/up 4096+14336, down 14336+4096
    per_block = 16 * (8192 + 5120 + 5120 + 8192 + 3 * 18432)
    assert plan.adapter_params == 32 * per_block == lora_params(LLAMA3, LoraSpec(16)) \
        == 41_943_040
    assert plan.adapter_bytes == 2 * 41_943_040
    assert plan.merged_bytes == 0
    assert plan.merge_temp_bytes == 2 * 4096 * 14336  # the largest B·A, gate/up/down
    assert plan.resident_bytes == plan.stack_bytes == 100 * plan.adapter_bytes
    fp32 = adapter_plan(LLAMA3, 100, 16, "q_proj,v_proj", 8, 16, dtype="fp32")
    assert fp32.adapter_bytes == 4 * 32 * 16 * (8192 + 5120)


def test_vllm_slots_cover_every_module_at_max_rank():
    """Slots: max_loras × max_lora_rank on every linear (packed qkv and gate_up as their
    slices) plus embed_tokens and lm_head, whatever the adapters target."""
    plan = adapter_plan(LLAMA3, 100, 8, "q_proj", 8, 16, dtype="bf16")
    linears = 32 * 16 * (8192 + 5120 + 5120 + 8192 + 3 * 18432)
    embeddings = 2 * 16 * (128256 + 4096)
    assert plan.adapter_slot_bytes == 8 * 2 * (linears + embeddings) == 738_852_864
    assert plan.embedding_slot_bytes == 8 * 2 * embeddings
    # independent of the adapters' own rank and targets, linear in the slots
    assert adapter_plan(LLAMA3, 100, 16, "all", 8, 16).adapter_slot_bytes \
        == plan.adapter_slot_bytes
    assert adapter_plan(LLAMA3, 100, 8, "q_proj", 4, 16).adapter_slot_bytes * 2 \
        == plan.adapter_slot_bytes
    off = adapter_plan(LLAMA3, 100, 8, "q_proj", 8, 16, embedding_slots=False)
    assert off.adapter_slot_bytes == 8 * 2 * linears and off.embedding_slot_bytes == 0


def test_gemma_has_no_embedding_slots_and_moe_has_fused_expert_slots():
    gemma = get_model("gemma-2-9b")
    assert slot_elements(gemma, 8)[1] == 0
    mixtral = get_model("mixtral-8x7b")  # 8 experts, moe_inter 14336, router 4096 → 8
    total, embed = slot_elements(mixtral, 8)
    attention = 8 * (8192 + 5120 + 5120 + 8192)
    experts = 3 * 8 * 8 * (4096 + 14336)  # w1, w3 (w13) and w2, every expert
    router = 8 * (4096 + 8)
    assert embed == 2 * 8 * (32000 + 4096)
    assert total == 32 * (attention + experts + router) + embed


def test_host_ram_is_vllm_cpu_cache():
    plan = adapter_plan(LLAMA3, 100, 16, "all", 8, 16, max_cpu_loras=32)
    assert (plan.host_adapters, plan.disk_adapters) == (32, 68)
    assert plan.host_adapter_bytes == 32 * plan.adapter_bytes
    every = adapter_plan(LLAMA3, 100, 16, "all", 8, 16)  # default: all K cached
    assert every.host_adapter_bytes == 100 * every.adapter_bytes and every.disk_adapters == 0
    assert every.gpu_bytes == {"merged": 0, "resident": every.resident_bytes,
                               "slotted": every.adapter_slot_bytes,
                               "stack": every.stack_bytes}
    assert adapter_plan(LLAMA3, 100, 16, stack=3).stack_bytes == 3 * every.adapter_bytes


@pytest.mark.parametrize("kwargs, says", [
    (dict(adapters=4, max_loras=8), "--max-loras 8 is above --adapters 4"),
    (dict(adapters=8, rank=32, max_lora_rank=16), "--rank 32 is above --max-lora-rank 16"),
    (dict(adapters=0), "--adapters must be a positive integer"),
    (dict(adapters=8, rank=-1), "--rank must be a positive integer"),
    (dict(adapters=8, max_loras=0), "--max-loras must be a positive integer"),
    (dict(adapters=8, max_loras=4, max_cpu_loras=2), "--max-cpu-loras 2 is below"),
    (dict(adapters=8, stack=9), "--stack 9 is above --adapters 8"),
    (dict(adapters=8, dtype="nf4"), "adapter dtype 'nf4'"),
    (dict(adapters=8, max_lora_rank=True), "--max-lora-rank must be a positive integer"),
])
def test_bad_input_is_one_line(kwargs, says):
    with pytest.raises(MemplanError) as err:
        adapter_plan(LLAMA3, **kwargs)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_lora_paper_gpt3_example():
    """Hu et al. 2021, 4.2: GPT-3 175B, r = 4 on Wq and Wv: 350 GB → 35 MB; 100 models
    ≈ 354 GB against ≈ 35 TB."""
    ex = lora_paper_example()
    assert ex.per_layer_params == 4 * (12288 + 12288) * 2  # Wq and Wv, not the fused c_attn
    assert ex.adapter_params == 96 * 196_608 == 18_874_368
    assert ex.adapter_bytes == 37_748_736  # ≈ 37.7 MB; the paper rounds to 35 MB
    assert ex.base_params == 174_604_259_328 and ex.base_bytes == 2 * ex.base_params
    assert ex.shared_bytes == ex.base_bytes + 100 * ex.adapter_bytes
    assert 352e9 < ex.shared_bytes < 355e9  # "≈ 354 GB"
    assert 34.5e12 < ex.full_copies_bytes < 35.5e12  # "≈ 35 TB"
    assert 9_000 < ex.reduction < 10_000  # "roughly 10,000×"
    # PEFT on the fused c_attn adapts one h × 3h matrix (Wk too, one A for all three):
    # r · (h + 3h) = 4rh, by coincidence the same count as Wq plus Wv, r · (h + h) · 2
    peft = lora_params(get_model("gpt3-175b"), LoraSpec(4, targets="c_attn"))
    assert peft == 96 * 4 * (12288 + 3 * 12288) == ex.adapter_params


def test_concurrency_plot_data_slots_cost_sequences():
    pytest.importorskip("matplotlib")
    from memplan import plots
    from memplan.serve import plan_serve

    data = plots.concurrency_data(LLAMA3, "l4", "bf16", rank=16, max_loras=8)
    bare, slotted = data.lines
    slots = 738_852_864 + 67_764_224  # the LoRA slots and the embedding slots, as serve takes
    assert data.seqs[-1] == LLAMA3.max_positions and data.adapter_slot_bytes == slots
    assert all(s <= b for b, s in zip(bare.ys, slotted.ys, strict=True))
    assert any(s < b for b, s in zip(bare.ys, slotted.ys, strict=True))
    at = data.seqs.index(4096)
    gpu = get_gpu("l4")
    for line, taken in ((bare, 0), (slotted, slots)):
        served = plan_serve(LLAMA3, "bf16", gpu.capacity_bytes, data.reserve_bytes, seq=4096,
                            adapter_gpu_bytes=taken)
        assert line.ys[at] == served.max_concurrent_sequences


def test_adapters_plot_data_lines():
    pytest.importorskip("matplotlib")
    from memplan import plots

    data = plots.adapters_data(LLAMA3, rank=16, max_loras=8, counts=(1, 8, 64), gpu="l4")
    merged, resident, slotted = data.lines
    assert merged.ys == (0, 0, 0)
    assert resident.ys == tuple(k * data.adapter_bytes for k in (1, 8, 64))
    assert data.host.ys == resident.ys  # every adapter cached in RAM by default
    full = 738_852_864 + 67_764_224  # LoRA and embedding slots
    assert slotted.ys[1] == slotted.ys[2] == full  # fixed once K ≥ max_loras
    assert slotted.ys[0] == full // 8  # one slot when K = 1
    assert 0 < data.gpu_left_bytes < get_gpu("l4").capacity_bytes


def test_plot_commands(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "c.png"
    result = cli("plot", "concurrency", "--model", "llama-3-8b", "--gpu", "l4", "--rank", "16",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0
    out = tmp_path / "a.svg"
    result = cli("plot", "adapters", "--model", "llama-3-8b", "--rank", "16", "--adapters", "100",
                 "--max-cpu-loras", "32", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("<?xml")
    bad = cli("plot", "adapters", "--model", "llama-3-8b", "--rank", "32", "--max-lora-rank",
              "16", "--out", str(tmp_path / "x.png"))
    assert bad.exit_code == 2 and "--rank 32 is above --max-lora-rank 16" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "x.png").exists()
    bad = cli("plot", "concurrency", "--model", "llama-3-8b", "--out", str(tmp_path / "x.png"))
    assert bad.exit_code == 2 and "plot concurrency needs exactly one of --gpu" in bad.output
    for args, says in ((["--dtype", "nope"], "--dtype 'nope' is not one of"),
                       (["--max-cpu-loras", "4"], "--max-cpu-loras 4 is below --max-loras 8"),
                       (["--adapters", "0"], "--adapters must be a positive integer"),
                       (["--max-loras", "300"], "--max-loras 300 is above --adapters 256")):
        bad = cli("plot", "adapters", "--model", "llama-3-8b", *args, "--out",
                  str(tmp_path / "x.png"))
        assert bad.exit_code == 2 and says in bad.output, (args, bad.output)
