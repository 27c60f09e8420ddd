"""A lender: lends one GPU's (or one host pool's) spare memory through the broker.

It registers with the broker, reports what it can lend, hands allocations out through
its pick-up socket once the broker vouches for the token, and frees (or zeroes and
pools) an allocation when the broker says its lease ended. :func:`lender.actor.lender_actor_class`
runs it as a Ray actor; it runs as well in any plain process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

import grpc

from harvestd.channel import broker_channel
from harvestd.errors import (
    FailedPrecondition,
    HarvestError,
    LeaseRevoked,
    NotFound,
    PermissionDenied,
    from_rpc_error,
)
from harvestd.paths import StateDir, node_name
from lender.backends import Allocation, BackendKind, get_backend
from lender.capacity import Capacity, capacity_for
from lender.config import LenderConfig
from lender.frees import Frees
from lender.host_device import HostDevice
from lender.metrics import LenderMetrics
from lender.pickup import Peer, PickupServer
from lender.pool import Pool
from lender.tenant_watch import ReclaimTrace, TenantWatch
from protos import harvest_pb2 as pb
from protos import harvest_pb2_grpc as pb_grpc

_log = logging.getLogger(__name__)


class Lender:
    """See the module docstring."""

    def __init__(self, config: LenderConfig) -> None:
        self.config = config
        self.id = config.lender_id
        # Every line this lender logs carries its id (a field of its own in JSON logs).
        self.log = logging.LoggerAdapter(_log, {"lender": self.id})
        self.node = config.node or node_name(config.state_dir)
        self.kind = BackendKind(config.backend)
        self.state = StateDir.resolve(config.state_dir).create()
        device = HostDevice(config.host_device) if config.host_device else None
        options: dict[str, Any] = (
            {"gpu_uuid": config.gpu_uuid} if self.kind.is_gpu else {"device": device}
        )
        self.backend = get_backend(self.kind, **options)
        self.capacity: Capacity = capacity_for(config, device)
        self.pool = Pool(self.backend, keep_bytes=self.capacity.pool_bytes())
        self.generation = 0
        self.last_reclaim_s = 0.0
        self.tenant_watch: TenantWatch | None = None
        if self.capacity.watches_tenant:
            self.tenant_watch = TenantWatch(
                self.capacity,
                self.pool,
                _BrokerCalls(self),
                self.held,
                config.pressure_interval_s,
                self.id,
            )
            self.tenant_watch.on_reclaim = self._reclaimed
        self._lock = threading.Lock()
        self._allocations: dict[str, Allocation] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()  # FREEs seen before a pick-up
        self._stop = threading.Event()
        self._channel = broker_channel(config.broker_address)
        self._broker = pb_grpc.BrokerStub(self._channel)
        self._pickup = PickupServer(str(self.state.pickup_socket(self.id)), self._hand_out)
        self.metrics = LenderMetrics(self.id, config.gpu_uuid, self.memory_bytes)
        self._frees = Frees(self._take, self._give_back, self._confirm_free, self._stop, self.log)
        self._threads = [
            threading.Thread(target=self._watch, name="harvest-lender-watch", daemon=True),
            *self._frees.threads,
            threading.Thread(target=self._report, name="harvest-lender-report", daemon=True),
        ]
        if self.tenant_watch is not None:
            self._threads.append(
                threading.Thread(
                    target=self.tenant_watch.run,
                    args=(self._stop,),
                    name="harvest-lender-tenant",
                    daemon=True,
                )
            )

    # ------------------------------------------------------------ life

    def start(self) -> "Lender":
        """Register with the broker, then serve pick-ups and follow the broker."""
        self._register()
        self._pickup.start()
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port)
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free every allocation this process holds."""
        self._stop.set()
        self._pickup.close()
        self._channel.close()
        with self._lock:
            allocations = list(self._allocations.values())
            self._allocations.clear()
        for alloc in allocations:
            self.pool.give_back(alloc, clean=False)
        self.pool.close()
        self._frees.close()
        self.log.info("lender %s stopped", self.id)

    def _register(self) -> None:
        info = self.capacity.describe()
        lender = pb.Lender(
            id=self.id,
            node=self.node,
            backend=self.kind.pb,
            gpu_uuid=info.gpu_uuid,
            gpu_index=info.gpu_index,
            links=[pb.GpuLink(peer_uuid=k, nvlinks=v) for k, v in info.links.items()],
            pickup_address=self._pickup.path,
            capacity=self.capacity.lendable(self.held()),
            pid=os.getpid(),
            granularity=self.backend.granularity,
            device_total=self.capacity.device_memory()[0],
            device_free=self.capacity.device_memory()[1],
            ray_node_id=self.config.ray_node_id,
        )
        reply = self._call(self._broker.RegisterLender, pb.RegisterLenderRequest(lender=lender))
        self.generation = reply.generation
        self.log.info(
            "lender %s registered as generation %d (%s, %d bytes)",
            self.id,
            self.generation,
            self.kind.value,
            lender.capacity,
        )

    def _call(self, method, request, timeout: float = 10.0):
        # wait_for_ready: a broker that restarts is back within seconds, and a pick-up or
        # a confirm that waits for it beats one that fails while the channel reconnects.
        try:
            return method(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def held(self) -> int:
        """Bytes this process holds for lending (handed out and pooled)."""
        return self.pool.out_bytes + self.pool.idle_bytes

    def memory_bytes(self) -> dict[str, int]:
        """This lender's memory by kind, as its metrics show it (the tenant's use and
        peak where a tenant is watched)."""
        out = {
            "handed_out": self.pool.out_bytes,
            "pooled": self.pool.idle_bytes,
            "lendable": self.capacity.lendable(self.held()),
        }
        tenant = self.capacity.tenant()
        if tenant is not None:
            out.update(tenant=tenant.now, tenant_peak=tenant.peak)
        return out

    def info(self) -> dict:
        """A summary for the daemon and tests."""
        with self._lock:
            handed_out = len(self._allocations)
        return {
            "id": self.id,
            "backend": self.kind.value,
            "node": self.node,
            "generation": self.generation,
            "pid": os.getpid(),
            "pickup_address": self._pickup.path,
            "handed_out": handed_out,
            "out_bytes": self.pool.out_bytes,
            "idle_bytes": self.pool.idle_bytes,
            "last_reclaim_s": self.last_reclaim_s,
            "last_reclaim": (
                self.tenant_watch.last.as_dict()
                if self.tenant_watch is not None and self.tenant_watch.last is not None
                else None
            ),
        }

    def _reclaimed(self, trace: ReclaimTrace) -> None:
        self.last_reclaim_s = trace.done_s
        self.metrics.tenant_latency.observe(trace.done_s)

    # ------------------------------------------------------------ pick-up

    def _hand_out(self, request: pb.PickupRequest, peer: Peer):
        if request.room:
            return self._make_room(request), None
        start = time.perf_counter()
        try:
            reply = self._hand_out_checked(request, peer)
        except HarvestError:
            self.metrics.refused.inc()
            raise
        self.metrics.pickups.inc()
        self.metrics.pickup_latency.observe(time.perf_counter() - start)
        return reply

    def _make_room(self, request: pb.PickupRequest) -> pb.PickupReply:
        """The device's tenant asks for room (:class:`client.tenant.Tenant`)."""
        if self.tenant_watch is None:
            raise FailedPrecondition(
                f"lender {self.id} lends a fixed budget and watches no tenant: "
                "reclaim through the broker (harvestd reclaim)"
            )
        elapsed, lendable = self.tenant_watch.make_room(request.room, request.timeout_s or 30.0)
        return pb.PickupReply(ok=True, elapsed_s=elapsed, lendable=lendable)

    def _hand_out_checked(self, request: pb.PickupRequest, peer: Peer):
        checked = self._call(
            self._broker.CheckPickup,
            pb.CheckPickupRequest(
                lender_id=self.id,
                lender_generation=self.generation,
                lease_id=request.lease_id,
                token=request.token,
                lease_generation=request.generation,
                holder_pid=peer.pid,
                holder_uid=peer.uid,
            ),
        )
        alloc = self.pool.take(checked.nbytes)
        with self._lock:
            ended = request.lease_id in self._ended
            if not ended:
                self._allocations[request.lease_id] = alloc
        if ended:  # the lease ended between the broker's check and now
            self.pool.give_back(alloc, clean=True)
            raise LeaseRevoked(f"lease {request.lease_id} ended during its pick-up")
        exported = self.backend.export(alloc)
        self.log.debug("lease %s picked up by pid %d", request.lease_id, peer.pid)
        return pb.PickupReply(
            ok=True,
            nbytes=checked.nbytes,
            alloc_bytes=alloc.nbytes,
            backend=self.kind.pb,
            gpu_uuid=exported.gpu_uuid,
            ipc_handle=exported.ipc_handle,
        ), exported.fd

    # ------------------------------------------------------------ following the broker

    def _take(self, lease_id: str) -> Allocation | None:
        """The allocation of a lease that ended, off our books (``None``: none here)."""
        with self._lock:
            alloc = self._allocations.pop(lease_id, None)
            if alloc is None:  # ended before its pick-up, or a FREE sent again
                self._ended[lease_id] = None
                while len(self._ended) > 100_000:
                    self._ended.popitem(last=False)
        return alloc

    def _confirm_free(self, lease_ids: list[str]) -> None:
        self._call(
            self._broker.ConfirmFree,
            pb.ConfirmFreeRequest(
                lender_id=self.id, generation=self.generation, lease_ids=lease_ids
            ),
        )

    def _give_back(self, alloc: Allocation, clean: bool) -> None:
        self.pool.give_back(alloc, clean=clean)
        self.metrics.freed(clean)
        if self.tenant_watch is not None:
            self.tenant_watch.freed()

    def _watch(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                stream = self._broker.WatchLender(
                    pb.WatchLenderRequest(lender_id=self.id, generation=self.generation)
                )
                for event in stream:
                    backoff = 0.1
                    if event.kind == pb.LenderEvent.FREE:
                        self._frees.put(event.lease_id, event.clean)
            except grpc.RpcError as err:
                self._recover(from_rpc_error(err))
            except HarvestError as err:
                self._recover(err)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _recover(self, err: HarvestError) -> None:
        if self._stop.is_set():
            return
        if isinstance(err, (NotFound, PermissionDenied)):
            # The broker no longer knows this generation: start over under a new one.
            self.log.warning("broker refused lender %s (%s): registering again", self.id, err)
            with self._lock:
                allocations = list(self._allocations.values())
                self._allocations.clear()
            for alloc in allocations:
                self.pool.give_back(alloc, clean=False)
            try:
                self._register()
            except HarvestError as exc:
                self.log.warning("registration failed: %s", exc)
        else:
            self.log.info("broker unreachable (%s); retrying", err)

    def _report(self) -> None:
        while not self._stop.wait(self.config.report_interval_s):
            try:
                self.report_capacity(self.capacity.lendable(self.held()))
            except HarvestError as err:
                if not self._stop.is_set():
                    self.log.info("report failed: %s", err)

    def report_capacity(self, capacity: int) -> None:
        """Tell the broker what this lender may hold now, with its device and tenant."""
        total, free = self.capacity.device_memory()
        tenant = self.capacity.tenant()
        self._call(
            self._broker.ReportLender,
            pb.ReportLenderRequest(
                lender_id=self.id,
                generation=self.generation,
                capacity=capacity,
                device_total=total,
                device_free=free,
                tenant_bytes=tenant.now if tenant else 0,
                tenant_peak=tenant.peak if tenant else 0,
                peak_window_s=self.capacity.peak_window_s,
            ),
        )
        if self.tenant_watch is not None:
            self.tenant_watch.reported = capacity


class _BrokerCalls:
    """A lender's broker calls for its :class:`~lender.tenant_watch.TenantWatch`."""

    def __init__(self, lender: Lender) -> None:
        self._lender = lender

    def report(self, capacity: int) -> None:
        """See :class:`lender.tenant_watch.Broker`."""
        self._lender.report_capacity(capacity)

    def reclaim(self) -> Any:
        """See :class:`lender.tenant_watch.Broker`."""
        lender = self._lender
        return lender._call(
            lender._broker.Reclaim,
            pb.ReclaimRequest(lender_id=lender.id, nbytes=0),
            timeout=60.0,
        )
