"""The tiered cache on host leases (the CPU twin of peer GPU memory): every read right,
through revocations, replacements and batched reads."""

from __future__ import annotations

import pytest
import torch
from support.waiting import wait_for

from client.cache import Tier, TieredCache
from harvestd.sizes import MiB


def expert(i: int, n: int = 64 * 1024) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) * 0.001 + i


def test_put_get_from_borrowed_memory_and_source(plain_node):
    with plain_node.connect() as client:
        cache = TieredCache(client, borrow_bytes=1 * MiB, slab_bytes=1 * MiB)
        for i in range(8):  # 256 KiB each: 4 fit in the 1 MiB budget
            cache.put(i, expert(i))
        tiers = [cache.tier_of(i) for i in range(8)]
        assert tiers.count(Tier.HOST_LEASE) == 4 and tiers.count(Tier.HOST) == 4
        for i in range(8):
            assert torch.equal(cache.get(i), expert(i))
        assert cache.stats.hits == {"host-lease": 4, "host": 4}
        cache.close()


def test_revocation_drops_entries_to_their_source_never_wrong(plain_node):
    with plain_node.connect() as client:
        cache = TieredCache(client, borrow_bytes=4 * MiB, slab_bytes=1 * MiB)
        for i in range(12):
            cache.put(i, expert(i))
        slab = cache._slabs.slabs[0]
        plain_node.cli("revoke", slab.lease.id, check=True)
        wait_for(lambda: cache.stats.revocations == 1, what="the cache to hear the revocation")
        assert sum(cache.tier_of(i) == Tier.HOST for i in range(12)) == 4
        for i in range(12):
            assert torch.equal(cache.get(i), expert(i))
        assert cache.refill() == 4  # capacity is back: the entries move up again
        assert all(cache.tier_of(i) == Tier.HOST_LEASE for i in range(12))
        cache.close()


def test_replacing_a_key_never_serves_the_old_value(plain_node):
    with plain_node.connect() as client:
        cache = TieredCache(client, borrow_bytes=MiB, slab_bytes=MiB)
        cache.put("w", expert(1))
        cache.put("w", expert(2))
        assert torch.equal(cache.get("w"), expert(2))
        cache.evict("w")
        with pytest.raises(KeyError):
            cache.get("w")
        cache.close()


def test_get_many_gathers_across_tiers(plain_node):
    with plain_node.connect() as client:
        cache = TieredCache(client, borrow_bytes=MiB, slab_bytes=MiB)
        for i in range(6):
            cache.put(i, expert(i))
        out = torch.empty((6, 64 * 1024), dtype=torch.float32)
        cache.get_many([5, 0, 3, 1, 4, 2], out)
        for row, i in enumerate([5, 0, 3, 1, 4, 2]):
            assert torch.equal(out[row], expert(i))
        assert cache.stats.hits["host-lease"] == 4 and cache.stats.hits["host"] == 2
        cache.close()


def test_recompute_source(plain_node):
    with plain_node.connect() as client:
        cache = TieredCache(client, borrow_bytes=0)
        calls: list[int] = []

        def recompute() -> torch.Tensor:
            calls.append(1)
            return expert(7)

        cache.put("kv", recompute=recompute)
        assert torch.equal(cache.get("kv"), expert(7)) and len(calls) == 2
        assert cache.tier_of("kv") == Tier.RECOMPUTE
        cache.close()


def test_background_pass_refills_after_revocation(plain_node):
    with plain_node.connect() as client:
        cache = TieredCache(client, borrow_bytes=4 * MiB, slab_bytes=1 * MiB, refill_every=0.05)
        for i in range(8):
            cache.put(i, expert(i))
        slab = cache._slabs.slabs[0]
        plain_node.cli("revoke", slab.lease.id, check=True)
        wait_for(lambda: cache.stats.revocations == 1, what="the cache to hear the revocation")
        wait_for(
            lambda: all(cache.tier_of(i) == Tier.HOST_LEASE for i in range(8)),
            what="the background pass to refill",
        )
        assert all(torch.equal(cache.get(i), expert(i)) for i in range(8))
        cache.close()


def test_rebalance_moves_used_objects_into_borrowed_memory(plain_node):
    with plain_node.connect() as client:
        cache = TieredCache(client, borrow_bytes=1 * MiB, slab_bytes=1 * MiB)
        for i in range(8):  # 256 KiB each: 0-3 fit, 4-7 stay on the host
            cache.put(i, expert(i))
        assert [cache.tier_of(i) for i in (6, 7)] == [Tier.HOST, Tier.HOST]
        for _ in range(5):
            cache.get(6)
            cache.get(7)
        cache.get(0)
        assert cache.rebalance() == 2
        assert [cache.tier_of(i) for i in (6, 7)] == [Tier.HOST_LEASE, Tier.HOST_LEASE]
        assert sum(cache.tier_of(i) == Tier.HOST_LEASE for i in range(8)) == 4
        assert cache.tier_of(0) == Tier.HOST_LEASE  # the one used object kept its place
        assert all(torch.equal(cache.get(i), expert(i)) for i in range(8))
        assert cache.stats.swaps == 2
        cache.close()


def test_fetch_names_rows_a_forced_fence_overlapped(plain_node):
    """A read that outlives the grace period: the lease is fenced under it, and the
    fetch reads those rows again from their source and says so."""
    with plain_node.connect() as client:
        cache = TieredCache(client, borrow_bytes=1 * MiB, slab_bytes=1 * MiB)
        for i in range(4):
            cache.put(i, expert(i))
        out = torch.empty((4, 64 * 1024), dtype=torch.float32)
        fetch = cache.fetch([0, 1, 2, 3], out)  # holds use() on the slab until wait()
        slab = cache._slabs.slabs[0]
        plain_node.cli("revoke", slab.lease.id, check=True)  # grace 1 s, then forced
        # The holder waits for reads in flight up to the grace, then fences under them.
        wait_for(lambda: cache.stats.revocations == 1, timeout=15, what="a forced fence")
        assert sorted(fetch.wait()) == [0, 1, 2, 3]
        for i in range(4):
            assert torch.equal(out[i], expert(i))
        assert cache.stats.fallbacks == 4
        cache.close()


def test_evicted_object_keeps_its_slot_until_its_reads_end(plain_node):
    with plain_node.connect() as client:
        cache = TieredCache(client, borrow_bytes=1 * MiB, slab_bytes=1 * MiB)
        cache.put("a", expert(1))
        out = torch.empty((1, 64 * 1024), dtype=torch.float32)
        fetch = cache.fetch(["a"], out)
        cache.evict("a")
        cache.put("b", expert(2))  # must not land in "a"'s slot while "a" is read
        fetch.wait()
        assert torch.equal(out[0], expert(1))
        assert torch.equal(cache.get("b"), expert(2))
        cache.close()
