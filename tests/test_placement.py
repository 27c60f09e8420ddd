"""Placement by topology and load (harvestd/policy.py) and the stripe count
(client/striped.py), on simulated nodes: 8 GPUs on NVSwitches, 4 GPUs in NVLink pairs,
4 GPUs on PCIe only. Grants go through the real lease table, so load is what the table
holds."""

from __future__ import annotations

import random

import pytest
from placement_dryrun import dry_run  # scripts/: the dry run with the client's stripe count

from client.striping import StripeLayout, auto_stripes
from harvestd.errors import InvalidArgument, NoCapacity
from harvestd.model import LenderRecord, LenderState
from harvestd.policy import NearestBestFit
from harvestd.simulation.placement import TOPOLOGIES, synthetic
from harvestd.sizes import GiB, MiB
from harvestd.store import MemoryStore
from harvestd.table import LeaseTable
from protos import harvest_pb2 as pb

NODE = "node"


def table_of(lenders: list[LenderRecord], policy: NearestBestFit | None = None) -> LeaseTable:
    table = LeaseTable(MemoryStore(), policy=policy)
    for lender in lenders:
        table.register_lender(lender)
    return table


def uuid(lenders: list[LenderRecord], index: int) -> str:
    return next(l.gpu_uuid for l in lenders if l.gpu_index == index)


def gpu_of(table: LeaseTable, lender_id: str) -> int:
    return table.lenders[lender_id].gpu_index


@pytest.mark.parametrize("kind", TOPOLOGIES)
def test_never_the_borrowers_own_gpu_until_full(kind):
    lenders = synthetic(kind, capacity=4 * GiB, host=2 * GiB)
    table = table_of(lenders)
    gpus = [l.gpu_index for l in lenders if l.gpu_uuid]
    for borrower in gpus:
        near = uuid(lenders, borrower)
        try:
            while True:
                _, lender = table.grant(f"c{borrower}", 512 * MiB, node=NODE, near_gpu=near)
                assert lender.gpu_uuid != near
        except NoCapacity:
            pass
    table.check_invariants()
    # Everything but each borrower's own GPU got used: lenders filled up in turn.
    assert all(l.free < 512 * MiB for l in table.lenders.values())


def test_fastest_link_first_then_load_among_equal_links():
    lenders = synthetic("pairs4", capacity=4 * GiB)
    table = table_of(lenders)
    near0 = uuid(lenders, 0)
    # GPU 1 (2 NVLinks) before 2 and 3 (1 each), however loaded it is, until it is full.
    picks = [
        gpu_of(table, table.grant("c", GiB, node=NODE, near_gpu=near0)[1].id) for _ in range(4)
    ]
    assert picks == [1, 1, 1, 1]
    # Then the single-link peers, spread by load: 2, 3, 2, 3, ...
    picks = [
        gpu_of(table, table.grant("c", GiB, node=NODE, near_gpu=near0)[1].id) for _ in range(8)
    ]
    assert picks == [2, 3] * 4
    with pytest.raises(NoCapacity):
        table.grant("c", GiB, node=NODE, near_gpu=near0)


@pytest.mark.parametrize("kind", ["nvswitch8", "pcie4"])
def test_load_spreads_one_borrowers_grants(kind):
    lenders = synthetic(kind)
    table = table_of(lenders)
    peers = len(lenders) - 1
    near0 = uuid(lenders, 0)
    picks = [
        gpu_of(table, table.grant("c", GiB, node=NODE, near_gpu=near0)[1].id)
        for _ in range(2 * peers)
    ]
    assert sorted(picks[:peers]) == list(range(1, peers + 1))  # each peer once ...
    assert sorted(picks[peers:]) == list(range(1, peers + 1))  # ... then once more


def test_borrowers_on_every_gpu_spread_over_lenders():
    lenders = synthetic("nvswitch8")
    table = table_of(lenders)
    for _ in range(3):
        for borrower in range(8):
            table.grant(f"c{borrower}", GiB, node=NODE, near_gpu=uuid(lenders, borrower))
    held = [l.held for l in table.lenders.values()]
    assert max(held) == min(held) == 3 * GiB  # 24 leases over 8 lenders: 3 each


def test_without_load_best_fit_piles_onto_one_lender():
    lenders = synthetic("nvswitch8")
    table = table_of(lenders, NearestBestFit(spread=False))
    near0 = uuid(lenders, 0)
    picks = {table.grant("c", GiB, node=NODE, near_gpu=near0)[1].id for _ in range(4)}
    assert len(picks) == 1


def test_best_fit_among_equal_links_and_load():
    small, large = 2 * GiB, 8 * GiB
    lenders = synthetic("pcie4", capacity=large)
    lenders[2].capacity = small  # GPU 2: the tightest hole
    table = table_of(lenders)
    near0 = uuid(lenders, 0)
    assert gpu_of(table, table.grant("c", GiB, node=NODE, near_gpu=near0)[1].id) == 2
    # GPU 2 is half full now: the empty ones (equal load, equal fit) go by id.
    assert gpu_of(table, table.grant("c", GiB, node=NODE, near_gpu=near0)[1].id) == 1


def test_gpu_before_host_and_host_without_a_gpu():
    lenders = synthetic("pcie4", capacity=GiB, host=64 * GiB)
    table = table_of(lenders)
    near0 = uuid(lenders, 0)
    assert table.grant("c", GiB, node=NODE, near_gpu=near0)[1].gpu_uuid  # a GPU, not host
    host = table.grant("c", GiB, node=NODE, near_gpu=near0, backend=pb.BACKEND_HOST)[1]
    assert host.backend == pb.BACKEND_HOST


def test_avoid_keeps_stripes_on_distinct_lenders():
    lenders = synthetic("nvswitch8")
    table = table_of(lenders)
    near0 = uuid(lenders, 0)
    chosen: list[str] = []
    for _ in range(7):
        chosen.append(table.grant("c", GiB, node=NODE, near_gpu=near0, avoid=chosen)[1].id)
    assert len(set(chosen)) == 7 and uuid(lenders, 0) not in {
        table.lenders[i].gpu_uuid for i in chosen
    }
    with pytest.raises(NoCapacity, match="avoiding 7 lenders"):
        table.grant("c", GiB, node=NODE, near_gpu=near0, avoid=chosen)
    with pytest.raises(InvalidArgument):
        table.grant("c", GiB, node=NODE, avoid=[f"x{i}" for i in range(2000)])


@pytest.mark.parametrize("kind", TOPOLOGIES)
def test_placement_is_deterministic_whatever_the_order(kind):
    def picks(shuffle: int | None) -> list[str]:
        lenders = synthetic(kind)
        if shuffle is not None:
            random.Random(shuffle).shuffle(lenders)
        table = table_of(lenders)
        out = []
        for round_ in range(3):
            for borrower in range(len(lenders)):
                out.append(
                    table.grant(
                        "c", GiB + round_ * MiB, node=NODE, near_gpu=uuid(lenders, borrower)
                    )[1].id
                )
        return out

    first = picks(None)
    assert picks(None) == first
    assert all(picks(seed) == first for seed in range(3))


def test_rank_agrees_with_place_and_skips_what_may_not_serve():
    lenders = synthetic("pairs4", capacity=4 * GiB)
    lenders[3].state = LenderState.DRAINING
    lenders[2].node = "elsewhere"
    policy = NearestBestFit()
    near0 = uuid(lenders, 0)
    ranked = policy.rank(lenders, GiB, NODE, near0)
    assert [l.gpu_index for _, l in ranked] == [1]
    assert policy.place(lenders, GiB, NODE, near0) is ranked[0][1]
    assert policy.place(lenders, 5 * GiB, NODE, near0) is None


# ---------------------------------------------------------------- stripe count


def wire(lenders: list[LenderRecord]) -> list[pb.Lender]:
    return [l.to_pb() for l in lenders]


@pytest.mark.parametrize("kind,expected", [("nvswitch8", 7), ("pairs4", 3), ("pcie4", 1)])
def test_auto_stripes_by_topology(kind, expected):
    lenders = synthetic(kind)
    assert auto_stripes(wire(lenders), 8 * GiB, uuid(lenders, 0), NODE) == expected
    assert auto_stripes(wire(lenders), 8 * GiB, "", NODE) == 1  # no GPU: one lease


def test_auto_stripes_caps_and_room():
    lenders = synthetic("nvswitch8", capacity=2 * GiB)
    near0 = uuid(lenders, 0)
    assert auto_stripes(wire(lenders), 8 * GiB, near0, NODE, max_stripes=4) == 4
    assert auto_stripes(wire(lenders), 8 * GiB, near0, NODE, max_stripes=1) == 1
    # 1 GiB held on GPUs 1-4: only 5, 6 and 7 have room for stripes over 1 GiB.
    for lender in lenders[1:5]:
        lender.held = GiB
    assert auto_stripes(wire(lenders), 6 * GiB, near0, NODE) == 7  # 878 MiB each: all fit
    assert auto_stripes(wire(lenders), 6 * GiB, near0, NODE, max_stripes=4) == 3  # 2 GiB each
    assert auto_stripes(wire(lenders), 12 * GiB, near0, NODE) == 1  # fits nowhere
    # A lease of few units takes at most one stripe per unit.
    assert auto_stripes(wire(lenders), 6 * MiB, near0, NODE) == 3


def test_auto_stripes_skips_links_too_slow_to_help():
    lenders = synthetic("pcie4")
    near0 = uuid(lenders, 0)
    lenders[1].links[near0] = 4
    lenders[2].links[near0] = 1
    # Equal stripes read at the slowest link's pace: 2 x 1 link < 1 x 4 links.
    assert auto_stripes(wire(lenders), 8 * GiB, near0, NODE) == 1
    lenders[3].links[near0] = 2
    assert auto_stripes(wire(lenders), 8 * GiB, near0, NODE) == 1  # 3 x 1 < 4; 2 x 2 = 4
    lenders[2].links[near0] = 3
    # 2 x 3 = 6 beats 4; 3 x 2 = 6 only ties it, and fewer stripes win a tie.
    assert auto_stripes(wire(lenders), 8 * GiB, near0, NODE) == 2
    assert auto_stripes(wire(lenders), 8 * GiB, near0, NODE, backend=pb.BACKEND_HOST) == 1


def test_stripe_layout_deals_units_in_turn():
    layout = StripeLayout(10 * MiB + 1, 3, 2 * MiB)
    assert layout.units == 6
    assert [layout.stripe_bytes(s) for s in range(3)] == [4 * MiB] * 3
    assert layout.locate(0) == (0, 0)
    assert layout.locate(2 * MiB + 5) == (1, 5)
    assert layout.locate(6 * MiB + 7) == (0, 2 * MiB + 7)
    assert layout.locate(10 * MiB) == (2, 2 * MiB)
    assert sum(StripeLayout(7 * MiB, 3, MiB).stripe_bytes(s) for s in range(3)) == 7 * MiB
    for bad in [(0, 1, MiB), (MiB, 0, MiB), (MiB, 1, 0), (MiB, 2, MiB), (MiB, 65, 1)]:
        with pytest.raises(InvalidArgument):
            StripeLayout(*bad)
    with pytest.raises(InvalidArgument):
        layout.locate(10 * MiB + 1)


def test_dry_run_covers_every_borrower():
    doc = dry_run(synthetic("nvswitch8"), GiB, 7, 8 * GiB, 8, pb.BACKEND_CUDA_VMM)
    assert len(doc["borrowers"]) == 8
    for b in doc["borrowers"]:
        assert b["stripes"] == 7 and len(set(b["stripe_lenders"])) == 7
        assert f"node-gpu{b['gpu_index']}" not in b["successive_leases"]
        assert len(set(b["successive_leases"])) == 7
