"""The broker's Prometheus registry: the lease table's counters and latencies (through
the :class:`~harvestd.metrics.Observer` seam), and gauges read from the table at scrape
time, so that they can never drift from the truth."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from harvestd.metrics import EVENTS, LATENCIES, LATENCY_BUCKETS

if TYPE_CHECKING:
    from harvestd.table import LeaseTable

log = logging.getLogger(__name__)


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
                    ("tenant", lender.tenant_bytes),
                    ("tenant_peak", lender.tenant_peak),
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
