"""The broker: the lease table behind a gRPC server, with the clock that expires leases.

It runs as a named, detached Ray actor (:func:`broker_actor_class`), or as a plain
process (``python -m harvestd.broker --state-dir D``) where Ray is not wanted.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc

from harvestd.broker_metrics import BrokerMetrics
from harvestd.errors import InvalidArgument
from harvestd.paths import StateDir
from harvestd.service import BrokerService, EventHub
from harvestd.store import SqliteStore
from harvestd.table import LeaseTable, Timing
from protos import harvest_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

BROKER_ACTOR_NAME = "harvest-broker"
RAY_NAMESPACE = "harvest"


@dataclass(frozen=True)
class BrokerConfig:
    """How a broker runs."""

    state_dir: str
    listen: str = ""  # extra TCP address (loopback only); the Unix socket is always on
    timing: Timing = Timing()
    sweep_interval_s: float = 0.05
    max_workers: int = 256  # each open watch stream holds one
    metrics_port: int = 0  # 0: no metrics endpoint
    log_format: str = "text"
    log_level: str = "info"


def check_listen(listen: str) -> str:
    """Refuse to listen beyond loopback: that needs TLS and a shared token (not built yet)."""
    if not listen:
        return listen
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit():
        raise InvalidArgument(f"listen address {listen!r} must be HOST:PORT")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InvalidArgument(f"refusing to listen on {host}: only loopback is allowed without TLS")
    return listen


class BrokerServer:
    """A running broker: store, table, gRPC server and sweeper."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.state = StateDir.resolve(config.state_dir).create()
        listen = check_listen(config.listen)
        self.store = SqliteStore(str(self.state.store_path))
        self.hub = EventHub(lambda: self.table)
        self.metrics = BrokerMetrics(lambda: self.table)
        self.table = LeaseTable(
            self.store, notifier=self.hub, timing=config.timing, observer=self.metrics
        )
        self.address = self.state.broker_address
        self.service = BrokerService(self.table, self.hub, self.address, str(self.state.store_path))
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers),
            maximum_concurrent_rpcs=config.max_workers * 4,
        )
        pb_grpc.add_BrokerServicer_to_server(self.service, self.server)
        if self.state.broker_socket.exists():
            self.state.broker_socket.unlink()
        self.server.add_insecure_port(self.address)
        self.tcp_port = self.server.add_insecure_port(listen) if listen else 0
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="harvest-sweeper", daemon=True)

    def start(self) -> "BrokerServer":
        """Serve until :meth:`stop`."""
        old = os.umask(0o077)  # the socket is private to this user
        try:
            self.server.start()
        finally:
            os.umask(old)
        os.chmod(self.state.broker_socket, 0o600)
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port)
        self._sweeper.start()
        log.info("broker serving on %s (store %s)", self.address, self.state.store_path)
        return self

    def _sweep(self) -> None:
        while not self._stop.wait(self.config.sweep_interval_s):
            try:
                self.table.sweep()
            except Exception:  # noqa: BLE001 - the clock must keep ticking
                log.exception("sweep failed")

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving and close the store."""
        self._stop.set()
        self.service.stop()
        self.server.stop(grace).wait()
        self.store.close()
        log.info("broker stopped")

    def wait(self) -> None:
        """Block until the server ends."""
        self.server.wait_for_termination()


def watch_ray_nodes(table: LeaseTable, stop: threading.Event, interval_s: float = 0.5) -> None:
    """End the leases of lenders whose Ray node died, as soon as Ray says so (rather than
    when they miss their reports)."""
    import ray

    while not stop.wait(interval_s):
        try:
            dead = {n["NodeID"] for n in ray.nodes() if not n.get("Alive", True)}
        except Exception as exc:  # noqa: BLE001 - GCS hiccups: try again next time
            log.info("cannot read Ray's node table: %s", exc)
            continue
        if not dead:
            continue
        with table.lock:
            lost = [
                l.id
                for l in table.lenders.values()
                if l.ray_node_id in dead and l.state.label != "down"
            ]
        if lost:
            table.lenders_lost(lost, "node lost")


def broker_actor_class():
    """The broker as a Ray actor class (built lazily so that importing needs no Ray)."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)
    class BrokerActor:
        """A detached Ray actor that serves the broker; Ray restarts it if it dies, and it
        carries on from its store."""

        def __init__(self, config: BrokerConfig) -> None:
            from harvestd.logs import setup_logging

            setup_logging(
                StateDir.resolve(config.state_dir).logs_dir / "broker.log",
                config.log_level,
                config.log_format,
            )
            self.server = BrokerServer(config).start()
            self._stop = threading.Event()
            threading.Thread(
                target=watch_ray_nodes,
                args=(self.server.table, self._stop),
                name="harvest-node-watch",
                daemon=True,
            ).start()

        def address(self) -> str:
            """The broker's gRPC target."""
            return self.server.address

        def pid(self) -> int:
            """The actor's process id."""
            return os.getpid()

        def shutdown(self) -> None:
            """Stop serving (the actor is killed after)."""
            self._stop.set()
            self.server.stop()

    return BrokerActor


def main(argv: list[str] | None = None) -> None:
    """Run a broker as a plain process until SIGTERM or SIGINT."""
    from harvestd.logs import setup_logging
    from harvestd.signals import wait_for_stop

    parser = argparse.ArgumentParser(prog="python -m harvestd.broker")
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--listen", default="")
    parser.add_argument("--ttl", type=float, default=Timing.default_ttl)
    parser.add_argument("--grace", type=float, default=Timing.grace)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    state = StateDir.resolve(args.state_dir).create()
    setup_logging(state.logs_dir / "broker.log", args.log_level, args.log_format)
    server = BrokerServer(
        BrokerConfig(
            state_dir=str(state.root),
            listen=args.listen,
            timing=Timing(default_ttl=args.ttl, grace=args.grace),
            metrics_port=args.metrics_port,
        )
    ).start()
    wait_for_stop()
    server.stop()


if __name__ == "__main__":
    main()
