"""A Harvest node for a benchmark: started in a fresh state dir, stopped at the end.

    from benchkit.node import bench_node
    with bench_node(backend="cuda-vmm", gpus="0", cap="24GiB", host_bytes="16GiB") as node:
        client = node.connect()
        ...

Also what every benchmark shares: the repository's root (results go under
``bench/results/``), the environment of a node's processes, quiet attention kernels and
matplotlib when it is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[2]  # scripts/benchkit/node.py


@dataclass
class BenchNode:
    """A running node: its state dir and the environment that finds it."""

    state_dir: Path
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 300) -> str:
        """Run ``harvestd ARGS``; its stdout, or ``RuntimeError`` with its stderr."""
        result = subprocess.run(
            [sys.executable, "-m", "harvestd", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"harvestd {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def lenders(self) -> list[dict[str, Any]]:
        """``harvestd lenders --json``."""
        return json.loads(self.cli("lenders", "--json"))

    def connect(self) -> Any:
        """A client of this node."""
        from client import connect

        return connect(state_dir=str(self.state_dir))


def node_env(state_dir: Path) -> dict[str, str]:
    """The environment under which ``harvestd`` and clients find the node in ``state_dir``."""
    env = {
        **os.environ,
        "HARVEST_STATE_DIR": str(state_dir),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    env.pop("HARVEST_ADDRESS", None)
    return env


@contextlib.contextmanager
def bench_node(
    backend: str = "host",
    *,
    gpus: str | None = None,
    cap: str | None = None,
    reserve: str | None = None,
    host_bytes: str | None = None,
    ttl: float = 30.0,
    grace: float = 2.0,
    plain: bool = True,
    timeout: float = 300.0,
) -> Iterator[BenchNode]:
    """Start a node (``harvestd start --detach``) in a new state dir, yield it, stop it.

    ``plain`` runs the broker as a plain process (no Ray actor for it), which starts
    faster; the lenders are Ray actors either way."""
    state = Path(tempfile.mkdtemp(prefix="hv-bench-", dir="/tmp"))
    node = BenchNode(state, node_env(state))
    os.environ["HARVEST_STATE_DIR"] = str(state)
    args = [
        "start",
        "--detach",
        "--backend",
        backend,
        "--ttl",
        str(ttl),
        "--grace",
        str(grace),
        "--timeout",
        str(timeout),
    ]
    for flag, value in (
        ("--gpus", gpus),
        ("--cap", cap),
        ("--reserve", reserve),
        ("--host-bytes", host_bytes),
    ):
        if value is not None:
            args += [flag, value]
    if plain:
        args.append("--no-ray-broker")
    began = time.monotonic()
    try:
        node.cli(*args, timeout=timeout + 30)
        print(f"node up in {time.monotonic() - began:.1f} s ({state})", flush=True)
        yield node
    finally:
        with contextlib.suppress(Exception):
            node.cli("stop", timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def steady_attention() -> str:
    """Keep scaled-dot-product attention off cuDNN for a benchmark, and say so.

    On the lent H100 (torch 2.11), decode steps whose key length the process had not
    seen before ran at 50-70 ms instead of 6: cuDNN's attention builds a plan for every
    new shape, and a decode step has a new key length each time. The first mode measured
    paid for that and the modes after it (same shapes) did not, which made the everything
    -resident ceiling look slower than Harvest. Flash and memory-efficient attention need
    no per-shape plan; every mode of a run uses the same kernels."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
        return "cuDNN attention off (flash / memory-efficient SDPA)"
    return "CPU attention"


def pyplot() -> Any:
    """matplotlib's pyplot (Agg), or None when matplotlib is missing (then say so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    return plt
