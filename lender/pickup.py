"""The pick-up protocol: a client fetches a granted allocation from its lender (and the
device's own tenant asks the lender for room, :func:`ask_room`).

Over the lender's Unix socket the client sends a ``PickupRequest`` (lease id, token,
generation); the lender checks the caller's uid (SO_PEERCRED) and, with the broker, the
token, then answers with a ``PickupReply`` and the allocation's file descriptor
(SCM_RIGHTS). Each message is framed by a 4-byte big-endian length.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from harvestd.errors import (
    HarvestError,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
    from_code,
    to_wire,
)
from protos import harvest_pb2 as pb

log = logging.getLogger(__name__)

_MAX_MESSAGE = 64 * 1024
_HEADER = struct.Struct(">I")


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a Unix socket, as the kernel says."""

    pid: int
    uid: int
    gid: int


def peer_of(conn: socket.socket) -> Peer:
    """SO_PEERCRED of a connected Unix socket."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed the pick-up socket")
        data += chunk
    return bytes(data)


def _read_frame(conn: socket.socket) -> bytes:
    (size,) = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
    if size > _MAX_MESSAGE:
        raise InvalidArgument(f"pick-up message of {size} bytes is too large")
    return _recv_exact(conn, size)


def _frame(message) -> bytes:
    body = message.SerializeToString()
    return _HEADER.pack(len(body)) + body


# A handler turns (request, peer) into (reply, fd to send or None).
Handler = Callable[[pb.PickupRequest, Peer], "tuple[pb.PickupReply, int | None]"]


class PickupServer:
    """Serves pick-ups on a Unix socket, one thread per connection."""

    def __init__(self, path: str, handler: Handler, timeout_s: float = 10.0) -> None:
        self.path = path
        self._handler = handler
        self._timeout = timeout_s
        if os.path.exists(path):
            os.unlink(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock.listen(128)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="harvest-pickup", daemon=True)

    def start(self) -> "PickupServer":
        """Accept connections in the background."""
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self._timeout)
            fd: int | None = None
            try:
                peer = peer_of(conn)
                if peer.uid != os.getuid():
                    raise PermissionDenied(f"uid {peer.uid} may not pick up from this lender")
                request = pb.PickupRequest.FromString(_read_frame(conn))
                reply, fd = self._handler(request, peer)
            except HarvestError as err:
                code, message = to_wire(err)
                reply = pb.PickupReply(ok=False, error_code=code.name, error_message=message)
            except Exception as exc:  # noqa: BLE001 - a malformed request gets an answer
                log.warning("pick-up failed: %s", exc)
                reply = pb.PickupReply(
                    ok=False,
                    error_code="INVALID_ARGUMENT",
                    error_message=f"bad pick-up request: {exc}",
                )
            try:
                if fd is not None:
                    socket.send_fds(conn, [_frame(reply)], [fd])
                else:
                    conn.sendall(_frame(reply))
            except OSError as exc:
                log.warning("pick-up reply not delivered: %s", exc)
            finally:
                if fd is not None:
                    os.close(fd)

    def close(self) -> None:
        """Stop accepting and remove the socket."""
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def pick_up(
    path: str, lease_id: str, token: bytes, generation: int, timeout_s: float = 10.0
) -> tuple[pb.PickupReply, int | None]:
    """Client side: fetch a lease's allocation; returns the reply and the received fd."""
    request = pb.PickupRequest(lease_id=lease_id, token=token, generation=generation)
    return _exchange(path, request, timeout_s)


def ask_room(path: str, nbytes: int, timeout_s: float = 30.0) -> pb.PickupReply:
    """The device's tenant asks its lender for ``nbytes`` of room, and waits for it."""
    request = pb.PickupRequest(room=nbytes, timeout_s=timeout_s)
    reply, fd = _exchange(path, request, timeout_s)
    if fd is not None:  # a room request carries no memory; never leak what came anyway
        os.close(fd)
    return reply


def _exchange(
    path: str, request: pb.PickupRequest, timeout_s: float
) -> tuple[pb.PickupReply, int | None]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise Unavailable(f"lender socket {path} does not answer: {exc}") from exc
        fds: list[int] = []
        try:
            sock.sendall(_frame(request))
            header, fds, _, _ = socket.recv_fds(sock, _HEADER.size, 1)
            if len(header) < _HEADER.size:
                header += _recv_exact(sock, _HEADER.size - len(header))
            (size,) = _HEADER.unpack(header)
            reply = pb.PickupReply.FromString(_recv_exact(sock, size))
        except OSError as exc:  # reset, closed, timed out: the lender went away mid-way
            for fd in fds:
                os.close(fd)
            raise Unavailable(f"lender socket {path} broke off the pick-up: {exc}") from exc
    finally:
        sock.close()
    received = fds[0] if fds else None
    if not reply.ok:
        if received is not None:
            os.close(received)
        raise from_code(reply.error_code, reply.error_message)
    return reply, received
