"""The broker's gRPC service: turns requests into lease-table calls, and table events
into the watch streams that holders and lenders keep open."""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import threading
import time
from typing import Callable, Iterator

import grpc

from harvestd import __version__
from harvestd.errors import HarvestError, InvalidArgument, abort_with
from harvestd.model import LeaseRecord, LenderRecord, LenderState
from harvestd.table import MAX_LEASE_BYTES, LeaseTable
from protos import harvest_pb2 as pb
from protos import harvest_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

UINT64_MAX = (1 << 64) - 1
MAX_WAIT_S = 3600.0  # Drain and Reclaim hold a worker thread while they wait

# How often a stream wakes with nothing to send, to notice that its peer went away.
_STREAM_POLL_S = 0.5
# Drain and Reclaim answer this long (at most a tenth of the caller's time) before the
# caller's own deadline: "not freed yet" tells it more than DEADLINE_EXCEEDED does.
_REPLY_MARGIN_S = 0.25
# The longest a waiter sleeps between checks; every free wakes it sooner. A backstop only.
_WAIT_POLL_S = 0.5


class EventHub:
    """Queues for the streams open now; a :class:`~harvestd.table.Notifier`.

    The table is the truth: a stream that (re)connects first gets what is pending from
    the table, so nothing is lost for a peer that was not listening; receivers treat
    every event as idempotent.
    """

    def __init__(self, table_ref: Callable[[], LeaseTable]) -> None:
        self._table = table_ref
        self._lock = threading.Lock()
        self._holders: dict[str, queue.Queue] = {}
        self._lenders: dict[str, queue.Queue] = {}
        # Never held while calling into the table: the table calls freed() with its own
        # lock held, so taking them in the other order would deadlock.
        self._freed_cond = threading.Condition()
        self._freed_seq = 0  # bumped by every wake-up, so that none is missed

    def _push(self, streams: dict[str, queue.Queue], key: str, event) -> None:
        with self._lock:
            q = streams.get(key)
        if q is not None:
            q.put(event)

    def revoke(self, lease: LeaseRecord) -> None:
        """Queue a REVOKE for the holder's stream."""
        self._push(
            self._holders,
            lease.client_id,
            pb.LeaseEvent(kind=pb.LeaseEvent.REVOKE, lease=self._lease_pb(lease)),
        )

    def ended(self, lease: LeaseRecord) -> None:
        """Queue an ENDED for the holder's stream."""
        self._push(
            self._holders,
            lease.client_id,
            pb.LeaseEvent(kind=pb.LeaseEvent.ENDED, lease=self._lease_pb(lease)),
        )

    def free(self, lease: LeaseRecord) -> None:
        """Queue a FREE for the lender's stream."""
        self._push(self._lenders, lease.lender_id, _free_event(lease))

    def freed(self, lender_id: str) -> None:
        """Wake whoever waits for memory to come free."""
        self.wake()

    def wake(self) -> None:
        """Wake every :meth:`wait_freed` so that it looks again."""
        with self._freed_cond:
            self._freed_seq += 1
            self._freed_cond.notify_all()

    def freed_seq(self) -> int:
        """A count of wake-ups; take it *before* looking at the table, then pass it to
        :meth:`wait_freed`, and a wake-up in between is not lost."""
        with self._freed_cond:
            return self._freed_seq

    def wait_freed(self, seen: int, timeout_s: float) -> None:
        """Block until a wake-up after ``seen`` (from :meth:`freed_seq`), or ``timeout_s``."""
        with self._freed_cond:
            self._freed_cond.wait_for(lambda: self._freed_seq != seen, timeout_s)

    def _lease_pb(self, lease: LeaseRecord) -> pb.Lease:
        return lease.to_pb(self._table().lenders.get(lease.lender_id))

    def open(self, kind: str, key: str) -> queue.Queue:
        """A fresh queue for a stream; a second stream for the same key replaces the first."""
        streams = self._holders if kind == "holder" else self._lenders
        q: queue.Queue = queue.Queue()
        with self._lock:
            old = streams.get(key)
            streams[key] = q
        if old is not None:
            old.put(None)  # ends the old stream
        return q

    def close(self, kind: str, key: str, q: queue.Queue) -> None:
        """Forget a stream's queue (if it is still the current one)."""
        streams = self._holders if kind == "holder" else self._lenders
        with self._lock:
            if streams.get(key) is q:
                del streams[key]

    def shutdown(self) -> None:
        """End every open stream."""
        with self._lock:
            queues = list(self._holders.values()) + list(self._lenders.values())
            self._holders.clear()
            self._lenders.clear()
        for q in queues:
            q.put(None)


def _free_event(lease: LeaseRecord) -> pb.LenderEvent:
    return pb.LenderEvent(
        kind=pb.LenderEvent.FREE, lease_id=lease.id, nbytes=lease.charged, clean=lease.clean
    )


def _rpc(method):
    """Map our exceptions to statuses in one place; anything else is a bug: INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except HarvestError as err:
            abort_with(context, err)
        except Exception:  # noqa: BLE001 - the client must get an answer, not a hang
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed; see broker log")

    return wrapper


def _require(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is required")
    return value


class BrokerService(pb_grpc.BrokerServicer):
    """gRPC methods over a :class:`LeaseTable`."""

    def __init__(self, table: LeaseTable, hub: EventHub, address: str, store_path: str) -> None:
        self.table = table
        self.hub = hub
        self.address = address
        self.store_path = store_path
        self.started_at = time.time()
        self._stopping = threading.Event()

    def stop(self) -> None:
        """End every stream (the server is going down)."""
        self._stopping.set()
        self.hub.shutdown()

    # ------------------------------------------------------------ lenders

    @_rpc
    def RegisterLender(self, request, context):
        """A lender (re)joins; it gets a new generation."""
        info = request.lender
        _require(info.id, "lender.id")
        if info.backend not in (pb.BACKEND_HOST, pb.BACKEND_CUDA_VMM, pb.BACKEND_CUDA_IPC):
            raise InvalidArgument(f"lender.backend {info.backend} is not a known backend")
        if info.capacity > MAX_LEASE_BYTES:
            raise InvalidArgument(f"lender.capacity must be at most {MAX_LEASE_BYTES}")
        record = LenderRecord(
            id=info.id,
            node=info.node,
            backend=info.backend,
            pickup_address=info.pickup_address,
            capacity=info.capacity,
            generation=0,
            gpu_uuid=info.gpu_uuid,
            gpu_index=info.gpu_index,
            links={l.peer_uuid: l.nvlinks for l in info.links},
            pid=info.pid,
            granularity=info.granularity or 4096,
            device_total=info.device_total,
            device_free=info.device_free,
            ray_node_id=info.ray_node_id,
        )
        return pb.RegisterLenderReply(generation=self.table.register_lender(record))

    @_rpc
    def ReportLender(self, request, context):
        """A lender's periodic capacity report."""
        if request.capacity > MAX_LEASE_BYTES:
            raise InvalidArgument(f"capacity must be at most {MAX_LEASE_BYTES}")
        if not math.isfinite(request.peak_window_s) or request.peak_window_s < 0:
            raise InvalidArgument(f"peak window must be >= 0 seconds, got {request.peak_window_s}")
        lender = self.table.report_lender(
            _require(request.lender_id, "lender_id"),
            request.generation,
            request.capacity,
            request.device_total,
            request.device_free,
            (request.tenant_bytes, request.tenant_peak, request.peak_window_s),
        )
        return pb.ReportLenderReply(reclaimed=lender.reclaimed)

    def WatchLender(self, request, context) -> Iterator[pb.LenderEvent]:
        """FREE events for one lender: first what is pending, then as leases end."""
        try:
            lender = self.table._current_lender(
                _require(request.lender_id, "lender_id"), request.generation
            )
        except HarvestError as err:
            abort_with(context, err)
            return
        q = self.hub.open("lender", lender.id)
        try:
            for lease in self.table.pending_frees(lender.id):
                yield _free_event(lease)
            yield from self._drain(q, context)
        finally:
            self.hub.close("lender", lender.id, q)

    @_rpc
    def ConfirmFree(self, request, context):
        """The lender freed these leases' memory."""
        self.table.confirm_free(
            _require(request.lender_id, "lender_id"), request.generation, request.lease_ids
        )
        return pb.ConfirmFreeReply()

    @_rpc
    def CheckPickup(self, request, context):
        """May this token pick up this lease from this lender?"""
        lease = self.table.check_pickup(
            _require(request.lender_id, "lender_id"),
            request.lender_generation,
            _require(request.lease_id, "lease_id"),
            request.token,
            request.lease_generation,
            request.holder_pid,
        )
        return pb.CheckPickupReply(nbytes=lease.nbytes, expires_at=lease.expires_at)

    # ------------------------------------------------------------ clients

    @_rpc
    def Grant(self, request, context):
        """A new lease, or RESOURCE_EXHAUSTED at once."""
        start = time.perf_counter()
        lease, lender = self.table.grant(
            _require(request.client_id, "client_id"),
            request.nbytes,
            request.ttl_s,
            request.node,
            request.near_gpu,
            request.priority,
            request.holder_pid,
            request.backend,
            request.avoid_lenders,
        )
        reply = lease.to_pb(lender, with_token=True)
        self.table.observer.observe("grant", time.perf_counter() - start)
        return reply

    @_rpc
    def KeepAlive(self, request, context):
        """Extend the caller's leases; report the ones it lost."""
        alive, lost = self.table.keepalive(
            _require(request.client_id, "client_id"), request.lease_ids
        )
        return pb.KeepAliveReply(alive=[l.to_pb() for l in alive], lost=[l.to_pb() for l in lost])

    @_rpc
    def Release(self, request, context):
        """The holder gives a lease back."""
        lease = self.table.release(
            _require(request.client_id, "client_id"), _require(request.lease_id, "lease_id")
        )
        return pb.ReleaseReply(lease=lease.to_pb())

    @_rpc
    def AckRevoke(self, request, context):
        """The holder has fenced a revoked lease."""
        self.table.ack_revoke(
            _require(request.client_id, "client_id"), _require(request.lease_id, "lease_id")
        )
        return pb.AckRevokeReply()

    def Watch(self, request, context) -> Iterator[pb.LeaseEvent]:
        """Revocations for one client: HELLO, what is pending, then as they happen."""
        if not request.client_id:
            abort_with(context, InvalidArgument("client_id is required"))
            return
        q = self.hub.open("holder", request.client_id)
        try:
            yield pb.LeaseEvent(kind=pb.LeaseEvent.HELLO)
            for lease in self.table.revoking_for(request.client_id):
                yield pb.LeaseEvent(
                    kind=pb.LeaseEvent.REVOKE,
                    lease=lease.to_pb(self.table.lenders.get(lease.lender_id)),
                )
            yield from self._drain(q, context)
        finally:
            self.hub.close("holder", request.client_id, q)

    def _drain(self, q: queue.Queue, context) -> Iterator:
        while context.is_active() and not self._stopping.is_set():
            try:
                event = q.get(timeout=_STREAM_POLL_S)
            except queue.Empty:
                continue
            if event is None:
                return
            yield event

    # ------------------------------------------------------------ operators

    @_rpc
    def Revoke(self, request, context):
        """Revoke one lease (the holder is asked; ``force`` ends it now)."""
        lease = self.table.revoke(
            _require(request.lease_id, "lease_id"),
            request.reason or "revoked by operator",
            request.force,
        )
        return pb.RevokeReply(lease=lease.to_pb())

    def _wait_freed(self, lease_ids: list[str], timeout_s: float, context) -> bool:
        """Wait until none of ``lease_ids`` holds memory on its lender: True once so,
        False if ``timeout_s``, the caller's deadline or its cancellation comes first (a
        worker thread is held meanwhile, so it must not outlive the caller)."""
        now = time.monotonic()
        deadline = now + timeout_s
        if context is not None:
            remaining = context.time_remaining()
            if remaining is not None:
                deadline = min(deadline, now + remaining - min(_REPLY_MARGIN_S, remaining / 10))
            # A cancelled or expired call wakes us at once rather than at the next poll.
            context.add_callback(self.hub.wake)
        while True:
            seen = self.hub.freed_seq()
            if not self.table.unfreed(lease_ids):
                return True
            left = deadline - time.monotonic()
            if left <= 0 or (context is not None and not context.is_active()):
                return False
            self.hub.wait_freed(seen, min(left, _WAIT_POLL_S))

    def _timeout(self, requested: float) -> float:
        if not math.isfinite(requested) or requested < 0 or requested > MAX_WAIT_S:
            raise InvalidArgument(
                f"timeout must be between 0 and {MAX_WAIT_S:.0f} seconds, got {requested}"
            )
        return requested or self.table.timing.grace + 2.0

    @_rpc
    def Drain(self, request, context):
        """Stop a lender's grants, revoke its leases, wait for their memory."""
        timeout = self._timeout(request.timeout_s)
        leases = self.table.drain(_require(request.lender_id, "lender_id"))
        ids = [l.id for l in leases]
        return pb.DrainReply(revoked=ids, freed=self._wait_freed(ids, timeout, context))

    @_rpc
    def Reclaim(self, request, context):
        """The tenant takes memory back; returns once it is free (or the timeout)."""
        start = time.monotonic()
        timeout = self._timeout(request.timeout_s)
        leases = self.table.reclaim(_require(request.lender_id, "lender_id"), request.nbytes)
        ids = [l.id for l in leases]
        freed = self._wait_freed(ids, timeout, context)
        if freed:
            self.table.observer.observe("reclaim", time.monotonic() - start)
        lender = self.table.lenders[request.lender_id]
        return pb.ReclaimReply(
            revoked=ids, reclaimed=lender.reclaimed, freed=freed, elapsed_s=time.monotonic() - start
        )

    @_rpc
    def Restore(self, request, context):
        """The tenant gives reclaimed memory back to lending."""
        lender = self.table.restore(_require(request.lender_id, "lender_id"), request.nbytes)
        return pb.RestoreReply(reclaimed=lender.reclaimed)

    @_rpc
    def ListLeases(self, request, context):
        """Live leases (and, on request, ended ones from the store)."""
        leases = self.table.live_leases(request.lender_id, request.client_id)
        if request.include_ended:
            seen = {l.id for l in leases}
            leases += [
                l
                for l in self.table.store.history()
                if l.id not in seen
                and (not request.lender_id or l.lender_id == request.lender_id)
                and (not request.client_id or l.client_id == request.client_id)
            ]
        lenders = self.table.lenders
        leases.sort(key=lambda l: l.created_at)
        return pb.ListLeasesReply(leases=[l.to_pb(lenders.get(l.lender_id)) for l in leases])

    @_rpc
    def ListLenders(self, request, context):
        """Every lender the broker knows."""
        with self.table.lock:
            lenders = sorted(self.table.lenders.values(), key=lambda l: (l.node, l.id))
            return pb.ListLendersReply(lenders=[l.to_pb() for l in lenders])

    @_rpc
    def Status(self, request, context):
        """One summary of the node."""
        with self.table.lock:
            up = [l for l in self.table.lenders.values() if l.state is LenderState.UP]
            active = [l for l in self.table.leases.values() if l.state.active]
            return pb.StatusReply(
                version=__version__,
                address=self.address,
                store_path=self.store_path,
                started_at=self.started_at,
                lenders_up=len(up),
                leases_active=len(active),
                bytes_lendable=min(UINT64_MAX, sum(l.lendable for l in up)),
                bytes_granted=min(UINT64_MAX, sum(l.held for l in self.table.lenders.values())),
                generation=self.table.generation,
                pid=os.getpid(),
            )
