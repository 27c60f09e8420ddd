"""Smoke test of scripts/bench_place.py: its --smoke run on the CPU twin (a host lender
as a plain process, tiny tensors), end to end: every tier measured in alternating
repeats against the comparator copy, the ratios, and revocations remapped for each chunk
size with the values equal throughout."""

from __future__ import annotations

import json
import subprocess

from support.env import PY, REPO, node_env

TIERS = {"local", "host-lease", "host"}


def _sane(s: dict, repeats: int) -> None:
    assert 0 < s["min"] <= s["median"] <= s["max"] and len(s["values"]) == repeats


def test_place_smoke_measures_tiers_and_remaps(tmp_path):
    out = tmp_path / "place.json"
    proc = subprocess.run(
        [PY, str(REPO / "scripts" / "bench_place.py"), "--smoke", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        env=node_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["platform"] == "cpu" and doc["smoke"] is True and doc["verified"] is True
    repeats = doc["statistics"]["repeats"]
    assert repeats >= 3 and doc["statistics"]["rounds"] >= 5

    tiers = doc["tiers"]
    assert set(tiers["tiers"]) == TIERS and tiers["host_location"] == "memfd"
    assert tiers["chunk_bytes"] == 64 << 10
    for name, t in tiers["tiers"].items():
        assert t["equal"] and t["equal_after"] and t["complete"], name
        assert t["tiers"][name] == tiers["bytes"]  # every byte in the tier it is named for
        _sane(t["read_GBps"], repeats)
        _sane(t["gemv_ms"], repeats)
        assert [r["repeat"] for r in t["runs"]] == list(range(repeats))
    assert tiers["comparator"]["mode"] == "host-copy"
    _sane(tiers["comparator"]["copy_ms"], repeats)
    # Every mode once per repeat, in an order that changes from repeat to repeat.
    assert all(sorted(o) == sorted([*TIERS, "host-copy"]) for o in tiers["order"])
    assert len({tuple(o) for o in tiers["order"]}) > 1
    ratios = tiers["ratios"]
    assert {
        "gemv_host_over_pinned_h2d_time",
        "host_gemv_speed_vs_pinned_h2d",
        "host_read_over_pinned_h2d",
        "lease_read_over_local",
        "gemv_lease_over_local_time",
    } <= set(ratios)
    for r in ratios.values():
        _sane(r, repeats)
    speed, time_ratio = (
        ratios[k]["values"]
        for k in ("host_gemv_speed_vs_pinned_h2d", "gemv_host_over_pinned_h2d_time")
    )
    assert all(abs(a * b - 1) < 1e-9 for a, b in zip(speed, time_ratio, strict=True))

    assert [r["chunk_bytes"] for r in doc["remap"]] == [64 << 10, 1 << 20]
    for remap in doc["remap"]:
        assert remap["equal"] and remap["measured"] == doc["statistics"]["rounds"]
        assert all(r["remapped"] and r["equal"] and r["leases"] == 1 for r in remap["rounds"])
        _sane(remap["told_to_acked_ms"], remap["measured"])
        per_gib = remap["ms_per_GiB"]["median"] * remap["nbytes"] / (1 << 30)
        assert abs(per_gib - remap["told_to_acked_ms"]["median"]) < 1e-6
        assert remap["steps_median_ms"]["remap"] >= 0
    targets = doc["targets"]
    assert set(targets["remap_ms_per_GiB"]) == {str(64 << 10), str(1 << 20)}
    assert isinstance(targets["host_gemv_speed_vs_pinned_h2d"]["met"], bool)
    assert "values equal throughout: True" in proc.stdout
    assert out.with_suffix(".png").exists()
