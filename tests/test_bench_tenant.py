"""Smoke tests of the tenant benchmarks on the CPU twin of a GPU (a host device):
scripts/bench_tenant_ramp.py and scripts/bench_reclaim.py, each with --smoke, end to end
through real brokers, lenders, holders and tenants."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.env import PY, REPO, node_env


def _run(script: str, out: Path) -> dict:
    proc = subprocess.run(
        [PY, str(REPO / "scripts" / script), "--smoke", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=node_env(),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tenant_ramp_smoke_holds_everything_with_no_wrong_read(tmp_path):
    doc = _run("bench_tenant_ramp.py", tmp_path / "ramp.json")
    rows = {(r["scenario"], r["piece"]): r for r in doc["rows"]}
    assert {s for s, _ in rows} == {
        "nothing-lent",
        "into-lent",
        "back-to-peak",
        "cooperating",
        "room-ahead",
    }
    for (scenario, _), row in rows.items():
        assert row["complete"] and row["wrong_reads"] == 0, row
        if scenario in ("back-to-peak", "cooperating", "room-ahead"):
            assert row["failures"] == 0, row
        timeline = row["timeline"]
        held = timeline["took_ms"]
        assert len(held) * row["piece"] >= row["target"] and held == sorted(held), row
        assert len(timeline["failed_ms"]) == row["failures"]
        assert 0 <= timeline["slowest_take_ms"] <= row["seconds"] * 1e3 + 1
        if scenario == "into-lent":
            assert row["revoked"] > 0 and row["reclaims"], row
            # The lender's reclaims on the ramp's clock: one began while the tenant ramped.
            starts = [r["start"] for r in timeline["reclaims_ms"]]
            assert any(0 <= t <= held[-1] for t in starts), timeline
        if scenario == "back-to-peak":
            assert row["revoked"] == 0, row  # only what lay above the peak was lent
    assert (tmp_path / "ramp.png").exists()


@pytest.mark.slow
def test_reclaim_smoke_frees_everything_and_times_each_step(tmp_path):
    doc = _run("bench_reclaim.py", tmp_path / "reclaim.json")
    assert [r["holders"] for r in doc["rows"]] == [1, 4]
    for row in doc["rows"]:
        assert row["recovered"] and row["wrong_reads"] == 0, row
        for r in row["rounds"]:
            steps = r["steps_ms"]
            assert steps["revoked"] == row["holders"], steps
            assert steps["fence"]["max"] >= steps["fence"]["median"] >= 0
            assert steps["total"] > 0
