"""FSDP per rank, planned without torch (memplan/fsdp.py): shards, units and their events.

The byte counts asserted here are FSDP2's own records of the reference models (its
``padded_sharded_param_size`` per unit, read by ``memplan profile --nproc``); the planner
derives them from the spec alone.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from memplan import fsdp as F
from memplan.errors import MemplanError
from memplan.params import count_params
from memplan.planner import plan
from memplan.presets import get_model
from memplan.spec import TrainSpec

LLAMA = get_model("llama-tiny")  # h 256, 4 layers, vocab 4096, intermediate 688, 4 kv heads
JOB = TrainSpec(regime="zero", batch=2, seq=64, gpus=2)


def test_unit_sizes_are_fsdp2s_records():
    root, block = F.units(LLAMA, TrainSpec(regime="zero"))
    # embeddings and the untied head (4096 × 256 fp32 each) and the final norm
    assert root.gathered(2) == 2 * 4096 * 256 * 4 + 256 * 4 == 8_389_632
    assert block.gathered(2) == 2_902_016
    _, lora_block = F.units(LLAMA, TrainSpec(regime="lora"))
    assert lora_block.gathered(2) == 3_049_984  # with every adapter, A padded to whole rows
    assert lora_block.reduce_scatter(2) == 147_968  # the adapters' gradients only


def test_lora_a_pads_to_one_row_per_rank_beyond_its_rank():
    a = F.Param(rows=8, numel=8 * 256, itemsize=4, trainable=True)
    assert a.padded(16) == 256  # one row on each of 16 ranks: twice A once gathered
    assert [a.local(16, r) for r in (0, 7, 8, 15)] == [256, 256, 0, 0]


@pytest.mark.parametrize("rows, m", [(10, 4), (4096, 3), (7, 7), (1, 8), (11008, 1024)])
def test_local_shards_cover_every_row_once(rows, m):
    p = F.Param(rows=rows, numel=rows * 3, itemsize=4, trainable=True)
    assert sum(p.local(m, r) for r in range(m)) == p.numel
    assert p.local(m, 0) == max(p.local(m, r) for r in range(m))
    assert p.padded(m) * m >= p.numel


def test_rank_states_shard_the_notes_model_states():
    m = 8
    states = F.rank_states(LLAMA, TrainSpec(regime="zero"), m, 0)
    n = count_params(LLAMA)
    assert states.weights >= 4 * n // m  # padded shards
    assert states.weights - 4 * n // m < 4 * m * 64  # by less than a row per tensor
    # Adam on rank 0's local shard, plus one fp32 step counter per tensor
    tensors = 3 + 9 * LLAMA.num_layers
    assert states.optimizer_states == 8 * sum(
        p.local(m, 0) for u in F.units(LLAMA, TrainSpec(regime="zero")) for p in
        (u.params if u.params[0].rows == 4096 else u.params * LLAMA.num_layers)) + 4 * tensors
    mixed = F.rank_states(LLAMA, TrainSpec(regime="mixed"), m, 0)
    assert mixed.persistent_grads * 3 == mixed.optimizer_states  # bf16 grads, bf16 m + fp32 v
    assert mixed.sharded_grads == 0


def _forward_moments(strategy: str) -> list[tuple[int, int]]:
    sched = F.schedule(LLAMA, replace(JOB, shard=strategy), 2)
    seen: list[tuple[int, int]] = []
    sched.check = lambda: seen.append((sched.weights, sched.grads))
    sched.pre_forward(F.ROOT)
    for i in range(LLAMA.num_layers):
        sched.pre_forward(i)
        sched.post_forward(i)
    return seen


def test_forward_holds_three_blocks_at_a_copy_out():
    """Block i's all-gather buffer, its copy-out, and block i-1's buffer, freed only after."""
    root, block = (u.gathered(2) for u in F.units(LLAMA, JOB))
    peak = max(w for w, _ in _forward_moments("full-shard")[4:])  # past block 0
    assert peak == root + 3 * block


def test_shard_grad_op_keeps_every_block_gathered_to_backward():
    root, block = (u.gathered(2) for u in F.units(LLAMA, JOB))
    last = _forward_moments("shard-grad-op")[-1][0]  # the last block's copy-out
    # every block gathered, the last one's all-gather buffer and the one before it (freed
    # only once the copy-out returns)
    assert last == root + LLAMA.num_layers * block + 2 * block


def test_one_gpu_shards_nothing():
    one = plan(LLAMA, replace(JOB, gpus=1))
    assert one.total_bytes == plan(LLAMA, replace(JOB, regime="full")).total_bytes
    assert not F.is_sharded(replace(JOB, gpus=1))
    assert F.is_sharded(TrainSpec(regime="lora", gpus=2, shard="full-shard"))
    assert not F.is_sharded(TrainSpec(regime="lora", gpus=2))  # replicated (data parallel)


def test_sharded_plan_components_sum_and_phases():
    for regime in ("zero", "mixed", "lora", "lora-bf16"):
        for shard in F.STRATEGIES:
            b = plan(LLAMA, replace(JOB, regime=regime, shard=shard, gpus=4))
            assert sum(b.components.values()) == b.total_bytes
            assert set(b.phases) == {"step", "forward", "backward"}
            assert b.symbols["GPUs"] == 4


def test_rank_zero_is_the_fullest():
    job = replace(JOB, gpus=3)
    plans = [plan(LLAMA, job, rank=r).total_bytes for r in range(3)]
    assert plans[0] == max(plans) and plans[0] > plans[2]
    with pytest.raises(MemplanError, match="rank must be in"):
        plan(LLAMA, job, rank=3)


def test_lora_under_fsdp_can_cost_more_than_lora_replicated_at_tiny_scale():
    """The surprise users report: gathered units (fp32 base) outweigh what sharding saves
    when the base is small beside its embeddings. Planned, not assumed."""
    lora = TrainSpec(regime="lora", batch=2, seq=64)
    one = plan(LLAMA, lora).total_bytes
    two = plan(LLAMA, replace(lora, gpus=2, shard="full-shard")).total_bytes
    assert two > one


def test_without_activations_the_gather_phase_is_planned():
    b = plan(get_model("llama-2-7b"), TrainSpec(regime="zero", gpus=8))
    assert b.peak_phase in ("gather", "step")
    assert "gather" in b.phases
    # 16N/M plus the root and blocks gathered: above the notes' formula, below twice it
    assert b.model_state_bytes < b.total_bytes < 2 * b.model_state_bytes


@pytest.mark.parametrize("regime, shard, match", [
    ("classifier", "full-shard", "cannot be sharded"),
    ("prompt-tuning", "full-shard", "outside the model"),
    ("zero3", "full-shard", "sharded already"),
])
def test_unshardable_regimes_are_refused(regime, shard, match):
    with pytest.raises(MemplanError, match=match):
        plan(LLAMA, TrainSpec(regime=regime, gpus=2, shard=shard))


# ---- the commands -------------------------------------------------------------------------------

def test_estimate_over_gpus_shows_fsdp_rows(cli):
    r = cli("estimate", "--model", "llama-2-7b", "--gpus", "8", "--batch", "1", "--seq", "512",
            "--json")
    assert r.exit_code == 0, r.output
    regimes = json.loads(r.output)["regimes"]
    assert {"zero", "mixed · full-shard", "lora · full-shard"} <= set(regimes)
    assert regimes["lora · full-shard"]["total_bytes"] < regimes["lora"]["total_bytes"]
    r = cli("estimate", "--model", "llama-2-7b", "--gpus", "8", "--shard", "shard-grad-op",
            "--regime", "lora", "--json")
    assert list(json.loads(r.output)["regimes"]) == ["lora · shard-grad-op"]


def test_scale_finds_the_fewest_gpus(cli):
    r = cli("scale", "--model", "llama-2-70b", "--gpu", "h100-80gb", "--batch", "1", "--seq",
            "2048", "--checkpointing", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    spec = get_model("llama-2-70b")
    usable = doc["capacity_bytes"] - doc["reserve_bytes"]
    job = TrainSpec(batch=1, seq=2048, checkpointing=True)
    for regime, result in doc["regimes"].items():
        fewest = result["fewest_gpus"]
        assert fewest is not None and fewest > 1
        from memplan.scaling import gpu_counts, per_gpu

        counts = gpu_counts(1024, 8)
        below = counts[counts.index(fewest) - 1]
        assert per_gpu(spec, replace(job, regime=regime), regime, fewest).total_bytes <= usable
        assert per_gpu(spec, replace(job, regime=regime), regime, below).total_bytes > usable
    assert doc["regimes"]["lora"]["fewest_gpus"] < doc["regimes"]["zero"]["fewest_gpus"]


@pytest.mark.parametrize("args, match", [
    (["--regime", "classifier"], "does not shard"),
    (["--shard", "none"], "full-shard or shard-grad-op"),
    (["--max-gpus", "0"], "--max-gpus"),
])
def test_scale_bad_input(cli, args, match):
    r = cli("scale", "--model", "llama-2-7b", "--gpu", "t4", *args)
    assert r.exit_code == 2 and match in r.output
