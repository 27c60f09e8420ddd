"""The lease table against a model (Hypothesis stateful): ``TableMachine`` drives a real
:class:`LeaseTable` over a real :class:`SqliteStore` on a fake clock, including restarts
from the same file, and checks it against a small model after every step.

Each bug it found is fixed, and pinned by a test of its own below (named in
docs/reliability.md); the random strategies draw those inputs too, so the machine guards
them as well.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from support.clock import Clock
from support.recorder import Recorder

from harvestd.broker_metrics import BrokerMetrics
from harvestd.errors import (
    FailedPrecondition,
    HarvestError,
    InvalidArgument,
    LeaseRevoked,
    NoCapacity,
    NotFound,
    PermissionDenied,
)
from harvestd.invariants import check_store
from harvestd.model import LeaseState, LenderRecord, LenderState
from harvestd.sizes import KiB, MiB, round_up
from harvestd.store import SqliteStore
from harvestd.table import MAX_LEASE_BYTES, LeaseTable, Timing
from protos import harvest_pb2 as pb

TIMING = Timing(default_ttl=10.0, min_ttl=0.2, max_ttl=3600.0, grace=2.0, lender_timeout=30.0)


@dataclass(frozen=True)
class LenderSpec:
    """What a test lender is: fixed across its registrations."""

    id: str
    node: str
    backend: int
    gpu: str
    granularity: int


SPECS = {
    "h0": LenderSpec("h0", "n1", pb.BACKEND_HOST, "", 4 * KiB),
    "g0": LenderSpec("g0", "n1", pb.BACKEND_CUDA_VMM, "GPU-0", 64 * KiB),
    "h9": LenderSpec("h9", "n2", pb.BACKEND_HOST, "", 4 * KiB),  # joins only by a rule
}


@dataclass
class MLender:
    """The model's lender."""

    spec: LenderSpec
    capacity: int
    generation: int
    last_report: float
    reclaimed: int = 0
    state: LenderState = LenderState.UP
    # A report set its capacity below what it had lent: the store's capacity bound is
    # suspended until held <= capacity again (see check_store's rule 8).
    dropped: bool = False

    @property
    def lendable(self) -> int:
        """Capacity less what the tenant reclaimed."""
        return max(0, self.capacity - self.reclaimed)


@dataclass
class MLease:
    """The model's lease."""

    id: str
    client: str
    lender: str
    lender_generation: int
    generation: int
    charged: int
    token: bytes
    ttl: float
    priority: int
    created_at: float
    expires_at: float
    state: LeaseState = LeaseState.GRANTED
    revoke_deadline: float = 0.0
    freed: bool = False
    clean: bool = False
    picked_up: bool = False

    @property
    def active(self) -> bool:
        """Granted or revoking."""
        return self.state.active

    @property
    def in_table(self) -> bool:
        """Whether the table still keeps it in memory (live, or its memory not yet free)."""
        return self.active or not self.freed


CLIENTS = st.sampled_from(["c1", "c2"])
NBYTES = st.one_of(
    st.integers(1, 3 * MiB),
    st.sampled_from(
        [
            0,
            -1,
            -4096,
            1,
            4095,
            4096,
            4097,
            64 * KiB,
            64 * KiB + 1,
            MAX_LEASE_BYTES,
            MAX_LEASE_BYTES + 1,
            1 << 64,
        ]
    ),
)
TTLS = st.one_of(
    st.floats(0.2, 60.0),
    st.sampled_from([0.0, -1.0, 0.1, 0.2, 3600.0, 3600.5, math.nan, math.inf, -math.inf]),
)
LENDER_IDS = st.sampled_from(["h0", "h0", "g0", "g0", "h9", "nobody"])


def good_grant() -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A rule that draws a well-formed grant's arguments (``TableMachine.grant``'s)."""
    return rule(
        client=CLIENTS,
        nbytes=st.integers(1, 768 * KiB),
        ttl=st.one_of(st.just(0.0), st.floats(0.2, 30.0)),
        node=st.just("n1"),
        near=st.sampled_from(["", "", "GPU-0"]),
        priority=st.integers(-1, 1),
        backend=st.sampled_from([0, 0, pb.BACKEND_HOST, pb.BACKEND_CUDA_VMM]),
    )


class TableMachine(RuleBasedStateMachine):
    """A real LeaseTable over a real SqliteStore, on a fake clock, against a model.

    The model is deliberately plainer than the table: it keeps every lease it has ever
    seen with its expected state, and re-derives held bytes, expiries and revocations
    from those. Placement is checked by its properties (a grant lands on a lender that
    fits; NoCapacity only when none does), not re-implemented.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="hv-sm-")
        self.path = os.path.join(self.dir, "broker.db")
        self.clock = Clock()
        self.rec = Recorder()
        self.table = self._open()
        self.counter = 0
        self.lenders: dict[str, MLender] = {}
        self.leases: dict[str, MLease] = {}
        for lender_id, capacity in (("h0", 1 * MiB), ("g0", 2 * MiB)):
            self._register(lender_id, capacity)

    def _open(self) -> LeaseTable:
        # The broker's own observer, not a silent one: a metric that refuses a value is
        # an exception in the middle of a table operation.
        self.metrics = BrokerMetrics(lambda: self.table)
        return LeaseTable(
            SqliteStore(self.path),
            notifier=self.rec,
            timing=TIMING,
            clock=self.clock,
            observer=self.metrics,
        )

    def teardown(self) -> None:
        """Close the store and remove its directory."""
        try:
            self.table.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---------------------------------------------------------------- helpers

    def attempt(
        self, expected: type[HarvestError] | None, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """Call ``fn``; it must raise exactly ``expected`` (a HarvestError), or succeed if
        ``expected`` is None. Anything not a HarvestError propagates and fails the test."""
        try:
            result = fn(*args, **kwargs)
        except HarvestError as err:
            event(f"{fn.__name__}: {type(err).__name__}")
            assert expected is not None and type(err) is expected, (
                f"{fn.__name__}{args}: raised {type(err).__name__}({err}); the model "
                f"expected {expected.__name__ if expected else 'success'}"
            )
            return None
        event(f"{fn.__name__}: ok")
        assert expected is None, (
            f"{fn.__name__}{args}: succeeded; the model expected {expected.__name__}"
        )
        return result

    def held(self, lender_id: str) -> int:
        """Bytes of unfreed leases of the lender's current registration."""
        lender = self.lenders[lender_id]
        return sum(
            l.charged
            for l in self.leases.values()
            if l.lender == lender_id and not l.freed and l.lender_generation == lender.generation
        )

    def free(self, lender_id: str) -> int:
        """Bytes a grant may take from the lender now."""
        return max(0, self.lenders[lender_id].lendable - self.held(lender_id))

    def pick(self, data: st.DataObject, extra: list[str] | None = None) -> str:
        """A lease id: mostly one the table granted, sometimes one it never did."""
        known = list(self.leases) + (extra or ["lease-nope", ""])
        return data.draw(st.sampled_from(known), label="lease id")

    @staticmethod
    def holder_refusal(m: MLease | None, client: str) -> type[HarvestError] | None:
        """Mirror LeaseTable._holders_lease: what a holder's call about ``m`` is refused
        with before anything else (None: not refused there)."""
        if m is None or not m.in_table:
            return NotFound
        return PermissionDenied if m.client != client else None

    @staticmethod
    def registration_refusal(lender: MLender | None, stale: bool) -> type[HarvestError] | None:
        """Mirror LeaseTable._current_lender: an unknown lender, or a stale registration."""
        if lender is None:
            return NotFound
        return PermissionDenied if stale else None

    def end(self, lease: MLease, state: LeaseState, clean: bool) -> None:
        """Mirror LeaseTable._end."""
        lease.state = state
        lease.clean = clean
        lender = self.lenders.get(lease.lender)
        if lender is None or lender.generation != lease.lender_generation:
            lease.freed = True

    def _register(self, lender_id: str, capacity: int) -> None:
        spec = SPECS[lender_id]
        record = LenderRecord(
            id=spec.id,
            node=spec.node,
            backend=spec.backend,
            pickup_address=f"/tmp/{spec.id}.sock",
            capacity=capacity,
            generation=0,
            gpu_uuid=spec.gpu,
            granularity=spec.granularity,
        )
        generation = self.attempt(None, self.table.register_lender, record)
        self.counter += 1
        assert generation == self.counter, "a registration skipped or reused a generation"
        old = self.lenders.get(lender_id)
        self.lenders[lender_id] = MLender(
            spec, capacity, generation, self.clock.now, reclaimed=old.reclaimed if old else 0
        )
        for lease in self.leases.values():
            if lease.lender == lender_id and not lease.freed:
                if lease.active:
                    lease.state, lease.clean = LeaseState.REVOKED, False
                lease.freed = True

    # ---------------------------------------------------------------- rules: clients

    @rule(
        client=st.sampled_from(["c1", "c2", ""]),
        nbytes=NBYTES,
        ttl=TTLS,
        node=st.sampled_from(["n1", "n2", ""]),
        near=st.sampled_from(["", "GPU-0"]),
        priority=st.integers(-2, 2),
        backend=st.sampled_from([0, pb.BACKEND_HOST, pb.BACKEND_CUDA_VMM, 3]),
    )
    def grant_anything(
        self,
        client: str,
        nbytes: int,
        ttl: float,
        node: str,
        near: str,
        priority: int,
        backend: int,
    ) -> None:
        """A grant with any input: empty client, sizes of 0, negative or huge, bad TTLs,
        other nodes, backends nobody lends."""
        self.grant(client, nbytes, ttl, node, near, priority, backend)

    # Well-formed grants, twice as often as the rest, so that sequences reach the
    # interesting states (full lenders, reclaims with victims, pending frees).
    @good_grant()
    def grant_fitting(self, **kwargs: Any) -> None:
        """A well-formed grant (it may still find no room)."""
        self.grant(**kwargs)

    @good_grant()
    def grant_fitting_too(self, **kwargs: Any) -> None:
        """The same again (rules are drawn uniformly; this doubles the weight)."""
        self.grant(**kwargs)

    def grant(
        self,
        client: str,
        nbytes: int,
        ttl: float,
        node: str,
        near: str,
        priority: int,
        backend: int,
    ) -> None:
        """A grant: refused for bad input, NoCapacity iff no lender fits, else a lease
        that fits the chosen lender's capacity at grant time."""
        fits = {}
        for l in self.lenders.values():
            if (
                l.state is LenderState.UP
                and l.spec.node == node
                and (not backend or l.spec.backend == backend)
                and not (near and l.spec.gpu == near)
            ):
                need = round_up(nbytes, l.spec.granularity) if nbytes > 0 else 0
                if 0 < need <= self.free(l.spec.id):
                    fits[l.spec.id] = need
        effective_ttl = ttl or TIMING.default_ttl
        if not client or nbytes <= 0 or nbytes > MAX_LEASE_BYTES:
            expected: type[HarvestError] | None = InvalidArgument
        elif not TIMING.min_ttl <= effective_ttl <= TIMING.max_ttl:
            expected = InvalidArgument
        elif not fits:
            expected = NoCapacity
        else:
            expected = None
        before = {i: (self.held(i), self.lenders[i].lendable) for i in fits}
        result = self.attempt(
            expected, self.table.grant, client, nbytes, ttl, node, near, priority, 4242, backend
        )
        if result is None:
            return
        lease, lender = result
        assert lender.id in fits, f"granted from {lender.id}, which did not fit"
        held_before, lendable = before[lender.id]
        assert lease.charged == fits[lender.id]
        assert held_before + lease.charged <= lendable, "a grant exceeded the capacity"
        assert len(lease.token) == 32
        self.counter += 1
        assert lease.generation == self.counter, "a grant skipped or reused a generation"
        self.leases[lease.id] = MLease(
            lease.id,
            client,
            lender.id,
            lender.generation,
            lease.generation,
            lease.charged,
            lease.token,
            effective_ttl,
            priority,
            self.clock.now,
            self.clock.now + effective_ttl,
        )

    @rule(client=CLIENTS, data=st.data())
    def keepalive(self, client: str, data: st.DataObject) -> None:
        """Renews exactly the caller's granted, unexpired leases."""
        ids = data.draw(
            st.lists(st.sampled_from(list(self.leases) + ["lease-nope"]), max_size=4), label="ids"
        )
        now = self.clock.now
        want_alive, want_lost = [], []
        for lease_id in ids:
            m = self.leases.get(lease_id)
            if m is None or not m.in_table or m.client != client:
                want_lost.append(lease_id)
            elif m.state is LeaseState.GRANTED and m.expires_at > now:
                m.expires_at = now + m.ttl
                want_alive.append(lease_id)
            else:
                want_lost.append(lease_id)
        alive, lost = self.attempt(None, self.table.keepalive, client, ids)
        assert [l.id for l in alive] == want_alive
        assert [l.id for l in lost] == want_lost

    @rule(client=CLIENTS, data=st.data())
    def release(self, client: str, data: st.DataObject) -> None:
        """Ends a live lease cleanly; idempotent on an ended one; refuses strangers."""
        lease_id = self.pick(data)
        m = self.leases.get(lease_id)
        lease = self.attempt(self.holder_refusal(m, client), self.table.release, client, lease_id)
        if lease is None:
            return
        assert m is not None  # holder_refusal: NotFound for a lease the model never saw
        if m.active:
            self.end(m, LeaseState.RELEASED, clean=True)

    @rule(client=CLIENTS, data=st.data())
    def ack_revoke(self, client: str, data: st.DataObject) -> None:
        """Ends a revoking lease cleanly; refuses a granted one."""
        lease_id = self.pick(data)
        m = self.leases.get(lease_id)
        expected = self.holder_refusal(m, client)
        if expected is None:
            assert m is not None  # holder_refusal: NotFound for a lease the model never saw
            expected = FailedPrecondition if m.state is LeaseState.GRANTED else None
        if self.attempt(expected, self.table.ack_revoke, client, lease_id) is not None:
            assert m is not None
            if m.state is LeaseState.REVOKING:
                self.end(m, LeaseState.REVOKED, clean=True)

    @rule(
        data=st.data(),
        right_token=st.booleans(),
        right_generation=st.booleans(),
        stale_lender=st.booleans(),
    )
    def check_pickup(
        self, data: st.DataObject, right_token: bool, right_generation: bool, stale_lender: bool
    ) -> None:
        """A pick-up succeeds once, for the right token, while the lease is granted."""
        lease_id = self.pick(data)
        m = self.leases.get(lease_id)
        lender = self.lenders[m.lender] if m else self.lenders["h0"]
        token = m.token if m and right_token else b"\x01" * 32
        generation = m.generation if m and right_generation else 0
        lender_generation = lender.generation + (1000 if stale_lender else 0)
        if stale_lender:
            expected: type[HarvestError] | None = PermissionDenied
        elif (
            m is None
            or not m.in_table
            or not right_token
            or not right_generation
            or m.lender_generation != lender.generation
        ):
            expected = PermissionDenied
        elif m.state is not LeaseState.GRANTED or m.expires_at <= self.clock.now:
            expected = LeaseRevoked
        elif m.picked_up:
            expected = PermissionDenied
        else:
            expected = None
        if (
            self.attempt(
                expected,
                self.table.check_pickup,
                lender.spec.id,
                lender_generation,
                lease_id,
                token,
                generation,
                77,
            )
            is not None
        ):
            assert m is not None  # an unknown lease is refused: PermissionDenied
            m.picked_up = True

    # ---------------------------------------------------------------- rules: operators

    @rule(data=st.data(), force=st.booleans())
    def revoke(self, data: st.DataObject, force: bool) -> None:
        """Asks the holder (or, forced, ends the lease now and unclean)."""
        lease_id = self.pick(data)
        m = self.leases.get(lease_id)
        if m is None or not m.in_table:
            expected: type[HarvestError] | None = NotFound
        elif not m.active:
            expected = LeaseRevoked
        else:
            expected = None
        if self.attempt(expected, self.table.revoke, lease_id, "test", force) is None:
            return
        assert m is not None  # NotFound above
        if force:
            self.end(m, LeaseState.REVOKED, clean=False)
        elif m.state is LeaseState.GRANTED:
            m.state = LeaseState.REVOKING
            m.revoke_deadline = self.clock.now + TIMING.grace

    @rule(
        lender_id=LENDER_IDS,
        nbytes=st.one_of(
            st.integers(0, 3 * MiB), st.sampled_from([-1, 0, MAX_LEASE_BYTES, MAX_LEASE_BYTES + 1])
        ),
    )
    def reclaim(self, lender_id: str, nbytes: int) -> None:
        """Revokes just enough granted leases, lowest priority and newest first."""
        if nbytes < 0 or nbytes > MAX_LEASE_BYTES:
            expected: type[HarvestError] | None = InvalidArgument
        elif lender_id not in self.lenders:
            expected = NotFound
        else:
            expected = None
            if self.lenders[lender_id].reclaimed > self.lenders[lender_id].capacity:
                event("reclaim: reclaimed > capacity")
        result = self.attempt(expected, self.table.reclaim, lender_id, nbytes)
        if result is None:
            return
        lender = self.lenders[lender_id]
        # Up to the capacity; never less than the tenant holds already (a report may have
        # put the capacity below it).
        lender.reclaimed += max(
            0, min(lender.capacity, lender.reclaimed + nbytes) - lender.reclaimed
        )
        mine = [
            l
            for l in self.leases.values()
            if l.lender == lender_id and not l.freed and l.lender_generation == lender.generation
        ]
        going = {l.id for l in mine if l.state is not LeaseState.GRANTED}
        returned = [l.id for l in result]
        assert going <= set(returned), "reclaim forgot leases already on their way out"
        victims = [i for i in returned if i not in going]
        assert len(set(victims)) == len(victims)
        for lease_id in victims:
            assert self.leases[lease_id].state is LeaseState.GRANTED
            self.leases[lease_id].state = LeaseState.REVOKING
            self.leases[lease_id].revoke_deadline = self.clock.now + TIMING.grace
        kept = [l for l in mine if l.state is LeaseState.GRANTED]
        granted_after = sum(l.charged for l in kept)
        assert granted_after <= lender.lendable, "reclaim left too much granted"
        if victims:
            last = self.leases[victims[-1]]
            assert granted_after + last.charged > lender.lendable, "reclaim revoked too much"
            for v in (self.leases[i] for i in victims):
                for k in kept:
                    assert (v.priority, -v.created_at) <= (k.priority, -k.created_at), (
                        "reclaim revoked a lease before one of lower priority or newer"
                    )

    @rule(
        lender_id=LENDER_IDS,
        nbytes=st.one_of(st.integers(0, 3 * MiB), st.sampled_from([-1, 0, 1 << 70])),
    )
    def restore(self, lender_id: str, nbytes: int) -> None:
        """Gives reclaimed bytes back (0: all, and ends a drain)."""
        if nbytes < 0:
            expected: type[HarvestError] | None = InvalidArgument
        elif lender_id not in self.lenders:
            expected = NotFound
        else:
            expected = None
        if self.attempt(expected, self.table.restore, lender_id, nbytes) is None:
            return
        lender = self.lenders[lender_id]
        lender.reclaimed = 0 if nbytes == 0 else max(0, lender.reclaimed - nbytes)
        if lender.state is LenderState.DRAINING and nbytes == 0:
            lender.state = LenderState.UP

    @rule(lender_id=LENDER_IDS)
    def drain(self, lender_id: str) -> None:
        """Stops grants from the lender and asks every holder to give its lease up."""
        expected = None if lender_id in self.lenders else NotFound
        result = self.attempt(expected, self.table.drain, lender_id)
        if result is None:
            return
        self.lenders[lender_id].state = LenderState.DRAINING
        live = {l.id for l in self.leases.values() if l.lender == lender_id and l.active}
        assert {l.id for l in result} == live
        for lease_id in live:
            m = self.leases[lease_id]
            if m.state is LeaseState.GRANTED:
                m.state = LeaseState.REVOKING
                m.revoke_deadline = self.clock.now + TIMING.grace

    # ---------------------------------------------------------------- rules: lenders

    @rule(lender_id=st.sampled_from(["h0", "g0", "h9"]), capacity=st.integers(0, 4 * MiB))
    def register(self, lender_id: str, capacity: int) -> None:
        """A (re)registration: a new generation; every lease of the old one is over."""
        self._register(lender_id, capacity)

    @rule(
        lender_id=LENDER_IDS,
        stale=st.booleans(),
        capacity=st.one_of(st.integers(0, 4 * MiB), st.sampled_from([0, 1 << 40])),
    )
    def report(self, lender_id: str, stale: bool, capacity: int) -> None:
        """A capacity report from the current registration (a stale one is refused)."""
        lender = self.lenders.get(lender_id)
        expected = self.registration_refusal(lender, stale)
        generation = (lender.generation + (7 if stale else 0)) if lender else 1
        if (
            self.attempt(expected, self.table.report_lender, lender_id, generation, capacity)
            is None
        ):
            return
        assert lender is not None  # registration_refusal: NotFound for an unknown lender
        lender.capacity = capacity
        lender.last_report = self.clock.now
        lender.dropped = capacity < self.held(lender_id)
        if lender.state is LenderState.DOWN:
            lender.state = LenderState.UP

    @rule(lender_id=LENDER_IDS, stale=st.booleans(), data=st.data())
    def confirm_free(self, lender_id: str, stale: bool, data: st.DataObject) -> None:
        """The lender freed memory: only ended leases of its own count."""
        lender = self.lenders.get(lender_id)
        pending = [
            l.id
            for l in self.leases.values()
            if l.lender == lender_id and not l.active and not l.freed
        ]
        ids = data.draw(
            st.lists(st.sampled_from(pending + list(self.leases) + ["lease-nope"]), max_size=4),
            label="ids",
        )
        expected = self.registration_refusal(lender, stale)
        generation = (lender.generation + (3 if stale else 0)) if lender else 1
        if (
            self.attempt(expected, self.table.confirm_free, lender_id, generation, ids) is None
            and expected is not None
        ):
            return
        assert lender is not None  # registration_refusal: NotFound for an unknown lender
        for lease_id in ids:
            m = self.leases.get(lease_id)
            if m is not None and m.in_table and m.lender == lender_id and not m.active:
                m.freed = True
        if lender.dropped and self.held(lender_id) <= lender.capacity:
            lender.dropped = False

    @rule(lender_ids=st.lists(LENDER_IDS, min_size=1, max_size=2))
    def lose_lenders(self, lender_ids: list[str]) -> None:
        """A Ray node died with these lenders: they are down, their live leases end
        unclean, and all their memory counts as freed (it died with them)."""
        want = []
        for lender_id in dict.fromkeys(lender_ids):
            lender = self.lenders.get(lender_id)
            if lender is None or lender.state is LenderState.DOWN:
                continue
            lender.state = LenderState.DOWN
            for m in self.leases.values():
                if m.lender == lender_id and not m.freed:
                    if m.active:
                        self.end(m, LeaseState.REVOKED, clean=False)
                        want.append(m.id)
                    m.freed = True
            lender.dropped = False  # nothing held any more
        ended = self.attempt(None, self.table.lenders_lost, lender_ids, "node lost")
        assert sorted(l.id for l in ended) == sorted(want)

    # ---------------------------------------------------------------- rules: time

    @rule(dt=st.one_of(st.sampled_from([0.1, 1.0, 2.0, 10.0, 31.0]), st.floats(0.0, 40.0)))
    def advance(self, dt: float) -> None:
        """Time passes (nothing happens until a sweep)."""
        self.clock.now += dt

    @rule()
    def sweep(self) -> None:
        """Expiry, forced revocation after the grace, silent lenders down."""
        now = self.clock.now
        want = []
        for m in self.leases.values():
            if m.state is LeaseState.GRANTED and m.expires_at <= now:
                self.end(m, LeaseState.EXPIRED, clean=False)
                want.append(m.id)
            elif m.state is LeaseState.REVOKING and m.revoke_deadline <= now:
                self.end(m, LeaseState.REVOKED, clean=False)
                want.append(m.id)
        for lender in self.lenders.values():
            if (
                lender.state is not LenderState.DOWN
                and now - lender.last_report > TIMING.lender_timeout
            ):
                lender.state = LenderState.DOWN
                for m in self.leases.values():
                    if m.lender == lender.spec.id and m.active:
                        self.end(m, LeaseState.REVOKED, clean=False)
                        want.append(m.id)
        ended = self.attempt(None, self.table.sweep)
        assert sorted(l.id for l in ended) == sorted(want)

    # ---------------------------------------------------------------- rules: restart

    @rule()
    def restart(self) -> None:
        """Close the store and build a new table from the same file: it must come back
        with exactly what it had -- every lease in the same state, every lender's held
        bytes, the same generation counter -- except that a granted lease's expiry may
        move: keepalives need not be written to the store, so a restarted broker may give
        each granted lease a fresh TTL. It may never shorten one (its holder renewed it
        and counts on it), nor extend it past one TTL from now."""
        before = self._snapshot(self.table)
        self.table.store.close()
        self.table = self._open()
        self.table.check_invariants()
        after = self._snapshot(self.table)
        now = self.clock.now
        for lease_id, expiry in before["expiry"].items():
            moved = after["expiry"][lease_id]
            m = self.leases[lease_id]
            assert expiry <= moved <= max(expiry, now + m.ttl), (
                f"{lease_id}: expiry {expiry} became {moved} at a restart at {now}"
            )
            m.expires_at = moved
        del before["expiry"], after["expiry"]
        assert after == before, _diff(before, after)

    @staticmethod
    def _snapshot(table: LeaseTable) -> dict[str, Any]:
        granted = [l for l in table.leases.values() if l.state is LeaseState.GRANTED]
        return {
            "generation": table.generation,
            "leases": {
                l.id: (
                    l.state,
                    l.freed,
                    l.clean,
                    l.revoke_deadline,
                    l.picked_up,
                    l.charged,
                    l.client_id,
                    l.generation,
                    l.lender_generation,
                    l.ttl_s,
                    l.priority,
                    l.created_at,
                )
                for l in table.leases.values()
            },
            "expiry": {l.id: l.expires_at for l in granted},
            "lenders": {
                l.id: (l.generation, l.capacity, l.reclaimed, l.state, l.held, l.last_report)
                for l in table.lenders.values()
            },
        }

    # ---------------------------------------------------------------- invariants

    @invariant()
    def table_invariants_hold(self) -> None:
        """The table's own check: held bytes add up, no generation twice."""
        self.table.check_invariants()

    @invariant()
    def metrics_scrape(self) -> None:
        """A Prometheus scrape of the broker's metrics reads the table without error."""
        assert list(self.metrics.registry.collect())

    @invariant()
    def store_invariants_hold(self) -> None:
        """What a restarted broker would load breaks nothing (harvestd.invariants)."""
        bound = not any(l.dropped for l in self.lenders.values())
        assert check_store(self.path, capacity_bound=bound) == []

    @invariant()
    def model_agrees(self) -> None:
        """Same leases in memory, in the same states; same lenders; same counter."""
        table = self.table
        assert table.generation == self.counter
        want = {i: m for i, m in self.leases.items() if m.in_table}
        assert set(table.leases) == set(want)
        for lease_id, m in want.items():
            got = table.leases[lease_id]
            assert (got.state, got.freed, got.picked_up) == (m.state, m.freed, m.picked_up), (
                lease_id,
                got,
                m,
            )
            if m.state is LeaseState.GRANTED:
                assert got.expires_at == m.expires_at
            if m.state is LeaseState.REVOKING:
                assert got.revoke_deadline == m.revoke_deadline
            if not m.active:
                assert got.clean == m.clean
        assert set(table.lenders) == set(self.lenders)
        for lender_id, ml in self.lenders.items():
            got_lender = table.lenders[lender_id]
            assert (
                got_lender.generation,
                got_lender.capacity,
                got_lender.reclaimed,
                got_lender.state,
            ) == (ml.generation, ml.capacity, ml.reclaimed, ml.state), (lender_id, got_lender, ml)
            assert got_lender.held == self.held(lender_id)

    @invariant()
    def holders_and_lenders_were_told(self) -> None:
        """Every revocation reached its holder's stream, every lease ended by force or
        expiry was announced, and every ended lease's memory was sent to its lender."""
        revoked_ids = set(self.rec.revoked)
        ended_ids = set(self.rec.ends)
        free_ids = {lease_id for lease_id, _ in self.rec.frees}
        for m in self.leases.values():
            if m.state is LeaseState.REVOKING:
                assert m.id in revoked_ids
            if m.state is LeaseState.EXPIRED or (m.state is LeaseState.REVOKED and not m.clean):
                assert m.id in ended_ids
            if not m.active and not m.freed:
                assert m.id in free_ids, f"{m.id}: lender never told"


def _diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = []
    if before["generation"] != after["generation"]:
        lines.append(f"generation {before['generation']} -> {after['generation']}")
    for kind in ("leases", "lenders"):
        for key in sorted(set(before[kind]) | set(after[kind])):
            if before[kind].get(key) != after[kind].get(key):
                lines.append(
                    f"{kind[:-1]} {key}: {before[kind].get(key)} -> {after[kind].get(key)}"
                )
    return "restart changed the table: " + "; ".join(lines)


TableMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_lease_table_against_model = TableMachine.TestCase


def test_lenders_lost_commits_what_it_frees(tmp_path: Path) -> None:
    """``lenders_lost`` (a Ray node died) counts the memory of the lost lender's *ended,
    not yet freed* leases as freed (it died with the node), and commits that along with
    the leases it ends itself. So:

    - a restart loads them freed: the lender's held bytes stay as they were, and no FREE
      is sent again for memory that is gone;
    - if the lender re-registers, the store keeps no unfreed lease of an old
      registration (``check_store`` rule 6), and the table forgets them.
    """
    clock = Clock()
    path = str(tmp_path / "b.db")
    spec = SPECS["h0"]

    def record() -> LenderRecord:
        return LenderRecord(
            id=spec.id,
            node=spec.node,
            backend=spec.backend,
            pickup_address="/x",
            capacity=MiB,
            generation=0,
        )

    def released_then_lost(table: LeaseTable) -> str:
        table.register_lender(record())
        lease, _ = table.grant("c", 4 * KiB, node=spec.node)
        table.release("c", lease.id)  # ended; its memory not yet confirmed free
        table.lenders_lost([spec.id], "node lost")
        return lease.id

    problems = []
    # 1. ... then a restart: the lost memory comes back as held.
    table = LeaseTable(SqliteStore(path), timing=TIMING, clock=clock)
    released_then_lost(table)
    held = table.lenders[spec.id].held
    table.store.close()
    table = LeaseTable(SqliteStore(path), timing=TIMING, clock=clock)
    if table.lenders[spec.id].held != held:
        problems.append(f"held {held} before the restart, {table.lenders[spec.id].held} after")
    # 2. ... then the lender re-registers, no restart: the lease stays unfreed in the
    # store under the old registration, and in the table's memory.
    lease_id = released_then_lost(table)
    table.register_lender(record())
    problems += check_store(path)
    if lease_id in table.leases:
        problems.append(f"{lease_id} stays in the table's memory after its lender re-registered")
    table.store.close()
    assert problems == []


def test_reclaim_after_capacity_fell_below_reclaimed(tmp_path: Path) -> None:
    """A tenant reclaims 6 MiB of a lender's 8; then the lender reports 4 MiB (a GPU
    lender does exactly this when its tenant grows into the reserve) and asks the broker
    to revoke down to it with ``Reclaim(nbytes=0)``, as ``Lender._give_tenant_room``
    does. The reclaim takes nothing more (never a negative amount: the tenant keeps its
    6 MiB, and the Prometheus counter, which only goes up, is not asked to go down) and
    revokes the lease that no longer fits in what is lendable."""
    clock = Clock()
    metrics = BrokerMetrics(lambda: table)
    table = LeaseTable(
        SqliteStore(str(tmp_path / "b.db")), timing=TIMING, clock=clock, observer=metrics
    )
    spec = SPECS["h0"]
    table.register_lender(
        LenderRecord(
            id=spec.id,
            node=spec.node,
            backend=spec.backend,
            pickup_address="/x",
            capacity=8 * MiB,
            generation=0,
        )
    )
    generation = table.lenders[spec.id].generation
    lease, _ = table.grant("c", 2 * MiB, node=spec.node)
    table.reclaim(spec.id, 6 * MiB)  # lendable 2 MiB: the lease still fits
    table.report_lender(spec.id, generation, 4 * MiB)  # lendable 0
    try:
        going = table.reclaim(spec.id, 0)
        assert [l.id for l in going] == [lease.id]
        assert table.leases[lease.id].state is LeaseState.REVOKING
        assert table.lenders[spec.id].reclaimed == 6 * MiB
        table.check_invariants()
    finally:
        table.store.close()
