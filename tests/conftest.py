"""Fixtures that run real Harvest nodes: real processes, real Ray, real sockets."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def _env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    env.pop("HARVEST_ADDRESS", None)
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def short_tmpdir() -> Path:
    """A state dir short enough for Unix socket paths, whatever pytest's tmp_path is."""
    return Path(tempfile.mkdtemp(prefix="hv-", dir="/tmp"))


class Clock:
    """A clock a test moves by hand (``clock.now += 5``), for the lease table's tests."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 20.0,
    every: float = 0.05,
    what: str = "condition",
):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


class Node:
    """A node under test: its state dir, its CLI, and clients connected to it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def cli(
        self, *args: str, timeout: float = 120.0, check: bool = False
    ) -> subprocess.CompletedProcess:
        """Run ``harvestd ARGS --state-dir D``."""
        cmd = [PY, "-m", "harvestd", *args]
        if args and args[0] not in ("--help", "--version"):
            cmd += ["--state-dir", str(self.state_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
        if check and result.returncode != 0:
            raise AssertionError(f"{cmd} failed ({result.returncode}): {result.stderr}")
        return result

    def json(self, *args: str):
        """Run a read command with ``--json`` and parse its output."""
        return json.loads(self.cli(*args, "--json", check=True).stdout)

    def connect(self, **kwargs):
        """A client of this node, in this process."""
        from client import connect

        return connect(state_dir=str(self.state_dir), **kwargs)

    def lender_id(self) -> str:
        """The first lender's id."""
        return self.json("lenders")[0]["id"]

    def spawn(self, code: str, *args: str) -> "Holder":
        """Run a Python snippet in a new process with this node's state dir in its env."""
        proc = subprocess.Popen(
            [PY, "-u", "-c", textwrap.dedent(code), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(HARVEST_STATE_DIR=str(self.state_dir)),
        )
        return Holder(proc)


class Holder:
    """A client process that speaks JSON lines on stdout and takes commands on stdin."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pid = proc.pid

    def read(self, timeout: float = 30.0) -> dict:
        """The next JSON line the process printed."""
        import select

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("holder printed nothing in time; stderr: " + self._stderr())
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise AssertionError("holder exited; stderr: " + self._stderr())
                if line.startswith("{"):
                    return json.loads(line)

    def expect(self, event: str, timeout: float = 30.0) -> dict:
        """Read lines until one whose ``event`` is ``event``."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.read(max(0.1, deadline - time.monotonic()))
            if msg.get("event") == event:
                return msg

    def send(self, line: str) -> None:
        """Write a command line to the process's stdin (nothing if it has exited)."""
        if self.proc.poll() is not None:
            return
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it exited between the check and the write

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read()[-3000:]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit; its return code."""
        try:
            return self.proc.wait(timeout)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    stream.close()
                except Exception:  # noqa: BLE001
                    pass


class PlainNode(Node):
    """A broker and a host lender as plain processes (no Ray): fast to start, easy to
    kill, stop and restart piece by piece."""

    def __init__(
        self,
        state_dir: Path,
        host_bytes: str = "64MiB",
        ttl: float = 2.0,
        grace: float = 1.0,
        lender_id: str = "host-a",
        metrics_port: int = 0,
    ) -> None:
        super().__init__(state_dir)
        self.metrics_port = metrics_port
        self.host_bytes = host_bytes
        self.ttl = ttl
        self.grace = grace
        self.id = lender_id
        self.broker: subprocess.Popen | None = None
        self.lender: subprocess.Popen | None = None

    def start_broker(self) -> None:
        """Start (or restart) the broker process and wait for it to answer."""
        from harvestd.node import broker_ready

        self.broker = subprocess.Popen(
            [
                PY,
                "-m",
                "harvestd.broker",
                "--state-dir",
                str(self.state_dir),
                "--ttl",
                str(self.ttl),
                "--grace",
                str(self.grace),
                "--metrics-port",
                str(self.metrics_port),
            ],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        address = f"unix://{self.state_dir}/broker.sock"
        wait_for(
            lambda: self.broker.poll() is not None or broker_ready(address), what="broker to answer"
        )
        assert self.broker.poll() is None, "broker exited at start"

    def start_lender(self) -> None:
        """Start the host lender process and wait for it to register."""
        self.lender = subprocess.Popen(
            [
                PY,
                "-m",
                "lender",
                "--id",
                self.id,
                "--state-dir",
                str(self.state_dir),
                "--host-bytes",
                self.host_bytes,
                "--report-interval",
                "0.3",
                "--metrics-port",
                str(self.metrics_port + 1 if self.metrics_port else 0),
            ],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            lambda: any(l["id"] == self.id and l["state"] == "up" for l in self.json("lenders")),
            what="lender to register",
        )

    def processes(self) -> list[subprocess.Popen | None]:
        """The node's processes, lenders first (those not started are None)."""
        return [self.lender, self.broker]

    def stop(self) -> None:
        """Kill every process of the node: SIGTERM, then SIGKILL after 10 s."""
        for proc in self.processes():
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


class ManyLenderNode(PlainNode):
    """A broker and several host lenders, each a plain process (like :class:`PlainNode`):
    what striped leases need on a machine with no GPU."""

    def __init__(
        self, state_dir: Path, lenders: int = 3, host_bytes: str = "32MiB", **kwargs
    ) -> None:
        super().__init__(state_dir, host_bytes=host_bytes, **kwargs)
        self.ids = [f"host-{chr(ord('a') + i)}" for i in range(lenders)]
        self.lenders: dict[str, subprocess.Popen] = {}

    def start_lenders(self) -> None:
        """Start every lender process, then wait until all have registered."""
        for lender_id in self.ids:
            self.lenders[lender_id] = subprocess.Popen(
                [
                    PY,
                    "-m",
                    "lender",
                    "--id",
                    lender_id,
                    "--state-dir",
                    str(self.state_dir),
                    "--host-bytes",
                    self.host_bytes,
                    "--report-interval",
                    "0.3",
                ],
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        wait_for(
            lambda: {l["id"] for l in self.json("lenders") if l["state"] == "up"} >= set(self.ids),
            timeout=60,
            what="every lender to register",
        )

    def processes(self) -> list[subprocess.Popen | None]:
        """Every lender's process, then the broker's."""
        return [*self.lenders.values(), self.broker]


@contextlib.contextmanager
def running_plain_node(**kwargs) -> Iterator[PlainNode]:
    """A :class:`PlainNode` (``kwargs`` go to it) with its broker and lender started in a
    fresh state dir; stopped and removed afterwards."""
    node = PlainNode(short_tmpdir(), **kwargs)
    try:
        node.start_broker()
        node.start_lender()
        yield node
    finally:
        node.stop()
        shutil.rmtree(node.state_dir, ignore_errors=True)


@contextlib.contextmanager
def started_node(*start_args: str, timeout: float = 300) -> Iterator[Node]:
    """A node started by ``harvestd start --detach *start_args`` (real Ray, the broker
    actor, lender actors) in a fresh state dir; stopped and removed afterwards."""
    node = Node(short_tmpdir())
    try:
        result = node.cli("start", "--detach", *start_args, timeout=timeout)
        assert result.returncode == 0, f"harvestd start failed: {result.stderr}"
        yield node
    finally:
        node.cli("stop", timeout=120)
        shutil.rmtree(node.state_dir, ignore_errors=True)


@pytest.fixture
def plain_node():
    """A fresh plain-process node per test: TTL 2 s, grace 1 s, 64 MiB of host memory."""
    with running_plain_node() as node:
        yield node


@pytest.fixture(scope="module")
def many_lender_node():
    """A broker and three host lenders (32 MiB each) as plain processes, per module."""
    node = ManyLenderNode(short_tmpdir())
    node.start_broker()
    node.start_lenders()
    yield node
    node.stop()
    shutil.rmtree(node.state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_node():
    """One real node for the session, started by the CLI: Ray, the broker actor and a
    host lender actor (256 MiB, TTL 3 s, grace 1 s)."""
    with started_node(
        "--backend", "host", "--host-bytes", "256MiB", "--ttl", "3", "--grace", "1", timeout=240
    ) as node:
        yield node


# A holder process: leases N bytes, fills them with its marker byte, then keeps
# verifying them under lease.use() until it is revoked or told to stop. It reports on
# stdout as JSON lines; a read that ever sees a wrong byte is counted as "wrong".
HOLDER = r"""
import json, sys, threading, time, torch
from client import connect, LeaseRevoked
nbytes, marker, ttl = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
c = connect()
lease = c.lease(nbytes, ttl=ttl)
t = lease.tensor(torch.uint8)
t.fill_(marker)
revoked = threading.Event()
def on_revoke(l, why):
    print(json.dumps({"event": "revoked", "id": l.id, "reason": why}), flush=True)
    revoked.set()
lease.on_revoke(on_revoke)
print(json.dumps({"event": "leased", "id": lease.id, "lender": lease.lender,
                  "nbytes": lease.nbytes, "generation": lease.generation}), flush=True)
reads = wrong = 0
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
while not stop.is_set() and not revoked.is_set():
    try:
        with lease.use():
            ok = bool((t == marker).all())
        reads += 1  # counted only when use() vouched for the read
        wrong += not ok
    except LeaseRevoked:
        break
    time.sleep(0.01)
if lease.state == "revoked":
    revoked.wait(10)  # the callback runs on the revoking thread: let it report first
print(json.dumps({"event": "done", "reads": reads, "wrong": wrong,
                  "state": lease.state}), flush=True)
c.close()
"""
