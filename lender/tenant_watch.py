"""A lender's watch over its device's own tenant: it looks every few milliseconds, and
when the tenant needs memory back (its use, its recent peak, where its ramp is heading,
or room it asked for) it gives it: idle pooled memory first, then leases, through the
broker. Each reclaim leaves a :class:`ReclaimTrace` of where its time went.

The watch runs in its own thread and never waits for a reclaim: it tells the broker the
lower capacity and has it revoke down to it (a ``Reclaim`` call in a thread of its own),
then looks again a few milliseconds later, and asks for more if the tenant went on
growing. One look runs at a time (the watch's, or a tenant's request for room,
:meth:`make_room`, over the pick-up socket); a reclaim spans the looks from the first
that found too much held to the one that found it all given back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol

from harvestd.errors import HarvestError
from lender.capacity import Capacity
from lender.pool import Pool

log = logging.getLogger(__name__)

# How long room a tenant asked for stays promised if it never takes it.
ROOM_PROMISE_S = 10.0


class Broker(Protocol):
    """The two broker calls a reclaim makes, bound to the lender's id and generation."""

    def report(self, capacity: int) -> None:
        """Tell the broker what the lender may hold now."""

    def reclaim(self) -> Any:
        """Have the broker revoke leases down to the reported capacity; returns once their
        memory is free (the broker's ``ReclaimReply``)."""


@dataclass
class ReclaimTrace:
    """Where one reclaim's time went (seconds from its start) and what it did."""

    why: str  # "pressure" (the watch saw it) or "room" (the tenant asked)
    started_at: float  # monotonic
    held_before: int
    lendable: int
    pool_trimmed_s: float = 0.0  # idle pooled memory freed: no borrower noticed
    reported_s: float = 0.0  # the broker heard the new capacity
    revoked_s: float = 0.0  # the last Reclaim call answered (its leases freed)
    done_s: float = 0.0  # the lender held no more than it may
    revoked: int = 0  # leases revoked
    broker_s: float = 0.0  # the broker's own count, Reclaim received to memory freed
    held_after: int = 0
    freed_s: list[float] = field(default_factory=list)  # each lease's memory released

    def as_dict(self) -> dict[str, Any]:
        """For logs and ``Lender.info()``."""
        return asdict(self)


class TenantWatch:
    """See the module docstring. ``held``: the lender's bytes held for lending now."""

    def __init__(
        self,
        capacity: Capacity,
        pool: Pool,
        broker: Broker,
        held: Callable[[], int],
        interval_s: float,
        lender_id: str = "",
    ) -> None:
        self.capacity = capacity
        self.pool = pool
        self.broker = broker
        self._held = held
        self.interval_s = interval_s
        self.reported = -1  # capacity the broker last heard (-1: not yet)
        self.last: ReclaimTrace | None = None
        self.on_reclaim: Callable[[ReclaimTrace], None] = lambda trace: None
        self._lock = threading.Lock()
        self._episode: ReclaimTrace | None = None  # the reclaim under way
        self._asked = -1  # the lowest capacity a Reclaim call in flight revokes down to
        self._in_flight = 0
        self._log = logging.LoggerAdapter(log, {"lender": lender_id})

    # ------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> None:
        """Look at the tenant until ``stop``: give it room when it needs memory back."""
        while not stop.wait(self.interval_s):
            try:
                self.look()
            except HarvestError as err:
                if not stop.is_set():
                    self._log.info("tenant watch failed: %s", err)
            except Exception:  # noqa: BLE001 - NVML hiccups must not stop the watch
                self._log.exception("tenant watch failed")

    def look(self, why: str = "pressure") -> int:
        """One look: when the lender holds more than it may, free idle pooled memory and
        have the broker revoke leases down to what it may hold (without waiting: the
        next look, a few milliseconds on, revokes more if the tenant went on growing);
        when what it may lend fell, tell the broker at once so that it grants none of
        it. Returns what the lender may hold now."""
        with self._lock:
            lendable = self.capacity.lendable(self._held())
            episode = self._episode
            if episode is not None:
                # A tenant ramping into lent memory stalls while it waits for it, so
                # mid-reclaim it looks as if it needs less than it will. What this reclaim
                # set out to give back stays given back (freed, not pooled or re-lent)
                # until the reclaim ends: otherwise the last leases' memory is pooled, and
                # the tenant waits for a second reclaim to get it.
                lendable = min(lendable, episode.lendable)
            # Under pressure, memory coming back is freed at once (not zeroed and kept).
            self.pool.keep_bytes = min(
                self.capacity.pool_bytes(), max(0, lendable - self.pool.out_bytes)
            )
            if self._held() > lendable:
                self._press(lendable, why)
            elif 0 <= lendable < self.reported:
                self.broker.report(lendable)
                self.reported = lendable
            self._settle(lendable)
            return lendable

    def busy(self) -> bool:
        """Whether a reclaim is under way."""
        return self._episode is not None

    # ------------------------------------------------------------ the tenant asks

    def make_room(self, nbytes: int, timeout_s: float = 30.0) -> tuple[float, int]:
        """The tenant asks for ``nbytes`` now: keep them out of lending and free them;
        returns ``(seconds it took, what the lender may hold now)`` once they are free
        (or ``timeout_s`` passed)."""
        start = time.monotonic()
        self.capacity.promise(nbytes, ROOM_PROMISE_S)
        lendable = self.look("room")
        while self.busy() and time.monotonic() - start < timeout_s:
            time.sleep(min(self.interval_s, 0.002))
            lendable = self.look("room")
        return time.monotonic() - start, lendable

    def freed(self) -> None:
        """A lease's memory was released (by the lender's free thread): part of the
        reclaim under way, if one is."""
        trace = self._episode
        if trace is not None:
            trace.freed_s.append(time.monotonic() - trace.started_at)

    # ------------------------------------------------------------ reclaiming

    def _press(self, lendable: int, why: str) -> None:
        """Free the idle pool first (no borrower notices); if that is not enough, tell
        the broker what we may hold now and have it revoke leases down to it."""
        now = time.monotonic()
        trace = self._episode
        if trace is None:
            trace = self._episode = ReclaimTrace(why, now, self._held(), lendable)
        trace.lendable = min(trace.lendable, lendable)
        self.pool.trim(max(0, lendable - self.pool.out_bytes))
        if not trace.pool_trimmed_s:
            trace.pool_trimmed_s = time.monotonic() - trace.started_at
        if self.pool.out_bytes <= lendable:
            return
        # A Reclaim call in flight already revokes down to _asked: another one only for
        # a target lower by at least a lease's worth of granularity.
        if self._in_flight and lendable >= self._asked - self.pool.backend.granularity:
            return
        self.broker.report(lendable)
        self.reported = self._asked = lendable
        if not trace.reported_s:
            trace.reported_s = time.monotonic() - trace.started_at
        self._in_flight += 1
        threading.Thread(
            target=self._reclaim, args=(trace,), name="harvest-reclaim", daemon=True
        ).start()

    def _reclaim(self, trace: ReclaimTrace) -> None:
        try:
            reply = self.broker.reclaim()
        except HarvestError as err:
            self._log.info("reclaim call failed: %s", err)
            reply = None
        with self._lock:
            self._in_flight -= 1
            if reply is not None:
                trace.revoked += len(reply.revoked)
                trace.broker_s = max(trace.broker_s, reply.elapsed_s)
                trace.revoked_s = time.monotonic() - trace.started_at
        # Settle at once rather than at the next look.
        with contextlib.suppress(HarvestError):
            self.look(trace.why)

    def _settle(self, lendable: int) -> None:
        """End the reclaim under way once the lender holds no more than it may and no
        Reclaim call is in flight."""
        trace = self._episode
        if trace is None or self._in_flight or self._held() > lendable:
            return
        self.pool.trim(max(0, lendable - self.pool.out_bytes))
        trace.done_s = time.monotonic() - trace.started_at
        trace.held_after = self._held()
        self._episode = None
        self.capacity.reclaimed_in(trace.done_s)
        self.last = trace
        self.on_reclaim(trace)
        self._log.info("reclaim for the tenant: %s", json.dumps(trace.as_dict()))
