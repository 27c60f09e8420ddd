"""A placed tensor's address range on a GPU (see :class:`client.placed.space.AddressRange`).

Two reservations of ``nbytes``: the *placed range*, which the placed tensor views, and
the *authoritative window*, where the authoritative copy is mapped for good. That copy is
one pinned host allocation per chunk (``cuMemCreate`` on the GPU's host NUMA node):
``cuMemMap`` maps an allocation whole, so a revoked lease's span is covered again by
mapping exactly its own chunks, with no copy. An allocation may be mapped at several
addresses, so the window and the range map the same host chunks, and writes
(``PlacedTensor.write_``) to both keep the copy current. Access is set once per span,
never per chunk (per 2 MiB chunk it costs 15 ms per GiB). Kernels run on the range's
device; a lease on a peer GPU is reached through that device's access (peer access).
Importing this module needs no GPU: the driver is touched lazily.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from client.placed.space import Tier
from harvestd.errors import BackendUnavailable, FailedPrecondition, InvalidArgument
from harvestd.sizes import round_up
from lender.backends import cuda_driver as cu
from lender.backends.vmm_host import granularity as _granularity
from lender.backends.vmm_host import host_location

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_streams: dict[int, Any] = {}  # ordinal: the stream fills copy on (kept for the process)


def _stream(drv: Any, ordinal: int) -> Any:
    """A non-blocking stream on ``ordinal`` for fills (its context current)."""
    with _lock:
        if ordinal not in _streams:
            flags = cu.flag(drv.CUstream_flags.CU_STREAM_NON_BLOCKING)
            _streams[ordinal] = cu.check(drv.cuStreamCreate(flags), "cuStreamCreate")
        return _streams[ordinal]


@dataclass
class _State:
    """What a range maps and holds, for :func:`_release` (a finalizer must not hold the
    range object itself)."""

    ordinal: int
    chunk: int
    nbytes: int
    base: int = 0  # the placed range (0: not reserved yet)
    auth: int = 0  # the authoritative window
    host: list[Any] = field(default_factory=list)  # a host allocation per chunk
    in_window: int = 0  # host chunks mapped in the window, from the first
    host_at: set[int] = field(default_factory=set)  # offsets where the range maps its host chunk
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)  # offset: (bytes, key)
    scratch: dict[int, int] = field(default_factory=dict)  # staging address: bytes
    ungranted: set[int] = field(default_factory=set)  # spans mapped back, access not yet set
    imports: dict[int, Any] = field(default_factory=dict)  # key: a lease's imported handle
    keys: Iterator[int] = field(default_factory=lambda: itertools.count(1))  # 0: local memory
    freed: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)


def _quiet(result: Any, what: str, level: int = logging.DEBUG) -> None:
    """Log a failed driver call instead of raising: releasing goes on."""
    err = result[0] if isinstance(result, tuple) else result
    if err != cu.driver().CUresult.CUDA_SUCCESS:
        log.log(level, "%s failed while releasing placed pages: %s", what, err)


def _release(state: _State) -> None:
    """Unmap and release everything, free both reservations. Runs in a finalizer (maybe at
    interpreter exit, the driver gone): errors are logged, never raised."""
    with state.lock:
        if state.freed:
            return
        state.freed = True
        c = state.chunk
        maps = [(state.base + o, c) for o in state.host_at]
        maps += [(state.base + o, n) for o, (n, _) in state.spans.items()]
        maps += [(state.auth + i * c, c) for i in range(state.in_window)]
        try:
            with cu.on_device(state.ordinal) as drv:
                _quiet(drv.cuCtxSynchronize(), "cuCtxSynchronize")  # no kernel mid-read
                for va, size in maps + list(state.scratch.items()):
                    _quiet(drv.cuMemUnmap(va, size), "cuMemUnmap")
                for handle in [*state.imports.values(), *state.host]:
                    _quiet(drv.cuMemRelease(handle), "cuMemRelease")
                for va, size in [
                    *state.scratch.items(),
                    (state.base, state.nbytes),
                    (state.auth, state.nbytes),
                ]:
                    if va:
                        _quiet(drv.cuMemAddressFree(va, size), "cuMemAddressFree")
        except Exception:  # noqa: BLE001 - see the docstring
            log.debug("releasing a placed CUDA range failed", exc_info=True)


class _Owner:
    """Kept alive by every tensor over the range or the window; its finalizer frees them."""


class CudaLeasePages:
    """A CUDA VMM lease's pages for a :class:`CudaRange` (see
    :class:`client.placed.space.LeasePages`); ``fence_ms``: how long the evict's steps
    took (benchmarks).

    The lease must be exactly the span: ``cuMemMap`` maps an allocation whole, so a larger
    one would overlap the next chunks. Staging such a lease raises
    :class:`FailedPrecondition`, and the placed tensor keeps that run in the host copy
    until its next refill."""

    def __init__(self, space: "CudaRange", key: int, handle: Any, alloc: int, offset: int, n: int):
        self.offset, self.nbytes = offset, n
        self.fence_ms: dict[str, float] = {}
        self._space, self._key = space, key  # key: the handle's in the range's state
        self._scratch: int | None = None
        self._placed = self._evicted = False
        try:
            if alloc != n:
                raise FailedPrecondition(f"a {alloc}-byte lease cannot map a {n}-byte span whole")
            self._scratch = space._map_scratch(handle, n)
            self.fill()
        except BaseException:
            self.evict()
            raise

    def fill(self) -> None:
        """Copy the authoritative bytes into the staged pages (on the GPU)."""
        if self._scratch is None:
            raise InvalidArgument("the lease's pages are placed or gone: nothing to fill")
        self._space._fill(self._scratch, self.offset, self.nbytes)

    def place(self) -> None:
        """Map the lease at its offset in the range, over its host chunks."""
        if self._evicted or self._placed or self._scratch is None:
            raise InvalidArgument("the lease's pages are placed or gone already")
        try:
            self._space._place(self._key, self._scratch, self.offset, self.nbytes)
            self._placed, self._scratch = True, None
        except BaseException:
            self.evict()  # the host chunks are back: let the lease go
            raise

    def cut(self) -> None:
        """Unmap the lease from the span (when placed) and release it: nothing in this
        process reaches its memory afterwards, and its lender may free it. The span maps
        nothing until :meth:`restore`; the caller keeps kernels off it meanwhile.
        Idempotent once it has succeeded."""
        if not self._evicted:
            scratch, self._scratch = self._scratch, None
            self.fence_ms = self._space._cut(self._key, scratch, self.offset, self.nbytes)
            self._evicted = True

    def restore(self) -> None:
        """Map the host chunks back wherever the span lacks them, and grant access (after
        :meth:`cut`; a retry maps what a failed one left out)."""
        restored = self._space._restore(self.offset, self.nbytes)
        if restored:
            cut = {k: v for k, v in self.fence_ms.items() if k != "total"}
            self.fence_ms = {**cut, **restored}
            self.fence_ms["total"] = sum(
                ms for step, ms in self.fence_ms.items() if step not in ("total", "chunks")
            )

    def evict(self) -> None:
        """:meth:`cut`, then :meth:`restore`. Idempotent once it has succeeded; after a
        failure, calling it again maps what is still missing."""
        self.cut()
        self.restore()


class CudaRange:
    """A placed tensor's address range on a CUDA device (see the module's docstring).
    ``granularity``: the chunk size, rounded up to what device, exportable and host
    allocations all need (2 MiB on an H200); ``nbytes`` is rounded up to whole chunks."""

    lease_tier = Tier.GPU_LEASE
    lease_backend = "cuda-vmm"

    def __init__(self, nbytes: int, granularity: int, device: Any) -> None:
        if nbytes <= 0:
            raise InvalidArgument(f"a placed range needs a positive size, got {nbytes}")
        ordinal = cu.device_index(device)
        if ordinal is None:
            import torch

            ordinal = torch.cuda.current_device()
        if not cu.attribute(ordinal, "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED"):
            raise BackendUnavailable(f"CUDA device {ordinal} has no virtual memory management")
        host_prop, host_gran, self.host_location = host_location(ordinal)
        with cu.on_device(ordinal) as drv:
            own = _granularity(drv, cu.vmm_prop(drv, ordinal, False))
            self._access = [cu.access_desc(drv, ordinal)]  # for N GPUs: one desc each
        unit = math.lcm(cu.vmm_granularity(ordinal), own, host_gran)
        self._align = unit if unit & (unit - 1) == 0 else 0  # a power of two, else default
        g = self.granularity = round_up(max(granularity, 1), unit)
        self.nbytes = round_up(nbytes, g)
        state = self._state = _State(ordinal, g, self.nbytes)
        try:
            with state.lock, cu.on_device(ordinal) as drv:
                state.base = self._reserve(drv, self.nbytes)
                state.auth = self._reserve(drv, self.nbytes)
                for off in range(0, self.nbytes, g):
                    state.host.append(cu.check(drv.cuMemCreate(g, host_prop, 0), "cuMemCreate"))
                    self._map(drv, state.auth + off, g, state.host[-1])
                    state.in_window += 1
                    self._map(drv, state.base + off, g, state.host[-1])
                    state.host_at.add(off)
                self._grant(drv, state.auth, self.nbytes)
                self._grant(drv, state.base, self.nbytes)
        except BaseException:
            _release(state)
            raise
        self._owner: _Owner | None = _Owner()
        weakref.finalize(self._owner, _release, state)
        self._tensor: Any = cu.tensor_over(state.base, self.nbytes, ordinal, self._owner)
        self._auth: Any = cu.tensor_over(state.auth, self.nbytes, ordinal, self._owner)

    @property
    def device(self) -> "torch.device":
        """The CUDA device the range is addressed from."""
        import torch

        return torch.device("cuda", self._state.ordinal)

    def tensor(self) -> "torch.Tensor":
        """A ``uint8`` CUDA tensor over the whole placed range (no copy)."""
        if self._tensor is None:
            raise InvalidArgument("the range is closed")
        return self._tensor

    def authoritative(self) -> "torch.Tensor":
        """A ``uint8`` CUDA tensor over the authoritative window, host pages (no copy)."""
        if self._auth is None:
            raise InvalidArgument("the range is closed")
        return self._auth

    def map_local(self, offset: int, nbytes: int) -> None:
        """Back the span with one allocation of this GPU's own memory, filled first."""
        self._check_span(offset, nbytes)
        state = self._state
        with state.lock, cu.on_device(state.ordinal) as drv:
            self._check_host(offset, nbytes)
            prop = cu.vmm_prop(drv, state.ordinal, False)
            handle = cu.check(drv.cuMemCreate(nbytes, prop, 0), "cuMemCreate (local)")
            try:
                scratch = self._map_scratch(handle, nbytes)
                try:
                    self._fill(scratch, offset, nbytes)
                finally:
                    self._free_scratch(drv, scratch)
                self._swap_in(drv, handle, 0, offset, nbytes)
            finally:
                drv.cuMemRelease(handle)  # its mapping holds the memory from here on

    def stage(self, imported: Any, alloc_bytes: int, offset: int, nbytes: int) -> CudaLeasePages:
        """An imported lease (a ``lender.backends.cuda_vmm.VmmImport``, owned from here on)
        for a span: mapped whole at a private address and filled. A lease on a peer GPU
        works alike (peer access through this device's access)."""
        state = self._state
        with state.lock:
            try:
                self._check_span(offset, nbytes)
                if state.freed:
                    raise InvalidArgument("the range is released")
            except BaseException:
                with cu.on_device(state.ordinal) as drv:
                    drv.cuMemRelease(imported.handle)
                raise
            key = next(state.keys)
            state.imports[key] = imported.handle  # the range releases it if pages never do
        return CudaLeasePages(self, key, imported.handle, alloc_bytes, offset, nbytes)

    def synchronize(self) -> None:
        """Wait for every stream of the device's primary context (torch's included)."""
        with cu.on_device(self._state.ordinal) as drv:
            cu.check(drv.cuCtxSynchronize(), "cuCtxSynchronize")

    def close(self) -> None:
        """Drop the range's own tensors: the reservations and allocations go when the last
        tensor over the range or the window does (the leases are evicted before this)."""
        self._tensor = self._auth = self._owner = None

    # ------------------------------------------------------------ the pieces

    def _reserve(self, drv: Any, size: int) -> int:
        return int(
            cu.check(drv.cuMemAddressReserve(size, self._align, 0, 0), "cuMemAddressReserve")
        )

    def _map(self, drv: Any, va: int, size: int, handle: Any) -> None:
        cu.check(drv.cuMemMap(va, size, 0, handle, 0), "cuMemMap")  # offset 0: whole

    def _grant(self, drv: Any, va: int, size: int) -> None:
        # Once per span, never per chunk; every new mapping starts with no access at all.
        cu.check(drv.cuMemSetAccess(va, size, self._access, len(self._access)), "cuMemSetAccess")

    def _check_span(self, offset: int, nbytes: int) -> None:
        g = self.granularity
        if offset < 0 or nbytes <= 0 or offset + nbytes > self.nbytes or offset % g or nbytes % g:
            raise InvalidArgument(
                f"[{offset}, {offset + nbytes}) is not whole chunks of a {self.nbytes}-byte range"
            )

    def _check_host(self, offset: int, nbytes: int) -> None:
        if self._state.freed:
            raise InvalidArgument("the range is released")
        if not set(range(offset, offset + nbytes, self.granularity)) <= self._state.host_at:
            raise FailedPrecondition(f"[{offset}, {offset + nbytes}) is not all in the host copy")

    def _map_scratch(self, handle: Any, size: int) -> int:
        """Map ``handle`` whole at a fresh private address, with access: the address."""
        state = self._state
        with state.lock, cu.on_device(state.ordinal) as drv:
            va = self._reserve(drv, size)
            try:
                self._map(drv, va, size, handle)
                try:
                    self._grant(drv, va, size)
                except BaseException:
                    drv.cuMemUnmap(va, size)  # or the lease would stay mapped here
                    raise
            except BaseException:
                drv.cuMemAddressFree(va, size)
                raise
            state.scratch[va] = size
            return va

    def _free_scratch(self, drv: Any, va: int | None) -> None:
        size = self._state.scratch.pop(va, 0) if va is not None else 0
        if size:
            cu.check(drv.cuMemUnmap(va, size), "cuMemUnmap (staging)")
            cu.check(drv.cuMemAddressFree(va, size), "cuMemAddressFree (staging)")

    def _fill(self, dst: int, offset: int, nbytes: int) -> None:
        """Copy the window's ``[offset, offset + nbytes)`` to ``dst`` on a stream of our own,
        after every write queued on torch's streams (hence the context-wide sync)."""
        ordinal, src = self._state.ordinal, self._state.auth + offset
        with cu.on_device(ordinal) as drv:
            cu.check(drv.cuCtxSynchronize(), "cuCtxSynchronize")
            stream = _stream(drv, ordinal)
            cu.check(drv.cuMemcpyAsync(dst, src, nbytes, stream), "cuMemcpyAsync (fill)")
            cu.check(drv.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def _swap_in(self, drv: Any, handle: Any, key: int, offset: int, nbytes: int) -> None:
        """Unmap the span's host chunks (one call each: a mapping is unmapped whole), map
        ``handle`` there, grant access; on failure the host chunks come back."""
        state, g = self._state, self.granularity
        try:
            for o in range(offset, offset + nbytes, g):
                cu.check(drv.cuMemUnmap(state.base + o, g), "cuMemUnmap (host chunk)")
                state.host_at.discard(o)
            self._map(drv, state.base + offset, nbytes, handle)
            state.spans[offset] = (nbytes, key)
            self._grant(drv, state.base + offset, nbytes)
        except BaseException:
            if state.spans.pop(offset, None):
                drv.cuMemUnmap(state.base + offset, nbytes)
            self._map_host(drv, offset, nbytes)
            self._grant(drv, state.base + offset, nbytes)
            raise

    def _hole(self, offset: int, nbytes: int) -> bool:
        """Whether a chunk of the span maps nothing, or was mapped without access yet."""
        state, g = self._state, self.granularity
        return bool(
            set(range(offset, offset + nbytes, g)) - state.host_at or offset in state.ungranted
        )

    def _map_host(self, drv: Any, offset: int, nbytes: int) -> None:
        state, g = self._state, self.granularity
        for o in range(offset, offset + nbytes, g):
            if o not in state.host_at:
                self._map(drv, state.base + o, g, state.host[o // g])
                state.host_at.add(o)

    def _place(self, key: int, scratch: int, offset: int, nbytes: int) -> None:
        state = self._state
        with state.lock, cu.on_device(state.ordinal) as drv:
            self._check_host(offset, nbytes)
            cu.check(drv.cuCtxSynchronize(), "cuCtxSynchronize")  # no kernel over the span
            self._free_scratch(drv, scratch)
            self._swap_in(drv, state.imports[key], key, offset, nbytes)

    def _cut(self, key: int, scratch: int | None, offset: int, nbytes: int) -> dict[str, float]:
        """Unmap lease ``key`` if it is placed at ``offset``, free its staging address,
        release its handle; each step's time in ms. The span maps nothing afterwards."""
        state, marks = self._state, [("start", time.perf_counter())]
        with state.lock:
            if state.freed:  # the finalizer unmapped and released everything
                return {}
            with cu.on_device(state.ordinal) as drv:
                try:
                    if state.spans.get(offset) == (nbytes, key):
                        cu.check(drv.cuCtxSynchronize(), "cuCtxSynchronize")
                        marks.append(("sync", time.perf_counter()))
                        cu.check(drv.cuMemUnmap(state.base + offset, nbytes), "cuMemUnmap")
                        del state.spans[offset]
                        marks.append(("unmap", time.perf_counter()))
                    self._free_scratch(drv, scratch)
                finally:  # nothing maps the lease now (or, if the unmap failed, the mapping
                    # and not the handle keeps its pages): let go of it either way
                    handle = state.imports.pop(key, None)
                    if handle is not None:
                        _quiet(drv.cuMemRelease(handle), "cuMemRelease", logging.WARNING)
                    marks.append(("release", time.perf_counter()))
        return _steps(marks)

    def _restore(self, offset: int, nbytes: int) -> dict[str, float]:
        """Map the host chunks of the span that are missing and grant access, unless a
        lease is placed there; each step's time in ms (empty: nothing was missing)."""
        state, marks = self._state, [("start", time.perf_counter())]
        with state.lock:
            if state.freed or offset in state.spans or not self._hole(offset, nbytes):
                return {}
            with cu.on_device(state.ordinal) as drv:
                state.ungranted.add(offset)  # until the grant below succeeds
                self._map_host(drv, offset, nbytes)
                marks.append(("map", time.perf_counter()))
                self._grant(drv, state.base + offset, nbytes)
                state.ungranted.discard(offset)
                marks.append(("access", time.perf_counter()))
        return {**_steps(marks), "chunks": nbytes // self.granularity}


def _steps(marks: list[tuple[str, float]]) -> dict[str, float]:
    """Each step's ms from ``(step, perf_counter())`` marks, the first being the start."""
    ms = {step: (t - marks[i][1]) * 1e3 for i, (step, t) in enumerate(marks[1:])}
    ms["total"] = (marks[-1][1] - marks[0][1]) * 1e3
    return ms
