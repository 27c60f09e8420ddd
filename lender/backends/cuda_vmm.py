"""GPU memory lent through the CUDA virtual memory management (VMM) API: ``cuMemCreate``
allocations exported as POSIX file descriptors, the GPU twin of :mod:`host`.

Lender side: ``cuMemCreate`` on the lender's GPU (named by UUID), mapped into the
lender too so that it can be zeroed; ``cuMemExportToShareableHandle`` gives a fresh fd
per hand-out. Client side: ``cuMemImportFromShareableHandle`` + ``cuMemAddressReserve`` +
``cuMemMap`` + ``cuMemSetAccess`` for the client's own GPU, and a torch tensor over it.

Fencing mirrors the host backend: the client unmaps the lender's pages and maps a small
chunk of its *own* GPU memory, over and over, across the same addresses. Tensors made
before the fence stay valid objects that read local garbage; none can fault, and none can
reach the lender's memory again. The driver keeps the physical pages alive until the last
importer unmaps them, so a lender may free while a slow client still maps.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from harvestd.errors import BackendUnavailable, InvalidArgument
from harvestd.sizes import round_up
from lender.backends import cuda_driver as cu
from lender.backends.base import Allocation, BackendKind, Exported
from lender.backends.fence_chunks import fence_plan

log = logging.getLogger(__name__)


@dataclass
class VmmAllocation:
    """The lender's side of one allocation (``Allocation.handle``)."""

    handle: Any  # CUmemGenericAllocationHandle; None once freed
    va: int  # where the lender maps it, for zeroing
    size: int
    ordinal: int


@dataclass
class VmmImport:
    """A client's imported allocation, not yet mapped (``map`` takes ownership)."""

    handle: Any
    alloc_bytes: int
    gpu_uuid: str = ""


@dataclass
class _VaState:
    """What a mapping's address range holds; freed by the owner's finalizer."""

    ordinal: int
    va: int
    span: int
    mapped: list[tuple[int, int]] = field(default_factory=list)
    imported: Any = None  # the import's handle until the fence releases it


def _release(state: _VaState) -> None:
    """Unmap everything in the range, release the import if still held, free the range.

    Runs when no tensor over the range is left; errors are logged, never raised (this
    may run in a finalizer, or at interpreter exit after the driver went down)."""
    try:
        with cu.on_device(state.ordinal) as drv:
            for ptr, size in state.mapped:
                drv.cuMemUnmap(ptr, size)
            state.mapped = []
            if state.imported is not None:
                drv.cuMemRelease(state.imported)
                state.imported = None
            if state.span:
                drv.cuMemAddressFree(state.va, state.span)
    except Exception:  # noqa: BLE001 - see docstring
        log.debug("releasing a CUDA VMM mapping failed", exc_info=True)


class _Owner:
    """Kept alive by every tensor over a mapping; its finalizer frees the address range."""


class CudaVmmMapping:
    """An imported VMM allocation mapped for one of this process's GPUs (see
    :class:`lender.backends.base.Mapping`)."""

    def __init__(self, imported: VmmImport, nbytes: int, ordinal: int) -> None:
        self.nbytes = nbytes
        self._lock = threading.Lock()
        self._fenced = False
        self._covered = False
        self.fence_ms: dict[str, float] = {}  # how long the fence's steps took (metrics)
        try:
            if nbytes <= 0 or nbytes > imported.alloc_bytes:
                raise InvalidArgument(
                    f"cannot map {nbytes} bytes of a {imported.alloc_bytes}-byte allocation"
                )
            gran = cu.vmm_granularity(ordinal)
            span = round_up(imported.alloc_bytes, gran)
            with cu.on_device(ordinal) as drv:
                va = int(cu.check(drv.cuMemAddressReserve(span, gran, 0, 0), "cuMemAddressReserve"))
        except Exception:
            # The mapping owns the import from the start: release it on every failure.
            _release(_VaState(ordinal, 0, 0, imported=imported.handle))
            raise
        with cu.on_device(ordinal) as drv:
            state = _VaState(ordinal, va, span, imported=imported.handle)
            try:
                cu.check(drv.cuMemMap(va, imported.alloc_bytes, 0, imported.handle, 0), "cuMemMap")
                state.mapped.append((va, imported.alloc_bytes))
                # Access for the client's GPU only: a peer lender's GPU gets nothing here.
                access = [cu.access_desc(drv, ordinal)]
                cu.check(drv.cuMemSetAccess(va, imported.alloc_bytes, access, 1), "cuMemSetAccess")
            except Exception:
                _release(state)
                raise
        self._state = state
        # The fence's local chunks are made now, not when the fence runs: a fence runs
        # when the GPU's tenant wants memory back, and must not ask for any then.
        self._fence_plan = fence_plan(ordinal, span)
        self._owner: _Owner | None = _Owner()
        weakref.finalize(self._owner, _release, state)
        self._tensor = cu.tensor_over(va, nbytes, ordinal, self._owner)

    @property
    def device(self) -> Any:
        """The ``torch.device`` the memory is mapped for."""
        import torch

        return torch.device("cuda", self._state.ordinal)

    @property
    def address(self) -> int:
        """The mapping's virtual address in this process."""
        return self._state.va

    @property
    def fenced(self) -> bool:
        """Whether the lender's memory is cut off."""
        return self._fenced

    def as_tensor(self) -> Any:
        """A ``torch.uint8`` CUDA tensor of ``nbytes`` over the mapping (no copy)."""
        if self._tensor is None:
            raise InvalidArgument("the mapping is closed")
        return self._tensor

    def fence(self) -> None:
        """Wait for this device's work, unmap the lender's pages and release the import:
        from here on nothing in this process reaches the lender's memory, and once every
        holder has done so its physical pages are free. Idempotent.

        The range stays unmapped until :meth:`close` covers it with local chunks (stale
        tensors then read local memory; before that they FAULT). Covering costs one
        ``cuMemMap`` per chunk, and the driver runs the VMM calls of every process on
        the GPU one after another: done here, the covers of some holders would hold up
        the unmaps of the others, and the tenant waits for the last unmap. So the lease
        acknowledges after the fence and covers afterwards.

        Kernels must not read the range *during* the fence (the lease's ``use()`` makes
        sure)."""
        with self._lock:
            if self._fenced:
                return
            state = self._state
            t0 = time.perf_counter()
            with cu.on_device(state.ordinal) as drv:
                cu.check(drv.cuCtxSynchronize(), "cuCtxSynchronize")
                t1 = time.perf_counter()
                for ptr, size in state.mapped:
                    cu.check(drv.cuMemUnmap(ptr, size), "cuMemUnmap")
                state.mapped = []
                t2 = time.perf_counter()
                if state.imported is not None:
                    cu.check(drv.cuMemRelease(state.imported), "cuMemRelease")
                    state.imported = None
            t3 = time.perf_counter()
            self._fenced = True
            self.fence_ms = {
                "sync": (t1 - t0) * 1e3,
                "unmap": (t2 - t1) * 1e3,
                "release": (t3 - t2) * 1e3,
                "total": (t3 - t0) * 1e3,
            }
            log.debug("fenced %d bytes in %.2f ms", state.span, self.fence_ms["total"])

    def _cover(self) -> None:
        """Map local chunks over the fenced range, so that stale tensors read local
        memory instead of faulting."""
        with self._lock:
            state = self._state
            if not self._fenced or self._covered:
                return
            t0 = time.perf_counter()
            with cu.on_device(state.ordinal) as drv:
                for off, chunk, size in self._fence_plan:
                    cu.check(drv.cuMemMap(state.va + off, size, 0, chunk, 0), "cuMemMap (cover)")
                    state.mapped.append((state.va + off, size))
                access = [cu.access_desc(drv, state.ordinal)]
                cu.check(
                    drv.cuMemSetAccess(state.va, state.span, access, 1), "cuMemSetAccess (cover)"
                )
            self._covered = True
            self.fence_ms["cover"] = (time.perf_counter() - t0) * 1e3
            self.fence_ms["chunks"] = len(self._fence_plan)

    def close(self) -> None:
        """Fence, cover the range with local memory; the address range goes when the
        last tensor over it does."""
        self.fence()
        self._cover()
        self._tensor = None
        self._owner = None


class CudaVmmBackend:
    """GPU memory lent as ``cuMemCreate`` allocations exported as POSIX fds
    (``--backend cuda-vmm``).

    ``gpu_uuid`` (preferred) or ``device_index`` names the lender's GPU; with neither,
    the backend serves the client side only (and lends from device 0 if asked to)."""

    kind = BackendKind.CUDA_VMM

    def __init__(self, gpu_uuid: str | None = None, device_index: int | None = None) -> None:
        cu.driver()
        if gpu_uuid:
            ordinal: int | None = cu.ordinal_of_uuid(gpu_uuid)
        elif device_index is not None:
            ordinal = cu.device_index(int(device_index))
        else:
            ordinal = None
        self._ordinal = ordinal
        self._uuid = cu.device_uuid(ordinal) if ordinal is not None else ""
        if ordinal is not None:
            self._require_support(ordinal)
        self._granularity: int | None = None
        self._stream: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def _require_support(ordinal: int) -> None:
        if not cu.attribute(ordinal, "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED"):
            raise BackendUnavailable(f"CUDA device {ordinal} has no virtual memory management")
        if not cu.attribute(ordinal, "HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED"):
            raise BackendUnavailable(f"CUDA device {ordinal} cannot export POSIX fd handles")

    def _lender(self) -> int:
        if self._ordinal is None:
            self._ordinal = 0
            self._uuid = cu.device_uuid(0)
            self._require_support(0)
        return self._ordinal

    @property
    def gpu_uuid(self) -> str:
        """The lender GPU's UUID ('' for a client-only backend not yet used to lend)."""
        return self._uuid

    @property
    def device_index(self) -> int | None:
        """The lender GPU's CUDA ordinal in this process."""
        return self._ordinal

    @property
    def granularity(self) -> int:
        """The lender GPU's recommended VMM granularity (2 MiB on current GPUs)."""
        if self._granularity is None:
            self._granularity = cu.vmm_granularity(self._lender())
        return self._granularity

    def allocate(self, nbytes: int) -> Allocation:
        """``cuMemCreate`` of ``nbytes`` rounded up to the granularity, mapped here, zeroed."""
        if nbytes <= 0:
            raise InvalidArgument(f"allocation size must be positive, got {nbytes}")
        ordinal, size = self._lender(), round_up(nbytes, self.granularity)
        with cu.on_device(ordinal) as drv:
            handle = cu.check(drv.cuMemCreate(size, cu.vmm_prop(drv, ordinal), 0), "cuMemCreate")
            try:
                va = cu.map_range(drv, handle, size, ordinal, self.granularity)
            except Exception:
                drv.cuMemRelease(handle)
                raise
        alloc = Allocation(
            nbytes=size, handle=VmmAllocation(handle, va, size, ordinal), gpu_uuid=self._uuid
        )
        try:
            self.zero(alloc)
        except Exception:
            self.free(alloc)
            raise
        return alloc

    def zero(self, alloc: Allocation) -> None:
        """Overwrite with zeros and wait: the next holder must see only zeros."""
        vmm: VmmAllocation = alloc.handle
        if vmm.handle is None:
            raise InvalidArgument("the allocation was freed")
        with cu.on_device(vmm.ordinal) as drv:
            with self._lock:
                if self._stream is None:
                    self._stream = cu.check(
                        drv.cuStreamCreate(cu.flag(drv.CUstream_flags.CU_STREAM_NON_BLOCKING)),
                        "cuStreamCreate",
                    )
                stream = self._stream
            cu.check(drv.cuMemsetD8Async(vmm.va, 0, vmm.size, stream), "cuMemsetD8Async")
            cu.check(drv.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def tensor(self, alloc: Allocation) -> Any:
        """The lender's own ``torch.uint8`` view of an allocation (tests, benchmarks)."""
        vmm: VmmAllocation = alloc.handle
        return cu.tensor_over(vmm.va, vmm.size, vmm.ordinal, alloc)

    def export(self, alloc: Allocation) -> Exported:
        """A fresh POSIX fd for the allocation (the caller closes it after sending)."""
        vmm: VmmAllocation = alloc.handle
        drv = cu.driver()
        with cu.on_device(vmm.ordinal):
            fd = cu.check(
                drv.cuMemExportToShareableHandle(
                    vmm.handle,
                    drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                    0,
                ),
                "cuMemExportToShareableHandle",
            )
        return Exported(
            kind=self.kind, alloc_bytes=alloc.nbytes, fd=int(fd), gpu_uuid=alloc.gpu_uuid
        )

    def free(self, alloc: Allocation) -> None:
        """Unmap and release; importers that still map it keep the pages until they unmap."""
        vmm: VmmAllocation = alloc.handle
        if vmm is None or vmm.handle is None:
            return
        with cu.on_device(vmm.ordinal) as drv:
            cu.check(drv.cuMemUnmap(vmm.va, vmm.size), "cuMemUnmap")
            cu.check(drv.cuMemAddressFree(vmm.va, vmm.size), "cuMemAddressFree")
            cu.check(drv.cuMemRelease(vmm.handle), "cuMemRelease")
        vmm.handle = None

    def import_handle(self, exported: Exported) -> VmmImport:
        """Import the received fd (and close it: the handle now holds the memory)."""
        if exported.fd is None or exported.fd < 0:
            raise InvalidArgument("a CUDA VMM handle carries no file descriptor")
        try:
            ordinal = cu.visible_or_current(exported.gpu_uuid)
            with cu.on_device(ordinal) as drv:
                handle = cu.check(
                    drv.cuMemImportFromShareableHandle(
                        exported.fd,
                        drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                    ),
                    "cuMemImportFromShareableHandle",
                )
        finally:
            exported.close()
        return VmmImport(handle, exported.alloc_bytes, exported.gpu_uuid)

    def map(self, imported: VmmImport, nbytes: int, device: Any = None) -> CudaVmmMapping:
        """Map ``nbytes`` for ``device`` (index, ``"cuda:N"``, ``torch.device`` or UUID;
        default: the lender's GPU if visible here, else the current device)."""
        ordinal = cu.device_index(device)
        if ordinal is None:
            ordinal = cu.visible_or_current(imported.gpu_uuid)
        return CudaVmmMapping(imported, nbytes, ordinal)
