"""Property-based tests of the broker: its lease table against a model, every gRPC method
against malformed input, and the CLI against random arguments.

Three parts:

a. ``TableMachine``: a Hypothesis state machine drives a real :class:`LeaseTable` over a
   real :class:`SqliteStore` on a fake clock, including restarts from the same file,
   and checks it against a small model after every step.
b. Every gRPC method of a running broker (a plain-process node), called with random,
   huge, negative, empty and duplicate fields: each call ends OK or with one of the
   statuses a caller can act on, within its deadline.
c. The ``harvestd`` CLI with random arguments against a running node: exit 0 or 2, one
   clear line, never a traceback.

Each bug these found is fixed, and pinned by a test of its own next to its part (named
in docs/reliability.md); the random strategies draw those inputs too, so the fuzzers
guard them as well.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest
from conftest import PY, Clock, PlainNode, _env, running_plain_node, wait_for
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

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
from harvestd.metrics import BrokerMetrics
from harvestd.model import LeaseRecord, LeaseState, LenderRecord, LenderState
from harvestd.sizes import round_up
from harvestd.store import SqliteStore
from harvestd.table import MAX_LEASE_BYTES, LeaseTable, Timing
from protos import harvest_pb2 as pb
from protos import harvest_pb2_grpc as pb_grpc

KiB, MiB = 1 << 10, 1 << 20
U64_MAX = (1 << 64) - 1

# ======================================================================= a. the table

TIMING = Timing(default_ttl=10.0, min_ttl=0.2, max_ttl=3600.0, grace=2.0, lender_timeout=30.0)


class Recorder:
    """A notifier that remembers whom the table told what (ids, per kind of notice)."""

    def __init__(self) -> None:
        self.revoked_ids: set[str] = set()
        self.ended_ids: set[str] = set()
        self.free_ids: set[str] = set()

    def revoke(self, lease: LeaseRecord) -> None:
        """A REVOKE for the holder."""
        self.revoked_ids.add(lease.id)

    def ended(self, lease: LeaseRecord) -> None:
        """An ENDED for the holder."""
        self.ended_ids.add(lease.id)

    def free(self, lease: LeaseRecord) -> None:
        """A FREE for the lender."""
        self.free_ids.add(lease.id)

    def freed(self, lender_id: str) -> None:
        """Nobody waits in these tests."""


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
    GOOD_GRANT = dict(
        client=CLIENTS,
        nbytes=st.integers(1, 768 * KiB),
        ttl=st.one_of(st.just(0.0), st.floats(0.2, 30.0)),
        node=st.just("n1"),
        near=st.sampled_from(["", "", "GPU-0"]),
        priority=st.integers(-1, 1),
        backend=st.sampled_from([0, 0, pb.BACKEND_HOST, pb.BACKEND_CUDA_VMM]),
    )

    @rule(**GOOD_GRANT)
    def grant_fitting(self, **kwargs: Any) -> None:
        """A well-formed grant (it may still find no room)."""
        self.grant(**kwargs)

    @rule(**GOOD_GRANT)
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
        if lease is not None and m.active:
            self.end(m, LeaseState.RELEASED, clean=True)

    @rule(client=CLIENTS, data=st.data())
    def ack_revoke(self, client: str, data: st.DataObject) -> None:
        """Ends a revoking lease cleanly; refuses a granted one."""
        lease_id = self.pick(data)
        m = self.leases.get(lease_id)
        expected = self.holder_refusal(m, client) or (
            FailedPrecondition if m.state is LeaseState.GRANTED else None
        )
        if self.attempt(expected, self.table.ack_revoke, client, lease_id) is not None:
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
        for lender_id, m in self.lenders.items():
            got = table.lenders[lender_id]
            assert (got.generation, got.capacity, got.reclaimed, got.state) == (
                m.generation,
                m.capacity,
                m.reclaimed,
                m.state,
            ), (lender_id, got, m)
            assert got.held == self.held(lender_id)

    @invariant()
    def holders_and_lenders_were_told(self) -> None:
        """Every revocation reached its holder's stream, every lease ended by force or
        expiry was announced, and every ended lease's memory was sent to its lender."""
        for m in self.leases.values():
            if m.state is LeaseState.REVOKING:
                assert m.id in self.rec.revoked_ids
            if m.state is LeaseState.EXPIRED or (m.state is LeaseState.REVOKED and not m.clean):
                assert m.id in self.rec.ended_ids
            if not m.active and not m.freed:
                assert m.id in self.rec.free_ids, f"{m.id}: lender never told"


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


# ======================================================================= b. gRPC


ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
DEADLINE_S = 5.0

# Strings gRPC can carry (proto3 strings are UTF-8: no lone surrogates), short enough
# that no message nears gRPC's 4 MiB limit.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
# uint64 fields: a "negative" number reaches the broker as its two's complement.
U64 = st.one_of(
    st.integers(0, 64 * MiB),
    st.integers(0, U64_MAX),
    st.sampled_from(
        [0, 1, 4095, 4096, MAX_LEASE_BYTES, MAX_LEASE_BYTES + 1, 1 << 63, U64_MAX, U64_MAX - 4095]
    ),
)
# Lender capacities: mostly real, and up to the largest a uint64 holds (the broker refuses
# more than MAX_LEASE_BYTES: test_status_survives_huge_lenders).
CAPACITY = st.one_of(
    st.integers(0, 64 * MiB),
    st.sampled_from([0, 1, 1 << 40, MAX_LEASE_BYTES, MAX_LEASE_BYTES + 1, U64_MAX]),
    U64,
)
I32 = st.one_of(st.integers(-3, 3), st.integers(-(1 << 31), (1 << 31) - 1))
U32 = st.one_of(st.integers(0, 70000), st.sampled_from([0, (1 << 32) - 1]))
DOUBLE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [0.0, -0.0, -1.0, 0.1, 0.2, 1.0, 2.0, 3600.0, 3601.0, 1e300, math.nan, math.inf]
    ),
)
# Drain and Reclaim wait up to timeout_s for memory (0 means the grace + 2 s); what is not
# a finite number of seconds up to an hour is refused at once. Long waits are left to
# test_wait_timeouts_honour_the_callers_deadline: they end only at the fuzz's deadline.
# 0 (3 s on a lender that never frees) is drawn rarely: it is slow, not different.
WAIT = st.sampled_from(
    [
        0.0,
        0.01,
        0.05,
        0.05,
        0.1,
        0.3,
        0.3,
        1.0,
        -1.0,
        -1e300,
        3600.5,
        1e300,
        math.nan,
        math.inf,
        -math.inf,
    ]
)
RAW_BYTES = st.binary(max_size=64)


@dataclass
class Pool:
    """What the fuzz has learned about the broker: real ids to aim at."""

    node: str = ""
    leases: list[pb.Lease] = field(default_factory=list)
    lenders: dict[str, int] = field(default_factory=dict)  # id -> a generation seen
    calls: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)  # (method, status name)

    def remember(self, method: str, request: Any, reply: Any) -> None:
        """Keep ids and generations that later calls can aim at."""
        if method == "Grant" and reply.token:
            self.leases.append(reply)
            del self.leases[:-200]
        elif method == "RegisterLender":
            self.lenders[request.lender.id] = reply.generation
        elif method == "ListLenders":
            for lender in reply.lenders:
                self.lenders[lender.id] = lender.generation


class Fuzz:
    """Builds requests for each method out of a Hypothesis ``data`` object."""

    def __init__(self, pool: Pool, data: st.DataObject) -> None:
        self.pool = pool
        self.draw = data.draw

    def _known(self, items: list[Any]) -> Any | None:
        # Draw an index, not an element, and draw it even from an empty pool: the pool
        # changes from run to run, and Hypothesis replays draws, so the sequence of draws
        # must not depend on it.
        index = self.draw(st.integers(0, 1 << 20), label="pool index")
        return items[index % len(items)] if items else None

    def lease(self) -> pb.Lease | None:
        """A lease the broker granted, if any."""
        return self._known(self.pool.leases)

    def lease_id(self) -> str:
        """A real lease id, a random string, or empty."""
        lease = self.lease()
        choice = self.draw(st.sampled_from(["known", "known", "known", "text", "empty"]))
        text = self.draw(TEXT)
        if choice == "known" and lease is not None:
            return lease.id
        return "" if choice == "empty" else text

    def lender(self) -> tuple[str, int]:
        """A lender id with (mostly) its current generation, or garbage."""
        known = sorted(self.pool.lenders.items())
        choice = self.draw(st.sampled_from(["known", "known", "stale", "text", "empty"]))
        item = self._known(known)
        previous, text, number = self.draw(st.booleans()), self.draw(TEXT), self.draw(U64)
        if choice in ("known", "stale") and item is not None:
            lender_id, generation = item
            if choice == "stale":
                generation = max(0, generation - 1) if previous else number
            return lender_id, generation
        return ("" if choice == "empty" else text), number

    def client_id(self) -> str:
        """One of a few clients, a random one, or empty."""
        return self.draw(st.one_of(st.sampled_from(["fz-c0", "fz-c1", ""]), TEXT))

    def node(self) -> str:
        """The real node, the fuzz lenders' node, or garbage."""
        return self.draw(
            st.one_of(st.sampled_from([self.pool.node, self.pool.node, "fz-node", ""]), TEXT)
        )

    # ------------------------------------------------------------ one request per method

    def RegisterLender(self) -> pb.RegisterLenderRequest:  # noqa: N802 - gRPC's names
        """A lender joining: mostly the fuzz's own few ids."""
        lender_id = self.draw(st.one_of(st.sampled_from(["fz-0", "fz-1", "fz-2", ""]), TEXT))
        links = self.draw(st.lists(st.builds(pb.GpuLink, peer_uuid=TEXT, nvlinks=U32), max_size=3))
        return pb.RegisterLenderRequest(
            lender=pb.Lender(
                id=lender_id,
                node=self.draw(st.sampled_from(["fz-node", ""])),
                backend=self.draw(st.one_of(st.sampled_from([0, 1, 2, 3, 4, 99]), I32)),
                gpu_uuid=self.draw(st.one_of(st.just(""), TEXT)),
                gpu_index=self.draw(I32),
                links=links,
                pickup_address=self.draw(st.one_of(st.just("/tmp/fz.sock"), TEXT)),
                capacity=self.draw(CAPACITY),
                reclaimed=self.draw(U64),
                granted=self.draw(U64),
                generation=self.draw(U64),
                state=self.draw(st.sampled_from([0, 1, 2, 3, 42])),
                last_report=self.draw(DOUBLE),
                pid=self.draw(U32),
                granularity=self.draw(st.one_of(st.sampled_from([0, 1, 4096, 1 << 21]), U64)),
                device_total=self.draw(U64),
                device_free=self.draw(U64),
                ray_node_id=self.draw(TEXT),
            )
        )

    def ReportLender(self) -> pb.ReportLenderRequest:  # noqa: N802
        """A capacity report, from the current or a stale registration."""
        lender_id, generation = self.lender()
        return pb.ReportLenderRequest(
            lender_id=lender_id,
            generation=generation,
            capacity=self.draw(CAPACITY),
            device_total=self.draw(U64),
            device_free=self.draw(U64),
        )

    def ConfirmFree(self) -> pb.ConfirmFreeRequest:  # noqa: N802
        """Frees confirmed, for real and made-up (and repeated) lease ids."""
        lender_id, generation = self.lender()
        ids = [self.lease_id() for _ in range(self.draw(st.integers(0, 4)))]
        return pb.ConfirmFreeRequest(
            lender_id=lender_id,
            generation=generation,
            lease_ids=ids + ids[: self.draw(st.integers(0, 2))],
        )

    def CheckPickup(self) -> pb.CheckPickupRequest:  # noqa: N802
        """A pick-up check with the right or a random token and generations."""
        lease = self.lease()
        lender_id, generation = self.lender()
        right = self.draw(st.booleans()) and lease is not None
        right_token = self.draw(st.booleans())
        raw_token, raw_id, raw_generation = (self.draw(RAW_BYTES), self.lease_id(), self.draw(U64))
        return pb.CheckPickupRequest(
            lender_id=lease.lender_id if right else lender_id,
            lender_generation=self.pool.lenders.get(lease.lender_id, 0) if right else generation,
            lease_id=lease.id if right else raw_id,
            token=lease.token if right and right_token else raw_token,
            lease_generation=lease.generation if right else raw_generation,
            holder_pid=self.draw(U32),
            holder_uid=self.draw(U32),
        )

    def Grant(self) -> pb.GrantRequest:  # noqa: N802
        """Half well-formed grants on the real lender (so that later calls have real
        leases to aim at), half any size, TTL, node, GPU, priority and backend."""
        if self.draw(st.booleans(), label="well-formed"):
            return pb.GrantRequest(
                client_id=self.draw(st.sampled_from(["fz-c0", "fz-c1"])),
                nbytes=self.draw(st.integers(1, MiB)),
                ttl_s=self.draw(st.sampled_from([0.0, 5.0, 30.0])),
                node=self.pool.node,
                priority=self.draw(st.integers(-1, 1)),
                holder_pid=self.draw(U32),
                backend=self.draw(st.sampled_from([0, pb.BACKEND_HOST])),
            )
        return pb.GrantRequest(
            client_id=self.client_id(),
            nbytes=self.draw(st.one_of(st.integers(0, 8 * MiB), U64)),
            ttl_s=self.draw(st.one_of(st.sampled_from([0.0, 1.0, 2.0]), DOUBLE)),
            node=self.node(),
            near_gpu=self.draw(st.one_of(st.just(""), TEXT)),
            priority=self.draw(I32),
            holder_pid=self.draw(U32),
            backend=self.draw(st.sampled_from([0, 0, 1, 2, 3, 99])),
        )

    def KeepAlive(self) -> pb.KeepAliveRequest:  # noqa: N802
        """Renewals of real, random, empty and repeated ids."""
        lease = self.lease()
        own, other = self.draw(st.booleans()), self.client_id()
        client = lease.client_id if own and lease is not None else other
        ids = [self.lease_id() for _ in range(self.draw(st.integers(0, 5)))]
        return pb.KeepAliveRequest(client_id=client, lease_ids=ids + ids)

    def _holder_request(self, cls: type) -> Any:
        lease = self.lease()
        own, client_id, lease_id = self.draw(st.booleans()), self.client_id(), self.lease_id()
        if own and lease is not None:
            return cls(client_id=lease.client_id, lease_id=lease.id)
        return cls(client_id=client_id, lease_id=lease_id)

    def Release(self) -> pb.ReleaseRequest:  # noqa: N802
        """A release by the holder or by someone else."""
        return self._holder_request(pb.ReleaseRequest)

    def AckRevoke(self) -> pb.AckRevokeRequest:  # noqa: N802
        """An acknowledgement, due or not."""
        return self._holder_request(pb.AckRevokeRequest)

    def Watch(self) -> pb.WatchRequest:  # noqa: N802
        """A holder's stream."""
        return pb.WatchRequest(client_id=self.client_id())

    def WatchLender(self) -> pb.WatchLenderRequest:  # noqa: N802
        """A lender's stream, current or stale."""
        lender_id, generation = self.lender()
        return pb.WatchLenderRequest(lender_id=lender_id, generation=generation)

    def Revoke(self) -> pb.RevokeRequest:  # noqa: N802
        """A revocation, forced or not."""
        return pb.RevokeRequest(
            lease_id=self.lease_id(), reason=self.draw(TEXT), force=self.draw(st.booleans())
        )

    def Drain(self) -> pb.DrainRequest:  # noqa: N802
        """A drain of any lender, the real one too (a later Restore(0) ends it)."""
        lender_id, _ = self.lender()
        return pb.DrainRequest(lender_id=lender_id, timeout_s=self.draw(WAIT))

    def Reclaim(self) -> pb.ReclaimRequest:  # noqa: N802
        """A tenant taking back any number of bytes."""
        lender_id, _ = self.lender()
        return pb.ReclaimRequest(
            lender_id=lender_id, nbytes=self.draw(U64), timeout_s=self.draw(WAIT)
        )

    def Restore(self) -> pb.RestoreRequest:  # noqa: N802
        """A tenant giving bytes back (0: all)."""
        lender_id, _ = self.lender()
        return pb.RestoreRequest(lender_id=lender_id, nbytes=self.draw(st.one_of(st.just(0), U64)))

    def ListLeases(self) -> pb.ListLeasesRequest:  # noqa: N802
        """Leases filtered by anything."""
        lender_id, _ = self.lender()
        return pb.ListLeasesRequest(
            lender_id=self.draw(st.sampled_from([lender_id, ""])),
            include_ended=self.draw(st.booleans()),
            client_id=self.draw(st.one_of(st.just(""), TEXT)),
        )

    def ListLenders(self) -> pb.ListLendersRequest:  # noqa: N802
        """Every lender."""
        return pb.ListLendersRequest()

    def Status(self) -> pb.StatusRequest:  # noqa: N802
        """The summary."""
        return pb.StatusRequest()


# In the order the per-method fuzz runs them: grants first, so that the calls after
# them have real leases to aim at; lender-side changes and tenants' calls late.
UNARY = [
    "Grant",
    "CheckPickup",
    "KeepAlive",
    "Release",
    "AckRevoke",
    "Revoke",
    "ConfirmFree",
    "RegisterLender",
    "ReportLender",
    "Drain",
    "Reclaim",
    "Restore",
    "ListLeases",
    "ListLenders",
    "Status",
]
STREAMS = ["Watch", "WatchLender"]
METHODS = UNARY[:7] + STREAMS + UNARY[7:]
assert set(METHODS) == set(pb.DESCRIPTOR.services_by_name["Broker"].methods_by_name)


class Broker:
    """A fuzz target: a plain-process node and a stub on its socket."""

    def __init__(self, node: PlainNode) -> None:
        self.node = node
        self.channel = grpc.insecure_channel(f"unix://{node.state_dir}/broker.sock")
        self.stub = pb_grpc.BrokerStub(self.channel)
        self.pool = Pool(node=node.json("lenders")[0]["node"])
        self.pool.remember(
            "ListLenders", None, self.stub.ListLenders(pb.ListLendersRequest(), timeout=DEADLINE_S)
        )

    @property
    def db(self) -> str:
        """The broker's SQLite store."""
        return str(self.node.state_dir / "broker.db")

    def unary(self, method: str, request: Any) -> Any:
        """Call ``method``: OK, or one of the allowed statuses, within the deadline."""
        self.pool.calls[method] += 1
        note(f"{method}({request})")
        start = time.monotonic()
        try:
            reply = getattr(self.stub, method)(request, timeout=DEADLINE_S)
        except grpc.RpcError as err:
            self.pool.outcomes[method, err.code().name] += 1
            assert err.code() in ALLOWED, (
                f"{method} answered {err.code().name} ({err.details()}) after "
                f"{time.monotonic() - start:.2f} s to {request}"
            )
            return None
        self.pool.outcomes[method, "OK"] += 1
        self.pool.remember(method, request, reply)
        return reply

    def stream(self, method: str, request: Any) -> None:
        """Open a stream: a bad request must end at once with an allowed status; a good
        one must say something (HELLO, pending FREEs) or stay open, and close when we
        cancel it."""
        self.pool.calls[method] += 1
        note(f"{method}({request})")
        valid = self._valid_stream(method, request)
        call = getattr(self.stub, method)(request, timeout=2.0 if valid else DEADLINE_S)
        try:
            first = next(call)
            assert valid, f"{method} streamed {first} for a request it should refuse"
            if method == "Watch":
                assert first.kind == pb.LeaseEvent.HELLO
        except StopIteration:
            # Ended with OK before any event: a newer stream for the same lender replaced
            # this one (the real lender reconnects and takes its stream back). A request
            # that should be refused must never end this way.
            assert valid, f"{method} ended with OK for a request it should refuse"
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # A good lender stream with nothing pending stays open: that is its job.
                assert valid and method == "WatchLender", f"{method} hung for {request}"
            elif err.code() == grpc.StatusCode.CANCELLED:
                pass
            else:
                assert err.code() in ALLOWED and not valid, (
                    f"{method} answered {err.code().name} ({err.details()}) to {request}"
                )
        finally:
            call.cancel()

    def _valid_stream(self, method: str, request: Any) -> bool:
        if method == "Watch":
            return bool(request.client_id)
        reply = self.stub.ListLenders(pb.ListLendersRequest(), timeout=DEADLINE_S)
        self.pool.remember("ListLenders", None, reply)
        lenders = {l.id: l.generation for l in reply.lenders}
        return lenders.get(request.lender_id, -1) == request.generation

    def call(self, method: str, request: Any) -> Any:
        """Whichever kind ``method`` is."""
        if method in STREAMS:
            return self.stream(method, request)
        return self.unary(method, request)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()


@pytest.fixture(scope="module")
def broker():
    """One plain node (broker + host lender, TTL 2 s, grace 1 s) for the whole fuzz."""
    with running_plain_node() as node:
        target = Broker(node)
        yield target
        target.close()


FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("method", METHODS)
def test_rpc_fuzz(broker: Broker, method: str) -> None:
    """Each method alone, with random fields (and some of the broker's real ids)."""

    @FUZZ
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        broker.call(method, getattr(Fuzz(broker.pool, data), method)())

    run()


def test_rpc_fuzz_mixed(broker: Broker) -> None:
    """Short random sequences over every method: interactions (register then status,
    grant then reclaim, ...) that one method alone does not reach."""

    @settings(FUZZ, max_examples=80)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        fuzz = Fuzz(broker.pool, data)
        for method in data.draw(st.lists(st.sampled_from(METHODS), min_size=1, max_size=6)):
            broker.call(method, getattr(fuzz, method)())

    run()


def test_rpc_raw_bytes(broker: Broker) -> None:
    """Arbitrary bytes as a request: what parses as the request message must get an
    allowed status or OK; what does not parse gets gRPC's own INTERNAL (the broker's
    code never runs), and the broker carries on."""
    methods = pb.DESCRIPTOR.services_by_name["Broker"].methods_by_name

    @settings(FUZZ, max_examples=60)
    @given(method=st.sampled_from(UNARY), body=st.binary(max_size=200))
    def run(method: str, body: bytes) -> None:
        from google.protobuf import message_factory

        cls = message_factory.GetMessageClass(methods[method].input_type)
        try:
            cls.FromString(body)
            parses = True
        except Exception:  # noqa: BLE001 - DecodeError and friends
            parses = False
        raw = broker.channel.unary_unary(f"/harvest.v1.Broker/{method}")
        try:
            raw(body, timeout=DEADLINE_S)
        except grpc.RpcError as err:
            if parses:
                assert err.code() in ALLOWED, (method, body, err.code(), err.details())
            else:
                assert err.code() == grpc.StatusCode.INTERNAL, (method, err.code())

    run()


def test_broker_after_the_fuzz(broker: Broker) -> None:
    """After everything above: the store keeps every invariant, the broker answers
    Status, and the real lender is back to lending once the fuzz's leases are gone."""
    stub = broker.stub
    for lender in stub.ListLenders(pb.ListLendersRequest(), timeout=DEADLINE_S).lenders:
        stub.Restore(pb.RestoreRequest(lender_id=lender.id), timeout=DEADLINE_S)
    for lease in broker.pool.leases:
        try:  # the fuzz's long leases would otherwise hold the real lender for 30 s
            stub.Release(
                pb.ReleaseRequest(client_id=lease.client_id, lease_id=lease.id), timeout=DEADLINE_S
            )
        except grpc.RpcError as err:
            assert err.code() in ALLOWED, err
    # ReportLender was fuzzed with the current generation, so capacities moved under
    # held bytes: the capacity bound is not an invariant of this store (check_store's
    # rule 8). Every other rule is.
    assert check_store(broker.db, capacity_bound=False) == []
    status = stub.Status(pb.StatusRequest(), timeout=DEADLINE_S)
    assert status.pid == broker.node.broker.pid
    if broker.pool.calls:
        assert set(broker.pool.calls) == set(METHODS), broker.pool.calls
        print(
            "\nRPC fuzz outcomes:",
            ", ".join(f"{m} {c}: {n}" for (m, c), n in sorted(broker.pool.outcomes.items())),
        )
    # The real lender re-registers if the fuzz took its id, reports its real capacity,
    # and every fuzz lease on it ends within a TTL (2 s) or its grace (1 s).
    real = broker.node.id
    wait_for(
        lambda: any(
            l["id"] == real and l["state"] == "up" and l["granted"] == 0
            for l in broker.node.json("lenders")
        ),
        timeout=30,
        what="the real lender to lend again, with nothing granted",
    )
    with broker.node.connect() as client, client.lease(MiB, ttl=2) as lease:
        assert int(lease.as_bytes().count_nonzero()) == 0
    assert check_store(broker.db) == []


def test_status_survives_huge_lenders(broker: Broker) -> None:
    """A lender that claims close to 2**64 bytes (a bogus or hostile report; the wire
    allows it) is refused with INVALID_ARGUMENT, at registration and in a report: no
    lender lends more than ``MAX_LEASE_BYTES``. ``Status`` still answers with lenders at
    that limit, and its sums are clamped to what a uint64 holds, so ``harvestd status``
    and ``harvestd top`` keep working for everyone."""
    stub = broker.stub
    for capacity in (U64_MAX, MAX_LEASE_BYTES + 1):
        with pytest.raises(grpc.RpcError) as refused:
            stub.RegisterLender(
                pb.RegisterLenderRequest(
                    lender=pb.Lender(
                        id="huge-x",
                        node="huge-node",
                        backend=pb.BACKEND_HOST,
                        pickup_address="/tmp/huge.sock",
                        capacity=capacity,
                    )
                ),
                timeout=DEADLINE_S,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    generations = {}
    for lender_id in ("huge-0", "huge-1"):
        generations[lender_id] = stub.RegisterLender(
            pb.RegisterLenderRequest(
                lender=pb.Lender(
                    id=lender_id,
                    node="huge-node",
                    backend=pb.BACKEND_HOST,
                    pickup_address="/tmp/huge.sock",
                    capacity=MAX_LEASE_BYTES,
                )
            ),
            timeout=DEADLINE_S,
        ).generation
    try:
        with pytest.raises(grpc.RpcError) as refused:
            stub.ReportLender(
                pb.ReportLenderRequest(
                    lender_id="huge-0", generation=generations["huge-0"], capacity=U64_MAX
                ),
                timeout=DEADLINE_S,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = stub.Status(pb.StatusRequest(), timeout=DEADLINE_S)
        assert status.bytes_lendable >= 2 * MAX_LEASE_BYTES
        result = broker.node.cli("status")
        assert result.returncode == 0, result.stderr[-500:]
    finally:
        for lender_id, generation in generations.items():
            # Shrink them again so that the rest of the module's calls see real sizes.
            stub.ReportLender(
                pb.ReportLenderRequest(lender_id=lender_id, generation=generation, capacity=0),
                timeout=DEADLINE_S,
            )


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Unfreeable:
    """A fresh node whose broker knows a lender that never confirms a free."""

    stub: pb_grpc.BrokerStub
    pid: int
    lender_id: str


@pytest.fixture
def unfreeable(plain_node: PlainNode):
    """A fuzz lender that never confirms a free, with one lease being revoked on it:
    memory that a Drain or Reclaim waits for and never sees freed. On a fresh node of its
    own: a regression of what these tests pin can leave a broker deadlocked."""
    channel = grpc.insecure_channel(f"unix://{plain_node.state_dir}/broker.sock")
    stub = pb_grpc.BrokerStub(channel)
    stub.RegisterLender(
        pb.RegisterLenderRequest(
            lender=pb.Lender(
                id="never",
                node="never-node",
                backend=pb.BACKEND_HOST,
                pickup_address="/tmp/never.sock",
                capacity=MiB,
            )
        ),
        timeout=DEADLINE_S,
    )
    lease = stub.Grant(
        pb.GrantRequest(client_id="never", nbytes=4096, node="never-node", ttl_s=600),
        timeout=DEADLINE_S,
    )
    # Asked, not forced: Drain waits for live leases, Reclaim for those on their way out;
    # this one is both (and after the grace it is forced, and still never freed).
    stub.Revoke(pb.RevokeRequest(lease_id=lease.id), timeout=DEADLINE_S)
    yield Unfreeable(stub, plain_node.broker.pid, "never")
    channel.close()
    # A deadlocked or spinning broker would not stop on SIGTERM (plain_node's teardown
    # would wait 10 s, then kill it): this one is disposable.
    plain_node.broker.kill()
    plain_node.broker.wait()


def test_waiting_for_memory_does_not_deadlock_the_broker(unfreeable: Unfreeable) -> None:
    """While Reclaims (or Drains) wait for memory, lenders register: the broker keeps
    answering. The table calls ``notifier.freed()`` -- which takes the hub's condition
    -- with its own lock held (``register_lender``, ``lenders_lost``, ``_announce``), so
    ``_wait_freed`` must never call into the table while holding that condition; it
    reads a wake-up counter first, checks the table with no hub lock held, and sleeps
    only if no wake-up came in between, so none is missed either. Eight Reclaim
    waiters and a lender re-registering in a loop for 12 s: every registration is
    answered, and Status after it (a lock-order inversion here deadlocked the broker
    within seconds, every time, on 2 cores)."""
    stub = unfreeable.stub
    stop = time.monotonic() + 12.0
    done = threading.Event()

    def wait_for_memory() -> None:
        while not done.is_set() and time.monotonic() < stop:
            try:
                stub.Reclaim(
                    pb.ReclaimRequest(lender_id=unfreeable.lender_id, nbytes=0, timeout_s=0.3),
                    timeout=DEADLINE_S,
                )
            except grpc.RpcError:
                pass

    waiters = [threading.Thread(target=wait_for_memory, daemon=True) for _ in range(8)]
    for waiter in waiters:
        waiter.start()
    registrations = 0
    try:
        while time.monotonic() < stop:
            try:
                stub.RegisterLender(
                    pb.RegisterLenderRequest(
                        lender=pb.Lender(
                            id="restarting",
                            node="n",
                            backend=pb.BACKEND_HOST,
                            pickup_address="/tmp/r.sock",
                            capacity=MiB,
                        )
                    ),
                    timeout=DEADLINE_S,
                )
            except grpc.RpcError as err:
                pytest.fail(
                    f"RegisterLender answered {err.code().name} after "
                    f"{registrations} registrations: the broker is deadlocked"
                )
            registrations += 1
    finally:
        done.set()
        for waiter in waiters:
            waiter.join(DEADLINE_S + 1)
    stub.Status(pb.StatusRequest(), timeout=DEADLINE_S)


def test_wait_timeouts_nan_is_refused(unfreeable: Unfreeable) -> None:
    """``Drain(timeout_s=nan)`` on memory that is never freed is refused at once with
    INVALID_ARGUMENT, and the broker burns no CPU afterwards: a NaN timeout must not
    reach the wait loop (``left <= 0`` is never true for NaN, and
    ``Condition.wait(nan)`` returns at once, so it would spin a core for good)."""
    code = None
    try:
        unfreeable.stub.Drain(
            pb.DrainRequest(lender_id=unfreeable.lender_id, timeout_s=math.nan), timeout=1.0
        )
    except grpc.RpcError as err:
        code = err.code()
    cpu = _cpu_s(unfreeable.pid)
    time.sleep(1.0)
    spent = _cpu_s(unfreeable.pid) - cpu
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (
        f"Drain(timeout_s=nan) answered {code}; the broker then burnt {spent:.2f} s of CPU "
        f"in 1 s with nobody waiting"
    )


def test_wait_timeouts_honour_the_callers_deadline(unfreeable: Unfreeable) -> None:
    """A Reclaim waits no longer than its caller does. A timeout that is not a finite
    number of seconds up to an hour (inf, 1e300, 3600.5, -inf) is refused at once with
    INVALID_ARGUMENT. A long one (600 s) on memory that is never freed ends at the
    caller's 3 s deadline, a little before it, with ``freed=false``: the broker's worker
    thread (one of 256) is not held past the moment anyone could hear the answer."""
    stub = unfreeable.stub
    for timeout_s in (math.inf, 1e300, 3600.5, -math.inf):
        with pytest.raises(grpc.RpcError) as refused:
            stub.Reclaim(
                pb.ReclaimRequest(lender_id=unfreeable.lender_id, nbytes=0, timeout_s=timeout_s),
                timeout=2.0,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, timeout_s
    start = time.monotonic()
    reply = stub.Reclaim(
        pb.ReclaimRequest(lender_id=unfreeable.lender_id, nbytes=0, timeout_s=600.0), timeout=3.0
    )
    elapsed = time.monotonic() - start
    assert not reply.freed
    assert 2.0 < elapsed < 3.0, elapsed


def test_unknown_backend_is_refused(broker: Broker) -> None:
    """Proto3 enums are open, so ``RegisterLender`` may carry backend 99: the broker
    refuses any backend it does not know with INVALID_ARGUMENT, and stores nothing.
    The CLI, which may yet meet a value it does not know (from a newer broker), prints
    its number rather than crash in ``pb.Backend.Name``."""
    from harvestd.cli import lease_json, lender_json

    odd = lender_json(pb.Lender(id="odd", backend=99, state=42))
    assert (odd["backend"], odd["state"]) == ("99", "42")
    odd = lease_json(pb.Lease(id="odd", backend=99, state=42))
    assert (odd["backend"], odd["state"]) == ("99", "42")
    for backend in (99, pb.BACKEND_UNSPECIFIED, -1):
        request = pb.RegisterLenderRequest(
            lender=pb.Lender(
                id="odd-backend",
                node="odd-node",
                backend=backend,
                pickup_address="/tmp/odd.sock",
                capacity=MiB,
            )
        )
        with pytest.raises(grpc.RpcError) as refused:
            broker.stub.RegisterLender(request, timeout=DEADLINE_S)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, backend
    assert "odd-backend" not in {l["id"] for l in broker.node.json("lenders")}


# ======================================================================= c. the CLI

# What str.splitlines() breaks on (test_cli_argument_with_a_line_break), drawn often.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
# Any character an argument can hold: not NUL, and of the lone surrogates only those that
# stand for a byte that is not UTF-8 (U+DC80..U+DCFF, as os.fsencode writes them; see
# test_cli_undecodable_argument).
CLI_TEXT = st.text(
    st.one_of(
        st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
        st.sampled_from(LINE_BREAKS),
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
    ),
    max_size=12,
)
SIZES = st.one_of(
    st.sampled_from(
        [
            "-5",
            "1e99",
            "",
            "0",
            "1",
            "4096",
            "64MiB",
            "1.5GiB",
            "9999TiB",
            "99999999TiB",
            "9" * 40,
            "lots",
            "١٢٣",
            " 7 kib ",
            "NaN",
            "-0",
        ]
    ),
    CLI_TEXT,
)
FLOATS = st.one_of(
    st.sampled_from(["-1", "0", "0.1", "nan", "inf", "-inf", "1e300", "x", ""]), CLI_TEXT
)


@st.composite
def cli_args(draw: st.DrawFn, lender_id: str) -> list[str]:
    """An argument list for one subcommand (and a few junk ones)."""
    lender = draw(st.one_of(st.just(lender_id), CLI_TEXT))
    size = draw(SIZES)
    junk = draw(st.lists(CLI_TEXT, max_size=2))
    command = draw(
        st.sampled_from(
            [
                "status",
                "lenders",
                "leases",
                "revoke",
                "drain",
                "reclaim",
                "restore",
                "config",
                "junk",
            ]
        )
    )
    flags = draw(
        st.lists(st.sampled_from(["--json", "--all", "--force", "--help"]), max_size=2, unique=True)
    )
    if command in ("status", "lenders"):
        args = [command, *flags, *junk]
    elif command == "leases":
        args = [command, *flags, "--lender", lender, *junk]
    elif command == "revoke":
        args = [
            command,
            draw(st.one_of(st.just("lease-0"), CLI_TEXT)),
            *flags,
            "--reason",
            draw(CLI_TEXT),
        ]
    elif command == "drain":
        args = [command, lender, "--timeout", draw(FLOATS)]
    elif command == "reclaim":
        args = [command, "--lender", lender, "--bytes", size, "--timeout", draw(FLOATS)]
    elif command == "restore":
        args = [command, "--lender", lender, "--bytes", size]
    elif command == "config":
        option = draw(
            st.sampled_from(
                [
                    "--host-bytes",
                    "--reserve",
                    "--cap",
                    "--ttl",
                    "--grace",
                    "--backend",
                    "--gpus",
                    "--listen",
                    "--metrics-port",
                    "--config",
                ]
            )
        )
        args = [command, option, draw(st.one_of(SIZES, FLOATS)), *flags[:1]]
    else:
        args = junk  # none at all, too: test_cli_without_arguments
    # An option missing its value, or junk where a value belongs.
    if args and draw(st.integers(0, 9)) == 0:
        args = args[:-1]
    return args


@pytest.fixture(scope="module")
def cli_node():
    """A plain node of its own for the CLI fuzz."""
    with running_plain_node() as node:
        yield node


def _one_clear_outcome(result: subprocess.CompletedProcess, args: list[str]) -> None:
    assert result.returncode in (0, 2), (args, result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, (args, result.stderr[-2000:])
    if result.returncode == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("harvestd: error: "), (args, result.stderr)


def test_cli_fuzz(cli_node: PlainNode) -> None:
    """Random arguments to every command that talks to (or reads for) a running node:
    exit 0 or 2, no traceback, and on 2 one line. ``start``, ``stop`` and ``top`` are
    left out: the first would start a Ray node, the second would stop this one, the
    third takes over a terminal; ``config`` parses every option ``start`` takes."""

    @settings(
        max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(args=cli_args(cli_node.id))
    def run(args: list[str]) -> None:
        _one_clear_outcome(cli_node.cli(*args, timeout=60), args)

    run()
    # Whatever the fuzz drained or reclaimed, the node still lends.
    cli_node.cli("restore", "--lender", cli_node.id, check=True)
    assert check_store(str(cli_node.state_dir / "broker.db")) == []


@pytest.mark.parametrize("command", ["reclaim", "restore"])
@pytest.mark.parametrize("size", ["99999999TiB", "9" * 400])
def test_cli_sizes_past_uint64(cli_node: PlainNode, command: str, size: str) -> None:
    """A ``--bytes`` past what the wire carries (``99999999TiB`` is 1.1e20; 400 nines
    are past what a float holds) is refused while parsing, with one line naming the
    option and exit 2, before any request is built."""
    result = cli_node.cli(command, "--lender", cli_node.id, "--bytes", size)
    _one_clear_outcome(result, [command, size])
    assert result.returncode == 2 and "--bytes" in result.stderr and "too large" in result.stderr, (
        result.stderr
    )


def test_cli_undecodable_argument(cli_node: PlainNode) -> None:
    """``harvestd revoke $'\\xff'``: Python decodes the byte to the surrogate
    ``\\udcff``, which no request can carry (protobuf strings are UTF-8). The CLI says
    in one line that an argument is not valid text, exit 2; and where it quotes such an
    argument it writes the surrogate escaped."""
    said = {"revoke": "an argument is not valid text", "status": "a\\udcffb"}
    for args in (["revoke", os.fsdecode(b"\xff")], ["status", os.fsdecode(b"a\xffb")]):
        cmd = [PY, "-m", "harvestd", *args, "--state-dir", str(cli_node.state_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env())
        _one_clear_outcome(result, [ascii(a) for a in args])
        assert result.returncode == 2 and said[args[0]] in result.stderr, result.stderr


def test_cli_without_arguments() -> None:
    """``harvestd`` alone is a usage error like any other: one line that points at
    ``harvestd --help``, exit 2 (click's own message here is the whole help text)."""
    result = subprocess.run(
        [PY, "-m", "harvestd"], capture_output=True, text=True, timeout=60, env=_env()
    )
    _one_clear_outcome(result, [])
    assert result.returncode == 2 and "--help" in result.stderr


@pytest.mark.parametrize("arg", ["\n", "a\rb", "x\u2028y", "\x85", "\x1b[31mred", "tab\there"])
def test_cli_argument_with_a_line_break(cli_node: PlainNode, arg: str) -> None:
    """Found by test_cli_fuzz: click quotes a stray argument as it is (``harvestd status
    $'\\r'``: "Got unexpected extra argument (...)"). The CLI escapes every control
    character, line or paragraph separator in an error as ``repr`` does, so the error
    stays one line that scripts can parse and no argument can forge a log line."""
    result = cli_node.cli("status", arg)
    _one_clear_outcome(result, ["status", arg])
    assert result.returncode == 2
    assert repr(arg)[1:-1] in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args", [["drain", "LENDER"], ["reclaim", "--lender", "LENDER", "--bytes", "1MiB"], ["stop"]]
)
@pytest.mark.parametrize("timeout", ["nan", "inf", "-inf", "1e400", "-1"])
def test_cli_refuses_timeouts_that_are_not_finite(
    cli_node: PlainNode, args: list[str], timeout: str
) -> None:
    """``--timeout nan`` or ``inf`` is refused while parsing, with one line that names
    the option, exit 2, before anything reaches the node (a NaN or infinite gRPC
    deadline would expire before the request left, and read as "no node answers")."""
    args = [cli_node.id if a == "LENDER" else a for a in args]
    result = cli_node.cli(*args, "--timeout", timeout)
    _one_clear_outcome(result, args)
    assert result.returncode == 2 and "'--timeout'" in result.stderr, result.stderr
    assert cli_node.broker.poll() is None, "the node stopped"
