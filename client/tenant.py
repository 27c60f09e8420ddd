"""The device's own job, cooperating with its lender: allocations that meet lent memory
wait for the lender to give it back, instead of failing.

A GPU's tenant owns the GPU; Harvest lends only what the tenant does not use (above its
recent peak and a reserve, see :mod:`lender.tenant`). A tenant that grows faster than a
reclaim runs can still meet lent memory. PyTorch offers no hook that retries an
allocation: its caching allocator frees its own cache and raises ``OutOfMemoryError``,
and an out-of-memory observer cannot make it try again; a pluggable allocator would
need a compiled allocator of ours in every tenant. So the cooperating tenant does one of
two things, both plain Python around its own allocations:

* ``with tenant.room(nbytes):`` before a growth it knows of (a batch of long prompts, a
  training step's activations): the lender makes ``nbytes`` free, revoking leases if it
  must, and the block starts once the memory is free;
* ``tenant.allocate(make, nbytes)``: runs ``make()``; if it fails for lack of memory,
  asks the lender for room and runs it again, until ``timeout``.

The request goes straight to the lender over its pick-up socket (same user only, as for
pick-ups): the lender counts the promised bytes as the tenant's (so it lends none of
them) until the tenant's own use shows them or the promise lapses.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from harvestd.errors import InvalidArgument, NoCapacity, NotFound
from lender.pickup import ask_room

log = logging.getLogger(__name__)

T = TypeVar("T")

# torch's message: "CUDA out of memory. Tried to allocate 2.00 GiB. ..."
_TRIED = re.compile(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)")
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


@dataclass(frozen=True)
class Room:
    """What the lender did for one request."""

    nbytes: int  # bytes asked for
    elapsed_s: float  # until the memory was free
    lendable: int  # what the lender may hold after it


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, NoCapacity)):
        return True
    try:
        import torch
    except ImportError:
        return False
    return isinstance(exc, torch.OutOfMemoryError)


def _bytes_wanted(exc: BaseException) -> int | None:
    match = _TRIED.search(str(exc))
    if match is None:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2)])


class Tenant:
    """A device's own job, as its lender's tenant. ``client``: a :func:`client.connect`
    connection (used to find the lender). ``device``: the GPU the tenant runs on (index,
    ``"cuda:N"``, ``torch.device`` or UUID); or ``lender``: the lender's id (a host
    lender of a :class:`lender.host_device.HostDevice`, say)."""

    def __init__(
        self, client: Any, device: Any = None, *, lender: str | None = None, timeout: float = 30.0
    ) -> None:
        if (device is None) == (lender is None):
            raise InvalidArgument("a Tenant needs its device or its lender's id (one of them)")
        if not timeout > 0:
            raise InvalidArgument(f"timeout must be positive, got {timeout!r}")
        self.timeout = timeout
        lenders = list(client.lenders())
        if lender is None:
            from client.devices import resolve_near

            _, uuid = resolve_near(device)
            found = [l for l in lenders if l.gpu_uuid == uuid and l.node == client.node]
            what = f"GPU {uuid} on node {client.node}"
        else:
            found = [l for l in lenders if l.id == lender]
            what = f"lender {lender}"
        if not found:
            raise NotFound(f"no lender for {what}")
        self.lender = found[0].id
        self._pickup = found[0].pickup_address

    def make_room(self, nbytes: int) -> Room:
        """Have the lender free ``nbytes`` for this tenant now; returns once they are free
        (revoked leases acknowledged or past their grace, and the memory released).
        Raises :class:`client.Unavailable` when the lender cannot be reached."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise InvalidArgument(f"nbytes must be a positive int, got {nbytes!r}")
        reply = ask_room(self._pickup, nbytes, self.timeout)
        log.debug(
            "lender %s made room for %d bytes in %.1f ms",
            self.lender,
            nbytes,
            reply.elapsed_s * 1e3,
        )
        return Room(nbytes, reply.elapsed_s, reply.lendable)

    @contextlib.contextmanager
    def room(self, nbytes: int) -> Iterator[Room]:
        """``with tenant.room(n):`` the block starts once ``n`` bytes are free for it."""
        yield self.make_room(nbytes)

    def allocate(self, make: Callable[[], T], nbytes: int | None = None) -> T:
        """``make()``, waiting for the lender instead of failing: on an out-of-memory
        error (``torch.OutOfMemoryError``, ``MemoryError``, or a host device's
        ``NoCapacity``) ask for room (``nbytes``, else what torch says it tried to
        allocate) and try again, until ``timeout``; then the last error is raised."""
        deadline = time.monotonic() + self.timeout
        tries = 0
        while True:
            try:
                return make()
            except Exception as exc:
                if not _out_of_memory(exc) or time.monotonic() >= deadline:
                    raise
                want = nbytes or _bytes_wanted(exc)
                if not want:
                    raise InvalidArgument(
                        "out of memory, and no size to ask the lender for: pass nbytes"
                    ) from exc
                if tries:  # room was made and it still failed: the device is not just lent
                    time.sleep(min(0.05, 0.001 * 2**tries))
                tries += 1
                self.make_room(want)
