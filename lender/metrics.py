"""A lender's Prometheus metrics: what it hands out, frees and gives back to its tenant."""

from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from harvestd.metrics import LATENCY_BUCKETS

log = logging.getLogger(__name__)


class LenderMetrics:
    """One registry per lender process, labelled by lender and GPU."""

    def __init__(self, lender_id: str, gpu_uuid: str, memory: Callable[[], dict[str, int]]) -> None:
        """``memory``: the lender's bytes by kind (``handed_out``, ``pooled``,
        ``lendable``), read at each scrape."""
        self.registry = CollectorRegistry()
        labels = ["lender", "gpu"]
        self._labels = {"lender": lender_id, "gpu": gpu_uuid or "host"}
        self.pickups = Counter(
            "harvest_lender_pickups", "Allocations handed out.", labels, registry=self.registry
        ).labels(**self._labels)
        self.refused = Counter(
            "harvest_lender_pickups_refused",
            "Pick-ups refused (token, uid, ended lease).",
            labels,
            registry=self.registry,
        ).labels(**self._labels)
        self.frees = Counter(
            "harvest_lender_frees",
            "Allocations taken back, by whether they could be pooled.",
            labels + ["clean"],
            registry=self.registry,
        )
        self.pickup_latency = Histogram(
            "harvest_lender_pickup_latency_seconds",
            "From a pick-up request to the fd sent.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(**self._labels)
        self.tenant_latency = Histogram(
            "harvest_lender_tenant_reclaim_seconds",
            "From seeing the tenant's pressure to the memory being free.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        ).labels(**self._labels)
        self.registry.register(_PoolCollector(memory, self._labels))

    def freed(self, clean: bool) -> None:
        """An allocation came back."""
        self.frees.labels(clean=str(clean).lower(), **self._labels).inc()

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``addr:port``."""
        start_http_server(port, addr=addr, registry=self.registry)
        log.info("lender metrics on http://%s:%d/metrics", addr, port)


class _PoolCollector(Collector):
    def __init__(self, memory: Callable[[], dict[str, int]], labels: dict[str, str]) -> None:
        self._memory = memory
        self._labels = labels

    def collect(self):
        family = GaugeMetricFamily(
            "harvest_lender_memory_bytes",
            "The lender's memory, by kind.",
            labels=["lender", "gpu", "kind"],
        )
        values = [self._labels["lender"], self._labels["gpu"]]
        for kind, value in self._memory().items():
            family.add_metric(values + [kind], value)
        yield family
