"""A tiered cache over borrowed memory: objects (an expert's weights, a KV block) keyed by
the caller, each with an authoritative source, served from the fastest tier that holds
them, and never wrong.

Tiers, fastest first: ``local`` (this process's own device memory, an LRU of
``local_bytes``), ``gpu-lease`` and ``host-lease`` (slabs borrowed through Harvest, GPU
lenders first), and ``host`` (the authoritative copy, pinned where a GPU reads it) or
``recompute``. What lives where: borrowed memory is filled in the order objects are put;
a background pass (``refill_every``) moves objects that lost their borrowed copy back up
when lenders have room again, and swaps a much-used object that found no room for the
least-used one of its size (use counts decay, so recency counts too). A revoked lease
takes its objects down to their source at once; a read that a revocation overlapped is
read again from the source (see :mod:`client.cache.fetch`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch

from client import metrics
from client.cache.entry import CacheStats, Entry, Tier
from client.cache.fetch import DMA_MIN_BYTES, Fetch, Row
from client.cache.slabs import Slab, SlabSet
from harvestd.errors import InvalidArgument, LeaseRevoked

log = logging.getLogger(__name__)


class TieredCache:
    """See the module docstring. Thread-safe; objects are immutable once put (put the
    same key again to replace one).

    ``backends`` orders the lenders borrowed from (``"cuda-vmm"``, ``"cuda-ipc"``,
    ``"host"``); ``borrow_bytes`` caps what is borrowed, in leases of ``slab_bytes``.
    ``refill_every`` (seconds) runs the background pass that refills and rebalances;
    ``None`` leaves it to explicit :meth:`refill` / :meth:`rebalance` calls. The pass
    refills only ``refill_holdoff`` seconds after the last revocation (default
    ``REFILL_HOLDOFF_S``).
    """

    def __init__(
        self,
        client: Any,
        device: Any = "cpu",
        local_bytes: int = 0,
        borrow_bytes: int = 1 << 30,
        slab_bytes: int = 64 << 20,
        backends: Sequence[str] = ("cuda-vmm", "host"),
        ttl: float | None = None,
        pin_host: bool | None = None,
        refill_every: float | None = None,
        refill_holdoff: float | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.local_bytes = local_bytes
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._entries: dict[Hashable, Entry] = {}
        self._local: OrderedDict[Hashable, Entry] = OrderedDict()
        self._local_used = 0
        self._pending: dict[Hashable, tuple[Fetch, torch.Tensor]] = {}
        self._pin = self.device.type == "cuda" if pin_host is None else pin_host
        self._slabs = SlabSet(
            client, self.device, borrow_bytes, slab_bytes, backends, ttl, on_revoke=self._on_revoke
        )
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._fill_stream = torch.cuda.Stream(self.device) if self.stream is not None else None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._last_revocation = 0.0
        self.refill_holdoff = self.REFILL_HOLDOFF_S if refill_holdoff is None else refill_holdoff
        self._refiller: threading.Thread | None = None
        if refill_every is not None:
            self._refiller = threading.Thread(
                target=self._refill_loop,
                args=(refill_every,),
                name="harvest-cache-refill",
                daemon=True,
            )
            self._refiller.start()

    # ------------------------------------------------------------ writing

    def put(
        self,
        key: Hashable,
        value: torch.Tensor | None = None,
        *,
        recompute: Callable[[], torch.Tensor] | None = None,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tier:
        """Cache ``value`` under ``key`` (its authoritative copy is kept on the host), or
        register ``recompute`` as its source; returns the fastest tier it now sits in."""
        if value is None:
            if recompute is None:
                raise InvalidArgument("put needs a value or a recompute function")
            value = recompute()
        host = None
        if recompute is None:
            host = value.detach().to("cpu", copy=True).contiguous().view(-1).view(torch.uint8)
            if self._pin:
                host = host.pin_memory()
        entry = Entry(
            key,
            tuple(shape or value.shape),
            dtype or value.dtype,
            value.numel() * value.element_size(),
            host,
            recompute,
        )
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._drop(old)
            self._entries[key] = entry
        slot = self._take_slot(entry.nbytes)
        if slot is not None:
            self._fill(entry, slot, value)
        return self.tier_of(key)

    def put_many(self, keys: Sequence[Hashable], values: torch.Tensor) -> None:
        """Cache row ``i`` of ``values`` (``[len(keys), ...]``) under ``keys[i]``, in one
        batched write: one copy to the host for every authoritative copy, and one scatter
        per borrowed slab (one copy per row when rows are large). Query :meth:`tier_of`
        for where each landed."""
        n = len(keys)
        if not isinstance(values, torch.Tensor) or values.dim() == 0 or values.shape[0] != n:
            raise InvalidArgument(f"values must be a tensor with {n} rows, one per key")
        if len(set(keys)) != n:
            raise InvalidArgument("keys must be distinct")
        if n == 0:
            return
        rows = values.detach().contiguous().view(n, -1)
        flat = rows.view(torch.uint8) if rows.dtype != torch.uint8 else rows
        # One host buffer for all: entries keep views of its rows (it lives while any does).
        host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=self._pin)
        host.copy_(flat)
        entries = [
            Entry(key, tuple(values.shape[1:]), values.dtype, flat.shape[1], host[i], None)
            for i, key in enumerate(keys)
        ]
        with self._lock:
            for entry in entries:
                old = self._entries.pop(entry.key, None)
                if old is not None:
                    self._drop(old)
                self._entries[entry.key] = entry
        slots: list[tuple[Slab, int]] = []
        for entry in entries:
            slot = self._take_slot(entry.nbytes)
            if slot is None:
                break
            slots.append(slot)
        by_slab: dict[int, tuple[Slab, list[int]]] = {}
        for i, slot in enumerate(slots):
            by_slab.setdefault(id(slot[0]), (slot[0], []))[1].append(i)
        for slab, index in by_slab.values():
            self._fill_rows(
                slab, [entries[i] for i in index], [slots[i][1] for i in index], flat, index
            )

    def _fill_rows(
        self,
        slab: Slab,
        entries: list[Entry],
        offsets: list[int],
        flat: torch.Tensor,
        index: list[int],
    ) -> int:
        """Copy rows ``index`` of ``flat`` into one slab's slots and give the entries
        those slots; how many entries got theirs (an entry replaced meanwhile, or a slab
        revoked, gives its slot back)."""
        nbytes = flat.shape[1]
        written = False
        try:
            with slab.lease.use(device_work=self.stream is not None):
                dst = slab.lease.as_bytes()
                fill_stream = self._fill_stream  # there is one where there is self.stream
                ctx = (
                    torch.cuda.stream(fill_stream)
                    if fill_stream is not None
                    else contextlib.nullcontext()
                )
                if fill_stream is not None:
                    # Its own stream: a fill must not queue behind (or hold up) the
                    # model's work on the default stream.
                    fill_stream.wait_stream(torch.cuda.current_stream(self.device))
                with ctx:
                    if nbytes >= DMA_MIN_BYTES or len(index) == 1:
                        for i, offset in zip(index, offsets, strict=True):
                            dst[offset : offset + nbytes].copy_(flat[i], non_blocking=True)
                    else:
                        from client.blocks import scatter

                        scatter(
                            dst,
                            flat[index[0] : index[-1] + 1]
                            if index[-1] - index[0] == len(index) - 1
                            else flat[index],
                            offsets,
                            nbytes,
                            check=False,
                        )
                if fill_stream is not None:
                    fill_stream.synchronize()  # complete before use() ends
            written = True
        except LeaseRevoked:
            pass  # the slab went while we wrote: these entries stay on their source
        given = 0
        with self._lock:
            for entry, offset in zip(entries, offsets, strict=True):
                if (
                    written
                    and self._entries.get(entry.key) is entry
                    and slab.alive
                    and entry.slot is None
                ):
                    entry.slot = (slab, offset)
                    given += 1
                else:
                    slab.give(offset)
        return given

    def _take_slot(self, nbytes: int) -> tuple[Slab, int] | None:
        """A borrowed slot for ``nbytes``: in a slab we hold, else in a new one (leased
        without holding the lock, so that reads go on meanwhile)."""
        with self._lock:
            slot = self._slabs.take_existing(nbytes)
            if slot is not None or not self._slabs.may_grow(nbytes):
                return slot
        slab = self._slabs.grow(nbytes)
        if slab is None:
            return None
        with self._lock:
            self._slabs.add(slab)
            return self._slabs.take_existing(nbytes)

    def _fill(self, entry: Entry, slot: tuple[Slab, int], value: torch.Tensor) -> bool:
        """Copy ``value`` into a borrowed slot and give the entry that slot; whether it
        got it (see :meth:`_fill_rows`)."""
        flat = value.detach().contiguous().view(1, -1).view(torch.uint8)
        return self._fill_rows(slot[0], [entry], [slot[1]], flat, [0]) == 1

    def _drop(self, entry: Entry) -> None:
        """Forget an entry's copies (its borrowed slot once nobody reads it)."""
        entry.dropped = True
        if entry.slot is not None and entry.readers == 0:
            entry.slot[0].give(entry.slot[1])
            entry.slot = None
        if entry.local is not None:
            self._local.pop(entry.key, None)
            self._local_used -= entry.nbytes
            entry.local = None
        self._pending.pop(entry.key, None)

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
                return self._slab_tier(entry.slot[0])
            return Tier.HOST if entry.host is not None else Tier.RECOMPUTE

    @staticmethod
    def _slab_tier(slab: Slab) -> Tier:
        return Tier.GPU_LEASE if slab.on_gpu else Tier.HOST_LEASE

    def _entry(self, key: Hashable) -> Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"nothing cached under {key!r}") from None

    def fetch(self, keys: Sequence[Hashable], out: torch.Tensor) -> Fetch:
        """Start reading objects of one size into the rows of ``out``
        (``[len(keys), ...]``, contiguous): borrowed objects with one gather per slab
        (or one copy each when large), on the cache's own CUDA stream. Returns the
        :class:`~client.cache.fetch.Fetch`; its ``wait()`` finishes it."""
        self._finish_pending(keys)
        if not out.is_contiguous() or out.dim() == 0 or out.shape[0] != len(keys):
            raise InvalidArgument(f"out must be contiguous with {len(keys)} rows, one per key")
        row_bytes = out.numel() * out.element_size() // max(1, len(keys))
        now = time.monotonic()
        rows = []
        with self._lock:
            for i, key in enumerate(keys):
                entry = self._entry(key)
                if entry.nbytes != row_bytes:
                    raise InvalidArgument(
                        f"{entry.key!r} has {entry.nbytes} bytes; rows of out have {row_bytes}"
                    )
                entry.hits += 1
                entry.last_used = now
                entry.readers += 1
                if entry.local is not None:
                    self._local.move_to_end(key)
                rows.append(Row(i, entry, entry.local, entry.slot))
        return Fetch(
            rows, out, self.stream, self._read_source, self._slab_tier, Tier.LOCAL, self._fetched
        ).start()

    def _read_source(self, entry: Entry, flat: torch.Tensor) -> Tier:
        if entry.host is not None:
            flat.copy_(entry.host, non_blocking=True)
            return Tier.HOST
        assert entry.recompute is not None  # an entry has a host copy or a recompute
        flat.copy_(entry.recompute().contiguous().view(-1).view(torch.uint8))
        return Tier.RECOMPUTE

    def _fetched(self, fetch: Fetch) -> None:
        """A fetch is over: count it, and let go of what it read."""
        metrics.CACHE_FETCH_LATENCY.observe(time.perf_counter() - fetch.started)
        # Counted once per tier, not per row: a metric's labels().inc() costs microseconds,
        # and a fetch may have hundreds of rows.
        served: dict[Tier, list[int]] = {}
        fallbacks = 0
        with self._lock:
            for row in fetch.rows:
                entry = row.entry
                entry.readers -= 1
                if entry.dropped and entry.readers == 0 and entry.slot is not None:
                    entry.slot[0].give(entry.slot[1])
                    entry.slot = None
                if row.tier is None:
                    continue
                count = served.setdefault(row.tier, [0, 0])
                count[0] += 1
                count[1] += entry.nbytes
                if row.slot is not None and row.tier in (Tier.HOST, Tier.RECOMPUTE):
                    fallbacks += 1
            for tier, (n, nbytes) in served.items():
                self.stats.add(tier, nbytes, n)
            if fallbacks:
                self.stats.fallbacks += fallbacks
                metrics.CACHE_FALLBACKS.inc(fallbacks)

    def get_many(self, keys: Sequence[Hashable], out: torch.Tensor) -> torch.Tensor:
        """Objects of one size into the rows of ``out`` (``[len(keys), ...]``); returns
        ``out`` once they are there (see :meth:`fetch` for the asynchronous form)."""
        self.fetch(keys, out).wait()
        return out

    def get(self, key: Hashable, out: torch.Tensor | None = None) -> torch.Tensor:
        """The object, on the cache's device: the local copy itself if there is one (do not
        write to it), else a copy into ``out`` (or a new tensor)."""
        self._finish_pending([key])
        with self._lock:
            entry = self._entry(key)
            if entry.local is not None and out is None:
                entry.hits += 1
                entry.last_used = time.monotonic()
                self._local.move_to_end(key)
                self.stats.add(Tier.LOCAL, entry.nbytes)
                return entry.local
        if out is None:
            out = torch.empty(entry.shape, dtype=entry.dtype, device=self.device)
        self.fetch([key], out.view(1, -1)).wait()
        self._promote(entry, out)
        return out

    def _promote(self, entry: Entry, value: torch.Tensor, copy: bool = True) -> None:
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
            entry.local = value.clone() if copy else value
            self._local[entry.key] = entry
            self._local_used += entry.nbytes

    def prefetch(self, keys: Iterable[Hashable]) -> None:
        """Start bringing objects to the local tier, on the cache's own CUDA stream; a
        later :meth:`get` or :meth:`fetch` of them finds them there (it waits for the copy
        if it has not landed yet). A no-op for a cache on the CPU."""
        if self.stream is None or self.local_bytes <= 0:
            return
        for key in keys:
            with self._lock:
                entry = self._entries.get(key)
                if (
                    entry is None
                    or entry.local is not None
                    or key in self._pending
                    or entry.nbytes > self.local_bytes
                ):
                    continue
            buf = torch.empty(entry.shape, dtype=entry.dtype, device=self.device)
            fetch = self.fetch([key], buf.view(1, -1))
            with self._lock:
                self._pending[key] = (fetch, buf)

    def _finish_pending(self, keys: Iterable[Hashable]) -> None:
        if not self._pending:
            return
        for key in keys:
            with self._lock:
                pending = self._pending.pop(key, None)
            if pending is not None:
                fetch, buf = pending
                fetch.wait()
                self._promote(fetch.rows[0].entry, buf, copy=False)

    # ------------------------------------------------------------ revocation and refill

    def _on_revoke(self, slab: Slab) -> None:
        """A slab's lease is gone: its entries fall to their source, now."""
        with self._lock:
            lost = [e for e in self._entries.values() if e.slot is not None and e.slot[0] is slab]
            for entry in lost:
                entry.slot = None
            self.stats.revocations += 1
            self._last_revocation = time.monotonic()
        metrics.CACHE_REVOCATIONS.inc()
        self._wake.set()
        log.info("slab %s revoked: %d entries fall back to their source", slab.lease.id, len(lost))

    def refill(self) -> int:
        """Put entries that lost their borrowed copy back into borrowed memory, as far as
        the budget and the lenders allow, most used first; returns how many moved up."""
        moved = 0
        with self._lock:
            waiting = sorted(
                (
                    e
                    for e in self._entries.values()
                    if e.slot is None and e.local is None and e.host is not None
                ),
                key=lambda e: (-e.hits, -e.last_used),
            )
        for entry in waiting:
            if self._entries.get(entry.key) is not entry:
                continue
            assert entry.host is not None  # chosen for having one (it never changes)
            slot = self._take_slot(entry.nbytes)
            if slot is None:
                break
            moved += self._fill(entry, slot, entry.host)
        return moved

    def rebalance(self, decay: float = 0.5) -> int:
        """Swap objects that are used much more than others of their size into those
        others' borrowed slots; then decay every use count by ``decay``, so that old use
        fades. Returns how many objects moved up."""
        swapped = 0
        with self._lock:
            outside = sorted(
                (
                    e
                    for e in self._entries.values()
                    if e.slot is None and e.local is None and e.host is not None
                ),
                key=lambda e: -e.hits,
            )
            inside = sorted(
                (e for e in self._entries.values() if e.slot is not None and e.readers == 0),
                key=lambda e: (e.hits, e.last_used),
            )
        for hot in outside:
            assert hot.host is not None  # chosen for having one (it never changes)
            cold = next(
                (e for e in inside if e.nbytes == hot.nbytes and hot.hits > 2 * e.hits + 1), None
            )
            if cold is None:
                continue
            inside.remove(cold)
            with self._lock:
                if cold.slot is None or cold.readers or hot.slot is not None:
                    continue
                slot, cold.slot = cold.slot, None
            if self._fill(hot, slot, hot.host):
                swapped += 1
        with self._lock:
            for entry in self._entries.values():
                entry.hits *= decay
            self.stats.swaps += swapped
        return swapped

    # Moving objects back right after a revocation feeds them to the next one while a
    # tenant is still taking memory back (each move crosses the link): wait this long
    # after the last revocation. Meanwhile reads come from the authoritative copy, so
    # throughput degrades toward the source's rather than below it.
    REFILL_HOLDOFF_S = 1.0

    # Swapping objects by use moves whole objects over the link: not more often than
    # this, and not while revocations come in (lenders are taking memory back then, and
    # a swap would only evict what is still read).
    REBALANCE_EVERY_S = 2.0

    def _refill_loop(self, every: float) -> None:
        last_rebalance = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(every)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                now = time.monotonic()
                if now - self._last_revocation >= self.refill_holdoff:
                    self.stats.refills += self.refill()
                if now - max(last_rebalance, self._last_revocation) >= self.REBALANCE_EVERY_S:
                    last_rebalance = now
                    self.rebalance()
            except Exception:  # noqa: BLE001 - the pass retries; reads never depend on it
                log.exception("cache refill failed")

    def close(self) -> None:
        """Stop the background pass and release every borrowed slab."""
        self._stop.set()
        self._wake.set()
        if self._refiller is not None:
            self._refiller.join(timeout=10)
        for fetch, _ in list(self._pending.values()):
            fetch.wait()
        self._pending.clear()
        self._slabs.close()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def borrowed_bytes(self) -> int:
        """Bytes leased by this cache now."""
        return self._slabs.leased
