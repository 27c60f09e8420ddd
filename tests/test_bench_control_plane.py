"""Smoke test of scripts/bench_control_plane.py: a --quick run against a node it starts."""

from __future__ import annotations

import json
import subprocess

import pytest
from support.env import PY, REPO
from support.env import node_env as _env


@pytest.mark.slow
def test_quick_run_reports_every_op_and_every_reclaim_freed(tmp_path):
    out = tmp_path / "cp.json"
    proc = subprocess.run(
        [PY, str(REPO / "scripts" / "bench_control_plane.py"), "--quick", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    throughput = res["throughput"]
    for op in ("grant", "keepalive", "release"):
        assert throughput["ops"][op]["ops_per_s"] > 0, op
        assert throughput["ops"][op]["p99_ms"] > 0, op
    assert throughput["errors"] == 0, throughput["errors_by_kind"]
    assert res["rpc_floor"]["rpcs_per_s"] > 0
    assert throughput["lease_ops_per_s"] > throughput["ops_per_s"]  # batched renewals
    assert 0 < throughput["of_rpc_floor"]
    assert [r["holders"] for r in res["reclaim"]] == [1, 2]
    for row in res["reclaim"]:
        assert row["runs"] and all(run["freed"] for run in row["runs"]), row
        assert row["all_freed"]
        assert row["callbacks"] == row["expected_callbacks"], row
    assert res["machine"]["cpus"] and res["command"] and res["parameters"]["quick"]
    assert res["node_started_here"]
