"""Where a node keeps its state, and how processes on the node find each other.

The state directory holds the broker's store (``broker.db``), its socket
(``broker.sock``), the lenders' pick-up sockets (``lenders/``), the node's description
(``node.json``) and logs (``logs/``). It is private to the user who runs the node.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harvestd.errors import InvalidArgument, Unavailable

ENV_ADDRESS = "HARVEST_ADDRESS"
ENV_STATE_DIR = "HARVEST_STATE_DIR"
ENV_NODE = "HARVEST_NODE"
# Unix socket paths are limited to 107 bytes; keep our own well under it.
_MAX_SOCKET_PATH = 100


def default_state_dir() -> Path:
    """``$HARVEST_STATE_DIR``, else ``$XDG_RUNTIME_DIR/harvest``, else ``~/.cache/harvest``."""
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR]).expanduser()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return Path(runtime) / "harvest"
    return Path.home() / ".cache" / "harvest"


def local_node_name() -> str:
    """``$HARVEST_NODE``, else the host name: what a node starting here calls itself."""
    return os.environ.get(ENV_NODE) or socket.gethostname()


def node_name(state_dir: str | os.PathLike | None = None) -> str:
    """This machine's name in placement: ``$HARVEST_NODE``, else the name the node running
    on ``state_dir`` (or the default state dir) goes by, else the host name."""
    if os.environ.get(ENV_NODE):
        return os.environ[ENV_NODE]
    try:
        info = StateDir.resolve(state_dir).read_node()
    except OSError:
        info = None
    return info.node if info is not None and info.node else socket.gethostname()


@dataclass
class StateDir:
    """The layout of one node's state directory."""

    root: Path

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> "StateDir":
        """The state dir named by ``path``, or the default."""
        root = Path(path).expanduser() if path else default_state_dir()
        return cls(root.absolute())

    def create(self) -> "StateDir":
        """Make the directories, private to this user (0700)."""
        for d in (self.root, self.lenders_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        if len(str(self.lenders_dir / ("x" * 24 + ".sock"))) > _MAX_SOCKET_PATH:
            raise InvalidArgument(
                f"state dir {self.root} is too long for Unix socket paths; "
                "choose a shorter --state-dir"
            )
        return self

    @property
    def store_path(self) -> Path:
        """The broker's SQLite store."""
        return self.root / "broker.db"

    @property
    def broker_socket(self) -> Path:
        """The broker's gRPC Unix socket."""
        return self.root / "broker.sock"

    @property
    def broker_address(self) -> str:
        """gRPC target for the broker's socket."""
        return f"unix://{self.broker_socket}"

    @property
    def lenders_dir(self) -> Path:
        """Where lenders put their pick-up sockets."""
        return self.root / "lenders"

    def pickup_socket(self, lender_id: str) -> Path:
        """The pick-up socket of one lender."""
        return self.lenders_dir / f"{lender_id}.sock"

    @property
    def logs_dir(self) -> Path:
        """The daemon's and actors' logs."""
        return self.root / "logs"

    @property
    def node_file(self) -> Path:
        """``node.json``: the running node's description."""
        return self.root / "node.json"

    def read_node(self) -> "NodeInfo | None":
        """The running node's description, or None."""
        try:
            return NodeInfo(**json.loads(self.node_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write_node(self, info: "NodeInfo") -> None:
        """Write ``node.json`` atomically."""
        tmp = self.node_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(info), indent=2))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.node_file)


@dataclass
class NodeInfo:
    """What ``harvestd start`` leaves in ``node.json`` for clients and ``harvestd stop``."""

    broker_address: str
    daemon_pid: int
    node: str
    ray_address: str = ""
    started_at: float = 0.0
    lenders: list[str] = field(default_factory=list)
    broker_mode: str = "ray"  # "ray": a detached Ray actor; "process": a plain process


def resolve_address(address: str | None = None, state_dir: str | os.PathLike | None = None) -> str:
    """The broker's gRPC target: ``address``, else ``$HARVEST_ADDRESS``, else the socket in
    the state dir named by ``state_dir`` / ``$HARVEST_STATE_DIR`` / the default."""
    if address:
        return address
    if os.environ.get(ENV_ADDRESS) and state_dir is None:
        return os.environ[ENV_ADDRESS]
    state = StateDir.resolve(state_dir)
    info = state.read_node()
    if info is not None and info.broker_address:
        # A node that joined a cluster uses the broker its head runs.
        return info.broker_address
    if not state.broker_socket.exists():
        raise Unavailable(
            f"no Harvest node runs with state dir {state.root} (start one with `harvestd start`)"
        )
    return state.broker_address
