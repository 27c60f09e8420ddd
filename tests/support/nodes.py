"""Nodes under test: real processes, real sockets, and (for :func:`started_node`) real
Ray. A :class:`Node` is a state dir with the CLI and clients pointed at it;
:class:`PlainNode` and :class:`ManyLenderNode` run the broker and host lenders as plain
processes, which start fast and can be killed piece by piece."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from support.env import PY, node_env
from support.holder import Holder
from support.sockets import short_tmpdir
from support.waiting import wait_for

if TYPE_CHECKING:
    from client import Client


class Node:
    """A node under test: its state dir, its CLI, and clients connected to it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def cli(
        self, *args: str, timeout: float = 120.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``harvestd ARGS --state-dir D``."""
        cmd = [PY, "-m", "harvestd", *args]
        if args and args[0] not in ("--help", "--version"):
            cmd += ["--state-dir", str(self.state_dir)]
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=node_env()
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{cmd} failed ({result.returncode}): {result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        """Run a read command with ``--json`` and parse its output."""
        return json.loads(self.cli(*args, "--json", check=True).stdout)

    def connect(self, **kwargs: Any) -> Client:
        """A client of this node, in this process."""
        from client import connect

        return connect(state_dir=str(self.state_dir), **kwargs)

    def lender_id(self) -> str:
        """The first lender's id."""
        lender_id: str = self.json("lenders")[0]["id"]
        return lender_id

    def spawn(self, program: Path | str, *args: str, **env: str) -> Holder:
        """Run a client program in a new process with this node's state dir (and ``env``)
        in its environment: ``program`` is a script's path (see :mod:`support.programs`)
        or a Python snippet's source."""
        if isinstance(program, Path):
            cmd = [PY, "-u", str(program), *args]
        else:
            cmd = [PY, "-u", "-c", textwrap.dedent(program), *args]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=node_env(HARVEST_STATE_DIR=str(self.state_dir), **env),
        )
        return Holder(proc)


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
        lender_args: Sequence[str] = (),
    ) -> None:
        super().__init__(state_dir)
        self.metrics_port = metrics_port
        self.lender_args = tuple(lender_args)  # more options for the lender's command line
        self.host_bytes = host_bytes
        self.ttl = ttl
        self.grace = grace
        self.id = lender_id
        self.broker: subprocess.Popen[bytes] | None = None
        self.lender: subprocess.Popen[bytes] | None = None

    def start_broker(self) -> None:
        """Start (or restart) the broker process and wait for it to answer."""
        from harvestd.node import broker_ready

        broker = subprocess.Popen(
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
            env=node_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.broker = broker
        address = f"unix://{self.state_dir}/broker.sock"
        wait_for(
            lambda: broker.poll() is not None or broker_ready(address), what="broker to answer"
        )
        assert broker.poll() is None, "broker exited at start"

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
                *self.lender_args,
            ],
            env=node_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            lambda: any(l["id"] == self.id and l["state"] == "up" for l in self.json("lenders")),
            what="lender to register",
        )

    def processes(self) -> list[subprocess.Popen[bytes] | None]:
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
        self, state_dir: Path, lenders: int = 3, host_bytes: str = "32MiB", **kwargs: Any
    ) -> None:
        super().__init__(state_dir, host_bytes=host_bytes, **kwargs)
        self.ids = [f"host-{chr(ord('a') + i)}" for i in range(lenders)]
        self.lenders: dict[str, subprocess.Popen[bytes]] = {}

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
                env=node_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        wait_for(
            lambda: {l["id"] for l in self.json("lenders") if l["state"] == "up"} >= set(self.ids),
            timeout=60,
            what="every lender to register",
        )

    def processes(self) -> list[subprocess.Popen[bytes] | None]:
        """Every lender's process, then the broker's."""
        return [*self.lenders.values(), self.broker]


@contextlib.contextmanager
def running_plain_node(**kwargs: Any) -> Iterator[PlainNode]:
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
