"""The lock between a placed tensor's users and the remaps under it: uses share it, a
remap (a revocation's fence, a refill's placement) has it alone. A remap that waits
goes before uses that have not begun, so a stream of uses cannot starve a revocation."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from harvestd.errors import FailedPrecondition


class RemapLock:
    """Shared for uses (re-entrant per thread), exclusive for remaps, remaps first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users: dict[int, int] = {}  # thread id: depth of its use() blocks
        self._remapping = False
        self._waiting = 0  # remaps waiting for the uses in flight

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Hold off remaps while the block runs. A thread already in a ``use`` block
        enters again at once: a remap waiting for it would otherwise wait for itself."""
        user = self.begin_use()
        try:
            yield
        finally:
            self.end_use(user)

    def begin_use(self) -> int:
        """:meth:`use`'s start, for a use that ends elsewhere (when the views a KV cache
        returned die); returns the user to pass to :meth:`end_use`, which any thread
        may call. Plain calls rather than a generator: a decode step makes a few of
        these per layer, and the generator's overhead showed in its time."""
        me = threading.get_ident()
        with self._cond:
            if not self._users.get(me):
                while self._remapping or self._waiting:
                    self._cond.wait()
            self._users[me] = self._users.get(me, 0) + 1
        return me

    def end_use(self, user: int) -> None:
        """End one use that :meth:`begin_use` began (``user``: what it returned)."""
        with self._cond:
            self._users[user] -= 1
            if not self._users[user]:
                del self._users[user]
                if self._waiting:  # only a remap waits for the uses to end
                    self._cond.notify_all()

    @contextlib.contextmanager
    def remap(self) -> Iterator[None]:
        """Wait for every use in flight (no new one starts meanwhile), then run alone."""
        self.begin_remap()
        try:
            yield
        finally:
            self.end_remap()

    def begin_remap(self) -> None:
        """:meth:`remap`'s start, for a remap whose two halves run apart (a revocation's:
        the lease is cut, acknowledged, then the host pages mapped back); every
        ``begin_remap`` needs its :meth:`end_remap`, which any thread may call."""
        with self._cond:
            if self._users.get(threading.get_ident()):
                raise FailedPrecondition(
                    "a remap cannot run inside a use() block of its own thread"
                )
            self._waiting += 1
            try:
                while self._remapping or self._users:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._remapping = True

    def end_remap(self) -> None:
        """Let uses (and the next remap) in again."""
        with self._cond:
            self._remapping = False
            self._cond.notify_all()
