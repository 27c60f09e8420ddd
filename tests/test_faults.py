"""Faults injected for real on a plain-process node: kill -9, SIGSTOP, stale tokens,
a holder that never acknowledges, and what the next holder sees."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
import torch
from support.programs import HOLDER
from support.waiting import wait_for

from client import LeaseRevoked, NoCapacity, PermissionDenied
from harvestd.sizes import MiB
from lender.pickup import pick_up
from protos import harvest_pb2 as pb
from protos import harvest_pb2_grpc as pb_grpc


def _stub(node):
    channel = grpc.insecure_channel(f"unix://{node.state_dir}/broker.sock")
    return pb_grpc.BrokerStub(channel), channel


def test_client_crash_returns_memory_within_one_ttl(plain_node):
    holder = plain_node.spawn(HOLDER, str(48 * MiB), "5", "2")
    leased = holder.expect("leased")
    with plain_node.connect() as client:
        with pytest.raises(NoCapacity):
            client.lease(48 * MiB)
        killed_at = time.monotonic()
        holder.kill()
        holder.finish()
        wait_for(
            lambda: plain_node.json("lenders")[0]["granted"] == 0,
            timeout=10,
            what="the dead holder's memory to come back",
        )
        assert time.monotonic() - killed_at < 2.0 + 1.0  # one TTL, plus the sweep and report
        ended = {l["id"]: l for l in plain_node.json("leases", "--all")}[leased["id"]]
        assert ended["state"] == "expired"
        # Granted again, and zeroed: nothing of the dead holder's pattern is visible.
        with client.lease(48 * MiB) as lease:
            assert int(lease.as_bytes().count_nonzero()) == 0


def test_every_byte_handed_out_is_zeroed(plain_node):
    with plain_node.connect() as client:
        for _ in range(3):
            with client.lease(16 * MiB) as lease:
                data = lease.as_bytes()
                assert int(data.count_nonzero()) == 0
                data.fill_(0xAB)


def test_broker_sigstop_holder_fences_itself(plain_node):
    with plain_node.connect() as client:
        lease = client.lease(MiB, ttl=1.0)
        ended = []
        lease.on_revoke(lambda l, why: ended.append(why))
        plain_node.broker.send_signal(signal.SIGSTOP)
        try:
            # No keepalive can get through; the holder's own clock ends its use before
            # the broker could possibly have granted the memory to anyone else.
            wait_for(lambda: lease.revoked, timeout=5, what="the holder to fence itself")
            assert time.monotonic() < lease.deadline + 0.5
            with pytest.raises(LeaseRevoked):
                lease.tensor(torch.uint8, 16)
            assert ended and "not renewed" in ended[0]
        finally:
            plain_node.broker.send_signal(signal.SIGCONT)
        wait_for(
            lambda: (
                {l["id"]: l for l in plain_node.json("leases", "--all")}[lease.id]["state"]
                == "expired"
            ),
            what="the broker to expire it",
        )
        # The client carries on with new leases once the broker is back.
        with client.lease(MiB) as again:
            assert again.generation > lease.generation


def test_broker_kill9_restart_loses_nothing(plain_node):
    with plain_node.connect() as client:
        # A TTL that outlasts a restart on a loaded machine: holders that cannot renew
        # in time fence themselves, as test_broker_sigstop_holder_fences_itself shows.
        leases = [client.lease(MiB, ttl=6.0) for _ in range(5)]
        before = {l["id"]: l for l in plain_node.json("leases")}
        plain_node.broker.kill()
        plain_node.broker.wait()
        plain_node.start_broker()
        after = {l["id"]: l for l in plain_node.json("leases")}
        assert set(after) == set(before)
        for lease_id, row in before.items():
            assert after[lease_id]["generation"] == row["generation"]
        time.sleep(7)  # past the TTL: the clients' keepalives reached the new broker
        assert all(l.state == "granted" for l in leases)
        fresh = client.lease(MiB)
        assert fresh.generation > max(l.generation for l in leases)
        assert plain_node.json("lenders")[0]["granted"] == 6 * MiB


def test_stuck_holder_loses_lease_after_grace(plain_node):
    stub, channel = _stub(plain_node)
    try:
        grant = stub.Grant(
            pb.GrantRequest(
                client_id="stuck", nbytes=MiB, node=plain_node.json("lenders")[0]["node"]
            )
        )
        _, fd = pick_up(grant.pickup_address, grant.id, grant.token, grant.generation)
        assert fd is not None, "a host lease is picked up as an fd"
        os.close(fd)
        start = time.monotonic()
        result = plain_node.cli("revoke", grant.id, check=True)
        assert "revoking" in result.stdout
        # It never acknowledges: after the 1 s grace the broker ends the lease anyway
        # and the lender frees (never pools) the memory.
        wait_for(
            lambda: (
                {l["id"]: l for l in plain_node.json("leases", "--all")}[grant.id]["state"]
                == "revoked"
            ),
            what="forced revocation",
        )
        assert time.monotonic() - start >= 0.9
        wait_for(lambda: plain_node.json("lenders")[0]["granted"] == 0, what="memory freed")
        row = {l["id"]: l for l in plain_node.json("leases", "--all")}[grant.id]
        assert "did not acknowledge" in row["reason"]
    finally:
        channel.close()


def test_pickup_refuses_wrong_token_second_pickup_and_ended_lease(plain_node):
    stub, channel = _stub(plain_node)
    try:
        node = plain_node.json("lenders")[0]["node"]
        grant = stub.Grant(pb.GrantRequest(client_id="c", nbytes=MiB, node=node, ttl_s=0.5))
        with pytest.raises(PermissionDenied):
            pick_up(grant.pickup_address, grant.id, b"\0" * 32, grant.generation)
        with pytest.raises(PermissionDenied):
            pick_up(grant.pickup_address, "lease-guessed", grant.token, grant.generation)
        with pytest.raises(PermissionDenied):
            pick_up(grant.pickup_address, grant.id, grant.token, grant.generation + 1)
        _, fd = pick_up(grant.pickup_address, grant.id, grant.token, grant.generation)
        assert fd is not None, "a host lease is picked up as an fd"
        os.close(fd)
        with pytest.raises(PermissionDenied):
            pick_up(grant.pickup_address, grant.id, grant.token, grant.generation)
        late = stub.Grant(pb.GrantRequest(client_id="c", nbytes=MiB, node=node, ttl_s=0.3))
        time.sleep(0.6)  # its token has expired with it
        with pytest.raises(PermissionDenied, match="ended"):
            pick_up(late.pickup_address, late.id, late.token, late.generation)
    finally:
        channel.close()


def _refused(lease) -> bool:
    try:
        with lease.use():
            return False
    except LeaseRevoked:
        try:
            lease.tensor(torch.uint8, 8)
        except LeaseRevoked:
            return True
        return False


def test_revocation_waits_for_reads_in_flight(plain_node):
    with plain_node.connect() as client:
        lease = client.lease(MiB)
        data = lease.as_bytes()
        data.fill_(9)
        with lease.use():
            plain_node.cli("revoke", lease.id, check=True)
            wait_for(lambda: lease.state == "revoked", what="the revocation to arrive")
            time.sleep(0.3)
            # New uses are refused (from any thread), but the memory under this use is not
            # fenced yet, and this use may still reach it to finish its reads.
            refused = []
            other = threading.Thread(target=lambda: refused.append(_refused(lease)))
            other.start()
            other.join()
            assert refused == [True]
            assert bool((lease.tensor(torch.uint8, 8) == 9).all())
            assert bool((data == 9).all())
        wait_for(
            lambda: (
                {l["id"]: l for l in plain_node.json("leases", "--all")}[lease.id]["state"]
                == "revoked"
            ),
            what="acknowledgement",
        )
        assert int(data.count_nonzero()) == 0  # fenced once the use ended
        with pytest.raises(LeaseRevoked):
            with lease.use():
                pass


STUCK = r"""
import json, os, sys, time, grpc
from lender.pickup import pick_up
from lender.backends import get_backend, Exported, BackendKind
from protos import harvest_pb2 as pb, harvest_pb2_grpc as pb_grpc
stub = pb_grpc.BrokerStub(grpc.insecure_channel(sys.argv[1]))
# A long TTL: the test revokes it, and a loaded machine must not let it lapse first.
grant = stub.Grant(pb.GrantRequest(client_id="stuck", nbytes=1 << 20, node=sys.argv[2],
                                   holder_pid=os.getpid(), ttl_s=60))
reply, fd = pick_up(grant.pickup_address, grant.id, grant.token, grant.generation)
host = get_backend("host")
mapping = host.map(host.import_handle(Exported(BackendKind.HOST, reply.alloc_bytes, fd)),
                   reply.alloc_bytes)
print(json.dumps({"event": "leased", "id": grant.id}), flush=True)
time.sleep(600)  # never renews, never acknowledges
"""


def test_kill_holder_gets_memory_back_from_a_stuck_holder(plain_node):
    node = plain_node.json("lenders")[0]["node"]
    stuck = plain_node.spawn(STUCK, f"unix://{plain_node.state_dir}/broker.sock", node)
    try:
        lease_id = stuck.expect("leased")["id"]
        result = plain_node.cli("revoke", lease_id, "--kill-holder", check=True)
        assert f"holder pid {stuck.pid} killed" in result.stdout
        assert stuck.finish(10) == -signal.SIGKILL
        row = {l["id"]: l for l in plain_node.json("leases", "--all")}[lease_id]
        assert row["state"] == "revoked"
        wait_for(lambda: plain_node.json("lenders")[0]["granted"] == 0, what="memory freed")
    finally:
        stuck.kill()
        stuck.finish()


def test_a_holder_whose_fence_fails_does_not_acknowledge(plain_node):
    with plain_node.connect() as client:
        lease = client.lease(MiB)
        mapping = lease._mapping

        def broken_close():
            raise OSError("injected: the unmap failed")

        lease._mapping = type("Broken", (), {"close": staticmethod(broken_close)})()
        try:
            plain_node.cli("revoke", lease.id, check=True)
            wait_for(lambda: lease.revoked, what="the revocation to arrive")
            # No acknowledgement: the lease ends only when its grace runs out, unclean,
            # so the lender frees its memory instead of lending it again.
            wait_for(
                lambda: (
                    {l["id"]: l for l in plain_node.json("leases", "--all")}[lease.id]["state"]
                    == "revoked"
                ),
                what="forced end",
            )
            row = {l["id"]: l for l in plain_node.json("leases", "--all")}[lease.id]
            assert "did not acknowledge" in row["reason"]
        finally:
            mapping.close()


def test_a_use_covering_device_work_is_never_fenced_under(plain_node):
    """``use(device_work=True)`` stands for a GPU copy in flight: the fence waits for it
    past the grace period (the broker ends the lease unclean meanwhile), and comes at once
    when the use ends."""
    with plain_node.connect() as client:
        lease = client.lease(MiB)
        data = lease.as_bytes()
        data.fill_(3)
        with lease.use(device_work=True):
            plain_node.cli("revoke", lease.id, check=True)
            wait_for(
                lambda: (
                    {l["id"]: l for l in plain_node.json("leases", "--all")}[lease.id]["state"]
                    == "revoked"
                ),
                what="the broker's forced end",
            )
            time.sleep(0.5)  # well past the 1 s grace since the revocation
            assert not lease._fenced and bool((data == 3).all())
        wait_for(lambda: lease._fenced, what="the fence once the use ended")
        assert int(data.count_nonzero()) == 0
        row = {l["id"]: l for l in plain_node.json("leases", "--all")}[lease.id]
        assert "did not acknowledge" in row["reason"]


def test_a_lender_that_breaks_off_a_pick_up_is_unavailable(tmp_path):
    """A lender socket that resets or closes mid-pick-up is the lender going away: a
    clear Unavailable, never a raw OSError (a placed tensor's refill then tries again)."""
    import socket as socket_module
    import threading

    from harvestd.errors import Unavailable
    from lender.pickup import pick_up

    path = str(tmp_path / "lender.sock")
    server = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.recv(1024)
        conn.close()  # no reply at all

    threading.Thread(target=hang_up, daemon=True).start()
    with pytest.raises(Unavailable, match="broke off"):
        pick_up(path, "lease-x", b"token", 1)
    server.close()
