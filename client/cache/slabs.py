"""Borrowed memory for a cache, in slabs: leases carved into equal slots, one slot size
per slab, leased on demand within a budget (GPU lenders first, then host lenders)."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

from harvestd.errors import HarvestError, NoCapacity
from harvestd.sizes import round_up

log = logging.getLogger(__name__)

SLOT_ALIGN = 256  # keeps every slot aligned for any dtype and for vectorised copies


class Slab:
    """One lease cut into ``slot_bytes`` slots."""

    def __init__(self, lease: Any, slot_bytes: int) -> None:
        self.lease = lease
        self.slot_bytes = slot_bytes
        self.on_gpu = lease.backend.is_gpu
        self._free = list(range((lease.nbytes // slot_bytes) - 1, -1, -1))
        self.alive = True

    def take(self) -> int | None:
        """A free slot's byte offset, or None."""
        return self._free.pop() * self.slot_bytes if self._free and self.alive else None

    def give(self, offset: int) -> None:
        """Return a slot."""
        if self.alive:
            self._free.append(offset // self.slot_bytes)

    @property
    def empty(self) -> bool:
        """No slot is taken."""
        return len(self._free) == self.lease.nbytes // self.slot_bytes


class SlabSet:
    """The slabs of one cache. Not locked: the cache holds its lock around every call
    except :meth:`grow`, which asks the broker for a lease and must not block readers."""

    # After a lender kind says it has no room, do not ask it again for this long: a full
    # node would otherwise cost an RPC on every put and every refill pass.
    BACKOFF_S = 0.2

    def __init__(
        self,
        client: Any,
        device: Any,
        budget: int,
        slab_bytes: int,
        backends: Sequence[str],
        ttl: float | None,
        on_revoke: Callable[[Slab], None],
    ) -> None:
        self.client = client
        self.device = device
        self.budget = budget
        self.slab_bytes = slab_bytes
        self.backends = list(backends)
        self.ttl = ttl
        self._on_revoke = on_revoke
        self.slabs: list[Slab] = []
        self._full_until: dict[str, float] = {}

    @property
    def leased(self) -> int:
        """Bytes borrowed now."""
        return sum(s.lease.nbytes for s in self.slabs if s.alive)

    def take_existing(self, nbytes: int) -> tuple[Slab, int] | None:
        """A free slot for an object of ``nbytes`` in a slab we hold, or None."""
        slot_bytes = round_up(nbytes, SLOT_ALIGN)
        for slab in self.slabs:
            if slab.alive and slab.slot_bytes == slot_bytes:
                offset = slab.take()
                if offset is not None:
                    return slab, offset
        return None

    def slab_size(self, nbytes: int) -> int:
        """The size of a new slab for objects of ``nbytes``."""
        slot_bytes = round_up(nbytes, SLOT_ALIGN)
        return max(slot_bytes, self.slab_bytes // slot_bytes * slot_bytes)

    def may_grow(self, nbytes: int) -> bool:
        """Whether a new slab for objects of ``nbytes`` fits the budget, and some lender
        kind is worth asking."""
        now = time.monotonic()
        return self.leased + self.slab_size(nbytes) <= self.budget and any(
            self._full_until.get(b, 0.0) <= now for b in self.backends
        )

    def grow(self, nbytes: int) -> Slab | None:
        """Lease a new slab for objects of ``nbytes`` (call without the cache's lock)."""
        slot_bytes = round_up(nbytes, SLOT_ALIGN)
        size = self.slab_size(nbytes)
        for backend in self.backends:
            if self._full_until.get(backend, 0.0) > time.monotonic():
                continue
            try:
                lease = self.client.lease(
                    size,
                    ttl=self.ttl,
                    backend=backend,
                    device=self.device if self.device.type == "cuda" else None,
                )
            except NoCapacity:
                self._full_until[backend] = time.monotonic() + self.BACKOFF_S
                continue
            except HarvestError as err:
                log.info("no %s slab: %s", backend, err)
                self._full_until[backend] = time.monotonic() + self.BACKOFF_S
                continue
            slab = Slab(lease, slot_bytes)
            lease.on_revoke(lambda _lease, _why, slab=slab: self._revoked(slab))
            return slab
        return None

    def add(self, slab: Slab) -> None:
        """Start using a slab made by :meth:`grow` (under the cache's lock)."""
        if slab.alive:
            self.slabs.append(slab)

    def _revoked(self, slab: Slab) -> None:
        slab.alive = False
        self._on_revoke(slab)
        self.slabs = [s for s in self.slabs if s is not slab]

    def close(self) -> None:
        """Release every slab."""
        for slab in list(self.slabs):
            slab.alive = False
            slab.lease.release()
        self.slabs.clear()
