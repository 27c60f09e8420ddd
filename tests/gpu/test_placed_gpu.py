"""Placed tensors on a real GPU (issue 15): one reserved range on cuda:0 whose chunks map
this process's device memory, CUDA VMM leases from a lender process (on the same GPU,
or on a peer GPU) and the authoritative copy in pinned host-NUMA pages; revocation maps
the host pages back at the same addresses, and kernels read on. The GPU side of
tests/test_placed.py (the CPU twin). Run on a lent GPU machine with scripts/gpu_tests.sh.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from support.lender_process import LenderProcess
from support.nodes import started_node
from support.pattern import pattern
from support.waiting import wait_for

from harvestd.errors import NoCapacity
from harvestd.sizes import GiB, MiB

pytest.importorskip("cuda.bindings")
torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
COUNT = torch.cuda.device_count() if torch.cuda.is_available() else 0
CAP = 2 * GiB
CUDA0 = "cuda:0"


def uuid(ordinal: int) -> str:
    from client.devices import cuda_uuid

    return cuda_uuid(ordinal)


def _node_args(gpu: int) -> list[str]:
    # Other test modules' processes come and go on this GPU: their peaks are not the
    # tenant this module is about.
    return ["--peak-window", "0", "--backend", "cuda-vmm", "--gpus", uuid(gpu)] + [
        "--cap",
        str(CAP),
        "--host-bytes",
        "256MiB",
        "--ttl",
        "10",
        "--grace",
        "1",
    ]


@pytest.fixture(scope="module")
def gpu_node():
    """A CUDA VMM lender on GPU 0: the placed tensors below live on GPU 0 too."""
    with started_node(*_node_args(0)) as node:
        yield node


def _lender(node, gpu: int = 0) -> str:
    return next(
        l["id"]
        for l in node.json("lenders")
        if l["backend"] == "cuda-vmm" and l["gpu_uuid"] == uuid(gpu)
    )


def _granted(node, gpu: int = 0) -> int:
    return next(
        l["granted"]
        for l in node.json("lenders")
        if l["backend"] == "cuda-vmm" and l["gpu_uuid"] == uuid(gpu)
    )


def _source(nbytes: int, dtype=torch.bfloat16, cols: int = 4096) -> Any:
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    return (torch.arange(n, device=CUDA0) % 251).to(dtype).view(-1, cols)


def _reclaim_all(client, node, gpu: int = 0) -> list[str]:
    """The tenant takes the lender's whole capacity back: every lease there goes."""
    return list(client.reclaim(_lender(node, gpu), CAP).revoked)


def _reclaim_leased(client, node, nbytes: int) -> list[str]:
    """The tenant takes what is free and ``nbytes`` of the leases (a reclaim takes free
    memory first and revokes leases only for the rest)."""
    row = next(l for l in node.json("lenders") if l["id"] == _lender(node))
    free = max(0, row["capacity"] - row["reclaimed"] - row["granted"])
    return list(client.reclaim(row["id"], free + nbytes).revoked)


class _NoLessor:
    """A lessor with nothing to lend: the placed tensor stays in its host copy."""

    def lease(
        self,
        nbytes,
        ttl=None,
        near=None,
        priority=0,
        backend=None,
        device=None,
        avoid=(),
        mapper=None,
    ):
        raise NoCapacity("nothing to lend here")


# ---------------------------------------------------------------- the range alone


def test_range_maps_local_leased_and_host_pages_in_one_range():
    """CudaRange without a node: host chunks, then local memory, then a lease exported by
    another process, placed and evicted under one tensor that keeps its address."""
    from client.placed.cuda import CudaRange
    from harvestd.errors import FailedPrecondition
    from lender.backends import BackendKind

    r = CudaRange(60 * MiB, 2 * MiB, torch.device(CUDA0))
    assert r.granularity % (2 * MiB) == 0 and r.nbytes >= 60 * MiB
    g, whole = r.granularity, r.tensor()
    address = whole.data_ptr()
    auth = r.authoritative()
    assert auth.device == whole.device == torch.device(CUDA0)
    auth.copy_(pattern(r.nbytes, 5, CUDA0))
    torch.cuda.synchronize()
    assert torch.equal(whole, auth)  # the range maps the very host chunks of the copy

    r.map_local(0, 2 * g)
    assert torch.equal(whole, auth)

    lender = LenderProcess("cuda-vmm", device_index=0)
    try:
        n = 4 * g
        assert lender.call("alloc", name="a", nbytes=n)["alloc_bytes"] == n
        _, imported, _ = lender.receive("a", BackendKind.CUDA_VMM)
        pages = r.stage(imported, n, 4 * g, n)
        pages.fill()  # again: idempotent
        r.synchronize()
        pages.place()
        assert whole.data_ptr() == address and torch.equal(whole, auth)
        # The span reads the lender's memory now: a write there is seen by the lender...
        whole[4 * g : 4 * g + 16] = 0xFB
        torch.cuda.synchronize()
        assert lender.call("count", name="a", lo=0, hi=16, value=0xFB)["count"] == 16
        # ...and after the eviction the span reads the host copy again, at the same address.
        r.synchronize()
        pages.evict()
        assert torch.equal(whole, auth)
        assert {"sync", "unmap", "map", "access", "release", "total"} <= set(pages.fence_ms)
        print(f"evict of {n >> 20} MiB: {pages.fence_ms}")
        pages.evict()  # idempotent

        # A lease larger than its span cannot be mapped whole there: refused, released.
        assert lender.call("alloc", name="b", nbytes=2 * g)["alloc_bytes"] == 2 * g
        _, big, _ = lender.receive("b", BackendKind.CUDA_VMM)
        with pytest.raises(FailedPrecondition):
            r.stage(big, 2 * g, 8 * g, g)
        assert torch.equal(whole, auth)
    finally:
        lender.close()
    r.close()
    del whole, auth


def test_host_placed_tensor_reads_host_pages_in_place_with_no_device_memory():
    """All in the host copy (nothing to lend): equal, a GEMV reads the host pages where
    they lie, and the borrower's own GPU memory hardly moves."""
    from client.placed import PlacedTensor

    source = _source(256 * MiB, cols=8192)
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info(0)
    allocated = torch.cuda.memory_allocated(0)
    with PlacedTensor(_NoLessor(), source, CUDA0, refill_s=None) as placed:
        assert placed.tiers()["host"] == 256 * MiB
        free_after, _ = torch.cuda.mem_get_info(0)
        assert torch.cuda.memory_allocated(0) == allocated
        assert free_before - free_after < 32 * MiB, (free_before - free_after) >> 20
        assert torch.equal(placed.tensor, source)
        x = torch.randn(1, source.shape[1], device=CUDA0, dtype=torch.bfloat16)
        with placed.use() as w:
            y = x @ w.T
        torch.testing.assert_close(y, x @ source.T)


# ---------------------------------------------------------------- through a node


def test_placed_equals_source_in_gpu_leases(gpu_node):
    source = _source(64 * MiB)
    with gpu_node.connect() as c:
        with c.place(source, device=CUDA0, lease_bytes=16 * MiB, refill_s=None) as placed:
            assert placed.tiers() == {"local": 0, "gpu-lease": 64 * MiB, "host-lease": 0, "host": 0}
            assert placed.tensor.device == torch.device(CUDA0)
            assert torch.equal(placed.tensor, source)
            assert len(placed.leases()) == 4
            assert {lease.gpu_uuid for lease in placed.leases()} == {uuid(0)}
            x = torch.randn(8, source.shape[1], device=CUDA0, dtype=torch.bfloat16)
            with placed.use() as w:
                torch.testing.assert_close(x @ w.T, x @ source.T)
        wait_for(lambda: _granted(gpu_node) == 0, what="leases given back")


def test_revocation_remaps_host_pages_and_kernels_read_on(gpu_node):
    source = _source(64 * MiB)
    with gpu_node.connect() as c:
        with c.place(source, device=CUDA0, lease_bytes=16 * MiB, refill_s=None) as placed:
            address = placed.tensor.data_ptr()
            placed.write_((slice(0, 3), slice(None)), 7.0)  # a write survives the remap
            expected = source.clone()
            expected[:3] = 7.0
            leases = placed.leases()
            revoked = _reclaim_all(c, gpu_node)
            assert set(revoked) >= {lease.id for lease in leases}
            wait_for(lambda: placed.revocations == len(leases), what="the remaps")
            # Read by kernels right after: same address, host pages, same values.
            assert placed.tensor.data_ptr() == address
            assert placed.tiers()["host"] == 64 * MiB
            assert torch.equal(placed.tensor, expected)
            assert float(placed.tensor.float().sum()) == float(expected.float().sum())
            for lease in leases:
                assert {"told", "fenced", "acked"} <= set(lease.timeline)
                steps = lease._mapping.steps_ms
                assert {"sync", "unmap", "map", "access"} <= set(steps), steps
            print(f"remap ms: {placed.remap_ms}; last steps {steps}")
            # Lenders have room again: the refill copies and maps the chunks back.
            c.restore(_lender(gpu_node))
            wait_for(
                lambda: placed.refill() >= 0 and placed.tiers()["gpu-lease"] == 64 * MiB,
                timeout=20,
                every=0.3,
                what="the refill",
            )
            assert placed.tensor.data_ptr() == address
            assert torch.equal(placed.tensor, expected)


def test_one_revoked_lease_goes_to_host_the_others_stay(gpu_node):
    source = _source(32 * MiB)
    with gpu_node.connect() as c:
        with c.place(source, device=CUDA0, lease_bytes=8 * MiB, refill_s=None) as placed:
            lease = placed.leases()[0]
            assert gpu_node.cli("revoke", lease.id).returncode == 0
            wait_for(lambda: placed.revocations == 1, what="the remap")
            assert placed.tiers()["host"] == 8 * MiB
            assert placed.tiers()["gpu-lease"] == 24 * MiB
            assert torch.equal(placed.tensor, source)


def test_local_bytes_stay_local_through_revocations(gpu_node):
    source = _source(32 * MiB)
    with gpu_node.connect() as c:
        with c.place(
            source, device=CUDA0, local_bytes=8 * MiB, lease_bytes=8 * MiB, refill_s=None
        ) as placed:
            assert placed.tiers()["local"] == 8 * MiB
            assert placed.tiers()["gpu-lease"] == 24 * MiB
            assert torch.equal(placed.tensor, source)
            _reclaim_all(c, gpu_node)
            wait_for(lambda: placed.revocations == 3, what="the remaps")
            assert placed.tiers() == {
                "local": 8 * MiB,
                "gpu-lease": 0,
                "host-lease": 0,
                "host": 24 * MiB,
            }
            assert torch.equal(placed.tensor, source)
            c.restore(_lender(gpu_node))


def test_equal_through_reclaims_while_kernels_read(gpu_node):
    """Readers launch kernels under use() while reclaims, restores, background refills
    and writes go on: every read equals the expected values."""
    expected = _source(32 * MiB)
    lock = threading.Lock()
    wrong: list[int] = []
    reads = [0]
    stop = threading.Event()
    with gpu_node.connect() as c:
        placed = c.place(expected.clone(), device=CUDA0, lease_bytes=4 * MiB, refill_s=0.05)

        def read() -> None:
            while not stop.is_set():
                with lock, placed.use() as t:
                    total = t.float().sum()  # a kernel over every page...
                    if not torch.equal(t, expected):  # ...and a comparison, synced
                        wrong.append(reads[0])
                    del total
                    reads[0] += 1

        readers = [threading.Thread(target=read) for _ in range(2)]
        for r in readers:
            r.start()
        try:
            for i in range(6):
                time.sleep(0.05 * (i % 3))
                _reclaim_leased(c, gpu_node, (i % 3 + 1) * 4 * MiB)
                c.restore(_lender(gpu_node))
                with lock:
                    placed.write_((i, slice(None)), float(i))
                    expected[i] = float(i)
            time.sleep(0.5)
        finally:
            stop.set()
            for r in readers:
                r.join()
            assert torch.equal(placed.tensor, expected)
            placed.close()
    assert reads[0] > 0 and wrong == [], f"{len(wrong)} wrong of {reads[0]} reads"
    assert placed.revocations >= 1


HOLDER = """
import json, sys, torch
from client import connect
c = connect()
source = (torch.arange(16 << 20, device="cuda:0") % 251).to(torch.bfloat16)
placed = c.place(source, device="cuda:0", lease_bytes=8 << 20, refill_s=None)
print(json.dumps({"event": "placed", "tiers": placed.tiers(),
                  "equal": bool(torch.equal(placed.tensor, source))}), flush=True)
sys.stdin.readline()
"""


def test_killed_holder_gives_its_gpu_pages_back(gpu_node):
    holder = gpu_node.spawn(HOLDER)
    try:
        placed = holder.expect("placed", timeout=120)
        assert placed["equal"] and placed["tiers"]["gpu-lease"] == 32 * MiB
        assert _granted(gpu_node) == 32 * MiB
    finally:
        holder.kill()
        holder.finish()
    wait_for(lambda: _granted(gpu_node) == 0, timeout=30, what="the dead holder's pages")


# ---------------------------------------------------------------- peer GPUs


@pytest.mark.skipif(COUNT < 2, reason="needs two GPUs: leases on GPU 1, the tensor on GPU 0")
def test_peer_gpu_leases_under_a_tensor_on_gpu_0():
    with started_node(*_node_args(1)) as node, node.connect() as c:
        source = _source(64 * MiB)
        with c.place(source, device=CUDA0, lease_bytes=16 * MiB, refill_s=None) as placed:
            assert placed.tiers()["gpu-lease"] == 64 * MiB
            assert {lease.gpu_uuid for lease in placed.leases()} == {uuid(1)}
            assert torch.equal(placed.tensor, source)
            x = torch.randn(1, source.shape[1], device=CUDA0, dtype=torch.bfloat16)
            with placed.use() as w:
                torch.testing.assert_close(x @ w.T, x @ source.T)
            placed.write_((0, slice(None)), 3.0)
            source[0] = 3.0
            _reclaim_all(c, node, gpu=1)
            wait_for(lambda: placed.revocations == 4, what="the remaps")
            assert torch.equal(placed.tensor, source)
            c.restore(_lender(node, 1))
            wait_for(
                lambda: placed.refill() >= 0 and placed.tiers()["host"] == 0,
                timeout=20,
                every=0.3,
                what="the refill from the peer",
            )
            assert torch.equal(placed.tensor, source)
