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
from support.nodes import started_node
from support.programs import GPU_HOLDER, GPU_TENANT
from support.waiting import wait_for

from harvestd.sizes import GiB, MiB

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

RESERVE, CAP = 8 * GiB, 12 * GiB
LENDER = int(os.environ.get("HARVEST_LENDER_GPU", "0"))
CLIENT = int(os.environ.get("HARVEST_CLIENT_GPU", "0"))
if torch.cuda.is_available() and max(LENDER, CLIENT) >= torch.cuda.device_count():
    pytestmark.append(pytest.mark.skip(reason=f"needs GPUs {LENDER} and {CLIENT}"))


@pytest.fixture(scope="module")
def gpu_node():
    from client.devices import cuda_uuid

    # One GPU lender: the holders' grants, the tenant's pressure and its reclaim all
    # concern that GPU, however many the machine has.
    with started_node(
        # Other test modules' processes come and go on this GPU: their peaks are not the
        # tenant this module is about (the peak window is bench_tenant_ramp's).
        "--peak-window",
        "0",
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
        # (A tenant still growing as the lender looks is met where it is heading: the
        # older ones may go too, but always newest first.)
        tenant = gpu_node.spawn(GPU_TENANT, gpu["gpu_uuid"], str(4 * GiB), str(RESERVE))
        report = tenant.expect("tenant", timeout=120)
        print(f"tenant pressure to reserve free again: {report['freed_s'] * 1e3:.1f} ms")
        assert report["free_at_pressure"] < RESERVE and report["recovered"]
        for holder, leased in holders[2:]:
            assert holder.expect("revoked")["id"] == leased["id"]
            assert holder.expect("done")["wrong"] == 0
        rows = {l["id"]: l for l in gpu_node.json("leases")}
        kept = [
            leased["id"] in rows and rows[leased["id"]]["state"] == "granted"
            for _, leased in holders
        ]
        assert kept == sorted(kept, reverse=True), f"not newest first: {kept}"
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
