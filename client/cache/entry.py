"""What a tiered cache holds and counts: an entry, the tiers a read can come from, and
the reads served by each (shared by the cache and its fetches)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from client import metrics
from client.cache.slabs import Slab


class Tier(str, enum.Enum):
    """Where a read was served from."""

    LOCAL = "local"
    GPU_LEASE = "gpu-lease"
    HOST_LEASE = "host-lease"
    HOST = "host"
    RECOMPUTE = "recompute"


@dataclass(eq=False)
class Entry:
    """One cached object."""

    key: Hashable
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    host: torch.Tensor | None  # authoritative copy (uint8, flat)
    recompute: Callable[[], torch.Tensor] | None  # or a way to make it again
    slot: tuple[Slab, int] | None = None  # borrowed copy: slab, byte offset
    local: torch.Tensor | None = None  # copy on this process's device
    hits: float = 0.0  # uses, decaying (see rebalance)
    last_used: float = field(default_factory=time.monotonic)
    readers: int = 0  # fetches reading it now
    dropped: bool = False  # evicted or replaced while read


@dataclass
class CacheStats:
    """Reads and bytes served, by tier."""

    hits: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    revocations: int = 0
    fallbacks: int = 0  # reads meant for borrowed memory, served from the source instead
    swaps: int = 0  # objects moved into borrowed memory by use
    refills: int = 0  # objects moved back into borrowed memory by the background pass

    def add(self, tier: Tier, nbytes: int, n: int = 1) -> None:
        """Count ``n`` reads of ``nbytes`` in all from ``tier``."""
        self.hits[tier.value] = self.hits.get(tier.value, 0) + n
        self.bytes[tier.value] = self.bytes.get(tier.value, 0) + nbytes
        metrics.CACHE_READS.labels(tier=tier.value).inc(n)
        metrics.CACHE_BYTES.labels(tier=tier.value).inc(nbytes)
