"""The tenant's side of lending, on the CPU twin of a GPU: a host lender lends from a
host device that a tenant shares (lender.host_device), through a real broker, lender and
holder. The same policy a GPU lender applies: memory above the tenant's recent peak and
the reserve, reclaimed when the tenant grows, and room made for a tenant that asks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest
from support.nodes import PlainNode
from support.sockets import short_tmpdir
from support.waiting import wait_for

from client import FailedPrecondition, LeaseRevoked, NoCapacity
from client.tenant import Tenant
from harvestd.sizes import MiB
from lender.host_device import HostDevice, HostTenant

TOTAL = 256 * MiB
RESERVE = 32 * MiB
PIECE = 16 * MiB
LEASE = 32 * MiB


class Twin(PlainNode):
    """A node whose host lender lends from a host device shared with a tenant."""

    def __init__(self, state_dir: Path) -> None:
        path = state_dir / "device"
        HostDevice.create(path, TOTAL).close()
        super().__init__(
            state_dir,
            host_bytes=str(TOTAL),
            ttl=10.0,
            grace=2.0,
            lender_args=("--host-device", str(path), "--reserve", str(RESERVE)),
        )
        self.device = HostDevice(path)


@pytest.fixture
def twin() -> Iterator[Twin]:
    """A broker and a host lender of a fresh 256 MiB host device (32 MiB reserve)."""
    node = Twin(Path(short_tmpdir()))
    try:
        node.start_broker()
        node.start_lender()
        yield node
    finally:
        node.stop()


def _lender(node: PlainNode) -> dict:
    return next(l for l in node.json("lenders") if l["id"] == node.id)


def _borrow(client, count: int) -> list:
    leases = []
    for i in range(count):
        lease = client.lease(LEASE)
        lease.as_bytes().fill_(i + 1)
        leases.append(lease)
    return leases


def _no_wrong_reads(leases: list) -> int:
    """Reads every lease still held; returns how many were revoked. A held lease that
    reads anything but its own pattern fails the test."""
    revoked = 0
    for i, lease in enumerate(leases):
        try:
            with lease.use():
                data = lease.as_bytes()
                assert int(data.min()) == int(data.max()) == i + 1, f"lease {i} read wrong"
        except LeaseRevoked:
            revoked += 1
    return revoked


def _ramp(tenant: HostTenant, upto: int, deadline_s: float = 20.0) -> int:
    """Allocate PIECE after PIECE until ``upto`` is held, retrying a failed allocation
    every millisecond (a tenant that does not cooperate); returns the failures."""
    failures, deadline = 0, time.monotonic() + deadline_s
    while tenant.held < upto:
        try:
            tenant.allocate(PIECE)
        except NoCapacity:
            failures += 1
            assert time.monotonic() < deadline, f"tenant stuck at {tenant.held} bytes"
            time.sleep(0.001)
    return failures


def test_the_lender_shows_the_tenant_and_lends_above_it_and_the_reserve(twin):
    tenant = HostTenant(twin.device)
    _ramp(tenant, 64 * MiB)
    wait_for(lambda: _lender(twin)["tenant"] == 64 * MiB, what="a report of the tenant")
    lender = _lender(twin)
    assert lender["tenant_peak"] == 64 * MiB and lender["peak_window_s"] == 300
    assert lender["capacity"] == TOTAL - 64 * MiB - RESERVE
    out = twin.cli("lenders", check=True).stdout
    assert "64.0 MiB (peak 64.0 MiB in 300s)" in out


def test_a_tenant_growing_into_lent_memory_gets_it_back_and_no_holder_reads_wrong(twin):
    with twin.connect() as client:
        leases = _borrow(client, 6)  # 192 MiB of the 224 lendable
        tenant = HostTenant(twin.device)
        _ramp(tenant, 160 * MiB)
        # 160 MiB for the tenant and 32 for the reserve leave room for 2 leases.
        wait_for(lambda: sum(l.revoked for l in leases) >= 4, what="revocations")
        assert _no_wrong_reads(leases) >= 4
        assert twin.device.memory()[1] >= 0


def test_a_tenant_coming_back_to_an_earlier_peak_never_fails(twin):
    tenant = HostTenant(twin.device)
    assert _ramp(tenant, 160 * MiB) == 0  # nothing lent yet
    tenant.free_all()
    wait_for(lambda: _lender(twin)["tenant"] == 0, what="the tenant to breathe out")
    assert _lender(twin)["tenant_peak"] == 160 * MiB
    with twin.connect() as client:
        leases = []
        with pytest.raises(NoCapacity):
            while True:
                leases.append(client.lease(LEASE))
        # Only what lies above the peak and the reserve was lent.
        assert len(leases) == (TOTAL - 160 * MiB - RESERVE) // LEASE
        assert _ramp(tenant, 160 * MiB) == 0
        assert not any(l.revoked for l in leases)


def test_a_cooperating_tenant_waits_for_room_instead_of_failing(twin):
    with twin.connect() as client:
        leases = _borrow(client, 6)
        cooperating = Tenant(client, lender=twin.id)
        tenant = HostTenant(twin.device)
        room = cooperating.make_room(96 * MiB)
        assert room.lendable <= TOTAL - 96 * MiB - RESERVE
        assert _ramp(tenant, 96 * MiB) == 0  # the room was there before it allocated
        # And allocation by allocation: a failed one waits for room, then succeeds.
        while tenant.held < 160 * MiB:
            cooperating.allocate(lambda: tenant.allocate(PIECE), nbytes=PIECE)
        assert tenant.held == 160 * MiB
        assert _no_wrong_reads(leases) >= 4


def test_room_from_a_lender_that_watches_no_tenant_is_a_clear_error():
    node = PlainNode(short_tmpdir())
    try:
        node.start_broker()
        node.start_lender()
        with node.connect() as client:
            with pytest.raises(FailedPrecondition, match="watches no tenant"):
                Tenant(client, lender=node.id).make_room(MiB)
    finally:
        node.stop()


def test_a_tenant_needs_exactly_one_way_to_find_its_lender(twin):
    from client import InvalidArgument, NotFound

    with twin.connect() as client:
        with pytest.raises(InvalidArgument):
            Tenant(client)
        with pytest.raises(NotFound):
            Tenant(client, lender="nobody")
        with pytest.raises(InvalidArgument):
            Tenant(client, lender=twin.id).make_room(0)


def test_a_node_started_with_a_host_device_makes_it_and_lends_from_it(tmp_path):
    from harvestd.node import NodeOptions, plan_lenders

    path = tmp_path / "device"
    opts = NodeOptions(
        state_dir=str(tmp_path),
        backend="host",
        host_bytes=TOTAL,
        host_device=str(path),
        reserve_fraction=0.25,
        peak_window_s=60.0,
    )
    (plan,) = plan_lenders(opts, "vm")
    assert plan.host_device == str(path) and plan.backend == "host"
    assert plan.reserve_fraction == 0.25 and plan.peak_window_s == 60.0
    assert HostDevice(path).memory() == (TOTAL, TOTAL)


def test_allocate_passes_other_errors_on_and_needs_a_size_to_ask_for(twin):
    from client import InvalidArgument

    def broken() -> None:
        raise ValueError("not about memory")

    def out_of_memory() -> None:
        raise MemoryError("no size in this message")

    with twin.connect() as client:
        tenant = Tenant(client, lender=twin.id)
        with pytest.raises(ValueError, match="not about memory"):
            tenant.allocate(broken)
        with pytest.raises(InvalidArgument, match="pass nbytes"):
            tenant.allocate(out_of_memory)


def test_the_host_device_books_stay_exact_under_threads_of_one_process(tmp_path):
    """The lender frees from several threads: flock alone lets threads of one process in
    together (they share the open file), and a change was lost (a reclaim then never saw
    its memory free). Every change must land."""
    import threading

    path = tmp_path / "device"
    device = HostDevice.create(path, 1 << 40)
    rounds, threads = 300, 8

    def churn() -> None:
        for _ in range(rounds):
            device.allocate("lender", 4096)
            device.free("lender", 4096)
            device.allocate("lender", 4096)

    workers = [threading.Thread(target=churn) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert device.used("lender") == rounds * threads * 4096
    device.close()
