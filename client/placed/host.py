"""The CPU twin of a placed tensor's address range: one ``PROT_NONE`` reservation, and
pages of a memfd lease, of private memory or of the authoritative copy (a memfd of its
own) mapped into it with ``MAP_FIXED``.

``MAP_FIXED`` and ``mremap`` replace the pages under an address in one step, so on the
CPU a reader never meets a hole; the range still takes the placed tensor's remap lock,
as the GPU's must, so that both run the same protocol.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from typing import TYPE_CHECKING, Any

from client.placed.space import Tier
from harvestd.errors import InvalidArgument
from harvestd.sizes import round_up
from lender.backends import vm

if TYPE_CHECKING:
    import torch


def _buffer_over(addr: int, nbytes: int) -> Any:
    """A ctypes array over ``[addr, addr + nbytes)`` whose death unmaps it: torch keeps
    it alive through every tensor made from it."""
    buffer = (ctypes.c_ubyte * nbytes).from_address(addr)
    weakref.finalize(buffer, vm.unmap, addr, nbytes)
    return buffer


class HostLeasePages:
    """A memfd lease's pages for a :class:`HostRange` (see
    :class:`client.placed.space.LeasePages`)."""

    def __init__(self, space: "HostRange", fd: int, alloc_bytes: int, offset: int, nbytes: int):
        self.offset = offset
        self.nbytes = nbytes
        self._space = space
        self._fd = fd
        self._staged: int | None = None
        self._placed = False
        self._evicted = False
        try:
            if nbytes > alloc_bytes:
                raise InvalidArgument(f"a {alloc_bytes}-byte lease cannot hold {nbytes} bytes")
            self._staged = vm.map_pages(None, nbytes, mmap.MAP_SHARED, fd)
            self.fill()
        except BaseException:
            self.evict()
            raise

    def fill(self) -> None:
        """Copy the authoritative bytes into the staged pages."""
        if self._staged is None:
            raise InvalidArgument("the lease's pages are placed or gone: nothing to fill")
        ctypes.memmove(self._staged, self._space.authoritative_address + self.offset, self.nbytes)

    def place(self) -> None:
        """Map the lease's pages at their offset, over the authoritative ones."""
        if self._evicted or self._placed:
            raise InvalidArgument("the lease's pages are placed or gone already")
        vm.map_pages(
            self._space.address + self.offset, self.nbytes, mmap.MAP_SHARED | vm.MAP_FIXED, self._fd
        )
        self._placed = True
        self._let_go()

    def cut(self) -> None:
        """:meth:`evict`: one ``mmap`` maps the authoritative pages over the lease's, so
        the span is never left unmapped here."""
        self.evict()

    def restore(self) -> None:
        """Nothing: :meth:`cut` mapped the authoritative pages back already."""

    def evict(self) -> None:
        """Map the authoritative pages back (when placed) and drop the lease's pages."""
        if self._evicted:
            return
        self._evicted = True
        if self._placed:
            self._space.map_authoritative(self.offset, self.nbytes)
        self._let_go()

    def _let_go(self) -> None:
        if self._staged is not None:
            vm.unmap(self._staged, self.nbytes)
            self._staged = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class HostRange:
    """A placed tensor's address range in host memory (see
    :class:`client.placed.space.AddressRange`)."""

    lease_tier = Tier.HOST_LEASE
    lease_backend = "host"

    def __init__(self, nbytes: int, granularity: int = mmap.PAGESIZE) -> None:
        import torch

        if nbytes <= 0:
            raise InvalidArgument(f"a placed range needs a positive size, got {nbytes}")
        self.granularity = round_up(granularity, mmap.PAGESIZE)
        self.nbytes = round_up(nbytes, self.granularity)
        self._memfd = os.memfd_create("harvest-authoritative", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._memfd, self.nbytes)
            base = vm.reserve(self.nbytes)
            self._range = _buffer_over(base, self.nbytes)
            vm.map_pages(base, self.nbytes, mmap.MAP_SHARED | vm.MAP_FIXED, self._memfd)
            auth = vm.map_pages(None, self.nbytes, mmap.MAP_SHARED, self._memfd)
            self._auth = _buffer_over(auth, self.nbytes)
        except BaseException:
            os.close(self._memfd)
            raise
        self.address = base
        self.authoritative_address = auth
        self._tensor = torch.frombuffer(self._range, dtype=torch.uint8)
        self._auth_tensor = torch.frombuffer(self._auth, dtype=torch.uint8)

    @property
    def device(self) -> "torch.device":
        """Host memory: the CPU."""
        import torch

        return torch.device("cpu")

    def tensor(self) -> "torch.Tensor":
        """A ``uint8`` tensor over the whole range (no copy)."""
        return self._tensor

    def authoritative(self) -> "torch.Tensor":
        """A ``uint8`` tensor over the authoritative copy (no copy)."""
        return self._auth_tensor

    def _check_span(self, offset: int, nbytes: int) -> None:
        g = self.granularity
        if offset < 0 or nbytes <= 0 or offset + nbytes > self.nbytes or offset % g or nbytes % g:
            raise InvalidArgument(
                f"span [{offset}, {offset + nbytes}) is not whole granules "
                f"of a {self.nbytes}-byte range"
            )

    def map_authoritative(self, offset: int, nbytes: int) -> None:
        """Map the authoritative copy's own pages at ``[offset, offset + nbytes)``."""
        self._check_span(offset, nbytes)
        if self._memfd < 0:
            raise InvalidArgument("the range is closed")
        vm.map_pages(
            self.address + offset, nbytes, mmap.MAP_SHARED | vm.MAP_FIXED, self._memfd, offset
        )

    def map_local(self, offset: int, nbytes: int) -> None:
        """Private pages of this process, filled first and then moved into place."""
        self._check_span(offset, nbytes)
        own = vm.map_pages(None, nbytes, mmap.MAP_PRIVATE | vm.MAP_ANONYMOUS)
        try:
            ctypes.memmove(own, self.authoritative_address + offset, nbytes)
            vm.move_pages(own, nbytes, self.address + offset)
        except BaseException:
            vm.unmap(own, nbytes)
            raise

    def stage(self, imported: Any, alloc_bytes: int, offset: int, nbytes: int) -> HostLeasePages:
        """A memfd lease (``imported`` is its fd, owned from here on) for a span."""
        try:
            self._check_span(offset, nbytes)
        except BaseException:
            os.close(imported)
            raise
        return HostLeasePages(self, imported, alloc_bytes, offset, nbytes)

    def synchronize(self) -> None:
        """Nothing runs on a device here."""

    def close(self) -> None:
        """Close the authoritative memfd; its pages stay while a mapping holds them."""
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1
