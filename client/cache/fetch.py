"""Reads in flight: several cached objects copied into the rows of one tensor, from
whichever tier holds each, on the cache's own CUDA stream.

A read from borrowed memory is only right if it completes before the lease is fenced.
So a :class:`Fetch` holds ``lease.use()`` on every lease it reads from until the copies
have completed on the device (not merely been launched), and only then lets go: a
revocation waits for it (up to its grace period). If a lease was fenced anyway while we
read (a forced end), leaving ``use()`` raises ``LeaseRevoked`` and the rows read from it
are read again from their authoritative source; :meth:`Fetch.wait` names them, so that a
caller who already consumed them (through :meth:`Fetch.ready`) can redo that work.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from harvestd.errors import HarvestError, LeaseRevoked

if TYPE_CHECKING:
    from client.cache.entry import Entry
    from client.cache.slabs import Slab

log = logging.getLogger(__name__)

# Objects at least this large move with one copy each (the copy engine, at the link's
# full speed); smaller ones move together in one gather kernel, since one copy each
# would run at launch speed.
DMA_MIN_BYTES = 1 << 20
# From device memory (a GPU lease) a copy costs a launch (~10 us, a 1 MiB copy's time
# many times over), so small rows move in one gather kernel; but a gather of a few large
# rows ran far below memory speed on an H100 (two 17 MiB experts took about 0.9 ms), so
# rows this large, when there are not many of them, move one copy each.
DEVICE_COPY_MIN_BYTES = 8 << 20
MAX_COPIES = 64


@dataclass
class Row:
    """One object to read: into row ``index`` of the output, from ``source``."""

    index: int
    entry: "Entry"
    local: torch.Tensor | None
    slot: tuple["Slab", int] | None
    tier: Any = None  # client.cache.Tier, once read


def _offset(row: Row) -> int:
    """The byte offset of a row read from a slab (such a row has its slot)."""
    assert row.slot is not None
    return row.slot[1]


class Fetch:
    """Objects of one size on their way into the rows of ``out``. Make it with
    :meth:`client.cache.TieredCache.fetch`; call :meth:`wait` exactly once."""

    def __init__(
        self,
        rows: list[Row],
        out: torch.Tensor,
        stream: Any,
        read_source: Callable[["Entry", torch.Tensor], Any],
        tiers: Callable[["Slab"], Any],
        local_tier: Any,
        finished: Callable[["Fetch"], None],
    ) -> None:
        self.rows = rows
        self.out = out
        self._bytes = out.view(len(rows), -1).view(torch.uint8) if rows else out
        self._stream = stream
        self._read_source = read_source
        self._tier_of_slab = tiers
        self._local_tier = local_tier
        self._finished = finished
        self._uses: list[tuple["Slab", Any, list[Row]]] = []
        self._ready: dict[int, Any] = {}
        self._done: torch.cuda.Event | None = None
        self.started = time.perf_counter()
        self.redone: list[int] = []
        self._waited = False

    # ------------------------------------------------------------ launch

    def _ctx(self):
        return (
            torch.cuda.stream(self._stream)
            if self._stream is not None
            else contextlib.nullcontext()
        )

    def start(self) -> "Fetch":
        """Launch every copy (called by the cache)."""
        if self._stream is not None:
            # The rows may still be read by earlier work on the caller's stream.
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        by_slab: dict[int, tuple["Slab", list[Row]]] = {}
        sourced: list[Row] = []
        for row in self.rows:
            if row.local is not None:
                continue
            if row.slot is None:
                sourced.append(row)
            else:
                by_slab.setdefault(id(row.slot[0]), (row.slot[0], []))[1].append(row)
        for slab, rows in by_slab.values():
            use = slab.lease.use(device_work=self._stream is not None)
            try:
                use.__enter__()
            except HarvestError:  # gone already: read these from their source
                sourced.extend(rows)
                continue
            self._uses.append((slab, use, rows))
        try:
            self._launch(sourced)
        except BaseException:
            self._release_uses()
            self._finished(self)
            raise
        return self

    def _release_uses(self) -> None:
        for _, use, _ in self._uses:
            with contextlib.suppress(HarvestError):
                use.__exit__(None, None, None)
        self._uses = []

    def _launch(self, sourced: list[Row]) -> None:
        with self._ctx():
            for row in self.rows:
                if row.local is not None:
                    self._bytes[row.index].copy_(
                        row.local.reshape(-1).view(torch.uint8), non_blocking=True
                    )
                    row.tier = self._local_tier
                    self._mark(row)
            for slab, _, rows in self._uses:
                self._read_slab(slab, rows)
            for row in sorted(sourced, key=lambda r: r.index):
                row.tier = self._read_source(row.entry, self._bytes[row.index])
                self._mark(row)
            if self._stream is not None:
                self._done = torch.cuda.Event()
                self._done.record(self._stream)

    def _read_slab(self, slab: "Slab", rows: list[Row]) -> None:
        src = slab.lease.as_bytes()
        nbytes = self._bytes.shape[1]
        tier = self._tier_of_slab(slab)
        large = DMA_MIN_BYTES if src.device.type == "cpu" else DEVICE_COPY_MIN_BYTES
        if (
            (nbytes >= large and (src.device.type == "cpu" or len(rows) <= MAX_COPIES))
            or len(rows) == 1
            or self._bytes.device != src.device
            and self._bytes.device.type == "cpu"
        ):
            for row in rows:
                offset = _offset(row)
                self._bytes[row.index].copy_(src[offset : offset + nbytes], non_blocking=True)
                row.tier = tier
                self._mark(row)
            return
        from client.blocks import gather

        rows = sorted(rows, key=lambda r: r.index)
        first = rows[0].index
        if rows[-1].index - first == len(rows) - 1:
            # Rows bound for consecutive rows of out: gather straight into them.
            gather(
                src,
                [_offset(r) for r in rows],
                nbytes,
                self._bytes[first : first + len(rows)],
                check=False,
            )
        else:
            block = torch.empty((len(rows), nbytes), dtype=torch.uint8, device=self._bytes.device)
            gather(src, [_offset(r) for r in rows], nbytes, block, check=False)
            index = torch.tensor([r.index for r in rows], device=self._bytes.device)
            self._bytes.index_copy_(0, index, block)
        for row in rows:
            row.tier = tier
        self._mark(*rows)

    def _mark(self, *rows: Row) -> None:
        if self._stream is None:
            return
        event = torch.cuda.Event()
        event.record(self._stream)
        for row in rows:
            self._ready[row.index] = event

    # ------------------------------------------------------------ use

    def ready(self, index: int) -> None:
        """Make the caller's current stream wait until row ``index`` is in (no CPU wait).

        What the caller computes from it is only right if :meth:`wait` does not name the
        row among those read again."""
        event = self._ready.get(index)
        if event is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(event)

    def done(self) -> bool:
        """Whether every copy launched has completed on the device (never blocks)."""
        return self._done is None or self._done.query()

    def wait(self) -> list[int]:
        """Finish: every row holds its object once this returns (on the caller's stream).
        Returns the rows that a revocation overlapped, which were read again from their
        source: anything computed from them before this call must be computed again.

        A second call (from any thread, not concurrently with the first) finishes
        nothing more: it orders the caller's stream after the rows again."""
        if self._waited:
            self._join()
            return self.redone
        self._waited = True
        try:
            if self._done is not None:
                self._done.synchronize()  # the copies are complete: now the leases may go
            for slab, use, rows in self._uses:
                try:
                    use.__exit__(None, None, None)
                except LeaseRevoked:
                    log.info(
                        "lease %s fenced while %d rows were read from it: reading them "
                        "from their source",
                        slab.lease.id,
                        len(rows),
                    )
                    with self._ctx():
                        for row in rows:
                            row.tier = self._read_source(row.entry, self._bytes[row.index])
                    self.redone.extend(r.index for r in rows)
                    if self._stream is not None:
                        self._done = torch.cuda.Event()  # now after the reads again
                        self._done.record(self._stream)
            self._join()
        finally:
            self._uses = []
            self._finished(self)
        return self.redone

    def _join(self) -> None:
        """Order the caller's stream after this fetch's copies: after its own event, not
        after the whole stream, where later fetches may already be queued behind it."""
        if self._done is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._done)

    def __enter__(self) -> "Fetch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wait()
