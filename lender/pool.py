"""A lender's pool of allocations, so that a grant need not pay for a fresh allocation.

Memory comes back to the pool only from a lease whose holder is known to have unmapped
it (``clean``); it is zeroed on the way in, so a hand-out is instant and never carries
the last holder's bytes. Memory that a holder may still map is freed instead: handing it
to someone else would let the old holder read the new one's data.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

from harvestd.sizes import round_up
from lender.backends.base import Allocation, Backend

log = logging.getLogger(__name__)


class Pool:
    """Zeroed allocations of one backend, by size."""

    def __init__(self, backend: Backend, keep_bytes: int = 0) -> None:
        self.backend = backend
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()
        self._idle: dict[int, list[Allocation]] = defaultdict(list)
        self.idle_bytes = 0
        self.out_bytes = 0

    def take(self, nbytes: int) -> Allocation:
        """A zeroed allocation of ``nbytes`` rounded up to the backend's granularity."""
        size = round_up(nbytes, self.backend.granularity)
        with self._lock:
            idle = self._idle.get(size)
            alloc = idle.pop() if idle else None
            if alloc is not None:
                self.idle_bytes -= size
            # Counted before the device shows it: a lender watching its tenant must never
            # see its own allocation in flight as the tenant growing.
            self.out_bytes += size
        if alloc is None:
            try:
                alloc = self.backend.allocate(size)
            except BaseException:
                with self._lock:
                    self.out_bytes -= size
                raise
            if alloc.nbytes != size:  # a backend that rounds further
                with self._lock:
                    self.out_bytes += alloc.nbytes - size
        return alloc

    def give_back(self, alloc: Allocation, clean: bool) -> None:
        """Return an allocation: zeroed into the pool if ``clean`` and there is room,
        otherwise freed."""
        with self._lock:
            keep = clean and self.idle_bytes + alloc.nbytes <= self.keep_bytes
            if keep:
                self.out_bytes -= alloc.nbytes
                self.idle_bytes += alloc.nbytes
        if not keep:
            # Counted until the device has it back (see take).
            try:
                self.backend.free(alloc)
            finally:
                with self._lock:
                    self.out_bytes -= alloc.nbytes
            return
        try:
            self.backend.zero(alloc)
        except Exception:  # noqa: BLE001 - never pool memory we could not zero
            log.exception("zeroing failed; freeing the allocation instead")
            with self._lock:
                self.idle_bytes -= alloc.nbytes
            self.backend.free(alloc)
            return
        with self._lock:
            self._idle[alloc.nbytes].append(alloc)

    def trim(self, keep_bytes: int = 0) -> int:
        """Free idle allocations until at most ``keep_bytes`` stay idle; bytes freed."""
        freed = 0
        while True:
            with self._lock:
                if self.idle_bytes <= keep_bytes:
                    return freed
                size = next(s for s, lst in self._idle.items() if lst)
                alloc = self._idle[size].pop()
                self.idle_bytes -= size
                self.out_bytes += size  # counted until freed (see take)
            try:
                self.backend.free(alloc)
            finally:
                with self._lock:
                    self.out_bytes -= size
            freed += size

    def close(self) -> None:
        """Free every idle allocation."""
        self.trim(0)
