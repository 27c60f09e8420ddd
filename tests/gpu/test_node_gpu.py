"""The node on a real GPU: a CUDA VMM lender (Ray actor) and client processes on the
same GPU, exchanging data through leases; revocation while reads run; a tenant process
growing into the reserve; a killed client's memory coming back; host and GPU leases
through the same calls. Run on a lent GPU machine with scripts/gpu_tests.sh.

HARVEST_LENDER_GPU and HARVEST_CLIENT_GPU (CUDA ordinals, default 0 and 0) put the lender
and the clients on two GPUs: scripts/multi_gpu_runs.sh runs these with 1 and 0."""

from __future__ import annotations

import os
import time

import pytest
from conftest import started_node, wait_for

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GiB, MiB = 1 << 30, 1 << 20
RESERVE, CAP = 8 * GiB, 12 * GiB
LENDER = int(os.environ.get("HARVEST_LENDER_GPU", "0"))
CLIENT = int(os.environ.get("HARVEST_CLIENT_GPU", "0"))
if torch.cuda.is_available() and max(LENDER, CLIENT) >= torch.cuda.device_count():
    pytestmark.append(pytest.mark.skip(reason=f"needs GPUs {LENDER} and {CLIENT}"))

# A holder on the GPU: leases, fills with its marker, gathers 16 KiB blocks in one launch,
# then verifies under use() until revoked; after that it reads its stale tensor once,
# which must neither fault nor show anything but its own (fenced) memory.
GPU_HOLDER = r"""
import json, os, sys, threading, time, torch
from client import connect, LeaseRevoked
nbytes, marker, backend, ttl = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
dev = f"cuda:{os.environ.get('HARVEST_CLIENT_GPU', '0')}"
c = connect()
lease = c.lease(nbytes, ttl=ttl, backend=backend, device=dev)
t = lease.tensor(torch.uint8)
t.fill_(marker)
blocks = 64
out = torch.empty((blocks, 16384), dtype=torch.uint8, device=dev)
lease.gather([i * 32768 for i in range(blocks)], 16384, out)
gathered_ok = bool((out == marker).all())
revoked = threading.Event()
lease.on_revoke(lambda l, why: (print(json.dumps({"event": "revoked", "id": l.id, "reason": why}),
                                      flush=True), revoked.set()))
print(json.dumps({"event": "leased", "id": lease.id, "lender": lease.lender,
                  "backend": lease.backend.value, "device": str(t.device),
                  "gathered_ok": gathered_ok}), flush=True)
reads = wrong = 0
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
while not stop.is_set() and not revoked.is_set():
    try:
        with lease.use():
            ok = bool((t == marker).all())
        reads += 1
        wrong += not ok
    except LeaseRevoked:
        break
if lease.state == "revoked":
    revoked.wait(10)
stale = int(t[:4096].sum())  # fenced: local memory, no fault
torch.cuda.synchronize()
print(json.dumps({"event": "done", "reads": reads, "wrong": wrong, "state": lease.state,
                  "stale_ok": True}), flush=True)
c.close()
"""

# The GPU's own tenant: allocates until NVML free memory is `leave` bytes, then times
# how long until free memory is back above the reserve; on "next", allocates into it.
TENANT = r"""
import json, os, sys, time, torch, pynvml
uuid, leave, reserve = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dev = f"cuda:{os.environ.get('HARVEST_LENDER_GPU', '0')}"  # the lender's GPU
torch.zeros(1, device=dev)  # our own CUDA context first: it takes memory too
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByUUID(uuid)
free = lambda: pynvml.nvmlDeviceGetMemoryInfo(h).free
grab = torch.empty(free() - leave, dtype=torch.uint8, device=dev)
torch.cuda.synchronize(dev)
pressed = time.monotonic()
low = free()
while free() < reserve and time.monotonic() - pressed < 30:
    time.sleep(0.0005)
freed_s = time.monotonic() - pressed
print(json.dumps({"event": "tenant", "free_at_pressure": low, "freed_s": freed_s,
                  "recovered": free() >= reserve}), flush=True)
sys.stdin.readline()
nxt = torch.empty(reserve // 2, dtype=torch.uint8, device=dev)  # finds the memory
torch.cuda.synchronize(dev)
print(json.dumps({"event": "next_ok"}), flush=True)
sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def gpu_node():
    from client.devices import cuda_uuid

    # One GPU lender: the holders' grants, the tenant's pressure and its reclaim all
    # concern that GPU, however many the machine has.
    with started_node(
        "--backend",
        "cuda-vmm",
        "--gpus",
        cuda_uuid(LENDER),
        "--reserve",
        str(RESERVE),
        "--cap",
        str(CAP),
        "--host-bytes",
        "2GiB",
        "--ttl",
        "3",
        "--grace",
        "1",
    ) as node:
        yield node


def _gpu_lender(node):
    return next(l for l in node.json("lenders") if l["backend"] == "cuda-vmm")


def test_lenders_identify_the_gpu_by_uuid(gpu_node):
    from client.devices import cuda_uuid

    lenders = gpu_node.json("lenders")
    assert {l["backend"] for l in lenders} == {"cuda-vmm", "host"}
    gpu = _gpu_lender(gpu_node)
    assert gpu["gpu_uuid"] == cuda_uuid(LENDER)
    assert 0 < gpu["capacity"] <= CAP


@pytest.mark.parametrize("backend", ["cuda-vmm", "host"])
def test_leases_exchange_data_and_revoke_while_reading(gpu_node, backend):
    holder = gpu_node.spawn(GPU_HOLDER, str(256 * MiB), "77", backend, "3")
    try:
        leased = holder.expect("leased", timeout=120)
        assert leased["backend"] == backend and leased["gathered_ok"]
        assert leased["device"] == (f"cuda:{CLIENT}" if backend == "cuda-vmm" else "cpu")
        time.sleep(1.0)  # reads run
        assert gpu_node.cli("revoke", leased["id"]).returncode == 0
        assert holder.expect("revoked")["id"] == leased["id"]
        done = holder.expect("done")
        assert done["wrong"] == 0 and done["reads"] > 0 and done["stale_ok"]
    finally:
        holder.kill()
        holder.finish()


def test_tenant_growing_into_the_reserve_triggers_reclaim(gpu_node):
    gpu = _gpu_lender(gpu_node)
    holders = []
    try:
        for marker in (1, 2, 3, 4):
            holder = gpu_node.spawn(GPU_HOLDER, str(2 * GiB), str(marker), "cuda-vmm", "5")
            holders.append((holder, holder.expect("leased", timeout=120)))
            time.sleep(0.05)
        assert _gpu_lender(gpu_node)["granted"] == 8 * GiB
        # Leave 4 GiB free: we may lend 4 + 8 - 8 = 4 GiB, so the two newest leases go.
        tenant = gpu_node.spawn(TENANT, gpu["gpu_uuid"], str(4 * GiB), str(RESERVE))
        report = tenant.expect("tenant", timeout=120)
        print(f"tenant pressure to reserve free again: {report['freed_s'] * 1e3:.1f} ms")
        assert report["free_at_pressure"] < RESERVE and report["recovered"]
        for holder, leased in holders[2:]:
            assert holder.expect("revoked")["id"] == leased["id"]
            assert holder.expect("done")["wrong"] == 0
        rows = {l["id"]: l for l in gpu_node.json("leases")}
        assert all(rows[leased["id"]]["state"] == "granted" for _, leased in holders[:2])
        # The tenant's next allocation finds the reserve free (and, growing into it
        # again, may cost the remaining leases: that is the reserve doing its job).
        tenant.send("next")
        tenant.expect("next_ok", timeout=60)
        tenant.send("done")
        tenant.finish()
    finally:
        for holder, _ in holders:
            holder.send("stop")
            holder.kill()
            holder.finish()


def test_killed_client_memory_comes_back(gpu_node):
    holder = gpu_node.spawn(GPU_HOLDER, str(GiB), "9", "cuda-vmm", "2")
    leased = holder.expect("leased", timeout=120)
    holder.kill()
    holder.finish()
    wait_for(
        lambda: _gpu_lender(gpu_node)["granted"] == 0,
        timeout=15,
        what="the killed client's lease to expire and its memory to be freed",
    )
    row = {l["id"]: l for l in gpu_node.json("leases", "--all")}[leased["id"]]
    assert row["state"] == "expired"
    with (
        gpu_node.connect() as client,
        client.lease(GiB, backend="cuda-vmm", device=f"cuda:{CLIENT}") as lease,
    ):
        assert int(lease.as_bytes().count_nonzero()) == 0  # zeroed before hand-out
