"""A client's connection to its node: leases, keepalive, and revocations."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Protocol

import grpc

from client import metrics
from client.devices import resolve_near
from client.lease import Lease, Mapper
from client.placed.tensor import PlacedTensor
from client.striped import StripedLease, lease_striped
from harvestd.channel import broker_channel
from harvestd.errors import HarvestError, InvalidArgument, LeaseRevoked, Unavailable, from_rpc_error
from harvestd.paths import node_name, resolve_address
from lender.backends import BackendKind, Exported, get_backend
from lender.pickup import pick_up
from protos import harvest_pb2 as pb
from protos import harvest_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# How long a lease that ended by force waits for uses in flight before it is fenced.
_ENDED_WAIT_S = 0.5


@dataclass(frozen=True)
class ReclaimResult:
    """What a reclaim did."""

    revoked: list[str]
    reclaimed: int
    freed: bool
    elapsed_s: float


class _EventStream(Protocol):
    """The broker's Watch call as gRPC returns it: its events, and a way to end it."""

    def __iter__(self) -> Iterator[pb.LeaseEvent]: ...

    def cancel(self) -> bool: ...


class Client:
    """A process's connection to the Harvest node; make one with :func:`connect`."""

    def __init__(
        self,
        address: str,
        node: str | None = None,
        timeout_s: float = 10.0,
        margin_s: float | None = None,
    ) -> None:
        self.address = address
        self.node = node or node_name()
        self.id = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.timeout_s = timeout_s
        self._margin = margin_s
        self._channel = broker_channel(address)
        self._broker = pb_grpc.BrokerStub(self._channel)
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        # A REVOKE must not be acknowledged for memory we may map but have not fenced. A
        # reclaim can revoke a lease before its Grant reply reaches us, or while we pick
        # it up, so an event for a lease that is not (yet) ours waits: in _deferred while
        # lease() picks that lease up, in _unclaimed while a Grant that may return it is
        # in flight (with the numbers of those Grants). lease() then handles it.
        self._grant_numbers = itertools.count()
        self._granting: set[int] = set()
        self._picking: set[str] = set()
        self._deferred: dict[str, list[pb.LeaseEvent]] = {}
        self._unclaimed: dict[str, tuple[set[int], list[pb.LeaseEvent]]] = {}
        self._closed = threading.Event()
        self._watching = threading.Event()
        self._stream: _EventStream | None = None
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise Unavailable(f"no Harvest broker answers at {address}") from None
        self._threads = [
            threading.Thread(target=self._watch, name="harvest-watch", daemon=True),
            threading.Thread(target=self._renew, name="harvest-keepalive", daemon=True),
            threading.Thread(target=self._fence_overdue, name="harvest-fence", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        # Revocations must reach us from the first lease on.
        self._watching.wait(timeout_s)

    # ------------------------------------------------------------ plumbing

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        except ValueError:  # grpc's "Cannot invoke RPC on closed channel!"
            if self._closed.is_set():
                raise Unavailable("this client is closed") from None
            raise

    def __repr__(self) -> str:
        return f"Client(id={self.id!r}, address={self.address!r}, leases={len(self._leases)})"

    # ------------------------------------------------------------ leases

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
        """Borrow ``nbytes`` on this node, mapped into this process.

        ``ttl``: seconds between keepalives before the lease lapses (the broker's default
        if None). ``near``: this process's own GPU (index, ``torch.device``, ``"cuda:N"`` or
        a UUID): never lend from it, prefer its fastest links, and map the memory for it.
        ``priority``: lower is revoked first. ``backend``: ``"host"``, ``"cuda-vmm"``, ...
        ``device``: map the memory for this device instead of ``near``'s, without keeping
        the lease off it (on a one-GPU machine, borrow from a process on the same GPU).
        ``avoid``: lender ids the broker must not place it on (see :meth:`lease_striped`).
        Raises :class:`client.NoCapacity` at once when no lender can meet it, and
        :class:`client.LeaseRevoked` when the lease is revoked before it is handed over (a
        tenant reclaimed it at once): it is fenced and acknowledged by then.

        ``mapper``: how the picked-up memory is mapped, for users that map it somewhere of
        their own (:meth:`place` maps leases into a placed tensor's range): called as
        ``mapper(kind, imported, alloc_bytes, device)`` with the backend's imported handle,
        which it owns from then on; it returns the lease's
        :class:`~lender.backends.base.Mapping`, whose ``fence`` a revocation calls before
        it acknowledges. None: the backend's own ``map``.
        """
        if self._closed.is_set():
            raise InvalidArgument("this client is closed")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise InvalidArgument(f"nbytes must be a positive int, got {nbytes!r}")
        device_arg = device
        avoid = [avoid] if isinstance(avoid, str) else list(avoid)
        if not all(isinstance(a, str) and a for a in avoid):
            raise InvalidArgument(f"avoid must be lender ids (non-empty strings), got {avoid!r}")
        if ttl is not None and (not isinstance(ttl, (int, float)) or ttl <= 0):
            raise InvalidArgument(f"ttl must be a positive number of seconds, got {ttl!r}")
        start = time.perf_counter()
        device, near_uuid = resolve_near(near)
        if device_arg is not None:
            device = resolve_near(device_arg)[0]
        kind = BackendKind(backend) if backend else None
        with self._lock:
            number = next(self._grant_numbers)
            self._granting.add(number)
        grant = None
        try:
            grant = self._call(
                self._broker.Grant,
                pb.GrantRequest(
                    client_id=self.id,
                    nbytes=nbytes,
                    ttl_s=float(ttl or 0),
                    node=self.node,
                    near_gpu=near_uuid,
                    priority=priority,
                    holder_pid=os.getpid(),
                    backend=kind.pb if kind else pb.BACKEND_UNSPECIFIED,
                    avoid_lenders=avoid,
                ),
            )
        finally:
            with self._lock:
                self._granting.discard(number)
                if grant is not None:
                    self._picking.add(grant.id)
                    claimed = self._unclaimed.pop(grant.id, None)
                    if claimed is not None:
                        self._deferred[grant.id] = claimed[1]
                strays = self._settle(number)
            for lease_id in strays:
                self._ack_id(lease_id)
        try:
            mapping = self._pick_up(grant, device, mapper)
        except BaseException as exc:
            with self._lock:
                self._picking.discard(grant.id)
                deferred = self._deferred.pop(grant.id, [])
            self._release_id(grant.id)
            if any(e.kind == pb.LeaseEvent.REVOKE for e in deferred):
                self._ack_id(grant.id)  # never mapped: nothing to fence
            if deferred and isinstance(exc, HarvestError) and not isinstance(exc, LeaseRevoked):
                # The lease ended first, and the lender or the broker refused the pick-up
                # for that reason, in whichever words: to the caller it is a revocation.
                raise LeaseRevoked(
                    f"lease {grant.id} ended before its pick-up: {_reason(deferred)}"
                ) from exc
            raise
        margin = self._margin if self._margin is not None else min(1.0, grant.ttl_s / 4)
        lease = Lease(self, grant, mapping, margin)
        with self._lock:
            deferred = self._deferred.pop(lease.id, [])
            if not deferred:
                self._picking.discard(lease.id)
                self._leases[lease.id] = lease
        if deferred:
            # Revoked (or ended) while we picked it up: fence it now, before anyone uses
            # it -- there is no use in flight to wait for -- and only then acknowledge.
            # It stays in _picking meanwhile, so that a repeated REVOKE (the stream
            # replays them when it reconnects) is held back too, not acknowledged early.
            reason = _reason(deferred)
            lease._end("revoked", reason, ack=any(e.kind == pb.LeaseEvent.REVOKE for e in deferred))
            with self._lock:
                self._picking.discard(lease.id)
                self._deferred.pop(lease.id, None)  # answered by the fence above
            raise LeaseRevoked(f"lease {lease.id} ended during its pick-up: {reason}")
        metrics.LEASES.labels(backend=lease.backend.value).inc()
        metrics.LEASED_BYTES.labels(backend=lease.backend.value).inc(lease.nbytes)
        metrics.LEASE_LATENCY.observe(time.perf_counter() - start)
        return lease

    def lease_striped(
        self,
        nbytes: int,
        stripes: int | None = None,
        near: Any = None,
        *,
        unit: int | None = None,
        ttl: float | None = None,
        priority: int = 0,
        backend: str | BackendKind | None = None,
        device: Any = None,
        max_stripes: int = 8,
    ) -> "StripedLease":
        """Borrow ``nbytes`` as several leases on distinct lenders (stripes), read at once
        over their links; see :class:`client.striped.StripedLease` for the layout,
        ``gather``/``scatter`` and revocation (any stripe lost ends the whole lease).

        ``stripes``: how many; None picks as many lenders as have NVLink to ``near``'s GPU
        and room for a stripe, up to ``max_stripes``, else 1. ``unit``: bytes per stripe
        unit (the logical space is dealt out to the stripes in turn, a unit each; default
        2 MiB; a block read by ``gather`` must not cross a unit). Other arguments as for
        :meth:`lease`. Raises :class:`client.NoCapacity` when the stripes cannot all be
        placed (whatever was granted is released first)."""
        return lease_striped(
            self,
            nbytes,
            stripes,
            near,
            unit=unit,
            ttl=ttl,
            priority=priority,
            backend=backend,
            device=device,
            max_stripes=max_stripes,
        )

    def place(self, source: Any = None, device: Any = None, **options: Any) -> PlacedTensor:
        """``source``'s values at one address on ``device`` (default: where ``source``
        is), backed chunk by chunk by this process's memory, leases and an authoritative
        host copy; a revoked lease's chunks are remapped to that copy, never lost. See
        :class:`client.placed.PlacedTensor` for ``options`` (``chunk_bytes``,
        ``local_bytes``, ``lease_bytes``, ``ttl``, ``priority``, ``refill_s``,
        ``borrow``; ``shape`` and ``dtype`` with no ``source``: an empty tensor)."""
        if self._closed.is_set():
            raise InvalidArgument("this client is closed")
        return PlacedTensor(self, source, device, **options)

    def _settle(self, number: int) -> list[str]:
        """Under the lock, once Grant ``number`` has returned: the events no Grant in
        flight can claim any more are for leases that are not ours (released or fenced
        already). Forget them; return the ids whose REVOKE still wants an answer."""
        strays = []
        for lease_id, (waiting, events) in list(self._unclaimed.items()):
            waiting.discard(number)
            if not waiting:
                del self._unclaimed[lease_id]
                if any(e.kind == pb.LeaseEvent.REVOKE for e in events):
                    strays.append(lease_id)
        return strays

    def _pick_up(self, grant: pb.Lease, device: Any, mapper: Mapper | None = None):
        reply, fd = pick_up(grant.pickup_address, grant.id, grant.token, grant.generation)
        kind = BackendKind.from_pb(reply.backend)
        if kind.is_gpu and device is None:
            import torch

            device = torch.device("cuda", torch.cuda.current_device())
        exported = Exported(
            kind=kind,
            alloc_bytes=reply.alloc_bytes,
            fd=fd,
            ipc_handle=reply.ipc_handle,
            gpu_uuid=reply.gpu_uuid,
        )
        backend = _client_backend(kind)
        imported = backend.import_handle(exported)
        if mapper is not None:
            return mapper(kind, imported, reply.alloc_bytes, device)
        return backend.map(imported, reply.alloc_bytes, device)

    def leases(self) -> list[Lease]:
        """This client's leases that are still usable."""
        with self._lock:
            return list(self._leases.values())

    def _forget(self, lease: Lease) -> None:
        with self._lock:
            known = self._leases.pop(lease.id, None)
        if known is not None:
            metrics.LEASED_BYTES.labels(backend=lease.backend.value).dec(lease.nbytes)

    def _release(self, lease: Lease) -> None:
        self._release_id(lease.id)

    def _release_id(self, lease_id: str) -> None:
        try:
            self._call(
                self._broker.Release, pb.ReleaseRequest(client_id=self.id, lease_id=lease_id)
            )
        except HarvestError as err:
            log.info("release of %s failed: %s", lease_id, err)

    def _ack(self, lease: Lease) -> None:
        try:
            self._call(
                self._broker.AckRevoke, pb.AckRevokeRequest(client_id=self.id, lease_id=lease.id)
            )
        except HarvestError as err:
            log.info("acknowledging revocation of %s failed: %s", lease.id, err)

    def _keepalive(self, leases: list[Lease], timeout: float | None = None) -> None:
        sent = time.monotonic()
        reply = self._call(
            self._broker.KeepAlive,
            pb.KeepAliveRequest(client_id=self.id, lease_ids=[l.id for l in leases]),
            timeout=timeout,
        )
        by_id = {l.id: l for l in leases}
        for alive in reply.alive:
            if alive.id in by_id:
                by_id[alive.id]._renewed(sent)
        for lost in reply.lost:
            if lost.id in by_id:
                # A lease being revoked is lost to us too, but the broker waits for our
                # acknowledgement: give it, whichever of this and the REVOKE event is first.
                by_id[lost.id]._end(
                    "revoked", lost.reason or "lease lost", ack=lost.state == pb.REVOKING
                )

    # ------------------------------------------------------------ background

    def _renew(self) -> None:
        """Renew every lease a third of its TTL after its last renewal."""
        last: dict[str, float] = {}
        while not self._closed.wait(0.05):
            now = time.monotonic()
            leases = self.leases()
            for lease in leases:
                last.setdefault(lease.id, now)  # just granted: not due for a third of a TTL
            due = [l for l in leases if now - last[l.id] >= l.ttl / 3]
            if due:
                try:
                    # A call that hangs must not outlive the renewal it is for.
                    self._keepalive(due, timeout=max(0.05, min(l.ttl for l in due) / 3))
                    for lease in due:
                        last[lease.id] = now
                except HarvestError as err:
                    log.info("keepalive failed: %s", err)
            live = {l.id for l in leases}
            for key in [k for k in last if k not in live]:
                del last[key]

    def _fence_overdue(self) -> None:
        """Fence any lease whose own deadline passed unrenewed: the broker may be
        unreachable, and may already have given the memory to someone else."""
        while not self._closed.wait(0.02):
            now = time.monotonic()
            for lease in self.leases():
                if now >= lease.deadline:
                    lease._end("revoked", "not renewed in time (broker unreachable?)", ack=False)

    def _watch(self) -> None:
        backoff = 0.05
        while not self._closed.is_set():
            try:
                self._stream = self._broker.Watch(pb.WatchRequest(client_id=self.id))
                for event in self._stream:
                    backoff = 0.05
                    if event.kind == pb.LeaseEvent.HELLO:
                        self._watching.set()
                    else:
                        self._on_event(event)
            except grpc.RpcError as err:
                if not self._closed.is_set():
                    log.info("revocation stream broke (%s); reconnecting", from_rpc_error(err))
            self._closed.wait(backoff)
            backoff = min(backoff * 2, 1.0)

    def _on_event(self, event: pb.LeaseEvent) -> None:
        lease_id = event.lease.id
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                # Maybe a lease that lease() is getting: it handles the event once it knows.
                if lease_id in self._picking:
                    self._deferred.setdefault(lease_id, []).append(event)
                    return
                if lease_id in self._unclaimed:
                    self._unclaimed[lease_id][1].append(event)
                    return
                if self._granting:
                    # Only a Grant in flight now can have made this lease.
                    self._unclaimed[lease_id] = (set(self._granting), [event])
                    return
        if lease is None:
            if event.kind == pb.LeaseEvent.REVOKE:
                # Not ours any more (already released or fenced): acknowledge anyway.
                self._ack_id(event.lease.id)
            return
        if event.kind == pb.LeaseEvent.REVOKE:
            lease.timeline.setdefault("told", time.monotonic())
            wait = max(0.0, event.lease.revoke_deadline - time.time() - 0.2)
            threading.Thread(
                target=lease._end, args=("revoked", event.lease.reason, True, wait), daemon=True
            ).start()
        elif event.kind == pb.LeaseEvent.ENDED:
            # Nobody else gets these pages while we map them (the lender frees rather than
            # pools memory of a lease that ended by force), so a short wait for reads in
            # flight is safe, and spares them a LeaseRevoked.
            threading.Thread(
                target=lease._end,
                args=("revoked", event.lease.reason or "lease ended", False, _ENDED_WAIT_S),
                daemon=True,
            ).start()

    def _ack_id(self, lease_id: str) -> None:
        try:
            self._call(
                self._broker.AckRevoke, pb.AckRevokeRequest(client_id=self.id, lease_id=lease_id)
            )
        except HarvestError:
            pass

    # ------------------------------------------------------------ tenants and operators

    def reclaim(self, lender: str, nbytes: int, timeout: float = 0.0) -> ReclaimResult:
        """Act as ``lender``'s tenant: take ``nbytes`` back, revoking just enough leases;
        returns once their memory is free (or ``timeout`` passes)."""
        if not isinstance(nbytes, int) or nbytes < 0:
            raise InvalidArgument(f"nbytes must be a non-negative int, got {nbytes!r}")
        reply = self._call(
            self._broker.Reclaim,
            pb.ReclaimRequest(lender_id=lender, nbytes=nbytes, timeout_s=timeout),
            timeout=(timeout or 60) + 5,
        )
        return ReclaimResult(list(reply.revoked), reply.reclaimed, reply.freed, reply.elapsed_s)

    def restore(self, lender: str, nbytes: int = 0) -> int:
        """Give reclaimed memory (``nbytes``, or all) back to lending; the reclaimed total."""
        return self._call(
            self._broker.Restore, pb.RestoreRequest(lender_id=lender, nbytes=nbytes)
        ).reclaimed

    def lenders(self) -> list[pb.Lender]:
        """Every lender the broker knows."""
        return list(self._call(self._broker.ListLenders, pb.ListLendersRequest()).lenders)

    def status(self) -> pb.StatusReply:
        """The broker's summary."""
        return self._call(self._broker.Status, pb.StatusRequest())

    # ------------------------------------------------------------ closing

    def close(self) -> None:
        """Release every lease and disconnect."""
        for lease in self.leases():
            lease.release()
        self._closed.set()
        if self._stream is not None:
            self._stream.cancel()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reason(events: list[pb.LeaseEvent]) -> str:
    return next((e.lease.reason for e in events if e.lease.reason), "revoked")


_BACKENDS: dict[BackendKind, Any] = {}


def _client_backend(kind: BackendKind):
    if kind not in _BACKENDS:
        _BACKENDS[kind] = get_backend(kind)
    return _BACKENDS[kind]


def connect(
    address: str | None = None,
    *,
    state_dir: str | None = None,
    node: str | None = None,
    timeout: float = 10.0,
) -> Client:
    """Connect to the Harvest node: ``address`` (a gRPC target), else ``$HARVEST_ADDRESS``,
    else the node whose state dir is ``state_dir`` / ``$HARVEST_STATE_DIR`` / the default."""
    return Client(
        resolve_address(address, state_dir), node=node or node_name(state_dir), timeout_s=timeout
    )
