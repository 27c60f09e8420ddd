"""The lender side of the GPU backend tests: a backend in a process of its own, driven
over a SOCK_SEQPACKET Unix socket (one JSON command per message, one JSON reply each;
exports send their fd with SCM_RIGHTS). Commands: ``alloc``, ``fill`` (with
:func:`support.pattern.pattern`), ``count``, ``same``, ``zero``, ``export``, ``free``,
``churn``, ``quit``. :class:`support.lender_process.LenderProcess` drives it.

Usage: ``backend_lender.py SOCKET_FD KIND OPTIONS_JSON`` with the repo and ``tests/`` on
``PYTHONPATH``.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any, Protocol, cast

import torch

from lender.backends import get_backend
from lender.backends.base import Allocation, Backend
from support.pattern import pattern


class LendingBackend(Backend, Protocol):
    """A backend as its lender sees it: its allocations are tensors in this process."""

    def tensor(self, alloc: Allocation) -> torch.Tensor: ...


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    backend = cast(LendingBackend, get_backend(sys.argv[2], **json.loads(sys.argv[3])))
    allocs: dict[str, Allocation] = {}
    churn: list[Allocation] = []

    def reply(msg: dict[str, Any], fd: int | None = None) -> None:
        data = json.dumps({"ok": True, **msg}).encode()
        if fd is not None:
            socket.send_fds(sock, [data], [fd])
        else:
            sock.send(data)

    while True:
        data = sock.recv(65536)
        if not data:
            break
        cmd = json.loads(data)
        op, name = cmd["op"], cmd.get("name")
        try:
            if op == "alloc":
                a = allocs[name] = backend.allocate(cmd["nbytes"])
                reply(
                    {
                        "alloc_bytes": a.nbytes,
                        "uuid": a.gpu_uuid,
                        "granularity": backend.granularity,
                        "zeroed": int(backend.tensor(a).count_nonzero()) == 0,
                    }
                )
            elif op == "fill":
                t = backend.tensor(allocs[name])
                t.copy_(pattern(t.numel(), cmd["seed"], t.device))
                torch.cuda.synchronize()
                reply({})
            elif op == "count":
                t = backend.tensor(allocs[name])[cmd["lo"] : cmd["hi"]]
                reply({"count": int((t == cmd["value"]).sum())})
            elif op == "same":
                t = backend.tensor(allocs[name])
                reply({"same": bool(torch.equal(t, pattern(t.numel(), cmd["seed"], t.device)))})
            elif op == "zero":
                backend.zero(allocs[name])
                reply({"zeroed": int(backend.tensor(allocs[name]).count_nonzero()) == 0})
            elif op == "export":
                e, e2 = backend.export(allocs[name]), backend.export(allocs[name])
                fresh = e.fd is None or e.fd != e2.fd
                e2.close()
                reply(
                    {
                        "alloc_bytes": e.alloc_bytes,
                        "uuid": e.gpu_uuid,
                        "ipc": e.ipc_handle.hex(),
                        "fresh": fresh,
                    },
                    e.fd,
                )
                e.close()
            elif op == "free":
                backend.free(allocs.pop(name))
                reply({})
            elif op == "churn":  # new allocations that could reuse freed pages, filled
                for _ in range(cmd["count"]):
                    a = backend.allocate(cmd["nbytes"])
                    backend.tensor(a).fill_(cmd["value"])
                    churn.append(a)
                torch.cuda.synchronize()
                reply({})
            elif op == "quit":
                for a in list(allocs.values()) + churn:
                    backend.free(a)
                reply({})
                break
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the test
            sock.send(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode())


if __name__ == "__main__":
    main()
