"""A client process's Prometheus metrics, in one registry of their own.

Serve them with :func:`serve`, or add :data:`REGISTRY` to the application's own exporter.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from harvestd.metrics import LATENCY_BUCKETS

REGISTRY = CollectorRegistry()

LEASES = Counter(
    "harvest_client_leases",
    "Leases this process was granted and mapped.",
    ["backend"],
    registry=REGISTRY,
)
LEASED_BYTES = Gauge(
    "harvest_client_leased_bytes", "Bytes this process holds now.", ["backend"], registry=REGISTRY
)
REVOCATIONS = Counter(
    "harvest_client_revocations",
    "Leases this process lost and fenced, by how.",
    ["how"],
    registry=REGISTRY,
)
LEASE_LATENCY = Histogram(
    "harvest_client_lease_latency_seconds",
    "From asking for a lease to its memory being mapped.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)


# What a TieredCache does (client/cache/tiered.py): reads and bytes by the tier that served them.
CACHE_READS = Counter(
    "harvest_cache_reads",
    "Cached objects read, by the tier that served them.",
    ["tier"],
    registry=REGISTRY,
)
CACHE_BYTES = Counter(
    "harvest_cache_read_bytes",
    "Bytes of cached objects read, by tier.",
    ["tier"],
    registry=REGISTRY,
)
CACHE_FETCH_LATENCY = Histogram(
    "harvest_cache_fetch_latency_seconds",
    "From starting a batched read to its data being in place.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
CACHE_REVOCATIONS = Counter(
    "harvest_cache_revocations_survived",
    "Borrowed slabs a cache lost; their objects fell back to their source.",
    registry=REGISTRY,
)
CACHE_FALLBACKS = Counter(
    "harvest_cache_fallbacks",
    "Reads meant for borrowed memory, served from the authoritative source because the lease went.",
    registry=REGISTRY,
)


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Serve this process's Harvest metrics on ``addr:port``."""
    start_http_server(port, addr=addr, registry=REGISTRY)
