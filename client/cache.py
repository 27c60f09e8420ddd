"""A tiered cache over borrowed memory: objects (an expert's weights, a KV block) keyed
by the caller, each with an authoritative source, served from the fastest tier that
holds them, and never wrong.

Tiers, fastest first: ``local`` (this process's own GPU memory, an LRU of
``local_bytes``), ``gpu-lease`` and ``host-lease`` (slabs borrowed through Harvest), and
``host`` (the authoritative copy, pinned where a GPU reads it) or recomputation. A
revoked lease takes its entries down to the next tier at once; a read that a revocation
overlapped is discarded and served again from the authoritative copy.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch

from client.slabs import Slab, SlabSet
from harvestd.errors import HarvestError, InvalidArgument, LeaseRevoked

log = logging.getLogger(__name__)


class Tier(str, enum.Enum):
    """Where a read was served from."""

    LOCAL = "local"
    GPU_LEASE = "gpu-lease"
    HOST_LEASE = "host-lease"
    HOST = "host"
    RECOMPUTE = "recompute"


@dataclass
class Entry:
    """One cached object."""

    key: Hashable
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    host: torch.Tensor | None                     # authoritative copy (uint8, flat)
    recompute: Callable[[], torch.Tensor] | None  # or a way to make it again
    slot: tuple[Slab, int] | None = None          # borrowed copy: slab, byte offset
    local: torch.Tensor | None = None             # copy on this process's device
    hits: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class CacheStats:
    """Reads and bytes served, by tier."""

    hits: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    revocations: int = 0
    fallbacks: int = 0   # reads a revocation overlapped, served again from the source

    def add(self, tier: Tier, nbytes: int, n: int = 1) -> None:
        """Count ``n`` reads of ``nbytes`` in all from ``tier``."""
        self.hits[tier.value] = self.hits.get(tier.value, 0) + n
        self.bytes[tier.value] = self.bytes.get(tier.value, 0) + nbytes


class TieredCache:
    """See the module docstring. Thread-safe; objects are immutable once put (put the
    same key again to replace one)."""

    def __init__(self, client: Any, device: Any = "cpu", local_bytes: int = 0,
                 borrow_bytes: int = 1 << 30, slab_bytes: int = 64 << 20,
                 backends: Sequence[str] = ("cuda-vmm", "host"), ttl: float | None = None,
                 pin_host: bool | None = None) -> None:
        self.device = torch.device(device)
        self.local_bytes = local_bytes
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._entries: dict[Hashable, Entry] = {}
        self._local: OrderedDict[Hashable, Entry] = OrderedDict()
        self._local_used = 0
        self._pin = self.device.type == "cuda" if pin_host is None else pin_host
        self._slabs = SlabSet(client, self.device, borrow_bytes, slab_bytes, backends, ttl,
                              on_revoke=self._on_revoke)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ------------------------------------------------------------ writing

    def put(self, key: Hashable, value: torch.Tensor | None = None, *,
            recompute: Callable[[], torch.Tensor] | None = None,
            shape: Sequence[int] | None = None, dtype: torch.dtype | None = None) -> Tier:
        """Cache ``value`` under ``key`` (its authoritative copy is kept on the host), or
        register ``recompute`` as its source; returns the fastest tier it now sits in."""
        if value is None and recompute is None:
            raise InvalidArgument("put needs a value or a recompute function")
        if value is None:
            value = recompute()
        host = None
        if recompute is None:
            host = value.detach().to("cpu", copy=True).contiguous().view(-1).view(torch.uint8)
            if self._pin:
                host = host.pin_memory()
        entry = Entry(key, tuple(shape or value.shape), dtype or value.dtype,
                      value.numel() * value.element_size(), host, recompute)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._drop(old)
            self._entries[key] = entry
            slot = self._slabs.take(entry.nbytes)
        if slot is not None:
            self._fill(entry, slot, value)
        return self.tier_of(key)

    def _fill(self, entry: Entry, slot: tuple[Slab, int], value: torch.Tensor) -> None:
        slab, offset = slot
        flat = value.detach().contiguous().view(-1).view(torch.uint8)
        try:
            with slab.lease.use():
                slab.lease.as_bytes()[offset: offset + entry.nbytes].copy_(flat)
        except LeaseRevoked:
            return  # the slab went while we wrote: the entry stays on its source
        with self._lock:
            if self._entries.get(entry.key) is entry and slab.alive:
                entry.slot = slot
            else:
                slab.give(offset)

    def _drop(self, entry: Entry) -> None:
        if entry.slot is not None:
            entry.slot[0].give(entry.slot[1])
            entry.slot = None
        if entry.local is not None:
            self._local.pop(entry.key, None)
            self._local_used -= entry.nbytes
            entry.local = None

    def evict(self, key: Hashable) -> None:
        """Forget ``key`` everywhere."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._drop(entry)

    # ------------------------------------------------------------ reading

    def tier_of(self, key: Hashable) -> Tier:
        """The fastest tier holding ``key`` now."""
        with self._lock:
            entry = self._entry(key)
            if entry.local is not None:
                return Tier.LOCAL
            if entry.slot is not None:
                return Tier.GPU_LEASE if entry.slot[0].on_gpu else Tier.HOST_LEASE
            return Tier.HOST if entry.host is not None else Tier.RECOMPUTE

    def _entry(self, key: Hashable) -> Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"nothing cached under {key!r}") from None

    def get(self, key: Hashable, out: torch.Tensor | None = None) -> torch.Tensor:
        """The object, on the cache's device: the local copy itself if there is one (do not
        write to it), else a copy into ``out`` (or a new tensor)."""
        with self._lock:
            entry = self._entry(key)
            entry.hits += 1
            entry.last_used = time.monotonic()
            if entry.local is not None:
                self._local.move_to_end(key)
                self.stats.add(Tier.LOCAL, entry.nbytes)
                return entry.local if out is None else out.copy_(entry.local)
        if out is None:
            out = torch.empty(entry.shape, dtype=entry.dtype, device=self.device)
        flat = out.view(-1).view(torch.uint8)
        tier = self._read(entry, flat)
        self.stats.add(tier, entry.nbytes)
        self._promote(entry, out)
        return out

    def _read(self, entry: Entry, flat: torch.Tensor) -> Tier:
        slot = entry.slot
        if slot is not None:
            slab, offset = slot
            try:
                with slab.lease.use():
                    flat.copy_(slab.lease.as_bytes()[offset: offset + entry.nbytes])
                return Tier.GPU_LEASE if slab.on_gpu else Tier.HOST_LEASE
            except LeaseRevoked:
                self.stats.fallbacks += 1  # discard what we read: serve it from the source
        return self._read_source(entry, flat)

    def _read_source(self, entry: Entry, flat: torch.Tensor) -> Tier:
        if entry.host is not None:
            flat.copy_(entry.host, non_blocking=False)
            return Tier.HOST
        flat.copy_(entry.recompute().contiguous().view(-1).view(torch.uint8))
        return Tier.RECOMPUTE

    def _promote(self, entry: Entry, value: torch.Tensor) -> None:
        """Keep the most recently used objects on the device, within ``local_bytes``."""
        if entry.nbytes > self.local_bytes or self.device.type == "cpu" and entry.host is not None:
            return
        with self._lock:
            if self._entries.get(entry.key) is not entry or entry.local is not None:
                return
            while self._local_used + entry.nbytes > self.local_bytes and self._local:
                _, victim = self._local.popitem(last=False)
                victim.local = None
                self._local_used -= victim.nbytes
            entry.local = value.clone()
            self._local[entry.key] = entry
            self._local_used += entry.nbytes

    def get_many(self, keys: Sequence[Hashable], out: torch.Tensor) -> torch.Tensor:
        """Objects of one size into the rows of ``out`` (``[len(keys), ...]``), with one
        gather per slab rather than one copy per object."""
        if out.shape[0] != len(keys):
            raise InvalidArgument(f"out has {out.shape[0]} rows for {len(keys)} keys")
        rows = out.view(len(keys), -1).view(torch.uint8)
        by_slab: dict[int, tuple[Slab, list[int], list[int]]] = {}
        rest = []
        with self._lock:
            entries = [self._entry(k) for k in keys]
            for i, entry in enumerate(entries):
                if entry.nbytes != rows.shape[1]:
                    raise InvalidArgument(f"{entry.key!r} has {entry.nbytes} bytes; rows of "
                                          f"out have {rows.shape[1]}")
                entry.hits += 1
                entry.last_used = time.monotonic()
                if entry.local is not None:
                    rows[i].copy_(entry.local.view(-1).view(torch.uint8))
                    self.stats.add(Tier.LOCAL, entry.nbytes)
                elif entry.slot is not None:
                    slab, offset = entry.slot
                    group = by_slab.setdefault(id(slab), (slab, [], []))
                    group[1].append(i)
                    group[2].append(offset)
                else:
                    rest.append(i)
        for slab, index, offsets in by_slab.values():
            try:
                block = torch.empty((len(index), rows.shape[1]), dtype=torch.uint8,
                                    device=rows.device)
                slab.lease.gather(offsets, rows.shape[1], block)
                rows[torch.tensor(index, device=rows.device)] = block
                self.stats.add(Tier.GPU_LEASE if slab.on_gpu else Tier.HOST_LEASE,
                               rows.shape[1] * len(index), len(index))
            except (LeaseRevoked, HarvestError):
                self.stats.fallbacks += len(index)
                rest.extend(index)
        for i in rest:
            self.stats.add(self._read_source(entries[i], rows[i]), rows.shape[1])
        return out

    def prefetch(self, keys: Iterable[Hashable]) -> None:
        """Bring objects to the local tier ahead of use, on the cache's own CUDA stream."""
        if self.stream is None:
            return
        with torch.cuda.stream(self.stream):
            for key in keys:
                with self._lock:
                    entry = self._entries.get(key)
                    if entry is None or entry.local is not None:
                        continue
                self._promote(entry, self.get(key))

    # ------------------------------------------------------------ revocation

    def _on_revoke(self, slab: Slab) -> None:
        """A slab's lease is gone: its entries fall to their source, now."""
        with self._lock:
            lost = [e for e in self._entries.values()
                    if e.slot is not None and e.slot[0] is slab]
            for entry in lost:
                entry.slot = None
            self.stats.revocations += 1
        log.info("slab %s revoked: %d entries fall back to their source", slab.lease.id,
                 len(lost))

    def refill(self) -> int:
        """Put entries that lost their borrowed copy back into borrowed memory, as far as
        the budget and the lenders allow; returns how many moved up."""
        moved = 0
        with self._lock:
            waiting = sorted((e for e in self._entries.values()
                              if e.slot is None and e.local is None and e.host is not None),
                             key=lambda e: (-e.hits, -e.last_used))
        for entry in waiting:
            with self._lock:
                slot = self._slabs.take(entry.nbytes)
            if slot is None:
                break
            self._fill(entry, slot, entry.host)
            moved += entry.slot is not None
        return moved

    def close(self) -> None:
        """Release every borrowed slab."""
        self._slabs.close()

    def __len__(self) -> int:
        return len(self._entries)
