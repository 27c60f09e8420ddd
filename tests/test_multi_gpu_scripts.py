"""The multi-GPU benchmarks and their one-command runner, on a machine with no GPU: they
import, parse their arguments, compute their targets, print the right commands, and run
end to end in --smoke mode (host lenders as plain processes, real leases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"  # on sys.path through pytest's pythonpath (pyproject.toml)


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


@pytest.mark.parametrize(
    "script",
    [
        "bench_tenant.py",
        "bench_aggregate.py",
        "bench_bandwidth.py",
        "placement_dryrun.py",
        "benchreader.py",
    ],
)
def test_scripts_parse_their_arguments(script):
    done = run(sys.executable, str(SCRIPTS / script), "--help", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_without_a_gpu_the_gpu_benchmarks_say_so():
    for script in ("bench_tenant.py", "bench_aggregate.py"):
        done = run(sys.executable, str(SCRIPTS / script), timeout=120)
        assert done.returncode == 2 and "no CUDA GPU" in done.stdout, done.stderr


def test_issue9_ratios_against_the_peer_ceiling():
    import bench_bandwidth

    mib = 1 << 20
    doc = {
        "peer_ceiling_1GiB": {"GBps": 400.0},
        "pinned_h2d_1GiB": {"GBps": 55.0},
        "sources": {
            "vmm_lease": {
                "single_copy": [
                    {"bytes": 16 * mib, "GBps": 200.0},
                    {"bytes": 64 * mib, "GBps": 370.0},
                    {"bytes": 1024 * mib, "GBps": 390.0},
                ]
            }
        },
    }
    got = bench_bandwidth.peer_targets(doc, {"vmm_lease": 330.0, "pinned_host_lease": 50.0})
    ratios = got["ratios"]
    assert ratios["large_read_min_over_peer_ceiling"] == 0.925  # 370 / 400: 16 MiB ignored
    assert ratios["gather16k_lease_over_peer_ceiling"] == 0.825
    assert ratios["large_read_min_over_pinned_h2d_1GiB"] == round(370 / 55, 3)
    assert got["met"] == {
        "large_read_min_over_peer_ceiling": True,
        "gather16k_lease_over_peer_ceiling": False,
        "large_read_min_over_pinned_h2d_1GiB": True,
        "gather16k_lease_over_pinned_h2d_1GiB": True,
    }


def test_placement_dry_run_writes_its_decisions(tmp_path):
    import placement_dryrun

    out = tmp_path / "placement.json"
    assert placement_dryrun.main(["--topology", "pairs4", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    first = doc["borrowers"][0]
    assert first["ranking"][0]["links"] == 2 and first["stripes"] == 3
    lenders = tmp_path / "lenders.json"
    lenders.write_text(
        json.dumps(
            [
                {
                    "id": f"n-gpu{i}",
                    "backend": "cuda-vmm",
                    "node": "n",
                    "capacity": 8 << 30,
                    "granted": 0,
                    "reclaimed": 0,
                    "state": "up",
                    "gpu_uuid": f"GPU-{i}",
                    "gpu_index": i,
                    "links": {f"GPU-{j}": 18 for j in range(4) if j != i},
                }
                for i in range(4)
            ]
        )
    )
    assert placement_dryrun.main(["--lenders-json", str(lenders), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [b["stripes"] for b in doc["borrowers"]] == [3, 3, 3, 3]


def test_runner_prints_one_command_per_part():
    env = {"HARVEST_DRY_RUN": "1", "HARVEST_GPUS": "2"}
    done = run("bash", str(SCRIPTS / "multi_gpu_runs.sh"), "x2", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [l.split()[0] for l in lines] == [
        "tests",
        "bandwidth",
        "tenant",
        "moe",
        "kv",
        "planner",
        "cachetests",
    ]
    text = done.stdout
    assert "HARVEST_LENDER_GPU=1 HARVEST_CLIENT_GPU=0 python3 -m pytest -m gpu" in text
    assert "bench_bandwidth.py --src-gpu 1 --dst-gpu 0" in text
    assert "bench_moe.py --lender-gpu 1 --device cuda:0" in text
    assert "bench_kv.py --lender-gpu 1" in text and "bench_planner.py --lender-gpu 1" in text
    done = run("bash", str(SCRIPTS / "multi_gpu_runs.sh"), "x8", env={**env, "HARVEST_GPUS": "8"})
    assert done.returncode == 0, done.stderr
    assert "--counts 1,2,4,7" in done.stdout
    assert "--tenant-gpus 4,5,6,7 --borrower-gpus 0,1,2,3" in done.stdout
    assert "bench_moe.py --lender-gpu 1,2,3,4,5,6,7 --device cuda:0" in done.stdout
    done = run("bash", str(SCRIPTS / "multi_gpu_runs.sh"), "x4", env={**env, "HARVEST_GPUS": "1"})
    assert done.returncode == 2 and "needs 3 GPUs" in done.stdout
    assert run("bash", str(SCRIPTS / "multi_gpu_runs.sh"), "x2", "nope", env=env).returncode == 2


@pytest.mark.slow
def test_aggregate_smoke_runs_end_to_end(tmp_path):
    out = tmp_path / "aggregate.json"
    done = run(
        sys.executable,
        str(SCRIPTS / "bench_aggregate.py"),
        "--smoke",
        "--counts",
        "1,2",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    assert [r["k"] for r in doc["fan_out"]] == [1, 2]
    assert [len(set(r["lenders"])) for r in doc["striped"]] == [1, 2]
    assert all(r["wrong"] == 0 for r in doc["fan_out"] + doc["striped"])
    assert all(r["grouped"] > 0 and r["random"] > 0 for r in doc["striped"])


@pytest.mark.slow
def test_tenant_smoke_runs_end_to_end(tmp_path):
    out = tmp_path / "tenant.json"
    done = run(
        sys.executable,
        str(SCRIPTS / "bench_tenant.py"),
        "--smoke",
        "--seconds",
        "0.5",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    assert len(doc["tenants"]) == 2 and doc["wrong_reads"] == 0
    assert all(t["read_gbps"] > 0 for t in doc["tenants"])
    reclaim = doc["reclaim"]
    assert reclaim["recovered"] and reclaim["revoked_readers_of_it"] == reclaim["readers_of_it"]
    assert reclaim["others_revoked"] == 0 and reclaim["others_gbps_during"] > 0
