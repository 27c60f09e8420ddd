"""The cluster simulator's own accounting, on a tiny cluster, in-process."""

from __future__ import annotations

import json

import pytest

from harvestd.model import LeaseState
from harvestd.simulation import cluster as simulate_cluster
from harvestd.simulation import trace as cluster_trace


@pytest.fixture(scope="module")
def sim() -> simulate_cluster.Simulation:
    """Two nodes (16 GPUs) for five simulated minutes."""
    s = simulate_cluster.Simulation(simulate_cluster.SimConfig(gpus=16, seconds=300, check=True))
    s.result = s.run()
    return s


def test_no_lease_granted_twice(sim):
    # The simulator raises on a repeated id or generation; here the totals must agree too.
    assert len(sim.granted) == sim.result["grants"] == len(sim.generations)
    assert sim.result["grants"] > 0


def test_leases_stay_on_the_borrowers_node_and_off_its_gpu(sim):
    assert sim.result["misplaced"] == 0
    for lease in sim.table.leases.values():
        borrower = sim.borrowers[lease.client_id]
        lender = sim.table.lenders[lease.lender_id]
        assert lender.node == borrower.node and lender.gpu_uuid != borrower.gpu


def test_table_invariants_hold_at_the_end(sim):
    sim.table.check_invariants()
    for lender in sim.table.lenders.values():
        assert lender.held <= lender.lendable, lender.id
    # Every revocation was acknowledged and every ended lease freed within its tick.
    assert all(l.state is LeaseState.GRANTED for l in sim.table.leases.values())


def test_lent_share_is_a_share(sim):
    assert 0.0 < sim.result["lent_share"] <= 1.0


def test_revocations_counted_match_the_tables(sim):
    assert sim.result["revocations"] > 0, "the trace should make tenants take memory back"
    assert sim.result["revocations"] == sim.result["table_revocations"]
    assert sim.counter.counts.get("revoke_acked", 0) == sim.result["revocations"]
    assert sim.result["forced_revocations"] == 0 and sim.result["expiries"] == 0


def test_borrowers_hold_what_the_table_holds(sim):
    held = {i for b in sim.borrowers.values() for i in (*b.experts, *b.kv)}
    assert held == set(sim.table.leases)


def test_traces_are_reproducible_and_independent_of_cluster_size():
    small = list(cluster_trace.trace(2, 600, 30, seed=7))
    large = list(cluster_trace.trace(64, 600, 30, seed=7))
    assert small == list(cluster_trace.trace(2, 600, 30, seed=7))
    assert [row[:2] for row in large] == small
    gpu = cluster_trace.TraceModel().gpu_bytes
    assert all(0 <= u <= gpu for row in large for u in row)


def test_quick_mode_writes_results(tmp_path):
    pytest.importorskip("matplotlib")
    assert simulate_cluster.main(["--quick", "--gpus", "8", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "simulation.quick.json").read_text())
    (result,) = doc["results"]
    assert result["gpus"] == 8 and result["invariants"] == "checked"
    assert 0.0 < result["lent_share"] <= 1.0
    assert result["revocations"] == result["table_revocations"]
    assert (tmp_path / "simulation.quick.png").stat().st_size > 0
