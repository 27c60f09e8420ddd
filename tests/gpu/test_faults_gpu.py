"""Faults on GPU leases (the GPU variants of tests/test_faults.py and tests/test_node.py):
the lender's actor killed while a holder reads, and a stuck holder that never lets go.
Run on a lent GPU machine with scripts/gpu_tests.sh."""

from __future__ import annotations

import os
import signal

import pytest
from support.nodes import started_node
from support.programs import GPU_HOLDER
from support.waiting import wait_for

from harvestd.sizes import GiB, MiB

pytest.importorskip("cuda.bindings")
torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


# A holder that maps a GPU lease, fills it, and then never lets go: its fence fails, so it
# neither unmaps nor acknowledges, and it keeps running.
STUCK_GPU = r"""
import json, sys, time, torch
from client import connect
c = connect()
lease = c.lease(int(sys.argv[1]), backend="cuda-vmm", device="cuda:0", ttl=30)
lease.tensor(torch.uint8).fill_(5)
torch.cuda.synchronize()
keep = lease._mapping  # the real mapping stays referenced: never unmapped
class Stuck:
    def close(self):
        raise OSError("injected: this holder never lets go")
lease._mapping = Stuck()
print(json.dumps({"event": "leased", "id": lease.id}), flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def node():
    with started_node(
        # Other test modules' processes come and go on this GPU: their peaks are not
        # the tenant this module is about.
        "--peak-window",
        "0",
        "--backend",
        "cuda-vmm",
        "--gpus",
        "0",
        "--cap",
        "8GiB",
        "--ttl",
        "5",
        "--grace",
        "1",
    ) as n:
        yield n


def _gpu_lender(node):
    return next(l for l in node.json("lenders") if l["backend"] == "cuda-vmm")


def _free_bytes(uuid: str) -> int:
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByUUID(uuid)).free


def test_gpu_lender_killed_while_a_holder_reads(node):
    """The holder hears of it, falls back, never reads a wrong byte (its import keeps the
    pages alive); Ray restarts the lender under a new generation with nothing granted."""
    lender = _gpu_lender(node)
    holder = node.spawn(GPU_HOLDER, str(64 * MiB), "7", "cuda-vmm", "5")
    try:
        leased = holder.expect("leased", timeout=120)
        assert leased["lender"] == lender["id"] and leased["gathered_ok"]
        os.kill(lender["pid"], signal.SIGKILL)
        revoked = holder.expect("revoked", timeout=120)
        assert revoked["id"] == leased["id"] and "lender" in revoked["reason"]
        done = holder.expect("done", timeout=60)
        assert done["wrong"] == 0 and done["reads"] > 0
        again = wait_for(
            lambda: [
                l
                for l in node.json("lenders")
                if l["id"] == lender["id"] and l["pid"] != lender["pid"] and l["state"] == "up"
            ],
            timeout=120,
            what="the lender's restart",
        )[0]
        assert again["generation"] > lender["generation"] and again["granted"] == 0
    finally:
        holder.kill()
        holder.finish()


def test_stuck_gpu_holder_loses_its_lease_after_the_grace(node):
    """It never acknowledges: the broker ends the lease after the grace, unclean, and the
    lender frees that allocation rather than lending it again; the pages stay with the
    stuck process (the driver frees them when it unmaps or dies)."""
    stuck = node.spawn(STUCK_GPU, str(GiB))
    try:
        lease_id = stuck.expect("leased", timeout=120)["id"]
        node.cli("revoke", lease_id, check=True)
        wait_for(
            lambda: (
                {l["id"]: l for l in node.json("leases", "--all")}[lease_id]["state"] == "revoked"
            ),
            timeout=30,
            what="the forced end",
        )
        row = {l["id"]: l for l in node.json("leases", "--all")}[lease_id]
        assert "did not acknowledge" in row["reason"]
        wait_for(lambda: _gpu_lender(node)["granted"] == 0, timeout=30, what="granted back to 0")
    finally:
        stuck.kill()
        stuck.finish()


def test_kill_holder_gets_gpu_memory_back_from_a_stuck_holder(node):
    """``harvestd revoke --kill-holder``: the stuck process dies, and the GPU memory it
    kept mapped is free again (NVML)."""
    uuid = _gpu_lender(node)["gpu_uuid"]
    stuck = node.spawn(STUCK_GPU, str(GiB))
    try:
        lease_id = stuck.expect("leased", timeout=120)["id"]
        held = _free_bytes(uuid)
        result = node.cli("revoke", lease_id, "--kill-holder", check=True)
        assert f"holder pid {stuck.pid} killed" in result.stdout
        assert stuck.finish(30) == -signal.SIGKILL
        # Its import and its CUDA context go with it: at least the lease comes back.
        wait_for(
            lambda: _free_bytes(uuid) >= held + int(0.9 * GiB),
            timeout=60,
            what="the stuck holder's GPU memory free again",
        )
    finally:
        stuck.kill()
        stuck.finish()
