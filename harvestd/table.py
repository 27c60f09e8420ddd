"""The lease table: every lease and lender, the rules that move them between states,
and the invariants that hold between those moves.

It is the broker's only source of truth in memory and writes every change through the
:class:`~harvestd.store.Store` before it answers. It knows nothing of gRPC: the servicer
(:mod:`harvestd.service`) and the simulator drive it through plain method calls, and
it tells holders and lenders what happened through a :class:`Notifier`.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from harvestd.errors import (
    FailedPrecondition,
    InvalidArgument,
    LeaseRevoked,
    NoCapacity,
    NotFound,
    PermissionDenied,
)
from harvestd.metrics import Observer, Silent
from harvestd.model import LeaseRecord, LeaseState, LenderRecord, LenderState
from harvestd.policy import NearestBestFit, Policy
from harvestd.sizes import round_up
from harvestd.store import Store

log = logging.getLogger(__name__)

MAX_LEASE_BYTES = 1 << 50  # 1 PiB: anything larger is a mistake, not a request
MAX_AVOID = 1024  # lenders a grant may exclude: a node has far fewer


class Notifier(Protocol):
    """Where the table sends what holders and lenders must hear."""

    def revoke(self, lease: LeaseRecord) -> None:
        """Tell the holder to stop using ``lease`` and acknowledge."""

    def ended(self, lease: LeaseRecord) -> None:
        """Tell the holder ``lease`` ended without its doing (expired, forced, lender lost)."""

    def free(self, lease: LeaseRecord) -> None:
        """Tell the lender to free (``lease.clean``: or zero and pool) the lease's memory."""

    def freed(self, lender_id: str) -> None:
        """Memory of ``lender_id`` was confirmed free (wakes reclaim waiters). Called
        with the table's lock held at times: it must not wait for anything that may be
        held while calling into the table."""


class _Silent:
    def revoke(self, lease: LeaseRecord) -> None: ...
    def ended(self, lease: LeaseRecord) -> None: ...
    def free(self, lease: LeaseRecord) -> None: ...
    def freed(self, lender_id: str) -> None: ...


@dataclass(frozen=True)
class Timing:
    """The table's clocks and limits, in seconds."""

    default_ttl: float = 30.0
    min_ttl: float = 0.2
    max_ttl: float = 3600.0
    grace: float = 5.0  # a holder's time to acknowledge a revocation
    lender_timeout: float = 30.0  # a lender silent this long is down


class LeaseTable:
    """Leases and lenders, guarded by one lock; see the module docstring."""

    def __init__(
        self,
        store: Store,
        policy: Policy | None = None,
        notifier: Notifier | None = None,
        timing: Timing = Timing(),
        clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
    ) -> None:
        self.store = store
        self.policy = policy or NearestBestFit()
        self.notifier: Notifier = notifier or _Silent()
        self.observer: Observer = observer or Silent()
        self.timing = timing
        self.clock = clock
        self.lock = threading.RLock()
        snapshot = store.load()
        self.generation = snapshot.generation
        self.lenders: dict[str, LenderRecord] = {r.id: r for r in snapshot.lenders}
        # Leases never cross nodes: placement looks at the client's node only, so its cost
        # does not grow with the cluster.
        self._by_node: dict[str, dict[str, LenderRecord]] = {}
        for lender in self.lenders.values():
            self._by_node.setdefault(lender.node, {})[lender.id] = lender
        self.leases: dict[str, LeaseRecord] = {r.id: r for r in snapshot.leases}
        now = clock()
        for lease in self.leases.values():
            # Keepalives are not written to the store (they would be most of its writes):
            # after a restart every granted lease gets one fresh TTL, as etcd's leases do
            # after a leader change. Nothing is granted twice, and a holder that cannot
            # renew stops on its own clock regardless.
            if lease.state is LeaseState.GRANTED:
                lease.expires_at = max(lease.expires_at, now + lease.ttl_s)
            owner = self.lenders.get(lease.lender_id)
            if owner is not None:
                owner.held += lease.charged
        log.info(
            "lease table loaded: generation %d, %d lenders, %d live leases",
            self.generation,
            len(self.lenders),
            len(self.leases),
        )

    # ------------------------------------------------------------------ helpers

    def _next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def _lender(self, lender_id: str) -> LenderRecord:
        lender = self.lenders.get(lender_id)
        if lender is None:
            raise NotFound(f"no lender {lender_id!r}")
        return lender

    def _lease(self, lease_id: str) -> LeaseRecord:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise NotFound(f"no live lease {lease_id!r}")
        return lease

    def _current_lender(self, lender_id: str, generation: int) -> LenderRecord:
        lender = self._lender(lender_id)
        if generation != lender.generation:
            raise PermissionDenied(
                f"lender {lender_id} generation {generation} is stale (current {lender.generation})"
            )
        return lender

    def _end(
        self, lease: LeaseRecord, state: LeaseState, reason: str, clean: bool, now: float
    ) -> None:
        """Move a live lease to an ended state and queue its memory for freeing."""
        lease.state = state
        lease.reason = reason or lease.reason
        lease.clean = clean
        lease.ended_at = now
        lender = self.lenders.get(lease.lender_id)
        if lender is None or lender.generation != lease.lender_generation:
            # Its memory died with the lender process that lent it.
            self._mark_freed(lease)

    def _mark_freed(self, lease: LeaseRecord) -> None:
        if lease.freed:
            return
        lease.freed = True
        lender = self.lenders.get(lease.lender_id)
        if lender is not None and lease.lender_generation == lender.generation:
            lender.held -= lease.charged

    def _announce(self, ended: Iterable[LeaseRecord], told_holder: bool = False) -> None:
        """After a commit: tell lenders to free, and holders that their lease is gone."""
        for lease in ended:
            if not told_holder:
                self.notifier.ended(lease)
            if not lease.freed:
                self.notifier.free(lease)
            else:
                self.notifier.freed(lease.lender_id)

    def _forget(self, lease: LeaseRecord) -> None:
        if lease.freed and not lease.state.active:
            self.leases.pop(lease.id, None)

    # ------------------------------------------------------------------ lenders

    def register_lender(self, lender: LenderRecord) -> int:
        """Add or re-add a lender under a new generation; leases of an older generation
        of the same lender are revoked (that process and its memory are gone)."""
        if not lender.id:
            raise InvalidArgument("a lender needs an id")
        if not lender.pickup_address:
            raise InvalidArgument("a lender needs a pick-up address")
        with self.lock:
            now = self.clock()
            old = self.lenders.get(lender.id)
            lender.generation = self._next_generation()
            lender.state = LenderState.UP
            lender.last_report = now
            lender.reclaimed = old.reclaimed if old is not None else 0
            lender.held = 0
            revoked, dropped = [], []
            for lease in self.leases.values():
                if lease.lender_id != lender.id or lease.freed:
                    continue
                if lease.state.active:
                    self._end(lease, LeaseState.REVOKED, "lender restarted", False, now)
                    revoked.append(lease)
                else:
                    dropped.append(lease)
                # Its memory died with the process that lent it.
                lease.freed = True
            if old is not None:
                self._by_node.get(old.node, {}).pop(lender.id, None)
            self.lenders[lender.id] = lender
            self._by_node.setdefault(lender.node, {})[lender.id] = lender
            self.store.commit(revoked + dropped, [lender], self.generation)
            if revoked:
                self.observer.count("revoke_forced", len(revoked))
            for lease in revoked:
                self.notifier.ended(lease)
            for lease in revoked + dropped:
                self._forget(lease)
            self.notifier.freed(lender.id)
            log.info(
                "lender %s registered: generation %d, node %s, %d bytes",
                lender.id,
                lender.generation,
                lender.node,
                lender.capacity,
                extra={"lender": lender.id},
            )
            return lender.generation

    def report_lender(
        self,
        lender_id: str,
        generation: int,
        capacity: int,
        device_total: int = 0,
        device_free: int = 0,
        tenant: tuple[int, int, float] = (0, 0, 0.0),
    ) -> LenderRecord:
        """A lender's report of what it can lend (and of its device and the device's
        tenant, if any: ``tenant`` is its use, its peak and the lender's peak window)."""
        with self.lock:
            lender = self._current_lender(lender_id, generation)
            lender.capacity = capacity
            lender.device_total = device_total
            lender.device_free = device_free
            lender.tenant_bytes, lender.tenant_peak, lender.peak_window_s = tenant
            lender.last_report = self.clock()
            if lender.state is LenderState.DOWN:
                lender.state = LenderState.UP
            self.store.commit(lenders=[lender])
            return lender

    def confirm_free(self, lender_id: str, generation: int, lease_ids: Iterable[str]) -> None:
        """The lender freed (or pooled) these leases' memory."""
        with self.lock:
            self._current_lender(lender_id, generation)
            done = []
            for lease_id in lease_ids:
                lease = self.leases.get(lease_id)
                if lease is None or lease.lender_id != lender_id or lease.state.active:
                    continue
                self._mark_freed(lease)
                done.append(lease)
            if done:
                self.store.commit(done)  # a lender's held bytes are derived: not stored
                for lease in done:
                    self._forget(lease)
        self.notifier.freed(lender_id)

    def pending_frees(self, lender_id: str) -> list[LeaseRecord]:
        """Ended leases of ``lender_id`` whose memory is not yet confirmed free."""
        with self.lock:
            lender = self.lenders.get(lender_id)
            return [
                l
                for l in self.leases.values()
                if l.lender_id == lender_id
                and not l.state.active
                and not l.freed
                and lender is not None
                and l.lender_generation == lender.generation
            ]

    def check_pickup(
        self,
        lender_id: str,
        lender_generation: int,
        lease_id: str,
        token: bytes,
        lease_generation: int,
        holder_pid: int,
    ) -> LeaseRecord:
        """Whether the holder of ``token`` may pick up ``lease_id`` from this lender, once."""
        with self.lock:
            lender = self._current_lender(lender_id, lender_generation)
            lease = self.leases.get(lease_id)
            # One answer for every refusal: a caller learns nothing by guessing ids.
            if (
                lease is None
                or lease.lender_id != lender.id
                or not hmac.compare_digest(lease.token, token)
                or lease.generation != lease_generation
                or lease.lender_generation != lender.generation
            ):
                raise PermissionDenied(
                    "no live lease for that token (unknown id, wrong token, or the lease ended)"
                )
            if lease.state is not LeaseState.GRANTED or lease.expires_at <= self.clock():
                raise LeaseRevoked(f"lease {lease_id} is {lease.state.label}")
            if lease.picked_up:
                raise PermissionDenied(f"lease {lease_id} was already picked up")
            lease.picked_up = True
            lease.holder_pid = holder_pid or lease.holder_pid
            self.store.commit([lease])
            return lease

    # ------------------------------------------------------------------ clients

    def grant(
        self,
        client_id: str,
        nbytes: int,
        ttl_s: float = 0.0,
        node: str = "",
        near_gpu: str = "",
        priority: int = 0,
        holder_pid: int = 0,
        backend: int = 0,
        avoid: Iterable[str] = (),
    ) -> tuple[LeaseRecord, LenderRecord]:
        """A new lease of ``nbytes`` on the client's node, or NoCapacity at once; never
        from a lender in ``avoid`` (the other stripes of a striped lease)."""
        avoid = frozenset(avoid)
        if len(avoid) > MAX_AVOID:
            raise InvalidArgument(f"at most {MAX_AVOID} lenders to avoid, got {len(avoid)}")
        if not client_id:
            raise InvalidArgument("a grant needs a client id")
        if nbytes <= 0 or nbytes > MAX_LEASE_BYTES:
            raise InvalidArgument(
                f"lease size must be between 1 byte and {MAX_LEASE_BYTES}, got {nbytes}"
            )
        ttl = ttl_s or self.timing.default_ttl
        if not (self.timing.min_ttl <= ttl <= self.timing.max_ttl):
            raise InvalidArgument(
                f"ttl must be between {self.timing.min_ttl} and "
                f"{self.timing.max_ttl} seconds, got {ttl}"
            )
        with self.lock:
            lender = self.policy.place(
                list(self._by_node.get(node, {}).values()), nbytes, node, near_gpu, backend, avoid
            )
            if lender is None:
                self.observer.count("grant_refused")
                raise NoCapacity(
                    self._no_capacity_reason(nbytes, node, backend)
                    + (f" (avoiding {len(avoid)} lenders)" if avoid else "")
                )
            now = self.clock()
            lease = LeaseRecord(
                id="lease-" + secrets.token_hex(6),
                lender_id=lender.id,
                client_id=client_id,
                nbytes=nbytes,
                charged=round_up(nbytes, lender.granularity),
                token=secrets.token_bytes(32),
                generation=self._next_generation(),
                lender_generation=lender.generation,
                ttl_s=ttl,
                created_at=now,
                expires_at=now + ttl,
                node=node,
                priority=priority,
                holder_pid=holder_pid,
            )
            lender.held += lease.charged
            try:
                self.store.commit([lease], generation=self.generation)
            except Exception:
                lender.held -= lease.charged
                raise
            self.leases[lease.id] = lease
            self.observer.count("grant")
            log.debug(
                "granted %s: %d bytes on %s to %s",
                lease.id,
                nbytes,
                lender.id,
                client_id,
                extra={"lender": lender.id, "client": client_id},
            )
            return lease, lender

    def _no_capacity_reason(self, nbytes: int, node: str, backend: int) -> str:
        here = list(self._by_node.get(node, {}).values())
        up = [
            l for l in here if l.state is LenderState.UP and (not backend or l.backend == backend)
        ]
        if not here:
            return f"no lender on node {node!r}"
        if not up:
            return f"no lender on node {node!r} is up for that backend"
        most = max(l.free for l in up)
        return f"no lender on node {node!r} has {nbytes} bytes free (largest free: {most})"

    def _holders_lease(self, client_id: str, lease_id: str) -> LeaseRecord:
        lease = self._lease(lease_id)
        if lease.client_id != client_id:
            raise PermissionDenied(f"lease {lease_id} belongs to another client")
        return lease

    def keepalive(
        self, client_id: str, lease_ids: Iterable[str]
    ) -> tuple[list[LeaseRecord], list[LeaseRecord]]:
        """Extend each GRANTED lease by its TTL; return (alive, lost)."""
        alive, lost = [], []
        with self.lock:
            now = self.clock()
            for lease_id in lease_ids:
                lease = self.leases.get(lease_id)
                if lease is None or lease.client_id != client_id:
                    lost.append(
                        lease
                        or LeaseRecord(
                            id=lease_id,
                            lender_id="",
                            client_id=client_id,
                            nbytes=0,
                            charged=0,
                            token=b"",
                            generation=0,
                            lender_generation=0,
                            ttl_s=0,
                            created_at=0,
                            expires_at=0,
                            state=LeaseState.EXPIRED,
                            reason="unknown lease",
                        )
                    )
                elif lease.state is LeaseState.GRANTED and lease.expires_at > now:
                    lease.expires_at = now + lease.ttl_s
                    alive.append(lease)
                else:
                    lost.append(lease)
            if lost:
                self.observer.count("keepalive_miss", len(lost))
        return alive, lost

    def release(self, client_id: str, lease_id: str) -> LeaseRecord:
        """The holder gives a lease back (idempotent once it has ended)."""
        with self.lock:
            lease = self._holders_lease(client_id, lease_id)
            if not lease.state.active:
                return lease
            self._end(lease, LeaseState.RELEASED, "released", True, self.clock())
            self.observer.count("release")
            self.store.commit([lease])
            self._announce([lease], told_holder=True)
            self._forget(lease)
            return lease

    def ack_revoke(self, client_id: str, lease_id: str) -> LeaseRecord:
        """The holder fenced and unmapped a lease it was told to give up."""
        with self.lock:
            lease = self._holders_lease(client_id, lease_id)
            if lease.state is LeaseState.GRANTED:
                raise FailedPrecondition(f"lease {lease_id} is not being revoked")
            if lease.state is LeaseState.REVOKING:
                now = self.clock()
                self._end(lease, LeaseState.REVOKED, lease.reason, True, now)
                self.observer.count("revoke_acked")
                self.observer.observe(
                    "revocation", now - (lease.revoke_deadline - self.timing.grace)
                )
                self.store.commit([lease])
                self._announce([lease], told_holder=True)
                self._forget(lease)
            return lease

    # ------------------------------------------------------------------ operators

    def revoke(
        self, lease_id: str, reason: str = "revoked by operator", force: bool = False
    ) -> LeaseRecord:
        """Ask the holder to give the lease up (``force``: end it now, unclean)."""
        with self.lock:
            lease = self._lease(lease_id)
            if not lease.state.active:
                raise LeaseRevoked(f"lease {lease_id} already {lease.state.label}")
            self._revoke([lease], reason, force)
            return lease

    def _revoke(self, leases: list[LeaseRecord], reason: str, force: bool) -> None:
        now = self.clock()
        asked, ended = [], []
        for lease in leases:
            if force:
                self._end(lease, LeaseState.REVOKED, reason, False, now)
                ended.append(lease)
            elif lease.state is LeaseState.GRANTED:
                lease.state = LeaseState.REVOKING
                lease.reason = reason
                lease.revoke_deadline = now + self.timing.grace
                asked.append(lease)
        if not asked and not ended:
            return
        self.observer.count("revoke", len(asked) + len(ended))
        if ended:
            self.observer.count("revoke_forced", len(ended))
        self.store.commit(asked + ended)
        for lease in asked:
            self.notifier.revoke(lease)
        self._announce(ended)
        for lease in ended:
            self._forget(lease)

    def reclaim(self, lender_id: str, nbytes: int) -> list[LeaseRecord]:
        """The lender's tenant takes ``nbytes`` back: revoke just enough leases, lowest
        priority first and newest first among equals. Returns the leases being revoked
        (those this call chose, and those already on their way out)."""
        if nbytes < 0 or nbytes > MAX_LEASE_BYTES:
            raise InvalidArgument(f"reclaim size must be between 0 and {MAX_LEASE_BYTES}")
        with self.lock:
            lender = self._lender(lender_id)
            # A report may have put the capacity below what the tenant already reclaimed
            # (a GPU tenant grew into the reserve): the tenant keeps what it has, and the
            # call still revokes down to what is lendable now.
            taken = max(0, min(lender.capacity, lender.reclaimed + nbytes) - lender.reclaimed)
            lender.reclaimed += taken
            self.store.commit(lenders=[lender])
            self.observer.count("reclaim", lender=lender_id)
            self.observer.count("reclaimed_bytes", taken, lender=lender_id)
            return self._make_room(lender, f"reclaimed by tenant of {lender_id}")

    def _make_room(self, lender: LenderRecord, reason: str) -> list[LeaseRecord]:
        mine = [
            l
            for l in self.leases.values()
            if l.lender_id == lender.id and l.lender_generation == lender.generation and not l.freed
        ]
        going = [l for l in mine if l.state is not LeaseState.GRANTED]
        excess = lender.held - lender.lendable - sum(l.charged for l in going)
        victims = []
        candidates = sorted(
            (l for l in mine if l.state is LeaseState.GRANTED),
            key=lambda l: (l.priority, -l.created_at),
        )
        for lease in candidates:
            if excess <= 0:
                break
            victims.append(lease)
            excess -= lease.charged
        self._revoke(victims, reason, force=False)
        return going + victims

    def restore(self, lender_id: str, nbytes: int = 0) -> LenderRecord:
        """The tenant gives ``nbytes`` (0: all) of what it reclaimed back to lending."""
        if nbytes < 0:
            raise InvalidArgument("restore size must not be negative")
        with self.lock:
            lender = self._lender(lender_id)
            lender.reclaimed = 0 if nbytes == 0 else max(0, lender.reclaimed - nbytes)
            if lender.state is LenderState.DRAINING and nbytes == 0:
                lender.state = LenderState.UP
            self.store.commit(lenders=[lender])
            return lender

    def drain(self, lender_id: str) -> list[LeaseRecord]:
        """Stop granting from a lender and revoke all its leases."""
        with self.lock:
            lender = self._lender(lender_id)
            lender.state = LenderState.DRAINING
            self.store.commit(lenders=[lender])
            live = [l for l in self.leases.values() if l.lender_id == lender_id and l.state.active]
            self._revoke(live, f"lender {lender_id} draining", force=False)
            return live

    def lenders_lost(self, lender_ids: Iterable[str], reason: str) -> list[LeaseRecord]:
        """These lenders are gone with their memory (their node died): mark them down and
        end their leases now; there is nothing left to free."""
        with self.lock:
            now = self.clock()
            down, ended, changed = [], [], []
            for lender_id in lender_ids:
                lender = self.lenders.get(lender_id)
                if lender is None or lender.state is LenderState.DOWN:
                    continue
                lender.state = LenderState.DOWN
                down.append(lender)
                for lease in self.leases.values():
                    if lease.lender_id != lender_id or lease.freed:
                        continue
                    if lease.state.active:
                        self._end(lease, LeaseState.REVOKED, reason, False, now)
                        ended.append(lease)
                    self._mark_freed(lease)
                    changed.append(lease)
            if not down:
                return []
            self.store.commit(changed, down)
            self.observer.count("lender_down", len(down))
            if ended:
                self.observer.count("revoke_forced", len(ended))
            for lease in ended:
                self.notifier.ended(lease)
            for lease in changed:
                self._forget(lease)
            for lender in down:
                log.warning(
                    "lender %s lost (%s): %d leases ended",
                    lender.id,
                    reason,
                    sum(1 for l in ended if l.lender_id == lender.id),
                    extra={"lender": lender.id},
                )
                self.notifier.freed(lender.id)
            return ended

    def unfreed(self, lease_ids: Iterable[str]) -> list[str]:
        """Which of these leases still hold memory on their lender."""
        with self.lock:
            return [i for i in lease_ids if i in self.leases and not self.leases[i].freed]

    # ------------------------------------------------------------------ time

    def sweep(self) -> list[LeaseRecord]:
        """Expire leases past their TTL, force revocations past their grace period, and
        mark silent lenders down. Returns the leases that ended."""
        with self.lock:
            now = self.clock()
            ended = []
            for lease in list(self.leases.values()):
                if lease.state is LeaseState.GRANTED and lease.expires_at <= now:
                    self._end(lease, LeaseState.EXPIRED, "no keepalive within the TTL", False, now)
                    self.observer.count("expiry")
                    ended.append(lease)
                elif lease.state is LeaseState.REVOKING and lease.revoke_deadline <= now:
                    self._end(
                        lease,
                        LeaseState.REVOKED,
                        lease.reason + " (holder did not acknowledge in time)",
                        False,
                        now,
                    )
                    self.observer.count("revoke_forced")
                    ended.append(lease)
            down = []
            for lender in self.lenders.values():
                if (
                    lender.state is not LenderState.DOWN
                    and now - lender.last_report > self.timing.lender_timeout
                ):
                    lender.state = LenderState.DOWN
                    down.append(lender)
                    self.observer.count("lender_down")
                    for lease in self.leases.values():
                        if lease.lender_id == lender.id and lease.state.active:
                            self._end(
                                lease, LeaseState.REVOKED, "lender stopped reporting", False, now
                            )
                            self.observer.count("revoke_forced")
                            ended.append(lease)
            if ended or down:
                self.store.commit(ended, down)
                self._announce(ended)
                for lease in ended:
                    self._forget(lease)
                for lender in down:
                    log.warning(
                        "lender %s stopped reporting: marked down",
                        lender.id,
                        extra={"lender": lender.id},
                    )
            return ended

    # ------------------------------------------------------------------ reading

    def live_leases(self, lender_id: str = "", client_id: str = "") -> list[LeaseRecord]:
        """Leases whose holder may still use them, or whose memory is not yet free."""
        with self.lock:
            return [
                l
                for l in self.leases.values()
                if (not lender_id or l.lender_id == lender_id)
                and (not client_id or l.client_id == client_id)
            ]

    def revoking_for(self, client_id: str) -> list[LeaseRecord]:
        """Revocations this client has not acknowledged yet."""
        with self.lock:
            return [
                l
                for l in self.leases.values()
                if l.client_id == client_id and l.state is LeaseState.REVOKING
            ]

    def check_invariants(self) -> None:
        """Raise AssertionError if the table breaks a promise (used by tests)."""
        with self.lock:
            for lender in self.lenders.values():
                held = sum(
                    l.charged
                    for l in self.leases.values()
                    if l.lender_id == lender.id
                    and not l.freed
                    and l.lender_generation == lender.generation
                )
                assert held == lender.held, f"{lender.id}: held {lender.held} != {held}"
            indexed = {i: l for lenders in self._by_node.values() for i, l in lenders.items()}
            assert indexed.keys() == self.lenders.keys() and all(
                indexed[i] is l and l.id in self._by_node[l.node] for i, l in self.lenders.items()
            ), "the node index is out of step"
            gens = [l.generation for l in self.leases.values()]
            assert len(gens) == len(set(gens)), "a generation was granted twice"
            assert all(g <= self.generation for g in gens), "generation above the counter"
