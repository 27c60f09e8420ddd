"""Addresses for nodes under test: state dirs short enough for Unix sockets, and TCP
ports nothing listens on."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def short_tmpdir() -> Path:
    """A state dir short enough for Unix socket paths, whatever pytest's tmp_path is."""
    return Path(tempfile.mkdtemp(prefix="hv-", dir="/tmp"))
