"""A bounded load test on a plain-process node: several client processes lease, map,
write, verify, renew and release host memory for a fixed time while a tenant process
reclaims and restores under them. It stops by itself, prints throughput and latency, and
then counts (does not assume) that nothing leaked: the lender's granted bytes, open file
descriptors and memfd mappings are back at their baseline, and every client's own
mappings of lent memory are gone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest
from support.holder import Holder
from support.nodes import PlainNode
from support.waiting import wait_for

from harvestd.errors import LeaseRevoked
from harvestd.invariants import check_store
from lender.pickup import pick_up
from protos import harvest_pb2 as pb
from protos import harvest_pb2_grpc as pb_grpc

DURATION_S = 10.0
CLIENTS = 3
RECLAIM = 48 << 20  # of the lender's 64 MiB: holders lose leases, grants find no room
MEMFD = "memfd:harvest"  # the lender names its memfds "harvest-lease"

# One borrower. Waits for "go" on stdin, then runs a random mix of operations for
# DURATION seconds, and prints one JSON line of counts and latencies. A lease is checked
# for zeros when it arrives, stamped with the client's marker at both ends, and its
# stamp is re-read under lease.use() at every keepalive: a read that use() vouched for
# and that sees another byte is a wrong result.
CLIENT = r"""
import collections, gc, json, random, sys, time, traceback
from client import connect, LeaseRevoked, NoCapacity

duration, seed, marker = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
SIZES = [4096, 64 << 10, 256 << 10, 1 << 20, 2 << 20, 4 << 20]


def memfd_maps():
    with open("/proc/self/maps") as maps:
        return sum("memfd:harvest" in line for line in maps)


c = connect()
print(json.dumps({"event": "ready"}), flush=True)
sys.stdin.readline()
lat = collections.defaultdict(list)
counts = collections.Counter()
unexpected = []
leases = []
peak_maps = 0
end = time.monotonic() + duration
while time.monotonic() < end:
    live = [l for l in leases if not l.revoked]
    counts["lost_to_revocation"] += len(leases) - len(live)
    leases = live
    if not leases or len(leases) < 10 and rng.random() < 0.4:
        op = "grant"
    else:
        op = rng.choice(["keepalive", "keepalive", "release"])
    start = time.perf_counter()
    try:
        if op == "grant":
            lease = c.lease(rng.choice(SIZES), ttl=5.0)
            lat[op].append(time.perf_counter() - start)
            data = lease.as_bytes()
            if int(data.count_nonzero()) != 0:
                counts["not_zeroed"] += 1
            data[0] = data[-1] = marker
            leases.append(lease)
            peak_maps = max(peak_maps, memfd_maps())
        elif op == "keepalive":
            lease = rng.choice(leases)
            lease.keepalive()
            lat[op].append(time.perf_counter() - start)
            data = lease.as_bytes()
            with lease.use():
                ok = int(data[0]) == marker and int(data[-1]) == marker
            counts["verified_reads"] += 1
            counts["wrong_reads"] += not ok
        else:
            lease = leases.pop(rng.randrange(len(leases)))
            lease.release()
            lat[op].append(time.perf_counter() - start)
        counts[op] += 1
    except NoCapacity:
        counts["no_capacity"] += 1
    except LeaseRevoked:
        counts["revoked_during_op"] += 1
        # A reclaim takes the newest lease first: often one not yet picked up.
        counts["revoked_during_grant"] += op == "grant"
    except Exception:
        unexpected.append(traceback.format_exc(limit=3))
for lease in leases:
    lease.release()
c.close()
leases = lease = data = None  # drop every tensor over lent memory before counting
gc.collect()
print(json.dumps({"event": "done", "counts": counts, "lat": lat, "unexpected": unexpected,
                  "peak_maps": peak_maps, "maps_after_close": memfd_maps()}), flush=True)
"""

# The lender's tenant: takes half the lender back every so often, then gives it back.
TENANT = r"""
import collections, json, random, sys, time, traceback
from client import connect

duration, lender, nbytes = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rng = random.Random(7)
c = connect()
print(json.dumps({"event": "ready"}), flush=True)
sys.stdin.readline()
lat = collections.defaultdict(list)
counts = collections.Counter()
unexpected = []
end = time.monotonic() + duration
while time.monotonic() < end:
    time.sleep(rng.uniform(0.3, 1.0))
    try:
        start = time.perf_counter()
        result = c.reclaim(lender, nbytes, timeout=3.0)
        lat["reclaim"].append(time.perf_counter() - start)
        counts["reclaim"] += 1
        counts["revoked_by_reclaim"] += len(result.revoked)
        counts["reclaim_not_freed"] += not result.freed
        time.sleep(rng.uniform(0.2, 0.6))
        start = time.perf_counter()
        c.restore(lender)
        lat["restore"].append(time.perf_counter() - start)
        counts["restore"] += 1
    except Exception:
        unexpected.append(traceback.format_exc(limit=3))
c.restore(lender)
c.close()
print(json.dumps({"event": "done", "counts": counts, "lat": lat, "unexpected": unexpected}),
      flush=True)
"""


def fd_count(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def memfd_maps(pid: int) -> int:
    """Lines of a process's memory map that map a Harvest memfd."""
    return sum(MEMFD in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@pytest.mark.slow
def test_load_no_errors_no_leaks(plain_node: PlainNode) -> None:
    """Clients and a tenant for DURATION_S; then zero unexpected errors, zero wrong reads,
    invariants hold, and every byte, fd and mapping is back where it started."""
    node = plain_node
    lender = node.json("lenders")[0]
    lender_pid, lender_id = lender["pid"], lender["id"]
    # Warm the lender's paths up (pick-up socket, free path) before taking the baseline.
    with node.connect() as warm, warm.lease(4096):
        pass
    wait_for(lambda: node.json("lenders")[0]["granted"] == 0, what="warm-up lease freed")
    time.sleep(0.5)
    base_fds, base_maps = fd_count(lender_pid), memfd_maps(lender_pid)

    workers: list[Holder] = [
        node.spawn(CLIENT, str(DURATION_S), str(seed), str(10 + seed)) for seed in range(CLIENTS)
    ]
    workers.append(node.spawn(TENANT, str(DURATION_S), lender_id, str(RECLAIM)))
    try:
        for worker in workers:
            worker.expect("ready", timeout=120)
        started = time.monotonic()
        for worker in workers:
            worker.send("go")
        peak_fds = base_fds
        while time.monotonic() - started < DURATION_S:
            peak_fds = max(peak_fds, fd_count(lender_pid))
            time.sleep(0.1)
        reports = [worker.expect("done", timeout=60) for worker in workers]
        elapsed = time.monotonic() - started
        for worker in workers:
            assert worker.finish(30) == 0
    finally:
        for worker in workers:
            worker.kill()
            worker.finish()

    clients, tenant = reports[:-1], reports[-1]
    totals: dict[str, int] = {}
    latencies: dict[str, list[float]] = {}
    for report in reports:
        for key, value in report["counts"].items():
            totals[key] = totals.get(key, 0) + value
        for op, values in report["lat"].items():
            latencies.setdefault(op, []).extend(values)
    ops = sum(len(v) for v in latencies.values())
    lines = [
        f"load: {CLIENTS} clients + 1 tenant, {elapsed:.1f} s, {ops} ops, "
        f"{ops / elapsed:.0f} ops/s (on {os.cpu_count()} cores)"
    ]
    for op in ("grant", "keepalive", "release", "reclaim", "restore"):
        values = latencies.get(op, [])
        if values:
            lines.append(
                f"  {op:<9} n={len(values):<6} p50={percentile(values, 0.5) * 1e3:7.2f} ms "
                f"p99={percentile(values, 0.99) * 1e3:7.2f} ms"
            )
    lines.append("  counts: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
    lines.append(
        f"  lender fds: baseline {base_fds}, peak {peak_fds}; memfd maps: baseline {base_maps}"
    )
    # How revocations ended (the broker's last 1000 leases): acknowledged by the holder,
    # or forced when the grace ran out.
    ended = node.json("leases", "--all")
    forced = sum("did not acknowledge" in l["reason"] for l in ended)
    revoked = sum(l["state"] == "revoked" for l in ended)
    lines.append(
        f"  broker: {len(ended)} leases in history, {revoked} revoked, of which "
        f"{forced} forced after the grace"
    )
    print("\n" + "\n".join(lines))

    # Errors: none that were not expected (NoCapacity and LeaseRevoked are the system
    # working: a reclaim took the memory; they are counted above).
    for report in reports:
        assert report["unexpected"] == [], report["unexpected"]
    assert totals.get("wrong_reads", 0) == 0
    assert totals.get("not_zeroed", 0) == 0
    assert totals.get("grant", 0) > 0 and totals.get("reclaim", 0) > 0
    # The tenant's reclaims did take leases from live holders, and grants did find the
    # lender full: the load reached the paths it is meant to.
    assert totals.get("lost_to_revocation", 0) + totals.get("revoked_during_op", 0) > 0
    assert totals.get("no_capacity", 0) > 0
    assert check_store(str(node.state_dir / "broker.db")) == []

    # Leaks, counted. The lender: every granted byte back, every fd closed, no mapping.
    wait_for(
        lambda: node.json("lenders")[0]["granted"] == 0,
        timeout=15,
        what="the lender's granted bytes back to 0",
    )
    assert node.json("status")["leases_active"] == 0
    assert peak_fds > base_fds, "the fd count never moved: it would not see a leak either"
    wait_for(
        lambda: fd_count(lender_pid) == base_fds,
        timeout=10,
        what=f"the lender's fds back to {base_fds} (now {fd_count(lender_pid)})",
    )
    assert memfd_maps(lender_pid) == base_maps
    # Each client: it did map lent memory, and after close and gc none of it is mapped.
    assert all(report["peak_maps"] > 0 for report in clients)
    assert [report["maps_after_close"] for report in clients] == [0] * CLIENTS
    assert tenant["counts"].get("restore", 0) > 0
    assert node.json("lenders")[0]["reclaimed"] == 0
    assert check_store(str(node.state_dir / "broker.db")) == []


def test_pickup_of_a_revoked_lease_raises_lease_revoked(plain_node: PlainNode) -> None:
    """Found by the load test: a reclaim revokes the newest lease first, often one whose
    holder has not picked it up yet. The broker's CheckPickup raises LeaseRevoked, which
    travels to the lender as FAILED_PRECONDITION marked ``lease ended: ``; the lender's
    pick-up reply keeps the marker (``errors.to_wire``, as the broker's ``abort_with``
    does, and for the lender's own "ended during its pick-up" refusal too), so
    ``pick_up`` raises LeaseRevoked, the type callers fall back on."""
    channel = grpc.insecure_channel(f"unix://{plain_node.state_dir}/broker.sock")
    try:
        stub = pb_grpc.BrokerStub(channel)
        grant = stub.Grant(
            pb.GrantRequest(client_id="c", nbytes=4096, node=plain_node.json("lenders")[0]["node"])
        )
        stub.Revoke(pb.RevokeRequest(lease_id=grant.id))  # asked, not forced
        with pytest.raises(LeaseRevoked):
            pick_up(grant.pickup_address, grant.id, grant.token, grant.generation)
    finally:
        channel.close()


@pytest.mark.parametrize("when", ["before-grant-reply", "before-pickup", "after-pickup"])
def test_revoke_during_pickup(
    plain_node: PlainNode, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the load test. A reclaim revokes the newest lease first: often one that
    ``Client.lease()`` has been granted but not yet handed to its caller. The client
    holds back such a REVOKE (and an ENDED) while a Grant that may have made the lease
    is in flight, or while the lease is being picked up, instead of acknowledging it as
    if fenced; then ``lease()``:

    - ``before-grant-reply`` (the REVOKE overtakes the Grant's reply) and
      ``before-pickup`` (the lease ended and its memory was freed before the pick-up,
      which then finds no such lease): releases and acknowledges, and raises
      LeaseRevoked, not the pick-up's PermissionDenied;
    - ``after-pickup`` (the memory is mapped): fences the mapping, only then
      acknowledges, and raises LeaseRevoked: no caller ever holds it.

    Either way nothing is acknowledged before the pick-up is over: here the broker ends
    each revocation itself after the grace, as "did not acknowledge".
    """
    channel = grpc.insecure_channel(f"unix://{plain_node.state_dir}/broker.sock")
    stub = pb_grpc.BrokerStub(channel)
    granted: list[str] = []

    def row(lease_id: str, include_ended: bool = True):
        leases = stub.ListLeases(
            pb.ListLeasesRequest(include_ended=include_ended), timeout=5
        ).leases
        return {l.id: l for l in leases}.get(lease_id)

    def revoke_and_wait_until_forgotten(lease_id: str) -> None:
        # Past the 1 s grace the broker forces the revocation whatever the client does,
        # and the lender frees memory that was never picked up.
        stub.Revoke(pb.RevokeRequest(lease_id=lease_id), timeout=5)
        wait_for(
            lambda: row(lease_id, include_ended=False) is None,
            timeout=10,
            what="the revoked lease to be freed and forgotten",
        )

    client = plain_node.connect()
    real_call, real_pick_up = client._call, client._pick_up

    def grant_overtaken(method, request, timeout=None):
        reply = real_call(method, request, timeout)
        if method is client._broker.Grant:
            # The tenant's reclaim lands before the Grant's reply reaches lease().
            granted.append(reply.id)
            revoke_and_wait_until_forgotten(reply.id)
        return reply

    def revoked_around_pick_up(grant, device, mapper=None):
        # The tenant's reclaim lands here, between Grant and the lease's registration.
        granted.append(grant.id)
        if when == "before-pickup":
            revoke_and_wait_until_forgotten(grant.id)
            return real_pick_up(grant, device, mapper)
        mapping = real_pick_up(grant, device, mapper)
        stub.Revoke(pb.RevokeRequest(lease_id=grant.id), timeout=5)
        wait_for(
            lambda: row(grant.id).state == pb.REVOKED, timeout=10, what="the revocation to end"
        )
        return mapping

    if when == "before-grant-reply":
        monkeypatch.setattr(client, "_call", grant_overtaken)
    else:
        monkeypatch.setattr(client, "_pick_up", revoked_around_pick_up)
    try:
        with pytest.raises(LeaseRevoked):
            lease = client.lease(4096, ttl=30)
            pytest.fail(
                f"the broker says {lease.id} was revoked "
                f"({row(lease.id).reason!r}), but the holder has it "
                f"{lease.state} and mapped"
            )
        assert client.leases() == []
        ended = row(granted[0])
        assert ended.state == pb.REVOKED and "did not acknowledge" in ended.reason, (
            f"{granted[0]} ended {pb.LeaseState.Name(ended.state)} ({ended.reason!r}): "
            "acknowledged before the pick-up was over"
        )
    finally:
        client.close()
        channel.close()
