"""A placed tensor: a tensor at one address for its whole life, whose pages lie in any
tier (the borrower's own memory, leases, the authoritative host copy), and whose leases
are revoked by remapping the authoritative pages under it rather than by copying.

    placed = c.place(weights, device="cuda:0")
    with placed.use():
        y = x @ placed.tensor.T        # reads the pages where they lie
    placed.tiers()                     # {"local": 0, "gpu-lease": ..., "host": ...}

The authoritative copy is the range's own host memory, filled from ``source`` when the
tensor is placed. Writes go through :meth:`PlacedTensor.write_`, which writes it and the
placed pages together, so that a revocation, which maps the authoritative pages back and
copies nothing, never loses a write.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from client.lease import Lease, LeaseSource
from client.placed.remap_lock import RemapLock
from client.placed.space import AddressRange, LeasePages, Tier
from harvestd.errors import FailedPrecondition, HarvestError, InvalidArgument, LeaseRevoked
from harvestd.sizes import MiB
from lender.backends.base import BackendKind

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 2 * MiB  # the H200's VMM granularity: the finest placement there
DEFAULT_LEASE_BYTES = 256 * MiB  # a lease carries many chunks; it is the unit of revocation
_EVICT_ATTEMPTS = 3


def make_range(device: "torch.device", nbytes: int, chunk_bytes: int) -> AddressRange:
    """The address range for ``device``: the CPU twin in host memory, or a GPU's."""
    if device.type == "cpu":
        from client.placed.host import HostRange

        return HostRange(nbytes, chunk_bytes)
    if device.type == "cuda":
        from client.placed.cuda import CudaRange  # needs cuda-bindings

        return CudaRange(nbytes, chunk_bytes, device)
    raise InvalidArgument(f"cannot place a tensor on {device}: only cpu and cuda devices")


class _PlacedMapping:
    """The :class:`~lender.backends.base.Mapping` a placed tensor gives each of its leases:
    the lease's fence cuts the lease off with the tensor's uses held off, and its close,
    right after the acknowledgement (``cover_at_once``), maps the authoritative pages back
    and lets the uses in again. So the lender's memory is free before the slow part of the
    remap (granting access to the host pages) begins."""

    cover_at_once = True  # see client.lease: close right after the acknowledgement

    def __init__(self, owner: "PlacedTensor", pages: LeasePages, first: int, count: int):
        self.owner = owner
        self.pages = pages
        self.first = first  # the chunks it covers
        self.count = count
        self.nbytes = pages.nbytes
        self.placed = False
        self.fence_ms: float | None = None  # the remap, cut to restore, once done
        self._cut_at: float | None = None  # set while uses are held off between the halves
        self._lock = threading.Lock()

    @property
    def steps_ms(self) -> dict[str, float]:
        """The remap's steps, where the range times them (the GPU's: sync, unmap, release,
        map, access); empty on the CPU twin or before the fence."""
        return dict(getattr(self.pages, "fence_ms", None) or {})

    @property
    def device(self) -> Any:
        """The device the placed range is addressed from."""
        return self.owner.device

    def as_tensor(self) -> Any:
        """The lease's span of the placed range, as ``uint8`` (no copy)."""
        return self.owner._space.tensor()[self.pages.offset : self.pages.offset + self.nbytes]

    def fence(self) -> None:
        """Hold off the tensor's uses and let go of the lease's memory; :meth:`close`
        maps the authoritative pages back and lets the uses in. Idempotent."""
        with self._lock:
            if self._cut_at is None and self.fence_ms is None:
                self._cut_at = self.owner._cut(self)

    def close(self) -> None:
        """Finish the remap :meth:`fence` began (fencing first if it has not run)."""
        self.fence()
        with self._lock:
            cut_at, self._cut_at = self._cut_at, None
            if cut_at is not None:
                self.owner._restore(self, cut_at)


class PlacedTensor:
    """``source``'s values at one address on ``device`` for the tensor's whole life, chunk
    by chunk in whatever tier Harvest can give (see the module's docstring).

    ``chunk_bytes``: the unit of placement (rounded up to the range's granularity).
    ``local_bytes``: how much of it to keep in this process's own memory (the first
    chunks). ``lease_bytes``: the most one lease carries (the unit of revocation).
    ``ttl``, ``priority``: the leases'. ``refill_s``: how often a background pass tries to
    lease again what sits in the authoritative copy (None: only :meth:`refill`).
    ``borrow=False``: lease nothing (the chunks past ``local_bytes`` read the
    authoritative copy in place).

    ``source=None`` with ``shape`` and ``dtype``: a tensor of that shape whose values are
    undefined until written (as ``torch.empty``), on ``device`` (default: the CPU), for
    a caller that writes every value before it reads it (the KV cache): nothing is copied
    in to fill it.
    """

    def __init__(
        self,
        lessor: LeaseSource,
        source: "torch.Tensor | None",
        device: Any = None,
        *,
        shape: Sequence[int] | None = None,
        dtype: "torch.dtype | None" = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        local_bytes: int = 0,
        lease_bytes: int = DEFAULT_LEASE_BYTES,
        ttl: float | None = None,
        priority: int = 0,
        refill_s: float | None = 1.0,
        borrow: bool = True,
    ) -> None:
        import torch

        if source is None:
            if shape is None or not isinstance(dtype, torch.dtype):
                raise InvalidArgument(
                    "place() takes a source tensor, or shape= and dtype= for an empty one"
                )
            shape = tuple(int(n) for n in shape)
            if any(n < 0 for n in shape):
                raise InvalidArgument(f"shape {shape} has a negative size")
            like = torch.empty(shape, dtype=dtype, device="meta")  # its size, no memory
        elif not isinstance(source, torch.Tensor):
            raise InvalidArgument(f"place() takes a torch.Tensor, got {type(source).__name__}")
        elif shape is not None or dtype is not None:
            raise InvalidArgument("shape= and dtype= are for a placed tensor with no source")
        else:
            like = source
        for name, value in (("chunk_bytes", chunk_bytes), ("lease_bytes", lease_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgument(f"{name} must be a positive int, got {value!r}")
        if not isinstance(local_bytes, int) or local_bytes < 0:
            raise InvalidArgument(f"local_bytes must be a non-negative int, got {local_bytes!r}")
        if refill_s is not None and refill_s <= 0:
            raise InvalidArgument(f"refill_s must be positive or None, got {refill_s!r}")
        default = torch.device("cpu") if source is None else source.device
        self.device = torch.device(device) if device is not None else default
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = like.dtype
        self.shape = tuple(like.shape)
        self.nbytes = like.numel() * like.element_size()
        self._lessor = lessor
        self._ttl = ttl
        self._priority = priority
        self._lease_bytes = lease_bytes
        self._space = make_range(self.device, max(self.nbytes, 1), chunk_bytes)
        self.chunk_bytes = self._space.granularity
        self._lock = RemapLock()
        self._version = 0  # bumped by every write_, so a refill knows its copy is stale
        self._version_lock = threading.Lock()
        self._refilling = threading.Lock()
        self._closed = False
        self._broken = ""  # why the tensor can no longer be used (a remap failed)
        self._stop = threading.Event()
        self._leases: dict[str, tuple[Lease, _PlacedMapping]] = {}
        self.revocations = 0
        self.remap_ms: list[float] = []  # each revocation's remap, in order
        chunks = self._space.nbytes // self.chunk_bytes
        self._tiers = [Tier.HOST] * chunks
        try:
            if source is not None and self.nbytes:
                raw = source.detach().reshape(-1).contiguous()
                self._space.authoritative()[: self.nbytes].copy_(raw.view(torch.uint8))
            self._authoritative: torch.Tensor | None = self._typed(self._space.authoritative())
            self._tensor: torch.Tensor | None = self._typed(self._space.tensor())
            local = min(chunks, -(-local_bytes // self.chunk_bytes))
            if local:
                self._space.map_local(0, local * self.chunk_bytes)
                self._tiers[:local] = [Tier.LOCAL] * local
            if borrow:
                self.refill()
        except BaseException:
            self.close()
            raise
        self._refiller: threading.Thread | None = None
        if refill_s is not None and borrow:
            self._refiller = threading.Thread(
                target=self._refill_every, args=(refill_s,), name="harvest-refill", daemon=True
            )
            self._refiller.start()

    @property
    def tensor(self) -> "torch.Tensor":
        """The placed tensor: ``source``'s values, at one address for the tensor's life
        (read it inside :meth:`use`)."""
        if self._tensor is None:
            raise FailedPrecondition("this placed tensor is closed")
        return self._tensor

    def _typed(self, raw: "torch.Tensor") -> "torch.Tensor":
        return raw[: self.nbytes].view(self.dtype).view(self.shape)

    def __repr__(self) -> str:
        tiers = ", ".join(f"{k}={v}" for k, v in self.tiers().items() if v)
        state = ", closed" if self._closed else ""
        return f"PlacedTensor({self.dtype}, {list(self.shape)}, {self.device}, {tiers}{state})"

    # ------------------------------------------------------------ use

    def tiers(self) -> dict[str, int]:
        """Bytes of the tensor in each tier: ``local``, ``gpu-lease``, ``host-lease``,
        ``host`` (the authoritative copy)."""
        out = {tier.value: 0 for tier in Tier}
        for i, tier in enumerate(self._tiers):
            start = i * self.chunk_bytes
            out[tier.value] += max(0, min(self.nbytes, start + self.chunk_bytes) - start)
        return out

    @contextlib.contextmanager
    def use(self) -> Iterator["torch.Tensor"]:
        """Hold off remaps while the block reads or writes :attr:`tensor`; yields it.

        Launch every kernel over the tensor inside a ``use`` block. A remap waits for the
        blocks in flight, then for the device (``cuCtxSynchronize``) before it changes a
        page, so kernels launched in a block need not finish before it ends; a kernel
        launched outside any block may run while pages change under it."""
        user = self.begin_use()
        try:
            yield self.tensor
        finally:
            self.end_use(user)

    def begin_use(self) -> int:
        """:meth:`use`'s start, for a use whose end is not the end of a block (a KV
        cache's views, which end the use when they die); every ``begin_use`` needs its
        :meth:`end_use`, with what it returned."""
        self._check_open()
        return self._lock.begin_use()

    def end_use(self, user: int) -> None:
        """End a use :meth:`begin_use` began (any thread may)."""
        self._lock.end_use(user)

    def write_(self, key: Any, value: Any) -> None:
        """``tensor[key] = value``, kept in the authoritative copy too, so that no
        revocation loses it."""
        user = self.begin_use()
        try:
            assert self._authoritative is not None  # open: checked by begin_use
            self._authoritative[key] = value
            self.tensor[key] = value
            with self._version_lock:
                self._version += 1
        finally:
            self.end_use(user)

    def leases(self) -> list[Lease]:
        """The leases under the tensor now."""
        with self._version_lock:
            return [lease for lease, _ in self._leases.values()]

    # ------------------------------------------------------------ placement

    def refill(self) -> int:
        """Lease what sits in the authoritative copy, a lease per run of chunks, until no
        lender has room; returns the bytes placed."""
        placed = 0
        with self._refilling:
            for first, count in self._host_runs():
                if self._closed or not self._lease_run(first, count):
                    break
                placed += count * self.chunk_bytes
        return placed

    def _host_runs(self) -> list[tuple[int, int]]:
        per_lease = max(1, self._lease_bytes // self.chunk_bytes)
        used = -(-max(self.nbytes, 1) // self.chunk_bytes)  # chunks the tensor touches
        runs, i = [], 0
        while i < used:
            if self._tiers[i] is not Tier.HOST:
                i += 1
                continue
            j = i
            while j < used and self._tiers[j] is Tier.HOST and j - i < per_lease:
                j += 1
            runs.append((i, j - i))
            i = j
        return runs

    def _lease_run(self, first: int, count: int) -> bool:
        """Lease ``count`` chunks from ``first``, fill them, place them; False when no
        lender has room (or the lease was revoked at once)."""
        offset, nbytes = first * self.chunk_bytes, count * self.chunk_bytes
        made: list[_PlacedMapping] = []

        def mapper(kind: BackendKind, imported: Any, alloc_bytes: int, device: Any):
            if kind.value != self._space.lease_backend:
                raise FailedPrecondition(
                    f"a {kind.value} lease cannot be placed in a {self.device} range"
                )
            pages = self._space.stage(imported, alloc_bytes, offset, nbytes)
            made.append(_PlacedMapping(self, pages, first, count))
            return made[-1]

        with self._version_lock:
            version = self._version
        try:
            lease = self._lessor.lease(
                nbytes,
                ttl=self._ttl,
                priority=self._priority,
                backend=self._space.lease_backend,
                device=self.device if self.device.type == "cuda" else None,
                mapper=mapper,
            )
        except LeaseRevoked:
            return False
        except (HarvestError, OSError) as err:
            # No room (NoCapacity), no lender (Unavailable), or this side could not map the
            # lease (OSError): the authoritative copy serves meanwhile.
            log.debug("no lease for %d bytes of a placed tensor: %s", nbytes, err)
            return False
        mapping = made[-1]
        with self._lock.remap():
            usable = not lease.revoked and not self._closed
            if usable:
                with self._version_lock:
                    stale = self._version != version
                try:
                    if stale:
                        mapping.pages.fill()
                    self._space.synchronize()
                    mapping.pages.place()
                except Exception:  # noqa: BLE001 - the authoritative copy serves on
                    log.exception("placing lease %s failed; its chunks stay on the host", lease.id)
                    usable = False
            if usable:
                mapping.placed = True
                self._tiers[first : first + count] = [self._space.lease_tier] * count
                with self._version_lock:
                    self._leases[lease.id] = (lease, mapping)
        if not usable:
            lease.release()
            return False
        lease.on_revoke(self._revoked)
        return True

    def _cut(self, mapping: _PlacedMapping) -> float:
        """A lease's fence, first half: wait for the uses in flight and hold off new ones,
        then let go of the lease's memory. Returns when it began; :meth:`_restore` must
        follow (it lets the uses in again)."""
        self._lock.begin_remap()
        start = time.perf_counter()
        try:
            self._retry(mapping, mapping.pages.cut, "letting go of a lease's pages")
        except BaseException:
            self._lock.end_remap()
            raise
        return start

    def _restore(self, mapping: _PlacedMapping, start: float) -> None:
        """A lease's fence, second half: the authoritative pages back over its span; then
        the uses go on."""
        try:
            self._retry(mapping, mapping.pages.restore, "mapping the host copy back")
            if mapping.placed:
                mapping.placed = False
                self._tiers[mapping.first : mapping.first + mapping.count] = [Tier.HOST] * (
                    mapping.count
                )
            mapping.fence_ms = (time.perf_counter() - start) * 1e3
        finally:
            self._lock.end_remap()

    def _retry(self, mapping: _PlacedMapping, step: Any, what: str) -> None:
        for attempt in range(_EVICT_ATTEMPTS):
            try:
                step()  # a retry does what a failed one left undone
                return
            except Exception as err:
                if attempt + 1 == _EVICT_ATTEMPTS:
                    # A span that maps nothing would fault the next kernel over it:
                    # refuse every use from here on instead.
                    self._broken = f"{what} ({mapping.nbytes} bytes) failed: {err}"
                    raise
                log.warning("%s failed (%s); retrying", what, err)
                time.sleep(0.01 * (attempt + 1))

    def _revoked(self, lease: Lease, reason: str) -> None:
        with self._version_lock:
            entry = self._leases.pop(lease.id, None)
        if entry is not None and lease.state == "revoked":
            self.revocations += 1
            if entry[1].fence_ms is not None:
                self.remap_ms.append(entry[1].fence_ms)
            log.info(
                "placed tensor: lease %s revoked (%s); its chunks read the host copy",
                lease.id,
                reason,
            )

    def _refill_every(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.refill()
            except Exception:  # noqa: BLE001 - the next pass tries again
                log.exception("refilling a placed tensor failed")

    # ------------------------------------------------------------ life

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("this placed tensor is closed")
        if self._broken:
            raise FailedPrecondition(f"this placed tensor is unusable: {self._broken}")

    def close(self) -> None:
        """Give every lease back and let the range go (once no tensor over it is left).
        Idempotent; :attr:`tensor` must not be used afterwards."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        refiller = getattr(self, "_refiller", None)
        if refiller is not None and refiller is not threading.current_thread():
            refiller.join()
        for lease in self.leases():
            lease.release()
        self._space.close()
        # The range and the authoritative copy go once no tensor over them is left: drop
        # ours, so that only the caller's own views keep them.
        self._tensor = self._authoritative = None

    def __enter__(self) -> "PlacedTensor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
