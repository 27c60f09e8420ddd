"""A Harvest node: Ray, the broker and one lender per GPU (or a host lender), started
and stopped together by ``harvestd start`` / ``harvestd stop``.

The daemon process (:func:`run_node`) is the Ray driver: it starts a local Ray instance
(or joins the cluster at ``--address`` / ``RAY_ADDRESS``), starts the broker as a named
detached actor (or a plain process with ``--no-ray-broker``) and the lenders as actors
pinned to this node, writes ``node.json``, and tears everything down on SIGTERM.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TypedDict

import grpc

from harvestd.broker import BROKER_ACTOR_NAME, RAY_NAMESPACE, BrokerConfig, broker_actor_class
from harvestd.channel import broker_channel
from harvestd.errors import FailedPrecondition, HarvestError, InvalidArgument, Unavailable
from harvestd.paths import NodeInfo, StateDir, local_node_name
from harvestd.sizes import reserve_parts
from harvestd.table import Timing
from lender.actor import LENDER_ACTOR_PREFIX, lender_actor_class
from lender.config import LenderConfig
from lender.host_device import HostDevice
from lender.tenant import DEFAULT_PEAK_WINDOW_S
from protos import harvest_pb2 as pb
from protos import harvest_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
DEFAULT_HOST_BYTES = 1 << 30


@dataclass
class NodeOptions:
    """Everything ``harvestd start`` takes."""

    state_dir: str
    ray_address: str = ""  # empty: RAY_ADDRESS, else a new local Ray instance
    backend: str = "auto"  # auto | host | cuda-vmm | cuda-ipc
    host_bytes: int | None = None  # None: DEFAULT_HOST_BYTES without GPUs, none beside them
    gpus: list[str] = field(default_factory=list)  # UUIDs or NVML indexes; empty: all
    reserve_bytes: int = 0
    reserve_fraction: float = 0.1
    cap_bytes: int = 0
    peak_window_s: float = DEFAULT_PEAK_WINDOW_S
    host_device: str = ""  # the host lender lends from this HostDevice (CPU twin of a GPU)
    ttl_s: float = Timing.default_ttl
    grace_s: float = Timing.grace
    listen: str = ""
    ray_broker: bool = True  # False: the broker runs as a plain process
    node: str = ""
    per_gpu: dict[str, dict] = field(default_factory=dict)  # index or UUID -> reserve, cap
    metrics_port: int = 0  # broker's; lenders take the next ones; 0: off
    log_format: str = "text"
    log_level: str = "info"
    ray_node_id: str = ""  # pin the lenders to this Ray node (default: the driver's)


class _LenderCommon(TypedDict):
    """The settings every lender of a node shares."""

    state_dir: str
    broker_address: str
    node: str
    cuda_visible_devices: str | None
    log_format: str
    log_level: str
    peak_window_s: float


class _RayInit(TypedDict, total=False):
    """What the daemon passes to ``ray.init`` either way (``_node_ip_address`` for a
    cluster on loopback)."""

    namespace: str
    log_to_driver: bool
    configure_logging: bool
    runtime_env: dict[str, Any]
    _node_ip_address: str


def _is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def broker_ready(address: str, timeout_s: float = 1.0) -> pb.StatusReply | None:
    """The broker's status if it answers at ``address`` within ``timeout_s``, else None."""
    channel = broker_channel(address)
    try:
        return pb_grpc.BrokerStub(channel).Status(pb.StatusRequest(), timeout=timeout_s)
    except grpc.RpcError:
        return None
    finally:
        channel.close()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_node(state: StateDir) -> NodeInfo | None:
    """The node that runs on this state dir now, if any."""
    info = state.read_node()
    if info is None or not pid_alive(info.daemon_pid):
        return None
    return info


def plan_lenders(opts: NodeOptions, node: str) -> list[LenderConfig]:
    """One lender per chosen GPU, plus a host lender where there is no GPU, where the
    host backend is asked for, or where ``host_bytes`` is set beside GPUs."""
    backend = opts.backend
    gpus = []
    if backend != "host":
        from lender.gpus import discover_gpus

        gpus = discover_gpus()
        if opts.gpus:
            wanted = set(opts.gpus)
            gpus = [g for g in gpus if g.uuid in wanted or str(g.index) in wanted]
            missing = wanted - {g.uuid for g in gpus} - {str(g.index) for g in gpus}
            if missing:
                raise InvalidArgument(f"no such GPU on this node: {', '.join(sorted(missing))}")
        if backend == "auto":
            backend = "cuda-vmm" if gpus else "host"
        elif not gpus:
            raise InvalidArgument(f"--backend {backend} needs a GPU; none was found")
    common = _LenderCommon(
        state_dir=opts.state_dir,
        broker_address="",
        node=node,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        log_format=opts.log_format,
        log_level=opts.log_level,
        peak_window_s=opts.peak_window_s,
    )
    plans: list[LenderConfig] = []
    for g in gpus if backend != "host" else []:
        own = opts.per_gpu.get(str(g.index)) or opts.per_gpu.get(g.uuid) or {}
        reserve_bytes, reserve_fraction = (
            reserve_parts(own["reserve"])
            if "reserve" in own
            else (opts.reserve_bytes, opts.reserve_fraction)
        )
        plans.append(
            LenderConfig(
                lender_id=f"{node}-gpu{g.index}",
                backend=backend,
                gpu_uuid=g.uuid,
                reserve_bytes=reserve_bytes,
                reserve_fraction=reserve_fraction,
                cap_bytes=own.get("cap", opts.cap_bytes),
                **common,
            )
        )
    host_bytes = (
        opts.host_bytes
        if opts.host_bytes is not None
        else (DEFAULT_HOST_BYTES if backend == "host" else 0)
    )
    if host_bytes and opts.host_device:
        if not os.path.exists(opts.host_device):
            HostDevice.create(opts.host_device, host_bytes).close()
        plans.append(
            LenderConfig(
                lender_id=f"{node}-host0",
                backend="host",
                host_bytes=host_bytes,
                host_device=os.path.abspath(opts.host_device),
                reserve_bytes=opts.reserve_bytes,
                reserve_fraction=opts.reserve_fraction,
                cap_bytes=opts.cap_bytes,
                **common,
            )
        )
    elif host_bytes:
        plans.append(
            LenderConfig(lender_id=f"{node}-host0", backend="host", host_bytes=host_bytes, **common)
        )
    return plans


class Node:
    """The pieces of a running node, owned by the daemon process."""

    def __init__(self, opts: NodeOptions) -> None:
        self.opts = opts
        self.state = StateDir.resolve(opts.state_dir).create()
        self.node = opts.node or local_node_name()
        # Ray actor handles: their methods exist at run time only (Ray types a handle's
        # attributes as Never), so they are Any here.
        self.broker_actor: Any = None
        self.broker_process: subprocess.Popen | None = None
        self.lender_actors: dict[str, Any] = {}
        self.ray_started_here = False
        self.joined = False

    def start(self) -> NodeInfo:
        """Start Ray, the broker and the lenders; write ``node.json``."""
        if running_node(self.state) is not None:
            raise FailedPrecondition(
                f"a Harvest node already runs with state dir "
                f"{self.state.root} (stop it with `harvestd stop`)"
            )
        ray_address = self.opts.ray_address or os.environ.get("RAY_ADDRESS", "")
        if ray_address and _is_loopback(ray_address):
            # Ray rewrites a loopback bootstrap address to this machine's outside address
            # unless it is told the cluster is local only; it reads this at import.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        env = {
            "PYTHONPATH": os.pathsep.join(
                p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p
            )
        }
        init = _RayInit(
            namespace=RAY_NAMESPACE,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": env},
        )
        if ray_address:
            if _is_loopback(ray_address):
                # Otherwise Ray looks for the cluster at this machine's outside address.
                init["_node_ip_address"] = "127.0.0.1"
            ray.init(address=ray_address, **init)
        else:
            # Our own Ray stays on loopback and small: it hosts a few actors, no data.
            # address="local": never attach to a cluster someone else left running here.
            ray.init(
                address="local",
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                object_store_memory=80 << 20,
                **init,
            )
            self.ray_started_here = True
        ray_node = self.opts.ray_node_id or ray.get_runtime_context().get_node_id()
        here = self._pinned(ray_node)
        # In a cluster that already has a broker, this node only adds its lenders.
        address = self._cluster_broker() if ray_address else ""
        if not address:
            self._start_broker(here)
            address = self.state.broker_address
        deadline = time.monotonic() + 60
        while broker_ready(address) is None:
            if time.monotonic() > deadline:
                raise Unavailable(
                    "the broker did not answer within 60 s; see "
                    f"{self.state.logs_dir / 'broker.log'}"
                )
            time.sleep(0.1)
        actor_cls = lender_actor_class()
        for i, config in enumerate(plan_lenders(self.opts, self.node)):
            port = self.opts.metrics_port + 1 + i if self.opts.metrics_port else 0
            config = LenderConfig(
                **{**asdict(config), "broker_address": address, "metrics_port": port}
            )
            actor = actor_cls.options(
                name=LENDER_ACTOR_PREFIX + config.lender_id,
                lifetime="detached",
                scheduling_strategy=here,
            ).remote(config)
            self.lender_actors[config.lender_id] = actor
        ray.get([a.info.remote() for a in self.lender_actors.values()], timeout=120)
        info = NodeInfo(
            broker_address=address,
            daemon_pid=os.getpid(),
            node=self.node,
            ray_address=ray.get_runtime_context().gcs_address,
            started_at=time.time(),
            lenders=sorted(self.lender_actors),
            broker_mode=("joined" if self.joined else "ray" if self.opts.ray_broker else "process"),
        )
        self.state.write_node(info)
        log.info("node %s up: broker %s, lenders %s", self.node, address, info.lenders)
        return info

    def _cluster_broker(self) -> str:
        """The address of the broker the cluster already runs, if any (this node joins)."""
        import ray

        try:
            actor: Any = ray.get_actor(BROKER_ACTOR_NAME, namespace=RAY_NAMESPACE)
            address: str = ray.get(actor.address.remote(), timeout=30)
        except (ValueError, ray.exceptions.RayError):
            return ""
        self.joined = True
        log.info("joining the cluster's broker at %s", address)
        return address

    @staticmethod
    def _pinned(ray_node: str):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Sockets and the store live in this node's state dir: the actors must run here.
        return NodeAffinitySchedulingStrategy(node_id=ray_node, soft=False)

    def _start_broker(self, here) -> None:
        config = BrokerConfig(
            state_dir=str(self.state.root),
            listen=self.opts.listen,
            timing=Timing(default_ttl=self.opts.ttl_s, grace=self.opts.grace_s),
            metrics_port=self.opts.metrics_port,
            log_format=self.opts.log_format,
            log_level=self.opts.log_level,
        )
        if self.opts.ray_broker:
            import ray

            self.broker_actor = (
                broker_actor_class()
                .options(name=BROKER_ACTOR_NAME, lifetime="detached", scheduling_strategy=here)
                .remote(config)
            )
            ray.get(self.broker_actor.address.remote(), timeout=60)
            return
        log_file = open(self.state.logs_dir / "broker.out", "ab")
        self.broker_process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "harvestd.broker",
                "--state-dir",
                str(self.state.root),
                "--ttl",
                str(self.opts.ttl_s),
                "--grace",
                str(self.opts.grace_s),
                "--metrics-port",
                str(self.opts.metrics_port),
                "--log-format",
                self.opts.log_format,
                "--log-level",
                self.opts.log_level,
            ]
            + (["--listen", self.opts.listen] if self.opts.listen else []),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p
                ),
            },
        )

    def stop(self) -> None:
        """Stop the lenders, then the broker, then Ray (if this node started it)."""
        import ray

        for lender_id, actor in self.lender_actors.items():
            try:
                ray.get(actor.shutdown.remote(), timeout=10)
            except Exception as exc:  # noqa: BLE001 - stopping goes on regardless
                log.warning("lender %s did not shut down cleanly: %s", lender_id, exc)
            ray.kill(actor, no_restart=True)
        if self.broker_actor is not None:
            try:
                ray.get(self.broker_actor.shutdown.remote(), timeout=10)
            except Exception as exc:  # noqa: BLE001
                log.warning("broker did not shut down cleanly: %s", exc)
            ray.kill(self.broker_actor, no_restart=True)
        if self.broker_process is not None:
            self.broker_process.terminate()
            try:
                self.broker_process.wait(10)
            except subprocess.TimeoutExpired:
                self.broker_process.kill()
        if ray.is_initialized():
            ray.shutdown()
        for path in (self.state.node_file, self.state.broker_socket):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        log.info("node %s stopped", self.node)


def run_node(opts: NodeOptions, ready: Callable[[NodeInfo], object] | None = None) -> None:
    """Run a node in this process until SIGTERM or SIGINT (the daemon's main loop)."""
    done = threading.Event()

    def on_signal(*_) -> None:
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    node = Node(opts)
    try:
        info = node.start()
        # ray.init may install handlers of its own; ours decide when the node stops.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        if ready is not None:
            ready(info)
        done.wait()
    finally:
        node.stop()


def stop_node(state: StateDir, timeout_s: float = 60.0) -> NodeInfo:
    """Ask the daemon of the node on ``state`` to stop, and wait until it has."""
    info = running_node(state)
    if info is None:
        # Only node.json is known stale here: the broker's socket may belong to a node
        # that is still starting.
        if state.node_file.exists():
            state.node_file.unlink()
        raise Unavailable(f"no Harvest node runs with state dir {state.root}")
    os.kill(info.daemon_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while pid_alive(info.daemon_pid):
        if time.monotonic() > deadline:
            os.kill(info.daemon_pid, signal.SIGKILL)
            raise HarvestError(
                f"the daemon (pid {info.daemon_pid}) did not stop within "
                f"{timeout_s:.0f} s and was killed"
            )
        time.sleep(0.1)
    return info
