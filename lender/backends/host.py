"""Host memory lent as memfd files: the backend every machine has, and the CPU twin of
the CUDA VMM backend (same protocol: an fd over SCM_RIGHTS, mapped by the client).

The client maps the memfd itself (``mmap`` through libc, so that it controls the
address), and fences by mapping private anonymous pages over the very same addresses:
tensors made before the fence stay valid Python objects, but from then on they read
zeros that belong to this process, never the lender's pages.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import weakref
from typing import Any

from harvestd.errors import BackendUnavailable, InvalidArgument
from harvestd.sizes import round_up
from lender.backends.base import Allocation, BackendKind, Exported
from lender.backends.vm import MAP_ANONYMOUS, MAP_FIXED, map_pages, punch_hole, unmap
from lender.host_device import LENDER, HostDevice

log = logging.getLogger(__name__)


class HostMapping:
    """A memfd mapped into this process (see :class:`lender.backends.base.Mapping`)."""

    def __init__(self, fd: int, nbytes: int, device: Any = None) -> None:
        import torch

        self.nbytes = nbytes
        self._lock = threading.Lock()
        self._fenced = False
        self._addr = map_pages(None, nbytes, mmap.MAP_SHARED, fd)
        # The ctypes array owns the address range: torch keeps it alive through every
        # tensor made from it, and the finalizer unmaps only when the last one is gone.
        self._buffer = (ctypes.c_ubyte * nbytes).from_address(self._addr)
        weakref.finalize(self._buffer, unmap, self._addr, nbytes)
        self._tensor: torch.Tensor | None = torch.frombuffer(self._buffer, dtype=torch.uint8)
        self._device = torch.device("cpu")
        self._pinned = False
        if device is not None and torch.device(device).type == "cuda":
            self._pin()

    def _pin(self) -> None:
        """Register the pages with CUDA so that GPU copies run at the PCIe link's speed."""
        import torch

        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(self._addr, self.nbytes, 0)
        if int(err) != 0:  # pragma: no cover - needs a GPU
            log.warning("cudaHostRegister failed (%s): host lease stays pageable", err)
            return
        self._pinned = True

    @property
    def device(self) -> Any:
        """Host memory is addressed from the CPU (pinned when a GPU user asked for it)."""
        return self._device

    @property
    def pinned(self) -> bool:
        """Whether the pages are registered with CUDA."""
        return self._pinned

    @property
    def address(self) -> int:
        """The mapping's virtual address in this process."""
        return self._addr

    def as_tensor(self) -> Any:
        """A ``torch.uint8`` tensor over the mapped memory (no copy)."""
        return self._tensor

    def fence(self) -> None:
        """Replace the lender's pages with private zero pages at the same addresses."""
        with self._lock:
            if self._fenced:
                return
            if self._pinned:  # pragma: no cover - needs a GPU
                import torch

                torch.cuda.synchronize()
                torch.cuda.cudart().cudaHostUnregister(self._addr)
                self._pinned = False
            map_pages(self._addr, self.nbytes, mmap.MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)
            self._fenced = True

    def close(self) -> None:
        """Fence; the address range itself goes when the last tensor over it does."""
        self.fence()
        self._tensor = None


class HostBackend:
    """Host memory lent as memfd files (``--backend host``)."""

    kind = BackendKind.HOST

    def __init__(self, granularity: int = mmap.PAGESIZE, device: HostDevice | None = None) -> None:
        """``device``: a :class:`~lender.host_device.HostDevice` whose books every
        allocation goes through (the CPU twin of a GPU's memory); None: none."""
        if not hasattr(os, "memfd_create"):
            raise BackendUnavailable("memfd_create is not available on this system")
        self._granularity = granularity
        self.device = device

    @property
    def granularity(self) -> int:
        """Allocations are whole pages."""
        return self._granularity

    def allocate(self, nbytes: int) -> Allocation:
        """A new memfd of ``nbytes`` rounded up to a page; the kernel hands it out zeroed."""
        if nbytes <= 0:
            raise InvalidArgument(f"allocation size must be positive, got {nbytes}")
        size = round_up(nbytes, self._granularity)
        if self.device is not None:
            self.device.allocate(LENDER, size)  # NoCapacity when the tenant holds it
        try:
            fd = os.memfd_create("harvest-lease", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                raise
        except BaseException:
            if self.device is not None:
                self.device.free(LENDER, size)
            raise
        return Allocation(nbytes=size, handle=fd)

    def zero(self, alloc: Allocation) -> None:
        """Punch the whole file out: its pages go back to the kernel and read as zeros.

        Punching keeps the size, so a mapping still open elsewhere reads zeros rather
        than faulting (truncating would raise SIGBUS there).
        """
        punch_hole(alloc.handle, alloc.nbytes)

    def export(self, alloc: Allocation) -> Exported:
        """A duplicate of the memfd, for SCM_RIGHTS."""
        return Exported(kind=self.kind, alloc_bytes=alloc.nbytes, fd=os.dup(alloc.handle))

    def free(self, alloc: Allocation) -> None:
        """Close the lender's fd; the pages go once every client has unmapped them too."""
        if alloc.handle is not None and alloc.handle >= 0:
            os.close(alloc.handle)
            alloc.handle = -1
            if self.device is not None:
                self.device.free(LENDER, alloc.nbytes)

    def import_handle(self, exported: Exported) -> int:
        """The received fd is the client's own reference."""
        if exported.fd is None or exported.fd < 0:
            raise InvalidArgument("host handle carries no file descriptor")
        return exported.fd

    def map(self, imported: int, nbytes: int, device: Any = None) -> HostMapping:
        """Map ``nbytes`` of the memfd (pinned for CUDA when ``device`` is a GPU), then
        close the fd: the mapping keeps the pages."""
        try:
            return HostMapping(imported, nbytes, device)
        finally:
            os.close(imported)
