"""The lease table's rules, on a fake clock, with the real SQLite store."""

from __future__ import annotations

import os

import pytest
from support.clock import Clock
from support.recorder import Recorder

from harvestd.errors import (
    FailedPrecondition,
    InvalidArgument,
    LeaseRevoked,
    NoCapacity,
    NotFound,
    PermissionDenied,
    StoreError,
)
from harvestd.model import LeaseState, LenderRecord, LenderState
from harvestd.sizes import MiB
from harvestd.store import MemoryStore, SqliteStore, Store
from harvestd.table import LeaseTable, Timing


def lender(lender_id="h0", node="n1", capacity=64 * MiB, gpu="", links=None, backend=1):
    return LenderRecord(
        id=lender_id,
        node=node,
        backend=backend,
        pickup_address="/x",
        capacity=capacity,
        generation=0,
        gpu_uuid=gpu,
        links=links or {},
        granularity=4096,
    )


class RecordedTable(LeaseTable):
    """A lease table that keeps the fake clock it runs on (``clock_``) and the recorder it
    tells holders and lenders through (``notes_``), for the tests to move and read."""

    def __init__(self, store: Store, timing: Timing) -> None:
        self.clock_, self.notes_ = Clock(), Recorder()
        super().__init__(store, notifier=self.notes_, timing=timing, clock=self.clock_)


@pytest.fixture
def table(tmp_path):
    t = RecordedTable(
        SqliteStore(str(tmp_path / "b.db")),
        timing=Timing(default_ttl=10, grace=2, lender_timeout=30),
    )
    t.register_lender(lender())
    return t


def reopen(t, tmp_path):
    t.store.close()
    again = LeaseTable(SqliteStore(str(tmp_path / "b.db")), timing=t.timing, clock=t.clock)
    again.check_invariants()
    return again


def test_grant_rounds_to_granularity_and_never_exceeds_capacity(table):
    a, _ = table.grant("c", 5000, node="n1")
    assert a.charged == 8192 and table.lenders["h0"].held == 8192
    table.grant("c", 64 * MiB - 8192, node="n1")
    with pytest.raises(NoCapacity, match="largest free: 0"):
        table.grant("c", 1, node="n1")
    with pytest.raises(NoCapacity, match="no lender on node"):
        table.grant("c", 1, node="elsewhere")
    table.check_invariants()


@pytest.mark.parametrize("nbytes", [0, -1, 1 << 60])
def test_grant_rejects_bad_sizes(table, nbytes):
    with pytest.raises(InvalidArgument):
        table.grant("c", nbytes, node="n1")


def test_grant_rejects_bad_ttl_and_missing_client(table):
    with pytest.raises(InvalidArgument):
        table.grant("c", 1, ttl_s=-5, node="n1")
    with pytest.raises(InvalidArgument):
        table.grant("c", 1, ttl_s=10**9, node="n1")
    with pytest.raises(InvalidArgument):
        table.grant("", 1, node="n1")


def test_keepalive_extends_and_expiry_frees_unclean(table):
    lease, _ = table.grant("c", MiB, node="n1")
    table.clock_.now += 9
    alive, lost = table.keepalive("c", [lease.id, "lease-unknown"])
    assert [l.id for l in alive] == [lease.id] and [l.id for l in lost] == ["lease-unknown"]
    table.clock_.now += 9.5
    assert table.sweep() == []
    table.clock_.now += 1
    assert [l.id for l in table.sweep()] == [lease.id]
    assert lease.state is LeaseState.EXPIRED
    assert table.notes_.ends == [lease.id] and table.notes_.frees == [(lease.id, False)]
    _, lost = table.keepalive("c", [lease.id])
    assert lost[0].state is LeaseState.EXPIRED


def test_release_is_clean_idempotent_and_owner_only(table):
    lease, _ = table.grant("c", MiB, node="n1")
    with pytest.raises(PermissionDenied):
        table.release("intruder", lease.id)
    table.release("c", lease.id)
    table.release("c", lease.id)
    assert table.notes_.frees == [(lease.id, True)]
    table.confirm_free("h0", table.lenders["h0"].generation, [lease.id])
    assert table.lenders["h0"].held == 0
    with pytest.raises(NotFound):
        table.release("c", lease.id)


def test_revoke_waits_for_ack_then_forces_after_grace(table):
    acked, _ = table.grant("c", MiB, node="n1")
    stuck, _ = table.grant("d", MiB, node="n1")
    table.revoke(acked.id)
    table.revoke(stuck.id)
    assert table.notes_.revoked == [acked.id, stuck.id]
    with pytest.raises(FailedPrecondition):
        table.ack_revoke("c", table.grant("c", MiB, node="n1")[0].id)
    table.ack_revoke("c", acked.id)
    assert acked.state is LeaseState.REVOKED and acked.clean
    table.clock_.now += 2.5
    assert [l.id for l in table.sweep()] == [stuck.id]
    assert stuck.state is LeaseState.REVOKED and not stuck.clean
    assert "did not acknowledge" in stuck.reason
    with pytest.raises(LeaseRevoked):
        table.revoke(stuck.id)


def test_reclaim_revokes_just_enough_lowest_priority_then_newest(table):
    low, _ = table.grant("c", 16 * MiB, node="n1", priority=0)
    table.clock_.now += 1
    high_old, _ = table.grant("c", 16 * MiB, node="n1", priority=5)
    table.clock_.now += 1
    high_new, _ = table.grant("c", 16 * MiB, node="n1", priority=5)
    table.clock_.now += 1
    low_new, _ = table.grant("c", 8 * MiB, node="n1", priority=0)
    # 56 MiB held; the tenant takes 30 MiB back, leaving 34: 22 MiB must go.
    victims = table.reclaim("h0", 30 * MiB)
    assert [v.id for v in victims] == [low_new.id, low.id]
    # A second reclaim counts what is already on its way out.
    more = table.reclaim("h0", 8 * MiB)
    assert {v.id for v in more[:2]} == {low_new.id, low.id}
    assert more[-1].id == high_new.id
    with pytest.raises(NoCapacity):
        table.grant("c", 1, node="n1")
    table.restore("h0")
    assert table.lenders["h0"].reclaimed == 0


def test_placement_same_node_never_own_gpu_fastest_link(table):
    table.register_lender(lender("g0", gpu="GPU-0", links={"GPU-1": 18, "GPU-2": 0}))
    table.register_lender(lender("g1", gpu="GPU-1", links={"GPU-0": 18}))
    table.register_lender(lender("g2", gpu="GPU-2", capacity=8 * MiB))
    assert table.grant("c", MiB, node="n1", near_gpu="GPU-1")[1].id == "g0"
    assert table.grant("c", MiB, node="n1", near_gpu="GPU-0")[1].id == "g1"
    # GPU memory first, tightest fit among equals.
    assert table.grant("c", MiB, node="n1", near_gpu="GPU-9")[1].id == "g2"
    assert table.grant("c", MiB, node="n1", backend=1, near_gpu="GPU-2")[1].id in ("g0", "g1")


def test_drain_stops_grants_and_revokes(table):
    lease, _ = table.grant("c", MiB, node="n1")
    assert [l.id for l in table.drain("h0")] == [lease.id]
    assert table.lenders["h0"].state is LenderState.DRAINING
    with pytest.raises(NoCapacity):
        table.grant("c", 1, node="n1")
    table.restore("h0")
    table.grant("c", 1, node="n1")


def test_lender_reregistration_revokes_old_generation(table):
    lease, _ = table.grant("c", MiB, node="n1")
    old_gen = table.lenders["h0"].generation
    new_gen = table.register_lender(lender())
    assert new_gen > old_gen
    assert lease.state is LeaseState.REVOKED and lease.reason == "lender restarted"
    assert table.lenders["h0"].held == 0
    with pytest.raises(PermissionDenied):
        table.report_lender("h0", old_gen, MiB)
    table.check_invariants()


def test_silent_lender_goes_down_and_its_leases_end(table):
    lease, _ = table.grant("c", MiB, node="n1", ttl_s=100)
    table.clock_.now += 31
    table.sweep()
    assert table.lenders["h0"].state is LenderState.DOWN
    assert lease.state is LeaseState.REVOKED and "stopped reporting" in lease.reason


def test_restart_from_store_keeps_every_grant_and_the_counter(table, tmp_path):
    leases = [table.grant("c", MiB, node="n1")[0] for _ in range(5)]
    table.release("c", leases[0].id)
    table.revoke(leases[1].id)
    gen = table.generation
    again = reopen(table, tmp_path)
    assert again.generation == gen
    assert set(again.leases) == {l.id for l in leases}  # released but not yet freed stays
    assert again.leases[leases[1].id].state is LeaseState.REVOKING
    assert again.leases[leases[2].id].token == leases[2].token
    fresh, _ = again.grant("c", MiB, node="n1")
    assert fresh.generation == gen + 1
    assert again.lenders["h0"].held == 6 * MiB


def test_check_pickup_once_with_the_right_token(table):
    lease, lend = table.grant("c", MiB, node="n1")
    with pytest.raises(PermissionDenied):
        table.check_pickup("h0", lend.generation, lease.id, b"x" * 32, lease.generation, 1)
    with pytest.raises(PermissionDenied):
        table.check_pickup("h0", lend.generation + 7, lease.id, lease.token, lease.generation, 1)
    table.check_pickup("h0", lend.generation, lease.id, lease.token, lease.generation, 42)
    assert lease.holder_pid == 42
    with pytest.raises(PermissionDenied, match="already picked up"):
        table.check_pickup("h0", lend.generation, lease.id, lease.token, lease.generation, 42)


def test_memory_store_behaves_like_sqlite():
    t = LeaseTable(MemoryStore())
    t.register_lender(lender())
    lease, _ = t.grant("c", MiB, node="n1")
    t.release("c", lease.id)
    assert t.store.history()[0].id == lease.id


def test_damaged_store_refuses_to_start(tmp_path):
    path = tmp_path / "b.db"
    store = SqliteStore(str(path))
    t = LeaseTable(store)
    t.register_lender(lender())
    for _ in range(50):
        t.grant("c", 4096, node="n1")
    store.close()
    for suffix in ("-wal", "-shm"):
        if os.path.exists(str(path) + suffix):
            os.unlink(str(path) + suffix)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff" * 4096)
    with pytest.raises(StoreError, match="damaged|cannot be opened"):
        LeaseTable(SqliteStore(str(path)))


def test_truncated_store_refuses_to_start(tmp_path):
    path = tmp_path / "b.db"
    path.write_bytes(b"SQLite format 3\0" + b"\x01" * 50)
    with pytest.raises(StoreError):
        LeaseTable(SqliteStore(str(path)))


def test_failed_commit_grants_nothing(table, monkeypatch):
    def boom(*args, **kwargs):
        raise StoreError("disk full")

    held = table.lenders["h0"].held
    monkeypatch.setattr(table.store, "commit", boom)
    with pytest.raises(StoreError):
        table.grant("c", MiB, node="n1")
    assert table.lenders["h0"].held == held and not table.leases


def test_keepalives_write_nothing_and_a_restart_refreshes_ttls(table, tmp_path, monkeypatch):
    lease, _ = table.grant("c", MiB, node="n1")
    writes = []
    original = table.store.commit

    def commit(*a, **k):
        writes.append(a)
        return original(*a, **k)

    monkeypatch.setattr(table.store, "commit", commit)
    table.clock_.now += 9
    table.keepalive("c", [lease.id])
    assert writes == []
    table.clock_.now += 9  # past the stored expiry (the renewal was never written)
    again = reopen(table, tmp_path)
    assert again.leases[lease.id].expires_at == table.clock_.now + lease.ttl_s
    assert again.sweep() == []
