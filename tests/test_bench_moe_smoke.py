"""Smoke test of scripts/bench_moe.py: its --smoke run on the CPU (tiny Mixtral- and
Qwen-MoE-shaped models, a host node), end to end: every mode the CPU can run, three
repeats of at least 64 timed steps in alternating order, the token verdicts, and the
revocation runs (the copy path's and the placed tensors')."""

from __future__ import annotations

import json
import subprocess

import pytest
from support.env import PY, REPO, node_env

REQUIRED = {
    "resident",
    "best-host-offload",
    "accelerate-pinned",
    "accelerate-default",
    "harvest-host",
    "harvest-gpu",
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_moe_smoke_measures_every_mode_with_repeats_and_identical_harvest_tokens(tmp_path):
    out = tmp_path / "moe.json"
    proc = subprocess.run(
        [PY, str(REPO / "scripts" / "bench_moe.py"), "--smoke", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=node_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["statistics"]["repeats"] >= 3 and doc["statistics"]["steps"] >= 64
    assert REQUIRED <= set(doc["modes"])
    assert "borrow_bytes=0" in doc["modes"]["best-host-offload"]  # the "how" names the path

    decode = [r for r in doc["rows"] if not r.get("experiment")]
    assert {(r["model"], r["batch"]) for r in decode} == {
        (m, b) for m in ("mixtral", "qwen2-moe") for b in (1, 3)
    }
    for row in decode:
        modes = row["modes"]
        assert REQUIRED <= set(modes), row["model"]
        # No GPU here: harvest-gpu says why it did not run; every other mode ran.
        assert modes["harvest-gpu"]["status"] == "skipped (needs CUDA)"
        measured = {m for m, e in modes.items() if e["status"] == "measured"}
        assert REQUIRED - {"harvest-gpu"} <= measured
        # Every measured mode once per repeat, the order differing between repeats.
        assert len(row["order"]) == 3
        assert all(sorted(o) == sorted(measured) for o in row["order"])
        assert len({o[0] for o in row["order"]}) > 1
        for mode in measured:
            entry = modes[mode]
            assert entry["repeats"] >= 3 and entry["steps"] >= 64, mode
            assert len(entry["runs"]) == entry["repeats"]
            assert [r["repeat"] for r in entry["runs"]] == list(range(entry["repeats"]))
            assert all(len(r["step_ms"]) >= 64 for r in entry["runs"])
            s = entry["tokens_per_s"]
            assert s["min"] <= s["median"] <= s["max"] and len(s["values"]) == entry["repeats"]
            assert entry["reference"] == "resident"
            assert isinstance(entry["tokens_identical"], bool)
            assert isinstance(entry["tokens_identical_to_resident"], bool)
        assert modes["harvest-host"]["tokens_identical"] is True
        assert all(r["tokens_identical"] for r in modes["harvest-host"]["runs"])
        assert all(
            r["borrowed_experts"] == r["offloaded_experts"] for r in modes["harvest-host"]["runs"]
        )
        # The best host offload borrows nothing: every read from the host copy.
        best = modes["best-host-offload"]
        assert best["borrowed_bytes"] == 0
        assert all(set(r["reads_by_tier"]) == {"host"} for r in best["runs"])
        assert modes["accelerate-default"]["offloaded_bytes"] == best["offloaded_bytes"]
        # host-placed leases nothing: every run read its host copy in place.
        host_placed = modes["host-placed"]
        assert host_placed["borrowed_bytes"] == 0
        assert all(
            r["tiers_after"]["host"] == host_placed["offloaded_bytes"] for r in host_placed["runs"]
        )
        # GPU memory: every measured mode has the fields; on the CPU they are None.
        for mode in measured:
            assert modes[mode]["gpu_allocated_bytes"] is None, mode
            assert modes[mode]["gpu_process_bytes"] is None, mode
        assert host_placed["staging_bytes"] is None and host_placed["placed_objects"] >= 1
        # Headlines name their baselines; without a GPU they say why they are missing.
        head = row["headline"]
        assert head["harvest_gpu_vs_best_host_offload"]["baseline"] == "best-host-offload"
        assert head["harvest_gpu_vs_resident"]["baseline"] == "resident"
        assert "unavailable" in head["harvest_gpu_vs_resident"]

    revocations = [r for r in doc["rows"] if r.get("experiment") == "revocations"]
    assert {r["model"] for r in revocations} == {"mixtral", "qwen2-moe"}
    for row in revocations:
        revoked = row["modes"]["harvest-gpu-revoked"]
        assert revoked["repeats"] >= 3 and revoked["steps"] >= 64
        assert len(revoked["revocations"]) == revoked["repeats"]
        assert all(r["reclaims"] >= 1 for r in revoked["runs"])
        # The reclaims fell on the revoked run's own leases, and it read on regardless.
        assert all(n >= 1 for n in revoked["revocations_seen"]), revoked["revocations_seen"]
        for entry in row["modes"].values():
            assert entry["tokens_identical"] is True
        assert "ratio" in row["headline"]["revoked_vs_host"]

    # The placed path's revocation run: on the CPU the host lender stands in for the GPU
    # lender, as it does for the copy path's.
    placed = [r for r in doc["rows"] if r.get("experiment") == "revocations-placed"]
    assert {r["model"] for r in placed} == {"mixtral", "qwen2-moe"}
    for row in placed:
        modes = row["modes"]
        assert list(modes) == [
            "harvest-gpu-placed-revoked",
            "harvest-gpu-placed",
            "host-placed",
            "harvest-host",
        ]
        revoked = modes["harvest-gpu-placed-revoked"]
        assert revoked["repeats"] >= 3 and revoked["steps"] >= 64
        assert all(r["reclaims"] >= 1 for r in revoked["runs"])
        # The reclaims fell on the placed tensors' own leases, each remapped to the host.
        assert all(n >= 1 for n in revoked["revocations_seen"]), revoked["revocations_seen"]
        assert len(revoked["remap_ms"]["values"]) >= 1
        assert revoked["placed_objects"] >= 1 and revoked["staging_bytes"] is None
        assert modes["host-placed"]["borrowed_bytes"] == 0
        for entry in modes.values():
            assert entry["tokens_identical"] is True
        head = row["headline"]
        assert head["placed_revoked_vs_host_placed"]["baseline"] == "host-placed"
        assert head["placed_revoked_vs_placed"]["baseline"] == "harvest-gpu-placed"
        assert "ratio" in head["placed_revoked_vs_host_placed"]
        assert "ratio" in head["placed_revoked_vs_placed"]
    assert {"gpu_allocated_bytes", "gpu_process_bytes", "staging_bytes"} <= set(doc["fields"])

    verdict = doc["verdict"]
    assert verdict["harvest_tokens_identical"] is True and not verdict["failed"]
    assert verdict["harvest_mismatches"] == [] and verdict["harvest_errors"] == []
    assert isinstance(verdict["baselines_with_other_tokens"], list)
    assert "Harvest's tokens: identical" in proc.stdout
    assert out.with_suffix(".png").exists()
