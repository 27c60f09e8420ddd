"""The GPU backends between two real processes: a lender process allocates and exports,
this test process (the client) imports, maps, reads and writes with torch, and fences.

Run on a GPU machine with scripts/gpu_tests.sh; skipped where there is no GPU or no
cuda-bindings. The lender side runs as a subprocess driven over a SOCK_SEQPACKET Unix
socketpair, receiving commands and sending file descriptors with SCM_RIGHTS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("cuda.bindings")
torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from support.env import REPO  # noqa: E402
from support.lender_process import LenderProcess  # noqa: E402
from support.pattern import pattern  # noqa: E402

from harvestd.errors import BackendUnavailable, InvalidArgument  # noqa: E402
from harvestd.sizes import MiB  # noqa: E402
from lender.backends import BackendKind, get_backend  # noqa: E402


@pytest.fixture(scope="module")
def vmm_lender():
    lender = LenderProcess("cuda-vmm", device_index=0)
    yield lender
    lender.close()


@pytest.fixture(scope="module")
def ipc_lender():
    lender = LenderProcess("cuda-ipc", device_index=0)
    yield lender
    lender.close()


def test_allocation_granularity_and_zeroing():
    from lender.backends.cuda_vmm import CudaVmmBackend

    backend = CudaVmmBackend(device_index=0)
    gran = backend.granularity
    assert gran >= 4096 and gran & (gran - 1) == 0
    small, odd = backend.allocate(1), backend.allocate(gran + 1)
    assert (small.nbytes, odd.nbytes) == (gran, 2 * gran)
    assert int(backend.tensor(odd).count_nonzero()) == 0
    backend.tensor(odd).fill_(1)
    backend.zero(odd)
    assert int(backend.tensor(odd).count_nonzero()) == 0
    backend.free(small)
    backend.free(odd)
    backend.free(odd)  # free is idempotent
    with pytest.raises(InvalidArgument):
        backend.allocate(0)
    print(f"VMM granularity on {torch.cuda.get_device_name(0)}: {gran >> 20} MiB")


REMAP = r"""
import json, os, sys
from harvestd.errors import BackendUnavailable
from lender.backends import cuda_driver as cu
from lender.backends.cuda_vmm import CudaVmmBackend
from lender.gpus import discover_gpus
out = {"nvml": [g.uuid for g in discover_gpus()], "resolved": {}}
try:
    out["visible"] = [cu.device_uuid(i) for i in range(cu.device_count())]
except BackendUnavailable as exc:
    out["visible"] = []
for uuid in out["nvml"]:
    try:
        out["resolved"][uuid] = CudaVmmBackend(gpu_uuid=uuid).device_index
    except BackendUnavailable as exc:
        out["resolved"][uuid] = None
print(json.dumps(out))
"""


def _remapped(visible: str) -> dict:
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": visible,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    done = subprocess.run(
        [sys.executable, "-c", REMAP],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gpus_are_named_by_uuid_whatever_cuda_visible_devices_says():
    from client.devices import cuda_uuid
    from lender.backends import cuda_driver as cu
    from lender.gpus import discover_gpus

    uuids = [cu.device_uuid(i) for i in range(cu.device_count())]
    assert uuids[0] == cuda_uuid(0)  # the driver and torch agree
    gpus = {g.uuid: g for g in discover_gpus()}
    assert set(uuids) <= set(gpus)
    assert gpus[uuids[0]].vmm_supported and gpus[uuids[0]].fd_handles_supported
    assert gpus[uuids[0]].total > gpus[uuids[0]].free > 0
    # Reversed, and written as UUIDs: ordinals follow the variable, UUIDs do not move.
    remap = _remapped(",".join(reversed(uuids)))
    assert remap["visible"] == list(reversed(uuids))
    assert all(remap["resolved"][u] == remap["visible"].index(u) for u in uuids)
    # Nothing visible: NVML still lists the GPU; CUDA cleanly cannot lend from it.
    hidden = _remapped("")
    assert uuids[0] in hidden["nvml"] and hidden["resolved"][uuids[0]] is None
    with pytest.raises(BackendUnavailable):
        get_backend(BackendKind.CUDA_VMM, gpu_uuid="GPU-00000000-0000-0000-0000-000000000000")


def test_vmm_two_processes_share_then_fence(vmm_lender):
    msg = vmm_lender.call("alloc", name="a", nbytes=64 * MiB + 1)
    n = msg["alloc_bytes"]
    assert msg["zeroed"] and n % msg["granularity"] == 0 and n >= 64 * MiB + 1
    vmm_lender.call("fill", name="a", seed=7)
    backend, imported, sent = vmm_lender.receive("a", BackendKind.CUDA_VMM)
    assert sent["fresh"]  # every export is a new fd
    mapping = backend.map(imported, n, device="cuda:0")
    t = mapping.as_tensor()
    assert t.device == torch.device("cuda", 0) and t.numel() == n and t.dtype == torch.uint8
    assert torch.equal(t, pattern(n, 7, t.device))  # the lender's bytes, read here
    t[:MiB].fill_(0xFE)
    torch.cuda.synchronize()
    assert vmm_lender.call("count", name="a", lo=0, hi=2 * MiB, value=0xFE)["count"] == MiB
    stale = t[MiB : 2 * MiB]
    start = time.perf_counter()
    mapping.fence()
    print(f"fence of {n >> 20} MiB: {(time.perf_counter() - start) * 1e3:.2f} ms")
    assert mapping.fenced
    vmm_lender.call("fill", name="a", seed=9)  # the next holder's data
    mapping.close()  # covers the fenced range with this process's own chunks
    seen = stale.clone()  # no fault: the range now holds this process's own chunk
    assert not torch.equal(seen, pattern(n, 9, t.device)[MiB : 2 * MiB])
    assert not torch.equal(seen, pattern(n, 7, t.device)[MiB : 2 * MiB])
    stale.fill_(0xFF)  # and stale writes land here, not in the lender
    torch.cuda.synchronize()
    assert vmm_lender.call("same", name="a", seed=9)["same"]
    mapping.close()  # idempotent
    mapping.fence()
    with pytest.raises(InvalidArgument):
        mapping.as_tensor()
    del t, stale
    vmm_lender.call("free", name="a")


def test_lender_frees_while_the_client_still_maps(vmm_lender):
    n = vmm_lender.call("alloc", name="b", nbytes=32 * MiB)["alloc_bytes"]
    vmm_lender.call("fill", name="b", seed=3)
    backend, imported, _ = vmm_lender.receive("b", BackendKind.CUDA_VMM)
    mapping = backend.map(imported, n, device=0)
    vmm_lender.call("free", name="b")
    vmm_lender.call("churn", nbytes=32 * MiB, count=8, value=0xEE)  # try to reuse its pages
    t = mapping.as_tensor()
    assert torch.equal(t, pattern(n, 3, t.device))  # the driver kept the pages for us
    mapping.close()


def test_memory_is_zeroed_before_it_is_handed_out_again(vmm_lender):
    n = vmm_lender.call("alloc", name="c", nbytes=8 * MiB)["alloc_bytes"]
    vmm_lender.call("fill", name="c", seed=5)
    backend, imported, _ = vmm_lender.receive("c", BackendKind.CUDA_VMM)
    first = backend.map(imported, n)  # default device: the lender's GPU, seen here
    assert first.device == torch.device("cuda", 0)
    assert torch.equal(first.as_tensor(), pattern(n, 5, first.device))
    first.close()
    assert vmm_lender.call("zero", name="c")["zeroed"]
    _, imported, _ = vmm_lender.receive("c", BackendKind.CUDA_VMM)
    from lender.backends import cuda_driver as cu

    second = backend.map(imported, n, device=cu.device_uuid(0))
    assert int(second.as_tensor().count_nonzero()) == 0
    second.close()
    vmm_lender.call("free", name="c")


def test_blocks_move_in_one_launch_over_a_lease_and_pinned_host(vmm_lender):
    from client.blocks import gather, scatter
    from lender.backends.host import HostBackend

    n = vmm_lender.call("alloc", name="d", nbytes=16 * MiB)["alloc_bytes"]
    vmm_lender.call("fill", name="d", seed=1)
    backend, imported, _ = vmm_lender.receive("d", BackendKind.CUDA_VMM)
    mapping = backend.map(imported, n, device=0)
    lease = mapping.as_tensor()
    offsets = [16384 * i for i in (900, 3, 511, 0, 77)] + [12345]  # one unaligned
    out = torch.empty(len(offsets) * 16384, dtype=torch.uint8, device="cuda:0")
    gather(lease, offsets, 16384, out)
    ref = torch.cat([lease[o : o + 16384] for o in offsets])
    assert torch.equal(out, ref)
    scatter(
        lease,
        torch.full((2 * 16384,), 0xFD, dtype=torch.uint8, device="cuda:0"),
        [16384, 16384 * 5],
        16384,
    )
    torch.cuda.synchronize()
    assert vmm_lender.call("count", name="d", lo=0, hi=n, value=0xFD)["count"] == 2 * 16384
    mapping.close()
    vmm_lender.call("free", name="d")

    host = HostBackend()
    alloc = host.allocate(8 * MiB)
    pinned = host.map(host.import_handle(host.export(alloc)), alloc.nbytes, device="cuda:0")
    assert pinned.pinned
    h = pinned.as_tensor()
    h.copy_(pattern(h.numel(), 4, "cpu"))
    out = torch.empty(4 * 16384, dtype=torch.uint8, device="cuda:0")
    gather(h, torch.tensor([0, 32768, 65536, 16384 * 100], device="cuda:0"), 16384, out)
    assert torch.equal(
        out.cpu(), torch.cat([h[o : o + 16384] for o in (0, 32768, 65536, 16384 * 100)])
    )
    scatter(h, torch.full((16384,), 0x77, dtype=torch.uint8, device="cuda:0"), [16384], 16384)
    torch.cuda.synchronize()
    assert bool((h[16384:32768] == 0x77).all())
    pinned.close()
    host.free(alloc)


def test_ipc_round_trip(ipc_lender):
    msg = ipc_lender.call("alloc", name="i", nbytes=3 * MiB)
    n = msg["alloc_bytes"]
    assert msg["zeroed"] and n == 4 * MiB
    ipc_lender.call("fill", name="i", seed=11)
    backend, imported, sent = ipc_lender.receive("i", BackendKind.CUDA_IPC)
    assert "fd" not in sent and len(bytes.fromhex(sent["ipc"])) == 64
    mapping = backend.map(imported, n, device=0)
    t = mapping.as_tensor()
    assert t.device == torch.device("cuda", 0)
    assert torch.equal(t, pattern(n, 11, t.device))
    t[-MiB:].fill_(0xFC)
    torch.cuda.synchronize()
    assert ipc_lender.call("count", name="i", lo=n - MiB, hi=n, value=0xFC)["count"] == MiB
    del t  # IPC fences by closing: a stale tensor would fault, so none may be used after
    mapping.close()
    assert mapping.fenced
    ipc_lender.call("free", name="i")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_vmm_across_two_gpus():
    lender = LenderProcess("cuda-vmm", device_index=1)
    try:
        n = lender.call("alloc", name="p", nbytes=64 * MiB)["alloc_bytes"]
        lender.call("fill", name="p", seed=13)
        backend, imported, _ = lender.receive("p", BackendKind.CUDA_VMM)
        mapping = backend.map(imported, n, device=0)  # the client's own GPU, a peer
        t = mapping.as_tensor()
        assert t.device == torch.device("cuda", 0)
        assert torch.equal(t, pattern(n, 13, t.device))
        t[:MiB].fill_(0xFB)
        torch.cuda.synchronize()
        assert lender.call("count", name="p", lo=0, hi=MiB, value=0xFB)["count"] == MiB
        mapping.close()
        lender.call("free", name="p")
    finally:
        lender.close()
