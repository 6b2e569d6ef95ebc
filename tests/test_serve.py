"""memplan serve: the plan's arithmetic, its windows, and its bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from memplan.cli.app import load_commands
from memplan.errors import MemplanError
from memplan.presets import get_gpu, get_model
from memplan.serve import KVLayout, kv_bytes_per_token, kv_windows, plan_serve, weight_bytes

GIB = 2**30


def test_kv_bytes_per_token_is_the_formula() -> None:
    spec = get_model("llama-3-8b")  # 32 layers, 8 kv heads of 128
    assert kv_bytes_per_token(spec, "bf16") == 2 * 32 * 8 * 128 * 2
    assert kv_bytes_per_token(spec, "fp32") == 2 * 32 * 8 * 128 * 4


def test_budget_adds_up_and_pages_are_whole() -> None:
    spec = get_model("llama-3-8b")
    cap = get_gpu("l4").capacity_bytes
    p = plan_serve(spec, "bf16", cap, GIB, seq=4096)
    assert p.kv_budget_bytes == cap - GIB - p.weights_bytes - p.activations_bytes
    assert p.kv_cache_tokens % 16 == 0
    assert p.kv_cache_tokens * p.kv_bytes_per_token <= p.kv_budget_bytes
    assert (p.kv_cache_tokens + 16) * p.kv_bytes_per_token > p.kv_budget_bytes
    assert p.max_concurrent_sequences == p.kv_budget_bytes // (4096 * p.kv_bytes_per_token)
    assert p.logits_bytes == 4 * 256 * spec.vocab_size <= p.activations_bytes


def test_concurrent_answers_fit_and_what_is_left() -> None:
    spec = get_model("llama-3-8b")
    cap = get_gpu("l4").capacity_bytes
    best = plan_serve(spec, "bf16", cap, GIB, seq=4096).max_concurrent_sequences
    yes = plan_serve(spec, "bf16", cap, GIB, seq=4096, concurrent=best)
    no = plan_serve(spec, "bf16", cap, GIB, seq=4096, concurrent=best + 1)
    assert yes.fits and yes.left_bytes >= 0 and not no.fits and no.left_bytes < 0


def test_quantised_weights_are_smaller_in_order() -> None:
    spec = get_model("llama-3-8b")
    sizes = [weight_bytes(spec, d) for d in ("fp32", "bf16", "int8", "nf4")]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == 2 * sizes[1] - spec.head_dim // 2 * 4  # buffers counted once


def test_gemma2_sliding_layers_hold_their_window() -> None:
    spec = get_model("gemma-2-9b")
    windows = kv_windows(spec)
    assert windows.count(None) == spec.num_layers // 2
    assert set(windows) == {None, spec.extra("sliding_window")}
    layout = KVLayout(100, 16, tuple(windows), 512)
    long, short = layout.sequence_bytes(65536), layout.sequence_bytes(1024)
    full = len(windows) // 2 * 100 * 65536 // 16
    assert full < long < 2 * full  # sliding layers keep far less than the full ones
    assert short == 100 * len(windows) * 1024 // 16
    assert kv_windows(get_model("llama-3-8b")) == [None] * 32


def test_bad_input_is_one_line() -> None:
    spec = get_model("llama-3-8b")
    with pytest.raises(MemplanError, match="8,192 positions"):
        plan_serve(spec, "bf16", 80 * GIB, GIB, seq=10_000)
    with pytest.raises(MemplanError, match=r"14\.96 GiB"):
        plan_serve(spec, "bf16", 12 * GIB, GIB)


def test_cli_json_and_exit_codes() -> None:
    runner = CliRunner()
    app = load_commands()
    r = runner.invoke(app, ["serve", "--model", "llama-3-8b", "--gpu", "l4", "--seq", "4096",
                            "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for key in ("kv_bytes_per_token", "kv_cache_tokens", "max_concurrent_sequences"):
        assert key in doc
    bad = runner.invoke(app, ["serve", "--model", "llama-3-8b", "--gpu", "l4", "--seq",
                              "100000"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    no = runner.invoke(app, ["serve", "--model", "llama-3-8b", "--gpu", "l4", "--seq", "4096",
                             "--concurrent", "500"])
    assert no.exit_code == 1


def test_cli_adapter_slots_take_from_the_kv_cache() -> None:
    runner = CliRunner()
    app = load_commands()
    base = ["serve", "--model", "llama-3-8b", "--gpu", "l4", "--seq", "4096", "--json"]
    plain = json.loads(runner.invoke(app, base).stdout)
    slots = json.loads(runner.invoke(app, base + ["--adapters", "100", "--max-loras", "8",
                                                  "--rank", "16"]).stdout)
    taken = slots["adapter_slot_bytes"] + slots["embedding_slot_bytes"]
    assert plain["kv_budget_bytes"] - slots["kv_budget_bytes"] == taken == \
        slots["adapter_gpu_bytes"] > 0
    assert slots["host_adapter_bytes"] == 100 * slots["adapter_bytes"]
