"""The KV fetch executor on a GPU: K/V from a CUDA VMM lease and a pinned host lease,
the rest recomputed from activations on a side stream, equal to the reference."""

from __future__ import annotations

import pytest
from support.nodes import started_node

pytest.importorskip("cuda.bindings")
torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda:0"


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
        "10",
        "--grace",
        "1",
    ) as n:
        yield n


def layer(tokens: int, hidden: int, kv_dim: int, dtype):
    """Integer-valued data: every product and sum is exact in fp16 and in fp32
    accumulators, so any GEMM algorithm and chunking gives the same bits."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def rnd(*shape):
        return torch.randint(-2, 3, shape, generator=gen, device=DEVICE).to(dtype)

    x = rnd(tokens, hidden)
    w_k, w_v, b_k, b_v = rnd(kv_dim, hidden), rnd(kv_dim, hidden), rnd(kv_dim), rnd(kv_dim)
    return x, w_k, b_k, w_v, b_v, torch.addmm(b_k, x, w_k.t()), torch.addmm(b_v, x, w_v.t())


@pytest.mark.parametrize("via", ["host", "peer"])
def test_three_way_fetch_equals_the_reference(node, via):
    from client.kv.fetch import fetch_kv
    from client.kv.plan import KVShape
    from client.kv.planner import FetchPlanner

    tokens, hidden, heads, head_dim, dtype = 8192, 256, 4, 64, torch.float16
    shape = KVShape(hidden, heads, head_dim, dtype)
    kv_dim = shape.kv_dim
    x, w_k, b_k, w_v, b_v, k, v = layer(tokens, hidden, kv_dim, dtype)
    kv_bytes = tokens * kv_dim * 2
    with node.connect() as client:
        host = client.lease(2 * kv_bytes + tokens * hidden * 2, backend="host", device=DEVICE)
        peer = client.lease(2 * kv_bytes + tokens * hidden * 2, backend="cuda-vmm", device=DEVICE)
        stores = {}
        for name, lease in (("host", host), ("peer", peer)):
            sk = lease.tensor(dtype, (tokens, kv_dim))
            sv = lease.tensor(dtype, (tokens, kv_dim), offset=kv_bytes)
            sx = lease.tensor(dtype, (tokens, hidden), offset=2 * kv_bytes)
            with lease.use():
                sk.copy_(k), sv.copy_(v), sx.copy_(x)
            stores[name] = (sk, sv, sx)
        assert stores["host"][0].device.type == "cpu" and stores["peer"][0].device.type == "cuda"
        pinned = stores["host"][0].is_pinned()  # checked last: slow if not, still right
        with host.use(), peer.use():
            rates = FetchPlanner.profile(
                shape,
                DEVICE,
                host=host.as_bytes(),
                peer=peer.as_bytes(),
                dtype=dtype,
                chunk_tokens=512,
                nbytes=16 << 20,
            )
        assert rates.host_bps is not None and rates.peer_bps is not None
        assert rates.concurrent and rates.host_bps > 0 and rates.peer_bps > 0
        planner = FetchPlanner(chunk_tokens=512)
        plans = [
            planner.fixed(
                tokens, shape, rates, recompute_tokens=3000, peer_tokens=2500, activations_via=via
            ),
            planner.plan(tokens, shape, rates),
            planner.plan(tokens, shape, rates, peer_available=False),
        ]
        for plan in plans:
            out_k = torch.full((tokens, kv_dim), float("nan"), dtype=dtype, device=DEVICE)
            out_v = torch.full_like(out_k, float("nan"))
            fetch_kv(
                plan,
                out_k=out_k,
                out_v=out_v,
                peer_kv=stores["peer"][:2],
                host_kv=stores["host"][:2],
                activations=stores[plan.activations_via or "host"][2],
                w_k=w_k,
                b_k=b_k,
                w_v=w_v,
                b_v=b_v,
                chunk_tokens=512,
                leases=[host, peer],
            )
            assert torch.equal(out_k, k) and torch.equal(out_v, v), plan
        host.release()
        peer.release()
    assert pinned, "the host lease mapped for the GPU should be pinned (cudaHostRegister)"
