"""The host-memory backend and the lender's pool: zeroing, sharing, fencing, and never
handing a possibly-still-mapped allocation to anyone else."""

from __future__ import annotations

import pytest

from harvestd.errors import InvalidArgument
from lender.backends import BackendKind, get_backend
from lender.pool import Pool


@pytest.fixture
def host():
    return get_backend(BackendKind.HOST)


def _map(backend, alloc):
    return backend.map(backend.import_handle(backend.export(alloc)), alloc.nbytes)


def test_allocations_are_page_multiples_zeroed_and_shared(host):
    alloc = host.allocate(5000)
    assert alloc.nbytes % host.granularity == 0 and alloc.nbytes >= 5000
    a, b = _map(host, alloc), _map(host, alloc)
    assert int(a.as_tensor().count_nonzero()) == 0
    a.as_tensor()[:100] = 7
    assert b.as_tensor()[:100].tolist() == [7] * 100
    host.zero(alloc)
    assert int(b.as_tensor().count_nonzero()) == 0  # a live mapping reads zeros, no SIGBUS
    a.close(), b.close(), host.free(alloc)


def test_fence_cuts_off_stale_views_only(host):
    alloc = host.allocate(1 << 16)
    holder, other = _map(host, alloc), _map(host, alloc)
    stale = holder.as_tensor()[10:20]
    holder.fence()
    other.as_tensor()[:] = 9
    assert stale.tolist() == [0] * 10  # the fenced holder no longer sees it
    stale[:] = 1  # and its writes land in its own pages
    assert other.as_tensor()[10:20].tolist() == [9] * 10
    holder.fence()  # idempotent
    other.close(), host.free(alloc)


def test_bad_sizes(host):
    with pytest.raises(InvalidArgument):
        host.allocate(0)


def test_pool_reuses_only_clean_memory_and_zeroes_it(host):
    pool = Pool(host, keep_bytes=1 << 20)
    first = pool.take(1 << 16)
    view = _map(host, first)
    view.as_tensor().fill_(0x5A)
    pool.give_back(first, clean=True)
    assert pool.idle_bytes == 1 << 16
    again = pool.take(1 << 16)
    assert again is first and int(_map(host, again).as_tensor().count_nonzero()) == 0
    pool.give_back(again, clean=False)  # its holder may still map it: freed
    assert pool.idle_bytes == 0 and again.handle == -1
    fresh = pool.take(1 << 16)
    assert fresh is not first
    pool.give_back(fresh, clean=True)
    assert pool.trim(0) == 1 << 16 and pool.idle_bytes == 0


def test_pool_frees_beyond_its_budget(host):
    pool = Pool(host, keep_bytes=0)
    alloc = pool.take(4096)
    pool.give_back(alloc, clean=True)
    assert pool.idle_bytes == 0 and pool.out_bytes == 0 and alloc.handle == -1
