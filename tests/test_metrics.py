"""Prometheus metrics: a scripted run on a real node, scraped over HTTP, must show
exactly the operations it did."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.nodes import running_plain_node
from support.sockets import free_port
from support.waiting import wait_for

from client import NoCapacity
from harvestd.sizes import MiB
from protos import harvest_pb2 as pb
from protos import harvest_pb2_grpc as pb_grpc


def scrape(port: int) -> dict[tuple, float]:
    """Every sample at ``port`` as {(name, sorted labels): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metered_node():
    with running_plain_node(metrics_port=free_port()) as node:
        yield node


def test_counts_match_a_scripted_run(metered_node):
    node = metered_node
    port = node.metrics_port
    lender = node.id
    with node.connect() as client:
        kept = client.lease(2 * MiB)
        released = client.lease(MiB)
        revoked = client.lease(MiB)
        released.release()
        node.cli("revoke", revoked.id, check=True)
        wait_for(lambda: revoked.revoked, what="revocation")
        with pytest.raises(NoCapacity):
            client.lease(1 << 40)  # refused: no capacity
        channel = grpc.insecure_channel(f"unix://{node.state_dir}/broker.sock")
        stub = pb_grpc.BrokerStub(channel)
        node_name = node.json("lenders")[0]["node"]
        lapsing = stub.Grant(
            pb.GrantRequest(client_id="lapsing", nbytes=MiB, ttl_s=0.3, node=node_name)
        )
        stub.KeepAlive(pb.KeepAliveRequest(client_id="lapsing", lease_ids=["lease-nope"]))
        channel.close()
        wait_for(
            lambda: lapsing.id not in {l["id"] for l in node.json("leases")},
            every=0.2,
            what="the lapsing lease to expire",
        )
        node.cli("reclaim", "--lender", lender, "--bytes", str(63 * MiB), check=True)
        wait_for(lambda: kept.revoked, what="reclaim to revoke the kept lease")
        broker = wait_for(
            lambda: (lambda s: s if value(s, "harvest_revocations_acked_total") >= 2 else None)(
                scrape(port)
            ),
            what="acknowledgements",
        )
    assert value(broker, "harvest_grants_total") == 4
    assert value(broker, "harvest_grants_refused_total") == 1
    assert value(broker, "harvest_releases_total") == 1
    assert value(broker, "harvest_expiries_total") == 1
    assert value(broker, "harvest_revocations_total") == 2
    assert value(broker, "harvest_revocations_acked_total") == 2
    assert value(broker, "harvest_keepalive_misses_total") == 1
    assert value(broker, "harvest_reclaims_total", lender=lender) == 1
    assert value(broker, "harvest_reclaimed_bytes_total", lender=lender) == 63 * MiB
    assert value(broker, "harvest_grant_latency_seconds_count") == 4
    assert value(broker, "harvest_revocation_latency_seconds_count") == 2
    assert value(broker, "harvest_reclaim_latency_seconds_count") == 1
    assert (
        value(
            broker,
            "harvest_lender_bytes",
            lender=lender,
            node=node_name,
            gpu="host",
            kind="capacity",
        )
        == 64 * MiB
    )
    assert (
        value(
            broker,
            "harvest_lender_bytes",
            lender=lender,
            node=node_name,
            gpu="host",
            kind="reclaimed",
        )
        == 63 * MiB
    )
    lender_side = scrape(port + 1)
    assert value(lender_side, "harvest_lender_pickups_total", lender=lender, gpu="host") == 3
    frees = value(
        lender_side, "harvest_lender_frees_total", lender=lender, gpu="host", clean="true"
    )
    assert frees == 3  # released, revoked and reclaimed: all acknowledged, all clean


def test_cache_metrics_count_reads_by_tier_and_revocations(plain_node):
    """A client's cache metrics (client.metrics.REGISTRY) move by exactly what a scripted
    run of the cache did."""
    import torch

    from client import metrics
    from client.cache import TieredCache

    def sample(name, **labels):
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    before = {
        tier: sample("harvest_cache_reads_total", tier=tier) for tier in ("host-lease", "host")
    }
    bytes_before = sample("harvest_cache_read_bytes_total", tier="host-lease")
    revoked_before = sample("harvest_cache_revocations_survived_total")
    fetches_before = sample("harvest_cache_fetch_latency_seconds_count")
    with plain_node.connect() as client:
        cache = TieredCache(client, borrow_bytes=MiB, slab_bytes=MiB)
        for i in range(6):  # 256 KiB each: 4 in the lease, 2 on the host
            cache.put(i, torch.full((64 * 1024,), float(i)))
        out = torch.empty((6, 64 * 1024))
        cache.get_many(list(range(6)), out)
        plain_node.cli("revoke", cache._slabs.slabs[0].lease.id, check=True)
        wait_for(lambda: cache.stats.revocations == 1, what="the revocation")
        cache.get(0)
        cache.close()
    assert sample("harvest_cache_reads_total", tier="host-lease") - before["host-lease"] == 4
    assert sample("harvest_cache_reads_total", tier="host") - before["host"] == 3
    assert (
        sample("harvest_cache_read_bytes_total", tier="host-lease") - bytes_before == 4 * 256 * 1024
    )
    assert sample("harvest_cache_revocations_survived_total") - revoked_before == 1
    assert sample("harvest_cache_fetch_latency_seconds_count") - fetches_before == 2
