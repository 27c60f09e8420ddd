"""scripts/gpu_bench.sh, every GPU figure in one command, checked on a machine with no GPU:
its syntax, the benchmarks it names (they exist and answer --help), its limits against
its budget, and its orchestration end to end with a stand-in Python (a part that passes,
one that fails, one that overruns its limit, one that leaves a process running)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_bench.sh"
PARTS = ["kv", "planner", "bandwidth", "reclaim", "moe"]  # the default, no H200 figures first
OPTIONAL = ["kv_batch8", "tenant_ramp", "place"]  # run only when named
BUDGET, GRACE, INSTALL = 540, 15, 30  # s: the call, a part's KILL grace, the wheels' install


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "HARVEST_WHEELS": "0", **(env or {})},
    )


def dry(*args: str, **env: str) -> list[str]:
    done = run(*args, env={"HARVEST_DRY_RUN": "1", **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def named_scripts() -> set[str]:
    names = set(re.findall(r"scripts/([\w/]+\.py)", SCRIPT.read_text()))
    lines = dry() + dry(*OPTIONAL)
    names |= {m for line in lines for m in re.findall(r"scripts/([\w/]+\.py)", line)}
    return names


def test_syntax():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_names_every_gpu_benchmark():
    assert named_scripts() == {
        "bench_bandwidth.py",
        "bench_reclaim.py",
        "bench_tenant_ramp.py",
        "bench_place.py",
        "bench_planner.py",
        "bench_kv.py",
        "bench_moe.py",
    }


@pytest.mark.parametrize("script", sorted(named_scripts()))
def test_every_named_script_exists_and_answers_help(script):
    path = REPO / "scripts" / script
    assert path.is_file(), path
    done = subprocess.run(
        [sys.executable, str(path), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_parts_limits_and_commands():
    lines = dry()
    assert [line.split()[0] for line in lines[:-1]] == PARTS
    limits = {line.split()[0]: int(line.split()[1]) for line in lines[:-1]}
    assert lines[-1] == f"limits: {sum(limits.values())} s in all, budget {BUDGET} s"
    # Every default part starts in one call even if each one before it runs to its limit:
    # the last one needs its limit and the KILL's grace left, after the wheels' install.
    assert sum(limits.values()) + GRACE + INSTALL <= BUDGET
    assert limits["moe"] >= 200  # measured on one H200: 198 s of its own clock, + import
    assert limits["reclaim"] < 135  # without the 64-holder row
    text = "\n".join(lines)
    # Shapes trimmed to fit, never repeats or steps (the scripts' defaults: 3 and 64).
    assert "--repeats" not in text and "--steps" not in text and "--decode" not in text
    assert (
        "bench_kv.py --lender-gpu 0 --contexts 8192,32768 --batches 1 --out bench/results/kv.json"
        in text
    )
    assert "bench_planner.py --lender-gpu 0 --tokens 16384 --out bench/results/planner.json" in text
    assert (
        "bench_bandwidth.py --src-gpu 0 --dst-gpu 0 --sizes 16KiB,1MiB,64MiB,1GiB "
        "--gather-blocks 16KiB,1MiB --out bench/results/bandwidth.json"
    ) in text
    assert "--configs 10GiB:4,40GiB:16 --rounds 3" in text and ":64" not in text
    assert "bench_moe.py --lender-gpu 0 --out bench/results/moe.json" in text
    assert not any(p in text for p in OPTIONAL)  # optional: named only


def test_optional_parts_run_by_name():
    lines = dry(*OPTIONAL)
    assert [line.split()[0] for line in lines[:-1]] == OPTIONAL
    limits = {line.split()[0]: int(line.split()[1]) for line in lines[:-1]}
    # kv_batch8 and tenant_ramp fit in a second call; place in a third, or beside tenant_ramp.
    for pair in (("kv_batch8", "tenant_ramp"), ("tenant_ramp", "place")):
        assert sum(limits[p] for p in pair) + GRACE + INSTALL <= BUDGET, pair
    text = "\n".join(lines)
    assert (
        "bench_kv.py --lender-gpu 0 --contexts 8192,32768 --batches 8 "
        "--out bench/results/kv_batch8.json"
    ) in text
    assert "bench_tenant_ramp.py --gpu 0 --out bench/results/tenant_ramp.json" in text
    assert "bench_place.py --gpu 0 --lender-gpu 0 --out bench/results/place.json" in text


def test_environment_adjusts_arguments_limits_and_the_64_holder_row():
    lines = dry(
        "reclaim",
        "moe",
        HARVEST_RECLAIM_64="1",
        HARVEST_MOE_ARGS="--lender-gpu 0 --models mixtral --out bench/results/m.json",
        HARVEST_MOE_TIMEOUT="200",
        HARVEST_GPU="3",
    )
    assert lines[0].startswith("reclaim 135 s:") and "40GiB:16,40GiB:64" in lines[0]
    assert "--gpu 3 " in lines[0]
    assert lines[1] == (
        "moe 200 s: python3 scripts/bench_moe.py --lender-gpu 0 --models mixtral "
        "--out bench/results/m.json"
    )
    assert run("nope").returncode == 2


STUB = """\
#!/usr/bin/env bash
# A stand-in for python3: writes its part's --out, or fails, overruns, or leaves a child.
[ "$1" = "--version" ] && { echo "Python stub"; exit 0; }
script="$(basename "$1")"; shift
out=""; while [ $# -gt 0 ]; do [ "$1" = "--out" ] && out="$2"; shift; done
case "$script" in
  bench_kv.py) echo "kv breaks"; exit 3 ;;
  bench_moe.py) trap 'echo interrupted; exit 130' INT; sleep 60 & wait; exit 0 ;;
  bench_planner.py) setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $! > "$STUB_PID" ;;
esac
mkdir -p "$(dirname "$out")" && echo '{"stub": true}' > "$out" && echo "wrote $out"
"""


def stub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    (tmp_path / "out").mkdir(exist_ok=True)
    return {
        "HARVEST_PYTHON": str(stub),
        "HARVEST_BENCH_RESULTS": str(tmp_path / "res"),  # not the repository's bench/results
        "OUT": str(tmp_path / "out"),
        "STUB_PID": str(tmp_path / "leftover.pid"),
        **extra,
    }


def summary_rows(stdout: str) -> tuple[dict[str, str], list[str]]:
    lines = stdout[stdout.index("== summary") :].splitlines()
    named = PARTS + OPTIONAL
    return {line.split()[0]: line for line in lines[1:] if line.split()[0] in named}, lines


def test_runs_each_part_under_its_limit_and_reports_which_finished(tmp_path):
    env = stub_env(
        tmp_path,
        HARVEST_MOE_TIMEOUT="2",
        HARVEST_KV_TIMEOUT="20",
        HARVEST_PLANNER_TIMEOUT="20",
        HARVEST_BANDWIDTH_TIMEOUT="20",
        HARVEST_BENCH_BUDGET_S="100",
    )
    res, out = tmp_path / "res", tmp_path / "out"
    began = time.monotonic()
    done = run("bandwidth", "planner", "kv", "moe", "tenant_ramp", env=env)
    assert time.monotonic() - began < 60  # moe was cut at its 2 s (+ the KILL's 15 s)
    assert done.returncode == 1, done.stdout + done.stderr
    rows, lines = summary_rows(done.stdout)
    assert " ok " in rows["bandwidth"] and " ok " in rows["planner"]
    assert "failed (exit 3)" in rows["kv"]
    assert "timed out (limit 2 s)" in rows["moe"]
    # 150 s of limit and 15 of grace do not fit in what is left of 100 s: never started.
    assert "not run: needs 150+15 s" in rows["tenant_ramp"]
    assert "== tenant_ramp (" not in done.stdout
    assert lines[-2:] == ["left for another call: scripts/gpu_bench.sh tenant_ramp", "exit 1"]
    # The process the planner part left running was ended, by the part's marker.
    pid = int((tmp_path / "leftover.pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "sleep" not in Path(
        f"/proc/{pid}/cmdline"
    ).read_text(errors="replace")
    assert "planner left processes running" in done.stdout
    # $OUT: the JSONs of the parts that wrote one, and one archive with everything.
    assert sorted(p.name for p in out.iterdir()) == [
        "bandwidth.json",
        "gpu_bench.tar.gz",
        "planner.json",
    ]
    with tarfile.open(out / "gpu_bench.tar.gz") as tar:
        names = {Path("/", name) for name in tar.getnames()}
    logs = res / "gpu_bench"
    assert {res / "bandwidth.json", res / "planner.json", logs / "summary.txt"} <= names
    assert {logs / f"{p}.log" for p in ("bandwidth", "planner", "kv", "moe")} <= names
    assert "kv breaks" in (logs / "kv.log").read_text()


def test_parts_left_for_another_call_exit_3(tmp_path):
    env = stub_env(tmp_path, HARVEST_BENCH_BUDGET_S="100")
    done = run("bandwidth", "tenant_ramp", env=env)
    assert done.returncode == 3, done.stdout + done.stderr
    rows, lines = summary_rows(done.stdout)
    assert " ok " in rows["bandwidth"] and "not run" in rows["tenant_ramp"]
    assert lines[-1] == "exit 3"


def test_usage_text_names_each_part_with_the_limit_it_runs_under():
    header = textwrap.dedent(
        "\n".join(l[2:] for l in SCRIPT.read_text().splitlines()[1:40] if l.startswith("#"))
    )
    for line in dry()[:-1] + dry(*OPTIONAL)[:-1]:
        part, limit = line.split()[:2]
        assert re.search(rf"^  {part}\s+{limit}\s+bench_", header, re.M), (part, limit)
