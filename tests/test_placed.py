"""Placed tensors on the CPU twin: host leases mapped into one reserved range, the
authoritative copy mapped back over a revoked lease. Real node processes, real leases,
real revocations; the same protocol the GPU range runs (tests/gpu/test_placed_gpu.py)."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.programs import PLACED_HOLDER
from support.waiting import wait_for

from client import FailedPrecondition, InvalidArgument
from client.placed import PlacedTensor, Tier
from client.placed.remap_lock import RemapLock
from harvestd.sizes import MiB


def _source(nbytes: int, dtype=torch.float32) -> torch.Tensor:
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    return (torch.arange(n) % 251).to(dtype)


def _granted(node) -> int:
    return sum(l["granted"] for l in node.json("lenders"))


def test_place_equals_source_in_host_leases(plain_node):
    source = _source(12 * MiB).view(3, -1)
    with plain_node.connect() as c:
        with c.place(source, chunk_bytes=MiB, lease_bytes=4 * MiB) as placed:
            assert torch.equal(placed.tensor, source)
            assert placed.tensor.shape == source.shape and placed.tensor.dtype == source.dtype
            assert placed.tiers() == {"local": 0, "gpu-lease": 0, "host-lease": 12 * MiB, "host": 0}
            assert len(placed.leases()) == 3  # 4 MiB a lease
            # The tensor's address never changes: the leases were mapped under it.
            assert _granted(plain_node) == 12 * MiB
            # A lease's own view is its span of the placed range.
            lease = placed.leases()[0]
            assert lease.as_bytes().data_ptr() >= placed.tensor.data_ptr()
        wait_for(lambda: _granted(plain_node) == 0, what="leases given back")


def test_place_overflows_to_host_and_keeps_local(plain_node):
    source = _source(80 * MiB)  # the node lends 64 MiB
    with plain_node.connect() as c:
        with c.place(
            source, chunk_bytes=2 * MiB, local_bytes=4 * MiB, lease_bytes=16 * MiB, refill_s=None
        ) as placed:
            tiers = placed.tiers()
            assert tiers["local"] == 4 * MiB
            assert tiers["host-lease"] == 64 * MiB
            assert tiers["host"] == 12 * MiB
            assert sum(tiers.values()) == source.numel() * 4
            assert torch.equal(placed.tensor, source)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int64, torch.uint8, torch.bool])
def test_place_any_dtype_and_shape(plain_node, dtype):
    source = torch.randint(0, 2 if dtype is torch.bool else 100, (5, 7, 333)).to(dtype)
    with plain_node.connect() as c:
        with c.place(source, chunk_bytes=4096, lease_bytes=8192) as placed:
            assert torch.equal(placed.tensor, source)
            assert sum(placed.tiers().values()) == source.numel() * source.element_size()


def test_revocation_remaps_the_authoritative_copy(plain_node):
    source = _source(16 * MiB)
    with plain_node.connect() as c:
        with c.place(source, chunk_bytes=MiB, lease_bytes=4 * MiB, refill_s=None) as placed:
            address = placed.tensor.data_ptr()
            placed.write_(slice(0, 10), -1.0)
            source[:10] = -1.0
            result = c.reclaim(plain_node.lender_id(), 60 * MiB)
            assert len(result.revoked) >= 1
            wait_for(lambda: placed.revocations == len(result.revoked), what="the remaps")
            assert placed.tiers()["host"] >= 8 * MiB
            assert placed.tensor.data_ptr() == address
            assert torch.equal(placed.tensor, source)  # the write survived the remap
            assert all(ms >= 0 for ms in placed.remap_ms)
            # Lenders have room again: a refill leases the host chunks back.
            c.restore(plain_node.lender_id())
            wait_for(
                lambda: placed.refill() >= 0 and placed.tiers()["host"] == 0,
                timeout=15,
                every=0.3,
                what="the refill",
            )
            assert torch.equal(placed.tensor, source)


def test_background_refill_after_revocation(plain_node):
    source = _source(8 * MiB)
    with plain_node.connect() as c:
        with c.place(source, chunk_bytes=MiB, lease_bytes=2 * MiB, refill_s=0.1) as placed:
            c.reclaim(plain_node.lender_id(), 60 * MiB)
            wait_for(lambda: placed.revocations >= 1, what="a revocation")
            c.restore(plain_node.lender_id())
            wait_for(lambda: placed.tiers()["host"] == 0, timeout=15, what="the background refill")
            assert torch.equal(placed.tensor, source)


@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    moments=st.lists(st.floats(0.0, 0.05), min_size=1, max_size=4),
    writes=st.lists(st.integers(0, 2 * MiB - 1), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_equal_through_revocations_at_random_moments(plain_node, moments, writes, seed):
    """Readers check the tensor under use() while reclaims land at random moments and
    writes go in between: every read equals the expected values."""
    node = plain_node
    rng = random.Random(seed)
    expected = _source(8 * MiB)
    with node.connect() as c:
        placed = c.place(expected.clone(), chunk_bytes=MiB, lease_bytes=2 * MiB, refill_s=0.02)
        wrong = []
        stop = threading.Event()
        lock = threading.Lock()

        def read() -> None:
            while not stop.is_set():
                with lock, placed.use() as t:
                    if not torch.equal(t, expected):
                        wrong.append(time.monotonic())

        readers = [threading.Thread(target=read) for _ in range(2)]
        for r in readers:
            r.start()
        try:
            for i, moment in enumerate(moments):
                time.sleep(moment)
                c.reclaim(node.lender_id(), rng.choice([2, 4, 8]) * MiB)
                c.restore(node.lender_id())
                for index in writes[i :: len(moments)]:
                    with lock:
                        value = float(rng.randrange(1000))
                        placed.write_(index, value)
                        expected[index] = value
            time.sleep(0.05)
        finally:
            stop.set()
            for r in readers:
                r.join()
            assert torch.equal(placed.tensor, expected)
            placed.close()
        assert wrong == []


def test_lender_killed_tensor_stays_equal_and_refills(plain_node):
    source = _source(8 * MiB)
    with plain_node.connect() as c:
        with c.place(source, chunk_bytes=MiB, lease_bytes=2 * MiB, refill_s=0.2) as placed:
            assert placed.tiers()["host-lease"] == 8 * MiB
            plain_node.lender.kill()
            plain_node.lender.wait()
            # The pages stay mapped (a memfd outlives its lender): equal while it is dead.
            for _ in range(10):
                assert torch.equal(placed.tensor, source)
                time.sleep(0.05)
            # Restarted, the lender registers anew and the broker ends the old leases: the
            # authoritative copy is mapped back, then the refill leases from the new one.
            plain_node.start_lender()
            wait_for(lambda: placed.revocations == 4, what="the old leases to end")
            assert torch.equal(placed.tensor, source)
            wait_for(
                lambda: placed.tiers()["host-lease"] == 8 * MiB,
                timeout=20,
                what="the refill onto the restarted lender",
            )
            assert torch.equal(placed.tensor, source)


def test_holder_killed_gives_its_pages_back(plain_node):
    holder = plain_node.spawn(PLACED_HOLDER, str(16 * MiB), "2")
    placed = holder.expect("placed")
    assert placed["tiers"]["host-lease"] == 16 * MiB
    assert _granted(plain_node) == 16 * MiB
    holder.kill()
    holder.finish()
    wait_for(lambda: _granted(plain_node) == 0, timeout=10, what="the dead holder's pages")


def test_holder_reads_right_through_reclaims(plain_node):
    holder = plain_node.spawn(PLACED_HOLDER, str(16 * MiB), "2")
    holder.expect("placed")
    with plain_node.connect() as c:
        for _ in range(3):
            c.reclaim(plain_node.lender_id(), 60 * MiB)
            c.restore(plain_node.lender_id())
            time.sleep(0.3)
    holder.proc.stdin.write("stop\n")
    holder.proc.stdin.flush()
    done = holder.expect("done")
    assert done["reads"] > 0 and done["wrong"] == 0


def test_bad_input_is_a_clear_error(plain_node):
    with plain_node.connect() as c:
        with pytest.raises(InvalidArgument):
            c.place([1, 2, 3])
        with pytest.raises(InvalidArgument):
            c.place(torch.ones(4), chunk_bytes=0)
        with pytest.raises(InvalidArgument):
            c.place(torch.ones(4), local_bytes=-1)
        with pytest.raises(InvalidArgument):
            c.place(torch.ones(4), device="meta")
        with pytest.raises(InvalidArgument, match="shape= and dtype="):
            c.place(None, shape=(4,))
        with pytest.raises(InvalidArgument, match="negative"):
            c.place(None, shape=(4, -1), dtype=torch.float32)
        with pytest.raises(InvalidArgument, match="no source"):
            c.place(torch.ones(4), shape=(4,), dtype=torch.float32)
        placed = c.place(torch.ones(4))
        placed.close()
        placed.close()  # idempotent
        with pytest.raises(FailedPrecondition):
            with placed.use():
                pass
        with pytest.raises(FailedPrecondition):
            placed.write_(0, 1.0)


def test_an_empty_placed_tensor_takes_its_values_from_writes(plain_node):
    """No source: the shape and dtype asked for, in host leases, values from write_ on;
    through a revocation they stay."""
    want = _source(4 * MiB).view(4, -1)
    with plain_node.connect() as c:
        with c.place(
            None, shape=want.shape, dtype=want.dtype, chunk_bytes=MiB, lease_bytes=2 * MiB
        ) as placed:
            assert placed.device == torch.device("cpu")
            assert placed.tensor.shape == want.shape and placed.tensor.dtype == want.dtype
            assert placed.tiers()["host-lease"] == 4 * MiB
            placed.write_(slice(None), want)
            assert torch.equal(placed.tensor, want)
            c.reclaim(plain_node.lender_id(), 64 * MiB)
            wait_for(lambda: placed.tiers()["host"] == 4 * MiB, what="the remaps")
            assert torch.equal(placed.tensor, want)


def test_empty_and_tiny_tensors(plain_node):
    with plain_node.connect() as c:
        with c.place(torch.empty(0)) as placed:
            assert placed.tensor.numel() == 0 and sum(placed.tiers().values()) == 0
        with c.place(torch.tensor(3.5)) as placed:
            assert placed.tensor.item() == 3.5 and placed.tensor.shape == ()


def test_remap_lock_orders_uses_and_remaps():
    lock = RemapLock()
    events = []
    in_use = threading.Event()
    release = threading.Event()

    def user() -> None:
        with lock.use():
            in_use.set()
            release.wait()
            events.append("use ends")

    def remapper() -> None:
        with lock.remap():
            events.append("remap")

    u = threading.Thread(target=user)
    u.start()
    in_use.wait()
    r = threading.Thread(target=remapper)
    r.start()
    time.sleep(0.05)

    # A waiting remap goes before new uses: this one must wait for it.
    def late_user() -> None:
        with lock.use():
            events.append("late use")

    late = threading.Thread(target=late_user)
    late.start()
    time.sleep(0.05)
    assert events == []
    release.set()
    for t in (u, r, late):
        t.join(5)
    assert events == ["use ends", "remap", "late use"]
    # Re-entrant for a thread's own uses; a remap inside a use is refused, not a deadlock.
    lock2 = RemapLock()
    with lock2.use():
        with lock2.use():
            with pytest.raises(FailedPrecondition):
                with lock2.remap():
                    pass


def _held_off_until(use, release) -> None:
    """A thread entering ``use()`` waits while the remap is open, and enters once
    ``release()`` has run."""
    entered = threading.Event()

    def user() -> None:
        with use():
            entered.set()

    t = threading.Thread(target=user)
    t.start()
    assert not entered.wait(0.2)  # held off while the remap is open
    release()
    assert entered.wait(5)
    t.join(5)


def test_a_remap_begun_in_one_thread_can_end_in_another():
    lock = RemapLock()
    lock.begin_remap()

    def end_in_another_thread() -> None:
        ender = threading.Thread(target=lock.end_remap)
        ender.start()
        ender.join(5)

    _held_off_until(lock.use, end_in_another_thread)


def test_a_revocation_acknowledges_before_the_host_pages_are_back(plain_node, monkeypatch):
    """The lease is cut off, acknowledged (its lender may free it), and only then are the
    authoritative pages mapped back; uses wait through both halves."""
    from client.placed import tensor as placed_module

    source = _source(4 * MiB)
    seen: list[bool | None] = []
    close = placed_module._PlacedMapping.close

    def recording_close(self):
        lease = next((l for l in placed.leases() if l._mapping is self), None)
        seen.append(("acked" in lease.timeline) if lease is not None else None)
        close(self)

    monkeypatch.setattr(placed_module._PlacedMapping, "close", recording_close)
    with plain_node.connect() as c:
        with c.place(source, chunk_bytes=MiB, lease_bytes=4 * MiB, refill_s=None) as placed:
            (lease,) = placed.leases()
            result = c.reclaim(plain_node.lender_id(), _granted(plain_node) + 60 * MiB)
            assert result.revoked == [lease.id]
            wait_for(lambda: placed.revocations == 1, what="the remap")
            assert seen and seen[0] is True  # acknowledged before the close ran
            assert placed.tiers()["host"] == 4 * MiB
            assert torch.equal(placed.tensor, source)

            # The halves by hand: between them no use begins.
            c.restore(plain_node.lender_id())
            wait_for(lambda: placed.refill() > 0, what="a lease again")
            (lease,) = placed.leases()
            mapping = lease._mapping
            mapping.fence()
            _held_off_until(placed.use, mapping.close)
            assert torch.equal(placed.tensor, source)


def test_tiers_name_every_tier():
    assert {t.value for t in Tier} == {"local", "gpu-lease", "host-lease", "host"}
    assert PlacedTensor.__doc__


def test_a_remap_that_keeps_failing_refuses_every_use(plain_node, monkeypatch):
    """A span the remap could not map back would fault the next kernel: the placed
    tensor refuses uses instead, and the lease is not acknowledged."""
    from client.placed import host

    source = _source(4 * MiB)
    with plain_node.connect() as c:
        placed = c.place(source, chunk_bytes=MiB, lease_bytes=4 * MiB, refill_s=None)
        calls = []

        def broken_evict(self):
            calls.append(self.offset)
            raise OSError("injected: mmap failed")

        monkeypatch.setattr(host.HostLeasePages, "evict", broken_evict)
        c.reclaim(plain_node.lender_id(), 64 * MiB, timeout=0.5)
        wait_for(lambda: len(calls) >= 3, what="the remap's attempts")
        with pytest.raises(FailedPrecondition, match="unusable"):
            with placed.use():
                pass
        with pytest.raises(FailedPrecondition):
            placed.write_(0, 1.0)
        monkeypatch.undo()
        placed.close()


def test_auto_placement_is_placed_only_where_a_gpu_maps_host_memory(monkeypatch):
    from client.placed import choice
    from lender.backends import vmm_host

    assert choice.choose_placement("auto", "cpu") == "copy"
    assert choice.choose_placement("placed", "cpu") == "placed"
    assert choice.choose_placement("copy", "cuda:0") == "copy"
    with pytest.raises(InvalidArgument, match="placement"):
        choice.choose_placement("elsewhere")

    def unavailable(ordinal):
        from harvestd.errors import BackendUnavailable

        raise BackendUnavailable(f"device {ordinal} cannot map VMM host memory")

    monkeypatch.setattr(vmm_host, "host_location", unavailable)
    assert choice.choose_placement("auto", "cuda:0") == "copy"  # the copy path serves
    monkeypatch.setattr(vmm_host, "host_location", lambda ordinal: (None, 2 * MiB, "host-numa"))
    assert choice.choose_placement("auto", "cuda:0") == "placed"
