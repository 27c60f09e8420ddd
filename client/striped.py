"""Striped leases: one borrower's large lease spread over several lenders, read from all
of them at once.

A single peer GPU's link caps how fast one lease reads. A :class:`StripedLease` is made of
leases (stripes) on distinct lenders; its logical bytes are dealt out to the stripes in
turn, ``unit`` bytes at a time (RAID-0), so any access pattern, random blocks or one long
range, spreads over every link. ``gather``/``scatter`` split their blocks by stripe and
launch one block kernel per stripe, each on its own CUDA stream, so the links run at once.

Revocation is all or nothing: a tenant taking back any one stripe ends the whole striped
lease for its holder (the other stripes are given back), which then falls back to its
authoritative copy exactly as with one lease.

    with client.lease_striped(8 << 30, near="cuda:0") as striped:
        striped.scatter(blocks, offsets, 16384)
        striped.gather(offsets, 16384, out)

The arithmetic (layout, plans, how many stripes) is in :mod:`client.striping`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

from client.devices import resolve_near
from client.lease import Lease, LeaseSource
from client.striping import DEFAULT_UNIT, StripeLayout, StripePlan, auto_stripes
from harvestd.errors import HarvestError, InvalidArgument, LeaseRevoked, NoCapacity
from lender.backends.base import BackendKind

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# How long the other stripes wait for uses in flight (on other threads) before they are
# given back; a striped use() holds every stripe, so it already ended by then.
_SIBLING_WAIT_S = 2.0

StripedCallback = Callable[["StripedLease", str], None]


class Lessor(LeaseSource, Protocol):
    """Where stripes come from: a connection that grants single leases and lists the
    lenders (:class:`client.connection.Client`)."""

    node: str

    def lenders(self) -> list[Any]:
        """Every lender the broker knows, as the broker describes it."""


def lease_striped(
    client: Lessor,
    nbytes: int,
    stripes: int | None = None,
    near: Any = None,
    *,
    unit: int | None = None,
    ttl: float | None = None,
    priority: int = 0,
    backend: str | BackendKind | None = None,
    device: Any = None,
    max_stripes: int = 8,
) -> "StripedLease":
    """See :meth:`client.connection.Client.lease_striped`."""
    unit = DEFAULT_UNIT if unit is None else unit
    if isinstance(max_stripes, bool) or not isinstance(max_stripes, int) or max_stripes < 1:
        raise InvalidArgument(f"max_stripes must be a positive int, got {max_stripes!r}")
    if stripes is not None:
        StripeLayout(nbytes, stripes, unit)  # validates before anything is granted
        counts = [stripes]
    else:
        StripeLayout(nbytes, 1, unit)
        _, near_uuid = resolve_near(near)
        kind = BackendKind(backend) if backend else None
        best = auto_stripes(
            client.lenders(),
            nbytes,
            near_uuid,
            client.node,
            kind.pb if kind else 0,
            unit,
            max_stripes,
        )
        counts = list(range(best, 0, -1))  # a lender may fill up meanwhile: fewer, then
    for i, count in enumerate(counts):
        layout = StripeLayout(nbytes, count, unit)
        leases: list[Lease] = []
        try:
            for stripe in range(count):
                leases.append(
                    client.lease(
                        layout.stripe_bytes(stripe),
                        ttl=ttl,
                        near=near,
                        priority=priority,
                        backend=backend,
                        device=device,
                        avoid=[l.lender for l in leases],
                    )
                )
        except NoCapacity:
            for lease in leases:
                lease.release()
            if i == len(counts) - 1:
                raise
            log.info("no room for %d stripes; trying %d", count, counts[i + 1])
            continue
        except BaseException:
            for lease in leases:
                lease.release()
            raise
        return StripedLease(leases, layout)
    raise AssertionError("unreachable")  # the loop returns or raises


# ---------------------------------------------------------------- the lease


def _word(block_bytes: int, *tensors: "torch.Tensor") -> Any:
    """The widest integer word dividing the block and every tensor's address."""
    import torch

    for size, dtype in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if block_bytes % size == 0 and all(t.data_ptr() % size == 0 for t in tensors):
            return dtype
    return torch.uint8


def _rows(flat: "torch.Tensor", n: int, block_bytes: int, dtype: Any) -> "torch.Tensor":
    """``flat[: n * block_bytes]`` (bytes) as ``n`` rows of ``dtype`` words."""
    words = flat[: n * block_bytes].view(dtype)
    return words.view(n, words.numel() // n)


def _table(src: "torch.Tensor", block_bytes: int, dtype: Any) -> "torch.Tensor":
    """A stripe's bytes as rows of ``block_bytes`` (the tail that is no whole row left
    out), in ``dtype`` words."""
    whole = src.numel() // block_bytes
    return _rows(src, whole, block_bytes, dtype) if whole else src[:0].view(0, 1)


class StripedLease:
    """Several leases on distinct lenders used as one (see the module docstring).

    ``stripes`` are the underlying :class:`client.Lease` objects, ``layout`` maps logical
    bytes to them. Use ``gather``/``scatter`` for blocks, ``tensor(stripe, ...)`` for a
    tensor over one stripe, ``use()`` to hold every stripe, ``on_revoke`` to hear that it
    is gone, ``release()`` (or ``with``) to give it back."""

    def __init__(self, leases: Sequence["Lease"], layout: StripeLayout) -> None:
        if len(leases) != layout.stripes:
            raise InvalidArgument(f"{len(leases)} leases for {layout.stripes} stripes")
        self.stripes: list[Lease] = list(leases)
        self.layout = layout
        self.nbytes = layout.nbytes
        self._lock = threading.Lock()
        self._ended = ""
        self._state = "granted"
        self._callbacks: list[StripedCallback] = []
        self._streams: dict[int, list[Any]] = {}
        for lease in self.stripes:
            lease.on_revoke(self._stripe_gone)

    # ------------------------------------------------------------ description

    def __repr__(self) -> str:
        return (
            f"StripedLease(nbytes={self.nbytes}, stripes={self.layout.stripes}, "
            f"unit={self.layout.unit}, lenders={self.lenders}, state={self.state!r})"
        )

    @property
    def ids(self) -> list[str]:
        """The stripes' lease ids, in stripe order."""
        return [lease.id for lease in self.stripes]

    @property
    def lenders(self) -> list[str]:
        """The stripes' lender ids, in stripe order (all distinct)."""
        return [lease.lender for lease in self.stripes]

    @property
    def device(self) -> Any:
        """The device the stripes are mapped for."""
        return self.stripes[0].device

    @property
    def state(self) -> str:
        """``granted``, ``revoked`` or ``released``."""
        return self._state

    @property
    def revoked(self) -> bool:
        """Whether it is gone (any stripe revoked or expired, or released)."""
        return bool(self._ended)

    def locate(self, offset: int) -> tuple[int, int]:
        """``(stripe, byte in that stripe)`` of logical byte ``offset``."""
        return self.layout.locate(offset)

    # ------------------------------------------------------------ use

    def _check(self) -> None:
        if self._ended:
            raise LeaseRevoked(f"striped lease {self.ids} is gone: {self._ended}")

    @contextlib.contextmanager
    def use(self, device_work: bool = False) -> Iterator[None]:
        """Hold every stripe (see :meth:`client.Lease.use`, ``device_work`` included): a
        revocation of any waits for this block, and if one was fenced during it, leaving
        raises ``LeaseRevoked``."""
        self._check()
        with contextlib.ExitStack() as stack:
            for lease in self.stripes:
                stack.enter_context(lease.use(device_work) if device_work else lease.use())
            yield

    def tensor(
        self,
        stripe: int,
        dtype: "torch.dtype",
        shape: Sequence[int] | int | None = None,
        offset: int = 0,
    ) -> "torch.Tensor":
        """A tensor over stripe ``stripe``'s own bytes (no copy; see
        :meth:`client.Lease.tensor`). Its bytes are the logical units ``stripe``,
        ``stripe + stripes``, ... back to back."""
        self._check()
        if (
            isinstance(stripe, bool)
            or not isinstance(stripe, int)
            or not (0 <= stripe < self.layout.stripes)
        ):
            raise InvalidArgument(f"stripe must be in [0, {self.layout.stripes}), got {stripe!r}")
        return self.stripes[stripe].tensor(dtype, shape, offset)

    def plan(
        self,
        offsets: Sequence[int] | "torch.Tensor",
        block_bytes: int,
        device: Any = None,
        *,
        check: bool = True,
    ) -> StripePlan:
        """Sort the blocks at logical byte ``offsets`` by stripe, once (one device sync),
        for any number of :meth:`gather` / :meth:`scatter` calls with the same blocks
        (pass the plan as their ``offsets``). ``device``: where the calls' ``out`` /
        ``src`` live (default: the offsets' device for a tensor, else the stripes')."""
        import torch

        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes <= 0:
            raise InvalidArgument(f"block_bytes must be a positive int, got {block_bytes!r}")
        if block_bytes > self.layout.unit:
            raise InvalidArgument(
                f"{block_bytes}-byte blocks do not fit a {self.layout.unit}-byte stripe unit"
            )
        if isinstance(offsets, torch.Tensor):
            if offsets.dim() != 1 or offsets.dtype not in (torch.int64, torch.int32):
                raise InvalidArgument("offsets must be a 1-D int64 or int32 tensor")
            off = offsets.long()
        else:
            try:
                off = torch.tensor([operator.index(o) for o in offsets], dtype=torch.int64)
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidArgument(f"offsets must be integers: {exc}") from exc
        device = (
            torch.device(device)
            if device is not None
            else (off.device if isinstance(offsets, torch.Tensor) else torch.device(self.device))
        )
        n, k, unit = off.numel(), self.layout.stripes, self.layout.unit
        if n == 0:
            return StripePlan(self.layout, block_bytes, 0, (0,) * k, None, None, True, device)
        units = torch.div(off, unit, rounding_mode="floor")
        stripe = units % k  # floor modulo: in [0, k) even for a bad negative offset
        local = torch.div(units, k, rounding_mode="floor") * unit + off % unit
        order = torch.argsort(stripe, stable=True)
        stats = [
            torch.bincount(stripe, minlength=k),
            (order == torch.arange(n, device=off.device)).all().reshape(1),
            (local % block_bytes == 0).all().reshape(1),
        ]
        if check:
            stats += [off.min().reshape(1), off.max().reshape(1), (off % unit).max().reshape(1)]
        flat = torch.cat([t.long() for t in stats]).tolist()  # the one sync
        counts, in_order, aligned = flat[:k], bool(flat[k]), bool(flat[k + 1])
        if check:
            lo, hi, deepest = flat[k + 2 :]
            if lo < 0 or hi + block_bytes > self.nbytes:
                raise InvalidArgument(
                    f"offsets must lie in [0, {self.nbytes - block_bytes}] "
                    f"for {block_bytes}-byte blocks; got [{lo}, {hi}]"
                )
            if deepest + block_bytes > unit:
                raise InvalidArgument(
                    f"a {block_bytes}-byte block at unit byte {deepest} "
                    f"crosses a {unit}-byte stripe unit"
                )
        local = local if in_order else local[order]
        local = local.to(device)
        return StripePlan(
            self.layout,
            block_bytes,
            n,
            tuple(counts),
            local,
            None if in_order else order.to(device),
            aligned,
            device,
            torch.div(local, block_bytes, rounding_mode="floor") if aligned else None,
        )

    def _plan_for(self, offsets: Any, block_bytes: int, device: Any, check: bool) -> StripePlan:
        if not isinstance(offsets, StripePlan):
            return self.plan(offsets, block_bytes, device, check=check)
        if offsets.layout != self.layout or offsets.block_bytes != block_bytes:
            raise InvalidArgument(
                f"the plan is for {offsets.block_bytes}-byte blocks of "
                f"{offsets.layout}, not {block_bytes}-byte blocks here"
            )
        if offsets.device != device:
            raise InvalidArgument(f"the plan is for {offsets.device}, the buffer on {device}")
        return offsets

    def _launch(self, device: Any, work: list[tuple[int, Callable[[], None]]]) -> None:
        """Run each stripe's piece of work, on a stream of its own on a GPU."""
        import torch

        if device.type != "cuda":
            for _, fn in work:
                fn()
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        streams = self._streams.get(index)
        if streams is None:
            streams = self._streams[index] = [torch.cuda.Stream(device=index) for _ in self.stripes]
        current = torch.cuda.current_stream(index)
        # Every tensor the pieces touch was made on `current`, which waits for all of them
        # below before anything else runs on it: none is reused while a piece reads it.
        for stripe, fn in work:
            streams[stripe].wait_stream(current)
            with torch.cuda.stream(streams[stripe]):
                fn()
        for stripe, _ in work:
            current.wait_stream(streams[stripe])

    def gather(
        self,
        offsets: "Sequence[int] | torch.Tensor | StripePlan",
        block_bytes: int,
        out: "torch.Tensor",
        *,
        check: bool = True,
    ) -> "torch.Tensor":
        """Copy the ``block_bytes`` blocks at logical byte ``offsets`` into ``out`` (block
        ``i`` to its bytes ``[i * block_bytes, (i + 1) * block_bytes)``); returns ``out``.

        One block kernel per stripe, each on its own stream, joined to the current one.
        A block must not cross a stripe unit. Sorting the blocks by stripe costs one
        device sync, none with a :meth:`plan` made beforehand; blocks not grouped by
        stripe go through a staging buffer, put in place on each stripe's stream.
        ``check=False`` skips the range checks (a wrong offset then reads outside)."""
        from client.blocks import gather

        out_b, plan = self._blocks(out, "out", offsets, block_bytes, check)
        if plan.n == 0:
            return out
        local = plan.local
        assert local is not None  # a plan with blocks has their offsets
        import torch

        staging = (
            out_b
            if plan.order is None
            else torch.empty(plan.n * block_bytes, dtype=torch.uint8, device=out_b.device)
        )
        word = _word(block_bytes, out_b, staging)

        def piece(src: "torch.Tensor", start: int, count: int) -> None:
            rows = slice(start * block_bytes, (start + count) * block_bytes)
            if plan.rows is not None and src.device == staging.device:
                # Aligned blocks, same device: the row indices are in the plan, so one
                # index_select is all; per stripe and call, Python's cost is what caps a
                # many-stripe read, not the GPU's.
                src_word = _word(block_bytes, src, staging)
                torch.index_select(
                    _table(src, block_bytes, src_word),
                    0,
                    plan.rows[start : start + count],
                    out=_rows(staging[rows], count, block_bytes, src_word),
                )
            else:
                gather(
                    src,
                    local[start : start + count],
                    block_bytes,
                    staging[rows],
                    check=not plan.aligned,
                )
            if plan.order is not None:
                # Into place on the stripe's own stream, while other stripes still read.
                _rows(out_b, plan.n, block_bytes, word).index_copy_(
                    0,
                    plan.order[start : start + count],
                    _rows(staging[rows], count, block_bytes, word),
                )

        with self.use():
            self._launch(out_b.device, self._pieces(plan, piece))
        return out

    def scatter(
        self,
        src: "torch.Tensor",
        offsets: "Sequence[int] | torch.Tensor | StripePlan",
        block_bytes: int,
        *,
        check: bool = True,
    ) -> None:
        """Copy block ``i`` of ``src`` to logical byte ``offsets[i]``; one block kernel
        per stripe, each on its own stream (as :meth:`gather`). Blocks must not overlap."""
        from client.blocks import scatter

        src_b, plan = self._blocks(src, "src", offsets, block_bytes, check)
        if plan.n == 0:
            return
        local = plan.local
        assert local is not None  # a plan with blocks has their offsets

        def piece(dst: "torch.Tensor", start: int, count: int) -> None:
            if plan.order is None:
                rows = src_b[start * block_bytes : (start + count) * block_bytes]
            else:
                rows = _rows(src_b, plan.n, block_bytes, _word(block_bytes, src_b)).index_select(
                    0, plan.order[start : start + count]
                )
            scatter(dst, rows, local[start : start + count], block_bytes, check=not plan.aligned)

        with self.use():
            self._launch(src_b.device, self._pieces(plan, piece))

    def _blocks(
        self,
        tensor: "torch.Tensor",
        name: str,
        offsets: "Sequence[int] | torch.Tensor | StripePlan",
        block_bytes: int,
        check: bool,
    ) -> "tuple[torch.Tensor, StripePlan]":
        """``tensor``'s bytes and the plan of ``offsets``, once the lease is checked and
        ``tensor`` is known to hold every block (what gather and scatter both need)."""
        from client.blocks import bytes_of

        self._check()
        data = bytes_of(tensor, name)
        plan = self._plan_for(offsets, block_bytes, data.device, check)
        total = plan.n * block_bytes
        if data.numel() < total:
            raise InvalidArgument(
                f"{name} holds {data.numel()} bytes; {plan.n} blocks of {block_bytes} need {total}"
            )
        return data, plan

    def _pieces(
        self, plan: StripePlan, piece: Callable[["torch.Tensor", int, int], None]
    ) -> list[tuple[int, Callable[[], None]]]:
        """``(stripe, work)`` for every stripe with blocks in ``plan`` (inside use())."""
        work: list[tuple[int, Callable[[], None]]] = []
        start = 0
        for stripe, count in enumerate(plan.counts):
            if count:
                src = self.stripes[stripe].as_bytes()
                work.append((stripe, functools.partial(piece, src, start, count)))
            start += count
        return work

    # ------------------------------------------------------------ life

    def on_revoke(self, callback: StripedCallback) -> None:
        """Call ``callback(striped, reason)`` once it is gone: any stripe revoked or
        expired, or the whole released (at once if it is gone already)."""
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return
        callback(self, self._ended)

    def _stripe_gone(self, lease: "Lease", reason: str) -> None:
        """A stripe ended (its fence is done): end the rest, then tell the holder."""
        with self._lock:
            if self._ended:
                return  # our own release(), or a second stripe going too
            self._ended = f"stripe {self.stripes.index(lease)} ({lease.lender}): {reason}"
            self._state = "revoked"
            callbacks, self._callbacks = self._callbacks, []
        for other in self.stripes:
            if other is not lease:
                other.release(wait_s=_SIBLING_WAIT_S)
        self._tell(callbacks)

    def _tell(self, callbacks: list[StripedCallback]) -> None:
        for callback in callbacks:
            try:
                callback(self, self._ended)
            except Exception:  # noqa: BLE001 - one bad callback must not hide the others
                log.exception("on_revoke callback for striped lease %s failed", self.ids)
        log.info("striped lease %s %s: %s", self.ids, self._state, self._ended)

    def release(self) -> None:
        """Give every stripe back; idempotent."""
        with self._lock:
            if self._ended:
                return
            self._ended = "released by its holder"
            self._state = "released"
            callbacks, self._callbacks = self._callbacks, []
        for lease in self.stripes:
            try:
                lease.release()
            except HarvestError as err:
                log.info("release of stripe %s: %s", lease.id, err)
        self._tell(callbacks)

    def __enter__(self) -> "StripedLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
