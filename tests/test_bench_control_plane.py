"""Smoke test of scripts/bench_control_plane.py: a --quick run against a node it starts."""

from __future__ import annotations

import json
import subprocess

import pytest
from support.env import PY, REPO
from support.env import node_env as _env


@pytest.mark.slow
def test_quick_run_reports_every_rpc_kind_pickups_and_every_reclaim_freed(tmp_path):
    out = tmp_path / "cp.json"
    proc = subprocess.run(
        [PY, str(REPO / "scripts" / "bench_control_plane.py"), "--quick", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    throughput, head = res["throughput"], res["headline"]

    # The mixed run: every RPC kind has a rate and a latency; the headline counts RPCs.
    rpcs = throughput["rpcs"]
    assert set(rpcs) == {"grant", "keepalive", "release"}
    for kind, row in rpcs.items():
        assert row["count"] > 0 and row["rpcs_per_s"] > 0, kind
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], kind
    total = sum(row["count"] for row in rpcs.values()) / throughput["window_s"]
    assert throughput["rpcs_per_s"] == pytest.approx(total)
    assert head["rpcs_per_s"] == throughput["rpcs_per_s"]
    assert set(head["rpc_ms"]) == set(rpcs)
    assert all(v["p99"] > 0 for v in head["rpc_ms"].values())
    assert throughput["errors"] == 0, throughput["errors_by_kind"]
    assert res["rpc_floor"]["rpcs_per_s"] > 0 and 0 < throughput["of_rpc_floor"]

    # Leases renewed inside batched keepalives: a figure of its own, labelled, not RPCs.
    renewals = throughput["batched_renewals"]
    assert "not RPCs" in renewals["what"]
    assert renewals["keepalive_rpcs_per_s"] == rpcs["keepalive"]["rpcs_per_s"]
    assert 1 < renewals["leases_per_keepalive_rpc"] <= res["parameters"]["batch"]
    assert renewals["leases_renewed_per_s"] > throughput["rpcs_per_s"]
    assert not any("renew" in key or "lease_ops" in key for key in head)
    assert "lease_ops_per_s" not in throughput and "ops" not in throughput

    # Grants that a holder picks up and maps: a rate and the latency to the mapped lease.
    pickup = res["pickup"]
    assert pickup["errors"] == 0, pickup["errors_by_kind"]
    assert pickup["grants"] > 0 and pickup["grants_per_s"] > 0
    to_mapped, grant_rpc = pickup["grant_to_mapped"], pickup["grant_rpc"]
    assert 0 < to_mapped["p50_ms"] <= to_mapped["p99_ms"]
    assert 0 < grant_rpc["p50_ms"] <= to_mapped["p50_ms"]  # the Grant RPC is a part of it
    assert pickup["pickup_and_map"]["p50_ms"] > 0 and pickup["release"]["p99_ms"] > 0
    assert head["grants_picked_up_per_s"] == pickup["grants_per_s"]
    assert head["grant_to_mapped_p50_ms"] == to_mapped["p50_ms"]
    assert head["grant_to_mapped_p99_ms"] == to_mapped["p99_ms"] > 0

    assert [r["holders"] for r in res["reclaim"]] == [1, 2]
    for row in res["reclaim"]:
        assert row["runs"] and all(run["freed"] for run in row["runs"]), row
        assert row["all_freed"]
        assert row["callbacks"] == row["expected_callbacks"], row
    assert res["machine"]["cpus"] and res["command"] and res["parameters"]["quick"]
    assert res["parameters"]["pickers"] == 2
    assert res["node_started_here"]
