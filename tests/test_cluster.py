"""Many nodes: a real multi-raylet Ray cluster on one machine (ray.cluster_utils), a
Harvest daemon per node (the head's starts the broker, the others join it), clients
placed on given nodes, a node removed mid-run, and the broker's actor killed mid-run."""

from __future__ import annotations

import shutil
import time
from typing import Any

import pytest
from support.nodes import Node
from support.programs import HOLDER
from support.sockets import short_tmpdir
from support.waiting import wait_for

from harvestd.sizes import MiB

pytestmark = pytest.mark.slow


class ClusterNode(Node):
    """A Harvest node on one raylet of the test cluster, named by HARVEST_NODE."""

    def __init__(self, name: str, ray_node_id: str) -> None:
        super().__init__(short_tmpdir())
        self.name = name
        self.ray_node_id = ray_node_id

    def start(self, ray_address: str) -> None:
        import os

        os.environ["HARVEST_NODE"] = self.name
        try:
            result = self.cli(
                "start",
                "--detach",
                "--address",
                ray_address,
                "--backend",
                "host",
                "--host-bytes",
                "64MiB",
                "--ttl",
                "3",
                "--grace",
                "1",
                "--ray-node-id",
                self.ray_node_id,
                timeout=240,
            )
        finally:
            del os.environ["HARVEST_NODE"]
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # Ray's node options, for the head and every node added.
    args: dict[str, Any] = dict(
        num_cpus=1, node_ip_address="127.0.0.1", object_store_memory=80 << 20
    )
    ray_cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(
            include_dashboard=False,
            _system_config={"health_check_period_ms": 500, "health_check_failure_threshold": 3},
            **args,
        ),
    )
    raylets = {
        "node-a": ray_cluster.head_node,
        "node-b": ray_cluster.add_node(**args),
        "node-c": ray_cluster.add_node(**args),
    }
    nodes = {name: ClusterNode(name, raylet.node_id) for name, raylet in raylets.items()}
    for node in nodes.values():  # the head first: it starts the broker
        node.start(ray_cluster.address)
    yield ray_cluster, raylets, nodes
    for node in reversed(list(nodes.values())):
        node.cli("stop", timeout=120)
        shutil.rmtree(node.state_dir, ignore_errors=True)
    ray_cluster.shutdown()


def test_one_broker_sees_every_node(cluster):
    _, _, nodes = cluster
    for node in nodes.values():
        lenders = node.json("lenders")
        assert sorted(l["node"] for l in lenders) == ["node-a", "node-b", "node-c"]
    a, b = nodes["node-a"], nodes["node-b"]
    assert a.json("status")["broker_pid"] == b.json("status")["broker_pid"]
    table = a.cli("lenders", check=True).stdout
    assert table.index("node-a") < table.index("node-b") < table.index("node-c")


def test_leases_stay_on_the_clients_node(cluster):
    _, _, nodes = cluster
    for name in ("node-b", "node-c"):
        with nodes[name].connect() as client, client.lease(MiB) as lease:
            assert lease.lender == f"{name}-host0"
            row = {l["id"]: l for l in nodes["node-a"].json("leases")}[lease.id]
            assert row["node"] == name
    from client import NoCapacity

    with nodes["node-a"].connect(node="node-z") as stranger:
        with pytest.raises(NoCapacity, match="no lender on node 'node-z'"):
            stranger.lease(MiB)


def test_node_loss_revokes_only_that_nodes_leases(cluster):
    ray_cluster, raylets, nodes = cluster
    lost = nodes["node-c"].spawn(HOLDER, str(4 * MiB), "3", "3")
    kept = nodes["node-b"].spawn(HOLDER, str(4 * MiB), "4", "3")
    try:
        lost_lease = lost.expect("leased")
        kept_lease = kept.expect("leased")
        ray_cluster.remove_node(raylets["node-c"])
        revoked = lost.expect("revoked", timeout=60)
        assert revoked["id"] == lost_lease["id"] and revoked["reason"] == "node lost"
        assert lost.expect("done")["wrong"] == 0
        lenders = {l["id"]: l for l in nodes["node-a"].json("lenders")}
        assert lenders["node-c-host0"]["state"] == "down"
        assert lenders["node-b-host0"]["state"] == "up"
        time.sleep(4)  # past the TTL: the other node's holder is undisturbed
        rows = {l["id"]: l for l in nodes["node-a"].json("leases")}
        assert rows[kept_lease["id"]]["state"] == "granted"
        kept.send("stop")
        assert kept.expect("done")["wrong"] == 0
    finally:
        for holder in (lost, kept):
            holder.kill()
            holder.finish()


def test_broker_actor_killed_mid_run_comes_back(cluster):
    import os
    import signal

    _, _, nodes = cluster
    b = nodes["node-b"]
    # A TTL that outlasts Ray's restart of the actor on a loaded 2-core machine.
    holder = b.spawn(HOLDER, str(2 * MiB), "8", "12")
    try:
        leased = holder.expect("leased")
        before = b.json("status")
        os.kill(before["broker_pid"], signal.SIGKILL)
        wait_for(
            lambda: (
                b.cli("status").returncode == 0
                and b.json("status")["broker_pid"] != before["broker_pid"]
            ),
            timeout=60,
            what="Ray to restart the broker",
        )
        time.sleep(13)  # past the TTL: the holder renewed against the new broker
        assert {l["id"]: l for l in b.json("leases")}[leased["id"]]["state"] == "granted"
        with b.connect() as client, client.lease(MiB) as lease:
            assert lease.generation > leased["generation"]
        holder.send("stop")
        assert holder.expect("done")["wrong"] == 0
    finally:
        holder.kill()
        holder.finish()
