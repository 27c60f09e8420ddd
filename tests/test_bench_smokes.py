"""The benchmarks' CPU smokes that no other test runs: scripts/bench_bandwidth.py --smoke
(the CPU twin: a host lease against local memory) and scripts/bench_planner.py --smoke
(host leases, tiny shapes), each end to end in a subprocess at its smallest settings,
writing to tmp_path; the JSON is checked for the keys the README and docs/benchmarks.md
figures come from, finite positive numbers, ratios against a baseline of the same run, and
the verdicts. The others run elsewhere: moe, kv, place (tests/test_bench_*_smoke.py),
control_plane --quick (test_bench_control_plane.py), reclaim and tenant_ramp
(test_bench_tenant.py), aggregate and tenant (test_multi_gpu_scripts.py)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support.env import PY, REPO, node_env

SCRIPTS = REPO / "scripts"
KIB = 1024

# The ratio names of a GPU run of bench_bandwidth.py (its run()); the twin keeps them all.
BANDWIDTH_RATIOS = {
    "gather16k_lease_over_local",
    "gather16k_pinned_host_lease_over_pinned_h2d_1GiB",
    "gather16k_lease_over_pinned_host_lease",
    "gather16k_lease_over_loop_copy_16k",
}
NEEDS_GPU = {
    "gather16k_pinned_host_lease_over_pinned_h2d_1GiB",
    "gather16k_lease_over_pinned_host_lease",
}
PLANNER_SHAPES = {"opt-6.7b/16", "opt-13b/16", "llama-3-8b/16"}  # bench_planner.SMOKE_SHAPES
PLANNER_TARGETS = {
    "mha_speedup_ge_1.3",
    "planner_within_10pct_of_best_sweep",
    "gqa_no_recompute",
    "results_verified",
}


def _smoke(script: str, out: Path, *args: str, timeout: float) -> tuple[dict[str, Any], str]:
    """Run ``script --smoke ARGS --out OUT``; its JSON and stdout (exit status 0 asserted)."""
    proc = subprocess.run(
        [PY, str(SCRIPTS / script), "--smoke", *args, "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=node_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_bandwidth_smoke_reads_a_host_lease_against_local_memory(tmp_path):
    out = tmp_path / "bandwidth.json"
    doc, stdout = _smoke("bench_bandwidth.py", out, timeout=120)
    # Labelled as the CPU twin, with nothing of a GPU run's in it.
    assert doc["platform"] == "cpu" and doc["smoke"] is True
    assert doc["device"].startswith("cpu: ") and "not comparable" in doc["twin"]
    assert "wall clock" in doc["timing"]
    assert not {"dst_gpu", "src_gpu", "pinned_h2d_1GiB", "vmm_lifecycle"} & set(doc)
    assert doc["lease"]["backend"] == "host" and doc["lease"]["bytes"] == doc["source_bytes"]

    # The table's rows: every copy size and gather block size, per source.
    assert set(doc["sources"]) == {"host_lease", "local_cpu"}
    for name, src in doc["sources"].items():
        assert src["single_copy"] and src["gather"], name
        for row in src["single_copy"] + src["gather"]:
            assert _positive(row["GBps"]) and _positive(row["us"]) and row["reps"] >= 5, row
            assert row["GBps"] == pytest.approx(row["bytes"] / row["us"] / 1e3), row
        assert 16 * KIB in {r["block_bytes"] for r in src["gather"]}, name
        for row in src["gather"]:
            assert row["bytes"] == row["block_bytes"] * row["blocks"] and row["inner"] == 5
    assert _positive(doc["loop_copy_16k_lease"]["GBps"])
    assert all(_positive(v) for v in doc["lease_lifecycle"].values() if not isinstance(v, str))
    for per_word in doc["gather16k_by_word"].values():
        assert set(per_word) == {"uint8", "int32", "int64", "complex128"}

    # Ratios: the GPU run's names; the twin's from figures of this same run, the rest null.
    g16 = {
        name: next(r["GBps"] for r in src["gather"] if r["block_bytes"] == 16 * KIB)
        for name, src in doc["sources"].items()
    }
    ratios = doc["ratios"]
    assert set(ratios) == BANDWIDTH_RATIOS
    assert all(ratios[k] is None for k in NEEDS_GPU)
    assert ratios["gather16k_lease_over_local"] == round(g16["host_lease"] / g16["local_cpu"], 3)
    assert ratios["gather16k_lease_over_loop_copy_16k"] == round(
        g16["host_lease"] / doc["loop_copy_16k_lease"]["GBps"], 3
    )
    assert all(_positive(ratios[k]) for k in BANDWIDTH_RATIOS - NEEDS_GPU)
    assert set(doc["ratio_baselines"]) == BANDWIDTH_RATIOS - NEEDS_GPU

    assert doc["gather_verified"] is True  # the verdict: the right bytes moved
    assert "CPU twin (not GPU figures)" in stdout and "n/a (needs a GPU)" in stdout
    assert out.with_suffix(".png").exists()


def test_bandwidth_without_a_gpu_or_smoke_says_so():
    """The GPU run, with the arguments scripts/gpu_bench.sh passes, on a machine with no
    GPU: it parses them, measures nothing and says why (exit status 2)."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the GPU run would measure it")
    args = "--src-gpu 0 --dst-gpu 0 --sizes 16KiB,1MiB,64MiB,1GiB --gather-blocks 16KiB,1MiB"
    proc = subprocess.run(
        [PY, str(SCRIPTS / "bench_bandwidth.py"), *args.split(), "--out", "/nonexistent/x.json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=node_env(),
    )
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_planner_smoke_splits_each_shape_against_transfer_only(tmp_path):
    out = tmp_path / "planner.json"
    doc, stdout = _smoke(
        "bench_planner.py",
        out,
        *("--tokens", "512", "--repeats", "3", "--warmup", "1", "--sweep", "3"),
        timeout=240,
    )
    assert doc["smoke"] is True and doc["device"] == "cpu" and "wall clock" in doc["timing"]
    assert doc["host_lease"]["pinned"] is False
    assert doc["peer_lease"]["backend"] == "host" and doc["peer_lease"]["same_gpu"] is False
    assert "smoke" in doc["peer_lease"]["note"]  # a host lease stands in for the GPU lease
    assert doc["baseline"]["what"] == "CPU memcpy (smoke)" and _positive(doc["baseline"]["GBps"])

    rows = doc["rows"]
    assert {r["shape"] for r in rows} == PLANNER_SHAPES and {r["tokens"] for r in rows} == {512}
    for row in rows:
        plans = [row["transfer_only"], row["planner"], row["three_way"], *row["sweep"]]
        for plan in plans:
            assert _positive(plan["measured_ms"]), (row["shape"], plan)
            assert math.isfinite(plan["predicted_ms"]) and plan["predicted_ms"] >= 0
            assert plan["recompute"] + plan["peer"] + plan["host"] == row["tokens"], plan
            assert plan["check"]["ok"] and plan["check"]["copied_exact"], plan
        transfer, planner = row["transfer_only"], row["planner"]
        assert transfer["recompute"] == 0 and transfer["peer"] == 0  # transfer alone, l = 0
        assert planner["peer"] == 0 and planner["reason"]  # KVPR: host + recompute only
        assert row["three_way"]["reason"]
        # The figures' ratios, against baselines measured in this same run.
        assert row["speedup_planner_over_transfer"] == pytest.approx(
            transfer["measured_ms"] / planner["measured_ms"]
        )
        best = row["best_sweep"]
        assert best["measured_ms"] == min(p["measured_ms"] for p in row["sweep"])
        assert row["planner_over_best_sweep"] == pytest.approx(
            planner["measured_ms"] / best["measured_ms"]
        )
        if row["mha"]:  # the sweep of the recomputed share: 0, half, all
            assert [p["recompute"] for p in row["sweep"]] == [0, 256, 512]
        else:  # GQA: recomputation never pays, nothing to sweep
            assert [p["recompute"] for p in row["sweep"]] == [0]
            assert planner["recompute"] == 0 and row["three_way"]["recompute"] == 0

    # The verdicts: each target says whether it was met, with the figures it judged.
    targets = doc["targets"]
    assert set(targets) == PLANNER_TARGETS
    assert all(isinstance(t["met"], bool) for t in targets.values())
    mha = [r for r in rows if r["mha"]]
    assert targets["mha_speedup_ge_1.3"]["values"] == [
        r["speedup_planner_over_transfer"] for r in mha
    ]
    assert targets["planner_within_10pct_of_best_sweep"]["values"] == [
        r["planner_over_best_sweep"] for r in rows
    ]
    assert targets["gqa_no_recompute"]["met"] is True
    assert targets["results_verified"]["met"] is True  # else the script exits 1
    assert "MET  results_verified" in stdout
    assert out.with_suffix(".png").exists()


@pytest.mark.parametrize(
    "script", ["bench_vmm_release.py", "bench_driver_ramp.py", "bench_watch_cost.py"]
)
def test_driver_probes_refuse_cleanly_without_a_gpu(tmp_path: Path, script: str):
    """The GPU probes (the driver's release calls, the tenant's ramp floor, what the
    lender's watch costs the tenant) measure the GPU itself: with no GPU each exits 2 with
    a one-line reason, not a traceback, and writes nothing."""
    out = tmp_path / "probe.json"
    proc = subprocess.run(
        [PY, str(SCRIPTS / script), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=node_env(),
    )
    assert proc.returncode == 2, proc.stderr
    assert "needs NVIDIA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
