"""GPU memory lent through legacy CUDA IPC handles (``cuIpcGetMemHandle``): the fallback
for drivers or devices without VMM fd export.

It is weaker than :mod:`cuda_vmm` in two ways, and lenders should prefer VMM wherever it
runs:

* The handle is 64 bytes of data, not a file descriptor: the kernel does not track who
  holds it, and the driver does not keep the pages alive for an importer. If the lender
  frees (``cuMemFree``) while a client still has the handle open, behaviour is undefined
  (CUDA's own words): the memory can be handed to the lender's next allocation, tenant
  data included, while the client can still read it. So the lender may reclaim only after
  the client acknowledged its fence (``give_back(clean=True)``); on a silent holder it
  must keep the allocation out of use until that process exits.
* Fencing closes the handle (``cuIpcCloseMemHandle``); nothing is mapped in its place.
  A stale tensor then points at unmapped addresses, and touching it raises an illegal
  address fault that poisons the whole CUDA context of the client process. Tensors must
  never be used after ``fence()``; the lease's ``use()`` enforces that for its callers.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from harvestd.errors import InvalidArgument
from harvestd.sizes import round_up
from lender.backends import cuda_driver as cu
from lender.backends.base import Allocation, BackendKind, Exported

log = logging.getLogger(__name__)

IPC_HANDLE_BYTES = 64
# cuMemAlloc hands out 2 MiB-aligned blocks for large sizes: lending whole blocks keeps
# pool sizes in step with the VMM backend's.
_GRANULARITY = 2 << 20


@dataclass
class IpcAllocation:
    """The lender's side of one allocation (``Allocation.handle``)."""

    ptr: int | None  # None once freed
    size: int
    ordinal: int


@dataclass
class IpcImport:
    """A client's received handle, not yet opened."""

    handle: bytes
    alloc_bytes: int
    gpu_uuid: str = ""


@dataclass
class _IpcState:
    ordinal: int
    ptr: int | None  # None once closed


def _close(state: _IpcState) -> None:
    """Close the opened handle once (fence or finalizer); errors are logged."""
    if state.ptr is None:
        return
    ptr, state.ptr = state.ptr, None
    try:
        with cu.on_device(state.ordinal) as drv:
            cu.check(drv.cuIpcCloseMemHandle(ptr), "cuIpcCloseMemHandle")
    except Exception:  # noqa: BLE001 - may run in a finalizer or at interpreter exit
        log.debug("closing a CUDA IPC handle failed", exc_info=True)


class _Owner:
    """Kept alive by every tensor over the mapping; its finalizer closes the handle."""


class CudaIpcMapping:
    """An opened IPC handle (see :class:`lender.backends.base.Mapping`; note the weaker
    fence described in the module docstring)."""

    def __init__(self, imported: IpcImport, nbytes: int, ordinal: int) -> None:
        if nbytes <= 0 or nbytes > imported.alloc_bytes:
            raise InvalidArgument(
                f"cannot map {nbytes} bytes of a {imported.alloc_bytes}-byte allocation"
            )
        self.nbytes = nbytes
        self._lock = threading.Lock()
        with cu.on_device(ordinal) as drv:
            handle = drv.CUipcMemHandle()
            ctypes.memmove(handle.getPtr(), imported.handle, IPC_HANDLE_BYTES)
            # Lazy peer access: the lender's GPU may be a peer of ours.
            ptr = cu.check(
                drv.cuIpcOpenMemHandle(
                    handle, cu.flag(drv.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
                ),
                "cuIpcOpenMemHandle",
            )
        self._state = _IpcState(ordinal, int(ptr))
        self._owner: _Owner | None = _Owner()
        weakref.finalize(self._owner, _close, self._state)
        self._tensor = cu.tensor_over(int(ptr), nbytes, ordinal, self._owner)

    @property
    def device(self) -> Any:
        """The ``torch.device`` the memory is opened for."""
        import torch

        return torch.device("cuda", self._state.ordinal)

    @property
    def fenced(self) -> bool:
        """Whether the handle is closed."""
        return self._state.ptr is None

    def as_tensor(self) -> Any:
        """A ``torch.uint8`` CUDA tensor of ``nbytes`` over the memory (no copy)."""
        if self._tensor is None:
            raise InvalidArgument("the mapping is closed")
        return self._tensor

    def fence(self) -> None:
        """Wait for this device's work, then close the handle. Stale tensors FAULT if
        used afterwards (no local memory takes the lender's place). Idempotent."""
        with self._lock:
            if self._state.ptr is None:
                return
            with cu.on_device(self._state.ordinal) as drv:
                cu.check(drv.cuCtxSynchronize(), "cuCtxSynchronize")
            _close(self._state)

    def close(self) -> None:
        """Fence and drop this mapping's tensor."""
        self.fence()
        self._tensor = None
        self._owner = None


class CudaIpcBackend:
    """GPU memory lent as ``cuMemAlloc`` blocks shared by legacy IPC handles
    (``--backend cuda-ipc``); ``gpu_uuid`` or ``device_index`` names the lender's GPU."""

    kind = BackendKind.CUDA_IPC

    def __init__(self, gpu_uuid: str | None = None, device_index: int | None = None) -> None:
        cu.driver()
        if gpu_uuid:
            self._ordinal: int | None = cu.ordinal_of_uuid(gpu_uuid)
        elif device_index is not None:
            self._ordinal = cu.device_index(int(device_index))
        else:
            self._ordinal = None
        self._uuid = cu.device_uuid(self._ordinal) if self._ordinal is not None else ""

    def _lender(self) -> int:
        if self._ordinal is None:
            self._ordinal, self._uuid = 0, cu.device_uuid(0)
        return self._ordinal

    @property
    def gpu_uuid(self) -> str:
        """The lender GPU's UUID ('' for a client-only backend)."""
        return self._uuid

    @property
    def granularity(self) -> int:
        """Allocations are whole 2 MiB blocks."""
        return _GRANULARITY

    def allocate(self, nbytes: int) -> Allocation:
        """``cuMemAlloc`` of ``nbytes`` rounded up to 2 MiB, zeroed."""
        if nbytes <= 0:
            raise InvalidArgument(f"allocation size must be positive, got {nbytes}")
        ordinal, size = self._lender(), round_up(nbytes, _GRANULARITY)
        with cu.on_device(ordinal) as drv:
            ptr = int(cu.check(drv.cuMemAlloc(size), "cuMemAlloc"))
        alloc = Allocation(
            nbytes=size, handle=IpcAllocation(ptr, size, ordinal), gpu_uuid=self._uuid
        )
        try:
            self.zero(alloc)
        except Exception:
            self.free(alloc)
            raise
        return alloc

    def zero(self, alloc: Allocation) -> None:
        """Overwrite with zeros and wait for it."""
        ipc: IpcAllocation = alloc.handle
        if ipc.ptr is None:
            raise InvalidArgument("the allocation was freed")
        with cu.on_device(ipc.ordinal) as drv:
            cu.check(drv.cuMemsetD8(ipc.ptr, 0, ipc.size), "cuMemsetD8")
            cu.check(drv.cuCtxSynchronize(), "cuCtxSynchronize")

    def tensor(self, alloc: Allocation) -> Any:
        """The lender's own ``torch.uint8`` view of an allocation (tests, benchmarks)."""
        ipc: IpcAllocation = alloc.handle
        if ipc.ptr is None:
            raise InvalidArgument("the allocation was freed")
        return cu.tensor_over(ipc.ptr, ipc.size, ipc.ordinal, alloc)

    def export(self, alloc: Allocation) -> Exported:
        """The allocation's 64-byte IPC handle (no fd)."""
        ipc: IpcAllocation = alloc.handle
        with cu.on_device(ipc.ordinal) as drv:
            handle = cu.check(drv.cuIpcGetMemHandle(ipc.ptr), "cuIpcGetMemHandle")
        raw = ctypes.string_at(handle.getPtr(), IPC_HANDLE_BYTES)
        return Exported(
            kind=self.kind,
            alloc_bytes=alloc.nbytes,
            fd=None,
            ipc_handle=raw,
            gpu_uuid=alloc.gpu_uuid,
        )

    def free(self, alloc: Allocation) -> None:
        """``cuMemFree``. Only safe once every importer closed its handle (see above)."""
        ipc: IpcAllocation = alloc.handle
        if ipc is None or ipc.ptr is None:
            return
        with cu.on_device(ipc.ordinal) as drv:
            cu.check(drv.cuMemFree(ipc.ptr), "cuMemFree")
        ipc.ptr = None

    def import_handle(self, exported: Exported) -> IpcImport:
        """Check the received handle's bytes; opening waits for ``map``."""
        exported.close()  # an fd has no business here; never leak one
        if len(exported.ipc_handle) != IPC_HANDLE_BYTES:
            raise InvalidArgument(
                f"a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes, got {len(exported.ipc_handle)}"
            )
        return IpcImport(bytes(exported.ipc_handle), exported.alloc_bytes, exported.gpu_uuid)

    def map(self, imported: IpcImport, nbytes: int, device: Any = None) -> CudaIpcMapping:
        """Open the handle for ``device`` (default: the lender's GPU if visible, else the
        current device) and wrap ``nbytes`` of it as a tensor."""
        ordinal = cu.device_index(device)
        if ordinal is None:
            ordinal = cu.visible_or_current(imported.gpu_uuid)
        return CudaIpcMapping(imported, nbytes, ordinal)
