"""The broker's Prometheus metrics.

The lease table counts what it does through the :class:`Observer` seam; gauges (bytes
per lender, leases by state) are read from the table at scrape time, so they can never
drift from the truth.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from harvestd.table import LeaseTable

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Observer(Protocol):
    """What the lease table tells about itself."""

    def count(self, event: str, n: int = 1, lender: str = "") -> None:
        """``event`` happened ``n`` times (on ``lender``)."""

    def observe(self, what: str, seconds: float) -> None:
        """A latency sample."""


class Silent:
    """An observer that keeps nothing."""

    def count(self, event: str, n: int = 1, lender: str = "") -> None:
        """Nothing."""

    def observe(self, what: str, seconds: float) -> None:
        """Nothing."""


# event name -> (metric name, help, labelled by lender)
EVENTS = {
    "grant": ("harvest_grants_total", "Leases granted.", False),
    "grant_refused": (
        "harvest_grants_refused_total",
        "Grants refused for want of capacity.",
        False,
    ),
    "release": ("harvest_releases_total", "Leases released by their holders.", False),
    "expiry": ("harvest_expiries_total", "Leases that lapsed without a keepalive.", False),
    "revoke": (
        "harvest_revocations_total",
        "Revocations started (operator, reclaim, drain).",
        False,
    ),
    "revoke_acked": (
        "harvest_revocations_acked_total",
        "Revocations the holder acknowledged.",
        False,
    ),
    "revoke_forced": (
        "harvest_revocations_forced_total",
        "Leases ended without the holder (grace passed, forced, lender lost).",
        False,
    ),
    "reclaim": ("harvest_reclaims_total", "Reclaims by a lender's tenant.", True),
    "reclaimed_bytes": ("harvest_reclaimed_bytes_total", "Bytes tenants took back.", True),
    "keepalive_miss": (
        "harvest_keepalive_misses_total",
        "Keepalives for leases that were already gone.",
        False,
    ),
    "lender_down": ("harvest_lenders_down_total", "Lenders marked down for silence.", False),
}
LATENCIES = {
    "grant": ("harvest_grant_latency_seconds", "Time to serve a Grant."),
    "revocation": (
        "harvest_revocation_latency_seconds",
        "From a revocation's request to the holder's acknowledgement.",
    ),
    "reclaim": (
        "harvest_reclaim_latency_seconds",
        "From a Reclaim request to the memory being free.",
    ),
}


class BrokerMetrics:
    """Counters, histograms and table gauges in one registry of their own."""

    def __init__(self, read_table: Callable[[], LeaseTable]) -> None:
        self.registry = CollectorRegistry()
        self._counters = {}
        for event, (name, doc, by_lender) in EVENTS.items():
            self._counters[event] = Counter(
                name.removesuffix("_total"),
                doc,
                ["lender"] if by_lender else [],
                registry=self.registry,
            )
        self._histograms = {
            what: Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=self.registry)
            for what, (name, doc) in LATENCIES.items()
        }
        self.registry.register(TableCollector(read_table))

    def count(self, event: str, n: int = 1, lender: str = "") -> None:
        """Add to a counter."""
        counter = self._counters[event]
        (counter.labels(lender=lender) if EVENTS[event][2] else counter).inc(n)

    def observe(self, what: str, seconds: float) -> None:
        """Add a latency sample."""
        self._histograms[what].observe(seconds)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``addr:port`` (loopback by default)."""
        start_http_server(port, addr=addr, registry=self.registry)
        log.info("broker metrics on http://%s:%d/metrics", addr, port)


class TableCollector(Collector):
    """Gauges read from the lease table at each scrape."""

    def __init__(self, read_table: Callable[[], LeaseTable]) -> None:
        self._table = read_table

    def collect(self):
        """Bytes per lender and GPU, and leases by state."""
        table = self._table()
        by_lender = GaugeMetricFamily(
            "harvest_lender_bytes",
            "Bytes per lender, by kind.",
            labels=["lender", "node", "gpu", "kind"],
        )
        states = GaugeMetricFamily(
            "harvest_leases", "Leases not yet freed, by state.", labels=["state"]
        )
        up = GaugeMetricFamily(
            "harvest_lender_up", "1 if the lender takes grants.", labels=["lender"]
        )
        with table.lock:
            for lender in table.lenders.values():
                labels = [lender.id, lender.node, lender.gpu_uuid or "host"]
                for kind, value in (
                    ("capacity", lender.capacity),
                    ("lendable", lender.lendable),
                    ("granted", lender.held),
                    ("reclaimed", lender.reclaimed),
                    ("free", lender.free),
                ):
                    by_lender.add_metric(labels + [kind], value)
                up.add_metric([lender.id], 1 if lender.state.label == "up" else 0)
            counts: dict[str, int] = {}
            for lease in table.leases.values():
                counts[lease.state.label] = counts.get(lease.state.label, 0) + 1
        for state in ("granted", "revoking", "released", "expired", "revoked"):
            states.add_metric([state], counts.get(state, 0))
        yield by_lender
        yield states
        yield up
