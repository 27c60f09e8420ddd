"""The node end to end: `harvestd start` (real Ray, broker actor, host lender actor),
several client processes, a tenant reclaiming under load, revocations reaching every
holder, the CLI in both forms, and the broker and lender killed mid-way."""

from __future__ import annotations

import os
import signal
import time

from support.programs import HOLDER
from support.waiting import wait_for

from harvestd.sizes import MiB

SURVIVOR_TTL = 12


def _leases(node, *args):
    return {l["id"]: l for l in node.json("leases", *args)}


def test_status_and_lenders_json(ray_node):
    status = ray_node.json("status")
    assert status["lenders_up"] == 1
    assert status["bytes_lendable"] == 256 * MiB
    lenders = ray_node.json("lenders")
    assert len(lenders) == 1
    lender = lenders[0]
    for key in ("id", "backend", "node", "capacity", "granted"):
        assert key in lender
    assert lender["backend"] == "host" and lender["capacity"] == 256 * MiB
    table = ray_node.cli("lenders", check=True).stdout
    assert lender["id"] in table and "256.0 MiB" in table


def test_holders_tenant_reclaim_and_broker_restart(ray_node):
    lender = ray_node.lender_id()
    holders = []
    for marker in (11, 22, 33):
        # A holder fences its lease on its own clock when renewals stop, so the TTL must
        # outlast a broker restart on a loaded machine (several seconds on a 2-core CI VM).
        holder = ray_node.spawn(HOLDER, str(8 * MiB), str(marker), str(SURVIVOR_TTL))
        holders.append((holder, holder.expect("leased")))
        time.sleep(0.05)  # distinct creation times: reclaim takes the newest first
    try:
        ids = [msg["id"] for _, msg in holders]
        live = _leases(ray_node)
        for holder, msg in holders:
            lease = live[msg["id"]]
            assert lease["state"] == "granted"
            assert lease["holder_pid"] == holder.pid
            assert lease["lender"] == lender and lease["nbytes"] == 8 * MiB
            assert lease["expires_at"] > time.time()
        table = ray_node.cli("leases", check=True).stdout
        assert all(i in table for i in ids)

        # The tenant takes back all but 8 MiB: the two newest leases must go, now.
        result = ray_node.cli("reclaim", "--lender", lender, "--bytes", str(248 * MiB), check=True)
        assert "2 leases revoked" in result.stdout and "memory free" in result.stdout
        for holder, msg in holders[1:]:
            assert holder.expect("revoked")["id"] == msg["id"]
            done = holder.expect("done")
            assert done["wrong"] == 0 and done["reads"] > 0
        states = _leases(ray_node, "--all")
        assert states[ids[0]]["state"] == "granted"
        assert states[ids[1]]["state"] == states[ids[2]]["state"] == "revoked"
        lender_row = ray_node.json("lenders")[0]
        assert lender_row["granted"] == 8 * MiB and lender_row["reclaimed"] == 248 * MiB
        ray_node.cli("restore", "--lender", lender, check=True)

        # Kill the broker's actor outright; Ray restarts it from its store.
        before = ray_node.json("status")
        os.kill(before["broker_pid"], signal.SIGKILL)
        after = wait_for(
            lambda: _status_if_new(ray_node, before["broker_pid"]), what="broker restart"
        )
        assert after["generation"] == before["generation"]
        # The first holder's lease survived, unchanged, and its holder renews it with the
        # new broker: the expiry moves past the fresh TTL the restart gave it.
        restarted = _leases(ray_node)[ids[0]]
        assert restarted["state"] == "granted" and restarted["holder_pid"] == holders[0][0].pid
        survivor = wait_for(
            lambda: _renewed_since(ray_node, ids[0], restarted["expires_at"]),
            timeout=SURVIVOR_TTL,
            every=0.5,
            what="keepalive to the restarted broker",
        )
        assert survivor["state"] == "granted" and survivor["holder_pid"] == holders[0][0].pid
        # Nothing is granted twice: a new lease gets a generation above every old one.
        with ray_node.connect() as client:
            fresh = client.lease(MiB, ttl=3)
            assert fresh.generation > max(msg["generation"] for _, msg in holders)
            assert fresh.id not in ids

        # An operator revokes the survivor from the CLI; its holder hears it.
        result = ray_node.cli("revoke", ids[0], check=True)
        assert "revoking" in result.stdout or "revoked" in result.stdout
        assert holders[0][0].expect("revoked")["reason"] == "revoked by operator"
        assert holders[0][0].expect("done")["wrong"] == 0
    finally:
        for holder, _ in holders:
            holder.kill()
            holder.finish()


def _renewed_since(node, lease_id, expires_at):
    lease = _leases(node).get(lease_id)
    return lease if lease is not None and lease["expires_at"] > expires_at else None


def _status_if_new(node, old_pid):
    result = node.cli("status", "--json")
    if result.returncode != 0:
        return None
    import json

    status = json.loads(result.stdout)
    return status if status["broker_pid"] != old_pid else None


def test_lender_crash_revokes_and_ray_restarts_it(ray_node):
    lender = ray_node.json("lenders")[0]
    holder = ray_node.spawn(HOLDER, str(4 * MiB), "7", "3")
    try:
        leased = holder.expect("leased")
        os.kill(lender["pid"], signal.SIGKILL)
        revoked = holder.expect("revoked", timeout=60)
        assert revoked["id"] == leased["id"] and "lender restarted" in revoked["reason"]
        assert holder.expect("done")["wrong"] == 0
        again = wait_for(
            lambda: [
                l
                for l in ray_node.json("lenders")
                if l["pid"] != lender["pid"] and l["state"] == "up"
            ],
            timeout=60,
            what="lender restart",
        )[0]
        assert again["generation"] > lender["generation"] and again["granted"] == 0
        with ray_node.connect() as client, client.lease(MiB, ttl=3) as lease:
            assert lease.lender == lender["id"]
    finally:
        holder.kill()
        holder.finish()


def test_second_start_refused(ray_node):
    result = ray_node.cli("start", "--detach", "--backend", "host")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "already runs" in result.stderr
