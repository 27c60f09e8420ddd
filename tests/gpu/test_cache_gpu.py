"""The tiered cache on a GPU: objects in borrowed CUDA VMM slabs, read onto the GPU,
right through a revocation and a refill."""

from __future__ import annotations

import pytest
from support.nodes import started_node
from support.waiting import wait_for

from harvestd.sizes import MiB

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def node():
    with started_node(
        # Other test modules' processes come and go on this GPU: their peaks are not
        # the tenant this module is about.
        "--peak-window",
        "0",
        "--backend",
        "cuda-vmm",
        "--cap",
        "1GiB",
        "--host-bytes",
        "256MiB",
        "--ttl",
        "5",
        "--grace",
        "1",
    ) as n:
        yield n


def test_cache_serves_from_gpu_leases_and_survives_revocation(node):
    from client.cache import Tier, TieredCache

    experts = {
        i: torch.randn(1024, 1024, device="cuda:0", dtype=torch.float16) for i in range(16)
    }  # 2 MiB each
    with node.connect() as client:
        cache = TieredCache(client, device="cuda:0", borrow_bytes=16 * MiB, slab_bytes=16 * MiB)
        for i, weight in experts.items():
            cache.put(i, weight)
        assert {cache.tier_of(i) for i in experts} == {Tier.GPU_LEASE, Tier.HOST}
        for i, weight in experts.items():
            assert torch.equal(cache.get(i), weight)
        out = torch.empty((16, 1024, 1024), dtype=torch.float16, device="cuda:0")
        cache.get_many(list(range(16)), out)
        assert all(torch.equal(out[i], experts[i]) for i in experts)
        slab = cache._slabs.slabs[0]
        node.cli("revoke", slab.lease.id, check=True)
        wait_for(lambda: cache.stats.revocations == 1, what="revocation")
        for i, weight in experts.items():
            assert torch.equal(cache.get(i), weight)
        assert cache.refill() > 0
        assert torch.equal(cache.get(0), experts[0])
        cache.close()
