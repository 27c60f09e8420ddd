"""Pieces the multi-GPU benchmarks share (bench_tenant, bench_aggregate): a node of host
lenders as plain processes for their --smoke runs on a CPU, worker processes that speak
JSON lines (scripts/benchreader.py, tenants), and small helpers for GPUs and results.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator

from benchkit.node import REPO, BenchNode, node_env

# The borrower program (benchkit.reader's command line), run as a worker.
READER = str(REPO / "scripts" / "benchreader.py")


@contextlib.contextmanager
def plain_host_node(
    lenders: int = 3, host_bytes: str = "256MiB", ttl: float = 30.0, grace: float = 2.0
) -> Iterator[BenchNode]:
    """A broker and ``lenders`` host lenders as plain processes (no Ray) in a fresh state
    dir: what a --smoke run needs on a machine with no GPU; stopped at the end."""
    state = Path(tempfile.mkdtemp(prefix="hv-bench-", dir="/tmp"))
    node = BenchNode(state, node_env(state))
    os.environ["HARVEST_STATE_DIR"] = str(state)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "harvestd.broker",
                "--state-dir",
                str(state),
                "--ttl",
                str(ttl),
                "--grace",
                str(grace),
            ],
            env=node.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        _wait(lambda: (state / "broker.sock").exists(), 60, "the broker")
        for i in range(lenders):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "lender",
                        "--id",
                        f"host-{i}",
                        "--state-dir",
                        str(state),
                        "--host-bytes",
                        host_bytes,
                        "--report-interval",
                        "0.5",
                    ],
                    env=node.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        _wait(lambda: _up(node) >= lenders, 120, "the lenders")
        yield node
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(state, ignore_errors=True)


def _up(node: BenchNode) -> int:
    try:
        return sum(1 for l in node.lenders() if l["state"] == "up")
    except RuntimeError:
        return 0


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def pipes(proc: subprocess.Popen[str]) -> tuple[IO[str], IO[str]]:
    """The stdin and stdout of ``proc``, started with both piped."""
    if proc.stdin is None or proc.stdout is None:
        raise ValueError("the process was started without stdin and stdout pipes")
    return proc.stdin, proc.stdout


class Worker:
    """A child process driven by lines on stdin, answering JSON lines on stdout."""

    def __init__(self, args: list[str], env: dict[str, str], name: str) -> None:
        self.name = name
        # A file, not a pipe: a chatty child must never block on a full stderr pipe.
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            env=env,
            cwd=REPO,
        )
        self.stdin, self.stdout = pipes(self.proc)

    def stderr_tail(self, chars: int = 2000) -> str:
        """The end of what it wrote on stderr."""
        self.err.seek(0)
        return self.err.read()[-chars:]

    def send(self, line: str) -> None:
        """One command."""
        self.stdin.write(line + "\n")
        self.stdin.flush()

    def expect(self, event: str, timeout: float = 120.0) -> dict[str, Any]:
        """The next answer whose ``event`` is ``event``; RuntimeError on an ``error``
        answer, on exit, or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: no {event!r} within {timeout:.0f} s")
            ready, _, _ = select.select([self.stdout], [], [], left)
            if not ready:
                continue
            line = self.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited ({self.proc.wait()}): {self.stderr_tail()}")
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if msg.get("event") == "error":
                raise RuntimeError(f"{self.name}: {msg.get('error')}")
            if msg.get("event") == event:
                return msg

    def ask(self, line: str, event: str, timeout: float = 120.0) -> dict[str, Any]:
        """Send a command and wait for its answer."""
        self.send(line)
        return self.expect(event, timeout)

    def close(self) -> None:
        """Ask it to exit; kill it if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.send("exit")
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def reader(device: str, env: dict[str, str], *extra: str) -> Worker:
    """A borrower process (scripts/benchreader.py) on ``device``, once it is up."""
    worker = Worker([READER, "--device", device, *extra], env, f"reader {device}")
    worker.expect("hello", timeout=180)
    return worker


def cuda_uuids() -> list[str]:
    """The GPU UUID of every CUDA ordinal this process sees ([] without CUDA)."""
    from benchkit.peer import gpu_count
    from client.devices import cuda_uuid

    return [cuda_uuid(i) for i in range(gpu_count())]


def lender_of(lenders: list[dict[str, Any]], gpu_uuid: str) -> str:
    """The id of the lender on GPU ``gpu_uuid``."""
    for lender in lenders:
        if lender["gpu_uuid"] == gpu_uuid:
            return lender["id"]
    raise RuntimeError(f"no lender on {gpu_uuid}")


def write_json(doc: dict[str, Any], out: str | Path) -> Path:
    """Write the result document; its path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path
