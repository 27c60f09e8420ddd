"""What a lender may lend beside its tenant (lender.tenant), and the host device that
stands in for a GPU's memory on machines without one (lender.host_device)."""

from __future__ import annotations

import multiprocessing

import pytest

from harvestd.errors import InvalidArgument, NoCapacity
from harvestd.sizes import GiB, MiB
from lender.host_device import LENDER, TENANT, HostDevice, HostTenant
from lender.tenant import RAMP_WINDOW_S, LendingPolicy, MemorySample, TenantHistory

TOTAL = 100 * GiB


def sample(at: float, tenant: int, held: int = 0) -> MemorySample:
    return MemorySample(at=at, total=TOTAL, free=TOTAL - tenant - held, held=held)


def test_a_steady_tenant_leaves_everything_above_it_and_the_reserve():
    policy = LendingPolicy(reserve=10 * GiB, peak_window_s=60)
    for i in range(10):
        view = policy.sample(sample(i * 0.01, 30 * GiB, held=20 * GiB))
    assert view.now == 30 * GiB and view.peak == 30 * GiB and view.growth_bps == 0
    # The lender's own holding is not the tenant's: 100 - 30 - 10.
    assert view.lendable == 60 * GiB


def test_memory_the_tenant_held_within_the_window_stays_unlent():
    policy = LendingPolicy(reserve=10 * GiB, peak_window_s=60)
    policy.sample(sample(0.0, 80 * GiB))
    view = policy.sample(sample(1.0, 20 * GiB))  # it breathed out
    assert view.now == 20 * GiB and view.peak == 80 * GiB
    assert view.lendable == 10 * GiB  # 100 - 80 - 10, not 100 - 20 - 10
    # Past the window, the old peak no longer counts.
    view = policy.sample(sample(61.5, 20 * GiB))
    assert view.peak == 20 * GiB and view.lendable == 70 * GiB


def test_a_zero_window_lends_down_to_the_use_now():
    policy = LendingPolicy(reserve=0, peak_window_s=0)
    policy.sample(sample(0.0, 80 * GiB))
    assert policy.sample(sample(1.0, 20 * GiB)).lendable == 80 * GiB


def test_a_ramping_tenant_is_met_where_it_is_heading():
    policy = LendingPolicy(reserve=10 * GiB, peak_window_s=60, horizon_s=0.05)
    # 10 GiB every 10 ms: 1 TB/s, so 50 GiB ahead within the 50 ms horizon.
    for i in range(4):
        view = policy.sample(sample(i * 0.01, (10 + 10 * i) * GiB))
    assert view.growth_bps == pytest.approx(1000 * GiB, rel=0.01)
    assert view.heading == pytest.approx(40 * GiB + 50 * GiB, rel=0.01)
    assert view.lendable == max(0, TOTAL - view.heading - 10 * GiB)
    # Once the ramp stops, growth falls back to 0 after the ramp window.
    for i in range(4, 4 + int(RAMP_WINDOW_S / 0.01) + 2):
        view = policy.sample(sample(i * 0.01, 40 * GiB))
    assert view.growth_bps == 0 and view.heading == 40 * GiB


def test_a_tenant_growing_back_to_its_earlier_peak_is_met_at_the_peak():
    policy = LendingPolicy(reserve=0, peak_window_s=60, horizon_s=0.05)
    policy.sample(sample(0.0, 60 * GiB))
    policy.sample(sample(1.0, 10 * GiB))
    for i in range(6):  # back up at 1 TB/s: no extrapolation while at or under 60 GiB
        view = policy.sample(sample(2.0 + i * 0.01, (10 + 10 * i) * GiB))
        assert view.heading == view.now and view.lendable == 40 * GiB
    view = policy.sample(sample(2.06, 70 * GiB))  # past it: a new ramp
    assert view.heading > 70 * GiB and view.lendable < 30 * GiB


def test_a_single_jump_that_stops_is_a_step_not_a_ramp():
    policy = LendingPolicy(reserve=10 * GiB, peak_window_s=60, horizon_s=0.05)
    policy.sample(sample(0.0, 10 * GiB))
    view = policy.sample(sample(0.005, 50 * GiB))  # 40 GiB at once, 40 GiB still free
    assert view.heading == view.now and view.lendable == 40 * GiB
    view = policy.sample(sample(0.010, 50 * GiB))
    assert view.lendable == 40 * GiB


def test_a_jump_into_the_reserve_counts_as_a_ramp():
    policy = LendingPolicy(reserve=10 * GiB, peak_window_s=60, horizon_s=0.05)
    policy.sample(sample(0.0, 10 * GiB))
    view = policy.sample(sample(0.005, 50 * GiB, held=48 * GiB))  # 2 GiB left free
    assert view.heading > view.now and view.lendable < 40 * GiB - 8 * GiB


def test_a_slow_reclaim_looks_further_ahead_and_a_fast_one_shortens_it_gradually():
    policy = LendingPolicy(reserve=0, horizon_s=0.05)
    policy.reclaimed_in(0.2)
    assert policy.horizon_s == pytest.approx(0.2)
    policy.reclaimed_in(0.02)
    assert policy.horizon_s == pytest.approx(0.11)
    policy.reclaimed_in(100.0)
    assert policy.horizon_s == 1.0  # bounded


def test_the_cap_bounds_what_is_lent():
    policy = LendingPolicy(reserve=0, cap=5 * GiB)
    assert policy.sample(sample(0.0, 10 * GiB)).lendable == 5 * GiB


def test_promised_room_stays_unlent_until_the_tenant_takes_it_or_the_promise_lapses():
    policy = LendingPolicy(reserve=0, peak_window_s=0)
    policy.sample(sample(0.0, 10 * GiB))
    policy.promise(30 * GiB, at=0.0, ttl_s=5.0)
    assert policy.sample(sample(0.1, 10 * GiB)).lendable == 60 * GiB
    # The tenant took it: its use keeps it unlent from now on, and the promise is done.
    policy.sample(sample(0.2, 40 * GiB))
    assert policy.sample(sample(0.3, 40 * GiB)).lendable == 60 * GiB
    assert policy.sample(sample(0.4, 10 * GiB)).lendable == 90 * GiB
    # A promise never taken lapses.
    policy.promise(30 * GiB, at=1.0, ttl_s=5.0)
    assert policy.sample(sample(2.0, 10 * GiB)).lendable == 60 * GiB
    assert policy.sample(sample(6.5, 10 * GiB)).lendable == 90 * GiB


def test_the_history_keeps_the_window_peak_with_few_entries():
    history = TenantHistory(peak_window_s=1.0)
    for i in range(10_000):
        history.add(i * 0.001, 10_000 - i)  # falling: every sample is a future peak
    assert history.peak() == 10_000 - 9_999 + 1000
    assert len(history._peaks) <= 1001


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        LendingPolicy(reserve=-1)
    with pytest.raises(ValueError):
        TenantHistory(peak_window_s=-1)


# ---------------------------------------------------------------- the host device


def test_a_host_device_keeps_the_books_of_both_sides(tmp_path):
    device = HostDevice.create(tmp_path / "dev", 64 * MiB)
    device.allocate(LENDER, 40 * MiB)
    tenant = HostTenant(HostDevice(tmp_path / "dev"))
    tenant.allocate(16 * MiB)
    assert device.memory() == (64 * MiB, 8 * MiB)
    with pytest.raises(NoCapacity):
        tenant.allocate(16 * MiB)  # the twin of cudaMalloc failing
    assert tenant.held == 16 * MiB and device.used(TENANT) == 16 * MiB
    device.free(LENDER, 40 * MiB)
    tenant.allocate(16 * MiB)
    tenant.free_all()
    assert device.memory() == (64 * MiB, 64 * MiB)


def _grab(path: str, n: int, out: multiprocessing.Queue) -> None:
    device, got = HostDevice(path), 0
    for _ in range(n):
        try:
            device.allocate(TENANT, MiB)
            got += 1
        except NoCapacity:
            pass
    out.put(got)


def test_allocations_from_two_processes_never_overcommit(tmp_path):
    path = str(tmp_path / "dev")
    HostDevice.create(path, 100 * MiB)
    out: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_grab, args=(path, 80, out)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(got) == 100
    assert HostDevice(path).memory() == (100 * MiB, 0)


def test_a_missing_or_bad_host_device_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidArgument, match="no host device"):
        HostDevice(tmp_path / "missing")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="not a host device"):
        HostDevice(tmp_path / "empty")
    with pytest.raises(InvalidArgument):
        HostDevice.create(tmp_path / "zero", 0)


class _ScriptedCapacity:
    """What the tenant leaves lendable at each look, in order (the last one repeats): the
    reading of the device a lender would get from NVML."""

    def __init__(self, *lendable: int) -> None:
        self.script = list(lendable)
        self.reclaims: list[float] = []

    def lendable(self, held: int) -> int:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def pool_bytes(self) -> int:
        return 64 * MiB

    def promise(self, nbytes: int, ttl_s: float) -> None:
        pass

    def reclaimed_in(self, seconds: float) -> None:
        self.reclaims.append(seconds)


def test_what_a_reclaim_gives_back_is_freed_even_if_the_tenant_looks_smaller_midway():
    """A tenant stalled on lent memory looks, mid-reclaim, as if it needed less: the
    memory of the reclaim's last leases must still be freed, not pooled, or the tenant
    waits for a second reclaim to get it."""
    import threading
    import time
    from types import SimpleNamespace

    from lender.backends.host import HostBackend
    from lender.pool import Pool
    from lender.tenant_watch import TenantWatch

    pool = Pool(HostBackend())
    lent = [pool.take(MiB) for _ in range(4)]  # four leases' memory, out with holders
    three_back, go = threading.Event(), threading.Event()

    class Broker:  # the broker's revocations: the holders give the memory back
        def report(self, capacity: int) -> None:
            pass

        def reclaim(self) -> SimpleNamespace:
            for alloc in lent[:3]:
                pool.give_back(alloc, clean=True)
            three_back.set()
            go.wait(10)
            pool.give_back(lent[3], clean=True)
            return SimpleNamespace(revoked=["a", "b", "c", "d"], elapsed_s=0.0)

    capacity = _ScriptedCapacity(0, 2 * MiB)  # pressed to 0, then the tenant stalls
    watch = TenantWatch(
        capacity,  # type: ignore[arg-type]
        pool,
        Broker(),
        held=lambda: pool.out_bytes + pool.idle_bytes,
        interval_s=1.0,
    )
    watch.look()  # the tenant presses: the reclaim starts
    assert three_back.wait(10)
    watch.look()  # mid-reclaim the tenant looks smaller: 2 MiB lendable, 1 MiB still out
    go.set()
    deadline = time.monotonic() + 10
    while watch.busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watch.last is not None and not watch.busy()
    assert watch.last.held_after == 0 and pool.idle_bytes == 0  # freed, none pooled
    assert watch.last.lendable == 0
    pool.close()
