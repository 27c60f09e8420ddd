"""What every process's metrics share (the latency buckets), and what the lease table
counts through the :class:`Observer` seam: its events and latencies. The broker's
registry is :mod:`harvestd.broker_metrics`."""

from __future__ import annotations

from typing import Protocol

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
