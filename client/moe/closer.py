"""Ending an offloaded layer's fetch off the model's thread: the model queues the next
layer's kernels while the copies run, and the fetch's leases stay in use (their fence
held off) until the copies are done."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from client.cache.fetch import Fetch

log = logging.getLogger(__name__)


class FetchCloser:
    """Ends fetches once their copies have completed, on a thread of its own, so that
    the model's thread never waits for a copy: it queues the next layer's kernels while
    the copies run (the kernels that need a fetched expert wait for it on the device).
    The fetch's leases stay in use, fence held off, until the copies are done."""

    def __init__(self, on_redone: Callable[[Fetch, list[int]], None]) -> None:
        self._queue: queue.SimpleQueue[Fetch | None] = queue.SimpleQueue()
        self._pending = 0
        self._idle = threading.Condition()
        self._on_redone = on_redone
        self._thread = threading.Thread(target=self._run, name="harvest-moe-closer", daemon=True)
        self._thread.start()

    def add(self, fetch: Fetch) -> None:
        """End ``fetch`` once its copies complete."""
        with self._idle:
            self._pending += 1
        self._queue.put(fetch)

    def _run(self) -> None:
        while (fetch := self._queue.get()) is not None:
            try:
                redone = fetch.wait()
                if redone:
                    self._on_redone(fetch, redone)
            except Exception:  # noqa: BLE001 - the closer must outlive one bad fetch
                log.exception("ending a fetch failed")
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until every fetch handed over has ended."""
        with self._idle:
            self._idle.wait_for(lambda: self._pending == 0, timeout)

    def stop(self) -> None:
        """End what is queued, then the thread."""
        self.drain()
        self._queue.put(None)
        self._thread.join(timeout=10)
