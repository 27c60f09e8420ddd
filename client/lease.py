"""A lease as its holder sees it: borrowed memory mapped into this process, usable
until it is released or revoked, and fenced the moment it is not."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, Sequence

from harvestd.errors import HarvestError, InvalidArgument, LeaseRevoked
from lender.backends.base import BackendKind, Mapping

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RevokeCallback = Callable[["Lease", str], None]

# How a picked-up allocation is mapped when its user maps it somewhere of its own:
# (kind, the backend's imported handle, which it then owns, alloc_bytes, device) -> the
# lease's Mapping. See Client.lease.
Mapper = Callable[[BackendKind, Any, int, Any], Mapping]

# How long after its fence a lease's mapping is closed (see Mapping.fence and close).
_COVER_DELAY_S = 0.1


class LeaseSource(Protocol):
    """What grants single leases (:class:`client.connection.Client`): the striped leases
    and the placed tensors borrow through it."""

    def lease(
        self,
        nbytes: int,
        ttl: float | None = None,
        near: Any = None,
        priority: int = 0,
        backend: str | BackendKind | None = None,
        device: Any = None,
        avoid: Iterable[str] = (),
        mapper: Mapper | None = None,
    ) -> Lease:
        """Grant, pick up and map one lease (through ``mapper`` if given)."""


class LeaseOwner(Protocol):
    """What a lease calls back into: the connection that granted it
    (:class:`client.connection.Client`), which talks to the broker for it."""

    def _keepalive(self, leases: list["Lease"], timeout: float | None = None) -> None:
        """Renew ``leases`` with the broker now."""

    def _release(self, lease: "Lease") -> None:
        """Tell the broker ``lease`` is given back."""

    def _ack(self, lease: "Lease") -> None:
        """Tell the broker ``lease`` is fenced (a revocation acknowledged)."""

    def _forget(self, lease: "Lease") -> None:
        """Stop keeping ``lease`` alive."""


class Lease:
    """Borrowed memory: ``lease.tensor(dtype, shape)`` is a torch tensor over it, with no
    copy. Keepalive runs in the background; ``on_revoke`` tells you when it is gone, and
    every use after that raises :class:`client.LeaseRevoked`."""

    def __init__(self, client: LeaseOwner, grant: Any, mapping: Mapping, margin_s: float) -> None:
        self._client = client
        self.id: str = grant.id
        self.nbytes: int = grant.nbytes
        self.lender: str = grant.lender_id
        self.generation: int = grant.generation
        self.ttl: float = grant.ttl_s
        self.backend = BackendKind.from_pb(grant.backend)
        self.gpu_uuid: str = grant.gpu_uuid
        self._mapping = mapping
        self._margin = margin_s
        self._cond = threading.Condition()
        self._readers = 0
        self._users: dict[int, int] = {}  # thread id: how many use() blocks it is in
        self._device_readers = 0  # uses covering device work in flight (see use())
        self._fenced = False
        self._fence_ok = False
        self._ack_wanted = False  # some caller of _end needs the broker to hear we fenced
        self._acked = False
        self._ended: str = ""  # why it ended; empty while usable
        self._state = "granted"
        self._callbacks: list[RevokeCallback] = []
        # When its end came, on this host's monotonic clock (comparable across processes):
        # "told" (a REVOKE arrived), "fenced" (the mapping was cut off), "acked" (the
        # broker heard it). Benchmarks read it to see where a reclaim's time goes.
        self.timeline: dict[str, float] = {}
        # The holder's own deadline, on its own monotonic clock: past it, the broker may
        # already have given the memory to someone else, so we stop using it even if we
        # cannot reach the broker to hear so.
        self._deadline = time.monotonic() + self.ttl - margin_s

    # ------------------------------------------------------------ description

    def __repr__(self) -> str:
        return (
            f"Lease(id={self.id!r}, nbytes={self.nbytes}, lender={self.lender!r}, "
            f"backend={self.backend.value!r}, state={self.state!r})"
        )

    @property
    def state(self) -> str:
        """``granted``, ``revoked`` or ``released``."""
        return self._state

    @property
    def revoked(self) -> bool:
        """Whether the lease is gone (revoked, expired or released)."""
        return bool(self._ended)

    @property
    def device(self) -> Any:
        """The torch device the memory is addressed from."""
        return self._mapping.device

    @property
    def deadline(self) -> float:
        """``time.monotonic()`` past which this holder stops using the lease unrenewed."""
        return self._deadline

    # ------------------------------------------------------------ use

    def _check(self) -> None:
        if self._ended:
            raise LeaseRevoked(f"lease {self.id} is gone: {self._ended}")
        if time.monotonic() >= self._deadline:
            self._end("revoked", "not renewed in time (broker unreachable?)", ack=False)
            raise LeaseRevoked(f"lease {self.id} is gone: not renewed in time")

    def _check_access(self) -> None:
        """Like :meth:`_check`, but a thread inside :meth:`use` keeps its access until the
        fence: a revocation that has begun waits for uses in flight, which must be able to
        finish the reads they started."""
        if self._users.get(threading.get_ident()) and not self._fenced:
            return
        self._check()

    @contextlib.contextmanager
    def use(self, device_work: bool = False) -> Iterator[None]:
        """Hold the lease for a read or write: a revocation waits (up to its grace) for
        every ``use`` in flight before it fences the memory, and no new one starts after.

        If the lease was nonetheless fenced while this ``use`` ran (a forced end that
        could not wait), leaving the block raises :class:`LeaseRevoked`: what the block
        read may be partly zeros, so the caller must discard it and fall back.

        ``device_work=True``: the block launches device work (a GPU copy) that reads the
        lease after the block's Python code is done, and the caller leaves the block only
        once that work has completed. The fence then waits for it however long it takes:
        unmapping pages under a copy in flight would fault it or let it read another
        lease's data. The broker still ends the lease after its grace period, unclean, so
        the lender frees that memory rather than lending it again while it is mapped here.
        """
        user = threading.get_ident()  # the thread that entered, wherever it is left
        with self._cond:
            self._check()
            self._readers += 1
            self._device_readers += device_work
            self._users[user] = self._users.get(user, 0) + 1
        completed = False
        try:
            yield
            completed = True
        finally:
            with self._cond:
                self._readers -= 1
                self._device_readers -= device_work
                self._users[user] -= 1
                if not self._users[user]:
                    del self._users[user]
                fenced = self._fenced
                self._cond.notify_all()
        if completed and fenced:
            raise LeaseRevoked(f"lease {self.id} was fenced during this use: {self._ended}")

    def as_bytes(self) -> "torch.Tensor":
        """A ``uint8`` tensor of ``nbytes`` over the borrowed memory (no copy)."""
        self._check_access()
        return self._mapping.as_tensor()[: self.nbytes]

    def tensor(
        self, dtype: "torch.dtype", shape: Sequence[int] | int | None = None, offset: int = 0
    ) -> "torch.Tensor":
        """A tensor of ``dtype`` and ``shape`` over the borrowed memory at byte ``offset``
        (no copy). Without a shape: as many elements as fit."""
        import torch

        self._check_access()
        itemsize = torch.empty((), dtype=dtype).element_size()
        if offset < 0 or offset % itemsize:
            raise InvalidArgument(f"offset {offset} must be a non-negative multiple of {itemsize}")
        if shape is None:
            shape = ((self.nbytes - offset) // itemsize,)
        elif isinstance(shape, int):
            shape = (shape,)
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise InvalidArgument(f"shape {shape} has a negative size")
        need = math.prod(shape) * itemsize
        if offset + need > self.nbytes:
            raise InvalidArgument(
                f"a {dtype} tensor of shape {shape} at offset {offset} "
                f"needs {offset + need} bytes; the lease has {self.nbytes}"
            )
        raw = self._mapping.as_tensor()[offset : offset + need]
        return raw.view(dtype).view(shape)

    def gather(
        self, offsets: Sequence[int] | "torch.Tensor", block_bytes: int, out: "torch.Tensor"
    ) -> "torch.Tensor":
        """Copy the blocks at byte ``offsets`` (each ``block_bytes`` long) into ``out``, in
        one launch: the fast way to move many small blocks."""
        from client.blocks import gather

        with self.use():
            return gather(self.as_bytes(), offsets, block_bytes, out)

    def scatter(
        self, src: "torch.Tensor", offsets: Sequence[int] | "torch.Tensor", block_bytes: int
    ) -> None:
        """Copy the rows of ``src`` (``block_bytes`` each) to byte ``offsets``, in one launch."""
        from client.blocks import scatter

        with self.use():
            scatter(self.as_bytes(), src, offsets, block_bytes)

    # ------------------------------------------------------------ life

    def on_revoke(self, callback: RevokeCallback) -> None:
        """Call ``callback(lease, reason)`` once the memory is gone (at once if it is)."""
        with self._cond:
            if not self._ended:
                self._callbacks.append(callback)
                return
        callback(self, self._ended)

    def keepalive(self) -> None:
        """Renew now (the background thread does this on its own)."""
        self._check()
        self._client._keepalive([self])

    def _renewed(self, sent_at: float) -> None:
        """The broker extended the lease by a keepalive sent at monotonic ``sent_at``."""
        with self._cond:
            self._deadline = max(self._deadline, sent_at + self.ttl - self._margin)

    def release(self, wait_s: float = 0.0) -> None:
        """Give the memory back; idempotent. ``wait_s``: first wait up to that long for
        uses in flight on other threads (a GPU mapping must not be fenced under a kernel
        that reads it; :class:`client.striped.StripedLease` releases its other stripes
        so when one is revoked)."""
        if self._ended:
            return
        self._end("released", "released by its holder", ack=False, wait_s=wait_s)
        try:
            self._client._release(self)
        except HarvestError as err:
            log.info("release of %s: %s", self.id, err)

    def _end(self, state: str, reason: str, ack: bool, wait_s: float = 0.0) -> None:
        """Fence: no new use, wait (up to ``wait_s``) for uses in flight, cut the mapping
        off from the lender's memory, then acknowledge and tell the callbacks."""
        with self._cond:
            if self._ended:
                # Fenced (or fencing) already; if this caller needs an acknowledgement the
                # first one did not send, it goes out once the fence has succeeded.
                self._ack_wanted |= ack
                late = self._fenced and self._fence_ok and self._ack_wanted and not self._acked
                self._acked |= late
            else:
                late = None
                self._ended = reason
                self._state = state
                deadline = time.monotonic() + wait_s
                while self._readers and (self._device_readers or time.monotonic() < deadline):
                    self._cond.wait(
                        max(0.001, deadline - time.monotonic())
                        if not self._device_readers
                        else 0.05
                    )
                callbacks, self._callbacks = self._callbacks, []
        if late is not None:
            if late:
                self._client._ack(self)
            return
        fence_ok = True
        try:
            self._mapping.fence()
            self.timeline["fenced"] = time.monotonic()
        except Exception:  # noqa: BLE001 - callbacks must still hear of it
            # We may still map the lender's pages: an acknowledgement would let the lender
            # zero and re-lend them. Stay silent; after the grace period the broker ends the
            # lease unclean, and the lender frees that memory rather than re-lending it.
            log.exception("fencing lease %s failed; not acknowledging", self.id)
            fence_ok = False
        with self._cond:
            self._fenced = True
            self._fence_ok = fence_ok
            self._ack_wanted |= ack
            ack = fence_ok and self._ack_wanted and not self._acked
            self._acked |= ack
        self._client._forget(self)
        if state == "revoked":
            from client import metrics

            metrics.REVOCATIONS.labels(how="acknowledged" if ack else "ended").inc()
        try:
            if ack:
                self._client._ack(self)
                self.timeline["acked"] = time.monotonic()
        finally:
            if fence_ok:
                self._cover()
        for callback in callbacks:
            try:
                callback(self, reason)
            except Exception:  # noqa: BLE001 - one bad callback must not hide the others
                log.exception("on_revoke callback for %s failed", self.id)
        log.info("lease %s %s: %s", self.id, state, reason)

    def _cover(self) -> None:
        """Close the fenced mapping: at once where its users wait for that (a placed
        tensor's), else a little later."""
        if getattr(self._mapping, "cover_at_once", False):
            self._close_mapping()
            return
        # Covering the fenced range with private memory is not on the tenant's path: it
        # waits until a mass revocation's fences (other holders' too) are done.
        cover = threading.Timer(_COVER_DELAY_S, self._close_mapping)
        cover.daemon = True
        cover.start()

    def _close_mapping(self) -> None:
        try:
            self._mapping.close()
        except Exception:  # noqa: BLE001 - the lender's memory is already cut off
            log.exception("closing the fenced mapping of lease %s failed", self.id)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
