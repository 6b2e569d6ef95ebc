"""reports/scaling: the ZeRO paper's example, the per-GPU curves, written whole or not at all."""

from __future__ import annotations

import pytest

from memplan.errors import MemplanError
from memplan.profile import scaling_report as S

pytest.importorskip("matplotlib")


def test_the_zero_papers_example():
    """Rajbhandari et al. 2020, Figure 1: 7.5B parameters, 64 GPUs, K = 12."""
    rows = {r["stage"]: r for r in S.paper_check()}
    assert rows["baseline"]["formula"] == "2N + 2N + 12N/G"  # on one GPU: 16Ψ
    for stage, row in rows.items():
        # the paper gives three figures; memplan adds only the rotary buffer (under 1 KiB)
        assert abs(row["memplan_gb"] - row["paper_gb"]) / row["paper_gb"] < 0.015, stage
        assert row["memplan_bytes"] - {"baseline": 16, "zero1": 4 + 12 / 64, "zero2": 2 + 14 / 64,
                                       "zero3": 16 / 64}[stage] * S.PAPER_PSI < 2048


def test_report_holds_plans_and_measured_points(tmp_path):
    row = {"model": "llama-2-7b", "regime": "lora", "nproc": 64,
           "options": "batch=1 seq=512 ×64 full-shard", "measured_bytes": 123,
           "ranks": [{"rank": 0, "measured_bytes": 8_826_000_000}]}
    meta = {"command": "memplan validate --device fake --sharded", "date": "today",
            "torch": "x"}
    paths = S.write_scaling_report([row], tmp_path, meta)
    assert sorted(p.name for p in paths) == ["scaling.json", "scaling.md", "scaling.png"]
    md = (tmp_path / "scaling.md").read_text()
    assert "8.22 GiB" in md  # the measured point, rank 0
    assert "| 1024 |" in md and "7.5B parameters on 64 GPUs" in md
    data = S.curves([row])
    plan = data["llama-2-7b"]["plan"]
    # the plan falls with M, then the gathered units and activations take over
    assert plan["zero"][1] > plan["zero"][8] > plan["zero"][64] > 16 * data["llama-2-7b"]["N"] / 64


def test_a_failing_disk_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MemplanError, match="cannot write"):
        S.write_scaling_report([], blocker, {"command": "c", "date": "d", "torch": "t"})
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
