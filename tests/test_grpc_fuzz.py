"""Every gRPC method of a running broker (a plain-process node), called with random, huge,
negative, empty and duplicate fields: each call ends OK or with one of the statuses a
caller can act on, within its deadline.

Each bug this found is fixed, and pinned by a test of its own below (named in
docs/reliability.md); the random strategies draw those inputs too, so the fuzz guards
them as well.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from support.nodes import PlainNode, running_plain_node
from support.waiting import wait_for

from harvestd.invariants import check_store
from harvestd.sizes import MiB
from harvestd.table import MAX_LEASE_BYTES
from protos import harvest_pb2 as pb
from protos import harvest_pb2_grpc as pb_grpc

U64_MAX = (1 << 64) - 1

ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
DEADLINE_S = 5.0
# OPEN_ENUMS: proto3 enums are open (a field takes any int32, and the fuzz sends numbers
# no enum names), but the generated stubs (harvest_pb2.pyi) admit only the named values.

# Strings gRPC can carry (proto3 strings are UTF-8: no lone surrogates), short enough
# that no message nears gRPC's 4 MiB limit.
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
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
                backend=self.draw(st.one_of(st.sampled_from([0, 1, 2, 3, 4, 99]), I32)),  # type: ignore[arg-type]  # an open enum: see OPEN_ENUMS
                gpu_uuid=self.draw(st.one_of(st.just(""), TEXT)),
                gpu_index=self.draw(I32),
                links=links,
                pickup_address=self.draw(st.one_of(st.just("/tmp/fz.sock"), TEXT)),
                capacity=self.draw(CAPACITY),
                reclaimed=self.draw(U64),
                granted=self.draw(U64),
                generation=self.draw(U64),
                state=self.draw(st.sampled_from([0, 1, 2, 3, 42])),  # type: ignore[arg-type]  # an open enum: see OPEN_ENUMS
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
        token, lease_id, lease_generation = (self.draw(RAW_BYTES), self.lease_id(), self.draw(U64))
        if right:
            assert lease is not None
            lender_id, generation = lease.lender_id, self.pool.lenders.get(lease.lender_id, 0)
            lease_id, lease_generation = lease.id, lease.generation
            if right_token:
                token = lease.token
        return pb.CheckPickupRequest(
            lender_id=lender_id,
            lender_generation=generation,
            lease_id=lease_id,
            token=token,
            lease_generation=lease_generation,
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
                backend=self.draw(st.sampled_from([0, pb.BACKEND_HOST])),  # type: ignore[arg-type]  # an open enum: see OPEN_ENUMS
            )
        return pb.GrantRequest(
            client_id=self.client_id(),
            nbytes=self.draw(st.one_of(st.integers(0, 8 * MiB), U64)),
            ttl_s=self.draw(st.one_of(st.sampled_from([0.0, 1.0, 2.0]), DOUBLE)),
            node=self.node(),
            near_gpu=self.draw(st.one_of(st.just(""), TEXT)),
            priority=self.draw(I32),
            holder_pid=self.draw(U32),
            backend=self.draw(st.sampled_from([0, 0, 1, 2, 3, 99])),  # type: ignore[arg-type]  # an open enum: see OPEN_ENUMS
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
    assert broker.node.broker is not None
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
    with broker.node.connect() as client, client.lease(MiB, ttl=2) as fresh:
        assert int(fresh.as_bytes().count_nonzero()) == 0
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
    broker = plain_node.broker
    assert broker is not None
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
    yield Unfreeable(stub, broker.pid, "never")
    channel.close()
    # A deadlocked or spinning broker would not stop on SIGTERM (plain_node's teardown
    # would wait 10 s, then kill it): this one is disposable.
    broker.kill()
    broker.wait()


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

    odd = lender_json(pb.Lender(id="odd", backend=99, state=42))  # type: ignore[arg-type]  # an open enum: see OPEN_ENUMS
    assert (odd["backend"], odd["state"]) == ("99", "42")
    odd = lease_json(pb.Lease(id="odd", backend=99, state=42))  # type: ignore[arg-type]  # an open enum: see OPEN_ENUMS
    assert (odd["backend"], odd["state"]) == ("99", "42")
    for backend in (99, pb.BACKEND_UNSPECIFIED, -1):
        request = pb.RegisterLenderRequest(
            lender=pb.Lender(
                id="odd-backend",
                node="odd-node",
                backend=backend,  # type: ignore[arg-type]  # an open enum: see OPEN_ENUMS
                pickup_address="/tmp/odd.sock",
                capacity=MiB,
            )
        )
        with pytest.raises(grpc.RpcError) as refused:
            broker.stub.RegisterLender(request, timeout=DEADLINE_S)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, backend
    assert "odd-backend" not in {l["id"] for l in broker.node.json("lenders")}
