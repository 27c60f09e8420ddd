"""Whole-layer fetches for :class:`client.kv.HarvestCache`: a layer's full K/V blocks on
their way from the tiered cache into one of two reused staging buffers, on the cache's
own CUDA stream, so that the next layer's copy runs while this layer computes.

A fetch holds ``lease.use()`` on the slabs it reads until it is finished, and a
revocation waits for that (up to its grace period). A fetch launched for a step that
never comes (the end of ``generate``, a loop that stopped) would hold the tenant's memory
for the whole grace. So a watchdog thread finishes the fetches of a cache that has been
idle (no layer launched or taken) for ``release_idle_s``, once their copies are complete:
the uses end, and a revocation of an idle cache goes through at once. The consumer
later finds the fetch finished and only orders its stream after it. While decoding goes
on the watchdog touches nothing, however long a layer's copy takes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch

from client.cache.fetch import Fetch
from client.cache.tiered import TieredCache

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LayerFetch:
    """One layer's first ``blocks`` full blocks, on their way into staging rows."""

    layer: int
    epoch: int  # the layer's epoch at launch: a crop or reset starts a new one
    blocks: int
    buffer: int  # which staging buffer
    rows: torch.Tensor  # [blocks, block bytes] (uint8) in that buffer
    fetch: Fetch
    finished: bool = False
    redone: list[int] = field(default_factory=list)


@dataclass
class FetchStats:
    """What the layer fetches moved, and what they cost the caller's thread."""

    fetches: int = 0
    blocks: int = 0
    bytes: int = 0
    launch_s: float = 0.0  # launching copies (on the CPU)
    wait_s: float = 0.0  # blocked until copies were complete (not hidden behind compute)
    redone_rows: int = 0  # rows read again from their source: a revocation overlapped
    released_idle: int = 0  # fetches the watchdog finished because nobody consumed them
    discarded: int = 0  # fetches made stale (crop, reset, layers out of order)


class Prefetcher:
    """Layer fetches into two staging buffers, at most one in flight per buffer.

    Used from the model's thread; the only other thread is its own watchdog, and both
    go through one lock."""

    def __init__(self, cache: TieredCache, release_idle_s: float | None = 0.05) -> None:
        self.cache = cache
        self.release_idle_s = release_idle_s
        self.stats = FetchStats()
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._inflight: list[LayerFetch | None] = [None, None]
        # Re-entrant: a finalizer closing this from inside a locked section (garbage
        # collection runs anywhere) must not deadlock.
        self._lock = threading.RLock()
        self._active = time.monotonic()  # last launch or take
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def device_bytes(self) -> int:
        """Bytes of the staging buffers."""
        return sum(b.numel() for b in self._buffers if b is not None)

    def launch(
        self,
        layer: int,
        epoch: int,
        keys: Sequence[Hashable],
        row_bytes: int,
        keep: int | None = None,
    ) -> LayerFetch:
        """Start fetching ``keys`` (a layer's first blocks, in order) into a staging buffer
        that does not hold the fetch of layer ``keep``; a fetch it replaces is finished
        and dropped. The same fetch in flight already is returned as it is."""
        with self._lock:
            self._active = time.monotonic()
            for pending in self._inflight:
                if (
                    pending is not None
                    and pending.layer == layer
                    and pending.epoch == epoch
                    and pending.blocks == len(keys)
                ):
                    return pending
            buffer = self._free_buffer(layer, keep)
            old = self._inflight[buffer]
            if old is not None:
                self._inflight[buffer] = None
                self._finish(old)
                self.stats.discarded += 1
            rows = self._staging(buffer, len(keys) * row_bytes).view(len(keys), row_bytes)
            began = time.perf_counter()
            fetch = self.cache.fetch(keys, rows)
            self.stats.launch_s += time.perf_counter() - began
            self.stats.fetches += 1
            self.stats.blocks += len(keys)
            self.stats.bytes += len(keys) * row_bytes
            pending = LayerFetch(layer, epoch, len(keys), buffer, rows, fetch)
            self._inflight[buffer] = pending
            self._watch()
            return pending

    def take(self, layer: int, epoch: int, blocks: int) -> LayerFetch | None:
        """The fetch of ``layer``'s current blocks, finished, its rows ready on the
        caller's stream; None if there is none (a stale one is finished and dropped).
        Its buffer is free for the next launch, which the cache stream orders after the
        caller's work: consume the rows on this stream before launching again."""
        found = None
        with self._lock:
            self._active = time.monotonic()
            for buffer, pending in enumerate(self._inflight):
                if pending is None or pending.layer != layer:
                    continue
                self._inflight[buffer] = None
                self._finish(pending)
                if pending.epoch == epoch and pending.blocks == blocks:
                    found = pending
                else:
                    self.stats.discarded += 1
        return found

    def _free_buffer(self, layer: int, keep: int | None) -> int:
        """A stale fetch of the same layer's buffer, else an empty one, else the one not
        holding ``keep``'s fetch."""
        for wanted in (
            lambda p: p is not None and p.layer == layer,
            lambda p: p is None,
            lambda p: p.layer != keep,
        ):
            for buffer, pending in enumerate(self._inflight):
                if wanted(pending):
                    return buffer
        # Unreachable (one fetch per layer at most); were it not, dropping the kept fetch
        # costs only its consumer a fetch of its own.
        return 0

    def _staging(self, buffer: int, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of a staging buffer, grown by doubling. Only a buffer
        with no fetch in flight is grown: its old memory is free on every stream."""
        buf = self._buffers[buffer]
        if buf is None or buf.numel() < nbytes:
            size = max(nbytes, 2 * buf.numel() if buf is not None else 0)
            self._buffers[buffer] = None  # let the old one go before the new one comes
            buf = torch.empty(size, dtype=torch.uint8, device=self.cache.device)
            self._buffers[buffer] = buf
        return buf[:nbytes]

    def _finish(self, pending: LayerFetch) -> None:
        """Finish a fetch (under the lock); a fetch finished before only orders the
        caller's stream after its copies again."""
        began = time.perf_counter()
        redone = pending.fetch.wait()
        if not pending.finished:
            pending.finished = True
            pending.redone = redone
            self.stats.wait_s += time.perf_counter() - began
            self.stats.redone_rows += len(redone)

    # ------------------------------------------------------------ watchdog

    def _watch(self) -> None:
        """A fetch is in flight: make sure the watchdog looks at it (under the lock)."""
        if self.release_idle_s is None:
            return
        if self._watchdog is None:
            self._watchdog = threading.Thread(
                target=self._run, name="harvest-kv-watchdog", daemon=True
            )
            self._watchdog.start()
        self._wake.set()

    def _run(self) -> None:
        assert self.release_idle_s is not None  # _watch starts this thread only with one
        idle = float(self.release_idle_s)
        while not self._stopped.is_set():
            self._wake.wait()
            if self._stopped.wait(idle):
                return
            with self._lock:
                if time.monotonic() - self._active < idle:
                    continue  # in use: its consumer will finish it
                for pending in self._inflight:
                    # Only complete copies: finishing never blocks, so neither does the lock.
                    if pending is not None and not pending.finished and pending.fetch.done():
                        self._finish(pending)
                        self.stats.released_idle += 1
                        log.debug("cache idle: layer %d fetch finished", pending.layer)
                if all(p is None or p.finished for p in self._inflight):
                    self._wake.clear()  # sleep until the next launch

    def close(self) -> None:
        """Stop the watchdog, finish every fetch in flight, drop the staging buffers."""
        self._stopped.set()
        self._wake.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=10)
        with self._lock:
            for buffer, pending in enumerate(self._inflight):
                if pending is not None:
                    self._inflight[buffer] = None
                    self._finish(pending)
            self._buffers = [None, None]
