"""A GPU lender backend in a process of its own (:mod:`support.programs.backend_lender`),
driven over a socketpair: the lender side of the backend tests, with this process as
the client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from typing import Any

from lender.backends import BackendKind, Exported, get_backend
from lender.backends.base import Backend
from support.env import PY, REPO, node_env
from support.programs import BACKEND_LENDER


class LenderProcess:
    """A lender in its own process, driven over a socketpair."""

    def __init__(self, kind: str, **options: Any) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = node_env()
        # The program imports support.pattern: tests/ goes on its path too.
        env["PYTHONPATH"] = os.pathsep.join((str(REPO / "tests"), env["PYTHONPATH"]))
        self.proc = subprocess.Popen(
            [PY, str(BACKEND_LENDER), str(theirs.fileno()), kind, json.dumps(options)],
            pass_fds=[theirs.fileno()],
            env=env,
            cwd=REPO,
        )
        theirs.close()
        self.sock = ours
        self.sock.settimeout(180)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one command; its reply (with ``fd`` if one came along)."""
        self.sock.send(json.dumps({"op": op, **args}).encode())
        data, fds, _, _ = socket.recv_fds(self.sock, 65536, 1)
        assert data, f"the lender process died (exit {self.proc.poll()})"
        msg: dict[str, Any] = json.loads(data)
        assert msg.pop("ok"), msg
        if fds:
            msg["fd"] = fds[0]
        return msg

    def receive(self, name: str, kind: BackendKind) -> tuple[Backend, Any, dict[str, Any]]:
        """Export ``name`` there, import it here: ``(client backend, imported, reply)``."""
        msg = self.call("export", name=name)
        exported = Exported(
            kind=kind,
            alloc_bytes=msg["alloc_bytes"],
            fd=msg.get("fd"),
            ipc_handle=bytes.fromhex(msg["ipc"]),
            gpu_uuid=msg["uuid"],
        )
        backend = get_backend(kind)
        return backend, backend.import_handle(exported), msg

    def close(self) -> None:
        """Ask the process to free everything and quit (kill it if it cannot)."""
        try:
            self.call("quit")
            self.proc.wait(60)
        except Exception:  # noqa: BLE001 - a dead lender is reported by its test
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
