"""Two GPUs (issue 9): a lender on one GPU, its borrowers on another, through real
processes and a real node. A lease mapped across GPUs with access set for the borrower's
GPU only; placement by UUID whatever CUDA_VISIBLE_DEVICES says, never on the borrower's
own GPU; revocation while reads run; a tenant on the lender's GPU reclaiming there while
the other GPU's lender keeps serving; a killed borrower's memory coming back; with three
GPUs or more, a striped lease over two peers.

HARVEST_LENDER_GPU and HARVEST_CLIENT_GPU (CUDA ordinals, default 1 and 0) pick the pair;
skipped with fewer than two GPUs. Run by scripts/multi_gpu_runs.sh on a two-GPU machine.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

pytest.importorskip("cuda.bindings")
torch = pytest.importorskip("torch")

from support.lender_process import LenderProcess  # noqa: E402
from support.nodes import Node, started_node  # noqa: E402
from support.pattern import pattern  # noqa: E402
from support.programs import GPU_TENANT, PEER_HOLDER  # noqa: E402
from support.sockets import short_tmpdir  # noqa: E402
from support.waiting import wait_for  # noqa: E402

from harvestd.sizes import GiB, MiB  # noqa: E402

RESERVE, CAP = 8 * GiB, 12 * GiB
LENDER = int(os.environ.get("HARVEST_LENDER_GPU", "1"))
CLIENT = int(os.environ.get("HARVEST_CLIENT_GPU", "0"))
COUNT = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        COUNT < 2 or LENDER == CLIENT or max(LENDER, CLIENT) >= COUNT,
        reason=f"needs two GPUs: {LENDER} (lender) and {CLIENT} (client)",
    ),
]

# Where leases near each visible GPU land, in a process whose CUDA ordinals are remapped.
PLACE = r"""
import json, torch
from client import connect
from client.devices import cuda_uuid
c = connect()
rows = []
for i in range(torch.cuda.device_count()):
    with c.lease(64 << 20, backend="cuda-vmm", near=f"cuda:{i}") as lease:
        t = lease.tensor(torch.uint8)
        t.fill_(i + 1)
        rows.append({"near": i, "near_uuid": cuda_uuid(i), "lender_gpu": lease.gpu_uuid,
                     "mapped": str(lease.device), "ok": bool((t == i + 1).all())})
print(json.dumps({"event": "placed", "rows": rows}), flush=True)
c.close()
"""


def uuid(ordinal: int) -> str:
    from client.devices import cuda_uuid

    return cuda_uuid(ordinal)


def lender_on(node: Node, ordinal: int) -> dict:
    return next(l for l in node.json("lenders") if l["gpu_uuid"] == uuid(ordinal))


@pytest.fixture(scope="module")
def pair_node():
    """A lender on each GPU of the pair (no host lender)."""
    with started_node(
        # Other test modules' processes come and go on this GPU: their peaks are not
        # the tenant this module is about.
        "--peak-window",
        "0",
        "--backend",
        "cuda-vmm",
        "--gpus",
        f"{uuid(LENDER)},{uuid(CLIENT)}",
        "--reserve",
        str(RESERVE),
        "--cap",
        str(CAP),
        "--ttl",
        "3",
        "--grace",
        "1",
    ) as node:
        yield node


def test_lease_across_gpus_maps_with_access_for_the_client_only():
    from lender.backends import BackendKind
    from lender.backends import cuda_driver as cu
    from lender.backends.cuda_vmm import CudaVmmMapping

    lender = LenderProcess("cuda-vmm", device_index=LENDER)
    try:
        n = lender.call("alloc", name="p", nbytes=64 * MiB)["alloc_bytes"]
        lender.call("fill", name="p", seed=17)
        backend, imported, sent = lender.receive("p", BackendKind.CUDA_VMM)
        assert sent["uuid"] == uuid(LENDER)
        mapping = backend.map(imported, n, device=CLIENT)
        assert isinstance(mapping, CudaVmmMapping)

        def access(ordinal: int) -> int:
            with cu.on_device(CLIENT) as drv:
                location = drv.CUmemLocation()
                location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
                location.id = ordinal
                return cu.flag(
                    cu.check(drv.cuMemGetAccess(location, mapping.address), "cuMemGetAccess")
                )

        drv = cu.driver()

        # The borrower's GPU reads and writes the range; the lender's GPU, whose memory
        # it is, gets no access in this process: none was asked for, none is needed.
        flags = drv.CUmemAccess_flags
        assert access(CLIENT) == cu.flag(flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        assert access(LENDER) == cu.flag(flags.CU_MEM_ACCESS_FLAGS_PROT_NONE)
        t = mapping.as_tensor()
        assert t.device == torch.device("cuda", CLIENT)
        assert torch.equal(t, pattern(n, 17, t.device))
        t[:MiB].fill_(0xFB)
        torch.cuda.synchronize(CLIENT)
        assert lender.call("count", name="p", lo=0, hi=MiB, value=0xFB)["count"] == MiB
        stale = t[MiB : 2 * MiB]
        mapping.fence()
        lender.call("fill", name="p", seed=19)
        mapping.close()  # covers the fenced range: the stale view reads local memory
        assert not torch.equal(stale.clone(), pattern(n, 19, t.device)[MiB : 2 * MiB])
        del t, stale
        lender.call("free", name="p")
    finally:
        lender.close()


def test_placement_by_uuid_whatever_cuda_visible_devices(pair_node):
    # The lender's GPU first: in that process cuda:0 is the lender's GPU, cuda:1 ours.
    visible = f"{uuid(LENDER)},{uuid(CLIENT)}"
    proc = pair_node.spawn(PLACE, CUDA_VISIBLE_DEVICES=visible)
    try:
        rows = proc.expect("placed", timeout=180)["rows"]
    finally:
        proc.finish()
    assert [r["near_uuid"] for r in rows] == [uuid(LENDER), uuid(CLIENT)]
    for row in rows:
        assert row["ok"] and row["mapped"] == f"cuda:{row['near']}"
        assert row["lender_gpu"] != row["near_uuid"]  # never the borrower's own GPU
    assert rows[0]["lender_gpu"] == uuid(CLIENT) and rows[1]["lender_gpu"] == uuid(LENDER)


def test_revocation_while_reads_run_across_gpus(pair_node):
    holder = pair_node.spawn(PEER_HOLDER, str(512 * MiB), "71", "3", f"cuda:{CLIENT}")
    try:
        leased = holder.expect("leased", timeout=180)
        assert leased["lender_gpu"] == uuid(LENDER) and leased["device_uuid"] == uuid(CLIENT)
        time.sleep(1.0)  # gathers across the link run
        assert pair_node.cli("revoke", leased["id"]).returncode == 0
        assert holder.expect("revoked")["id"] == leased["id"]
        done = holder.expect("done")
        assert done["wrong"] == 0 and done["reads"] > 0 and done["state"] == "revoked"
    finally:
        holder.kill()
        holder.finish()


def test_tenant_on_the_lender_gpu_reclaims_there_only(pair_node):
    gpu = lender_on(pair_node, LENDER)
    holders = []
    try:
        for marker, near in ((1, CLIENT), (2, CLIENT), (3, LENDER)):
            holder = pair_node.spawn(PEER_HOLDER, str(2 * GiB), str(marker), "5", f"cuda:{near}")
            holders.append((holder, holder.expect("leased", timeout=180)))
        assert [l["lender_gpu"] for _, l in holders] == [uuid(LENDER)] * 2 + [uuid(CLIENT)]
        assert lender_on(pair_node, LENDER)["granted"] == 4 * GiB
        # Leave 4 GiB free on the lender's GPU: 4 + 4 - 8 = 0 may be lent there now.
        tenant = pair_node.spawn(
            GPU_TENANT,
            gpu["gpu_uuid"],
            str(4 * GiB),
            str(RESERVE),
            HARVEST_LENDER_GPU=str(LENDER),
        )
        report = tenant.expect("tenant", timeout=180)
        print(f"tenant on GPU {LENDER}: pressure to reserve free: {report['freed_s'] * 1e3:.1f} ms")
        assert report["recovered"]
        for holder, leased in holders[:2]:
            assert holder.expect("revoked")["id"] == leased["id"]
            assert holder.expect("done")["wrong"] == 0
        # The other GPU's lender kept serving: its borrower still reads, still granted.
        rows = {l["id"]: l for l in pair_node.json("leases")}
        assert rows[holders[2][1]["id"]]["state"] == "granted"
        tenant.send("next")
        tenant.expect("next_ok", timeout=60)
        tenant.send("done")
        tenant.finish()
        holders[2][0].send("stop")
        done = holders[2][0].expect("done")
        assert done["wrong"] == 0 and done["reads"] > 0 and done["state"] == "granted"
    finally:
        for holder, _ in holders:
            holder.send("stop")
            holder.kill()
            holder.finish()


def test_killed_borrower_memory_comes_back_across_gpus(pair_node):
    holder = pair_node.spawn(PEER_HOLDER, str(GiB), "9", "2", f"cuda:{CLIENT}")
    leased = holder.expect("leased", timeout=180)
    assert leased["lender_gpu"] == uuid(LENDER)
    holder.kill()
    holder.finish()
    wait_for(
        lambda: lender_on(pair_node, LENDER)["granted"] == 0,
        timeout=15,
        what="the killed borrower's lease to expire and its memory to be freed",
    )
    with (
        pair_node.connect() as client,
        client.lease(GiB, backend="cuda-vmm", near=f"cuda:{CLIENT}") as lease,
    ):
        assert lease.gpu_uuid == uuid(LENDER)
        assert int(lease.as_bytes().count_nonzero()) == 0  # zeroed before hand-out


@pytest.mark.skipif(COUNT < 3, reason="a striped lease over two peers needs three GPUs")
def test_striped_lease_over_two_peer_gpus():
    others = [i for i in range(COUNT) if i != CLIENT][:2]
    node = Node(short_tmpdir())
    result = node.cli(
        "start",
        "--detach",
        "--backend",
        "cuda-vmm",
        "--gpus",
        ",".join(uuid(i) for i in [CLIENT, *others]),
        "--reserve",
        str(RESERVE),
        "--cap",
        str(CAP),
        "--ttl",
        "3",
        "--grace",
        "1",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    try:
        with node.connect() as client:
            striped = client.lease_striped(512 * MiB, stripes=2, near=f"cuda:{CLIENT}")
            assert sorted(s.gpu_uuid for s in striped.stripes) == sorted(uuid(i) for i in others)
            dev = torch.device("cuda", CLIENT)
            offsets = torch.randperm(512 * MiB // 16384, device=dev)[:4096] * 16384
            data = torch.randint(0, 256, (4096 * 16384,), dtype=torch.uint8, device=dev)
            striped.scatter(data, offsets, 16384)
            out = torch.empty_like(data)
            striped.gather(offsets, 16384, out)
            torch.cuda.synchronize(dev)
            assert torch.equal(out, data)
            assert node.cli("revoke", striped.ids[0]).returncode == 0
            wait_for(lambda: striped.revoked, timeout=15, what="the striped lease to end")
            assert all(s.revoked for s in striped.stripes)
    finally:
        node.cli("stop", timeout=120)
        shutil.rmtree(node.state_dir, ignore_errors=True)
