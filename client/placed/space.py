"""The seam under a placed tensor: one reserved virtual address range whose chunks are
backed by pages of any tier, and the pages of one lease staged for it.

A :class:`PlacedTensor <client.placed.tensor.PlacedTensor>` depends only on these two
protocols. :class:`client.placed.host.HostRange` is the CPU twin (``mmap`` with
``MAP_FIXED`` into one ``PROT_NONE`` reservation); :class:`client.placed.cuda.CudaRange`
is the GPU (``cuMemAddressReserve`` and ``cuMemMap`` of device, leased and host-NUMA
pages).

Every range keeps an *authoritative copy* of the whole span in host memory that it can
map at any offset without copying (a memfd on the CPU, host-NUMA ``cuMemCreate``
chunks on a GPU): that is what makes a revocation a remap rather than a copy.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


class Tier(str, enum.Enum):
    """Where a chunk's pages lie."""

    LOCAL = "local"  # the borrower's own memory (device memory on a GPU)
    GPU_LEASE = "gpu-lease"  # a lease of GPU memory (this GPU or a peer)
    HOST_LEASE = "host-lease"  # a lease of host memory (the CPU twin)
    HOST = "host"  # the authoritative copy itself


@runtime_checkable
class LeasePages(Protocol):
    """One lease's pages, staged for a range: mapped somewhere private first, filled with
    the authoritative bytes, then placed at their offset in the range."""

    offset: int
    nbytes: int

    def fill(self) -> None:
        """Copy the authoritative bytes of ``[offset, offset + nbytes)`` into the pages
        (before :meth:`place`, or again when a write raced the first copy)."""

    def place(self) -> None:
        """Map the pages at their offset in the range, over the authoritative ones. The
        caller makes sure no device work reads the span while it changes."""

    def cut(self) -> None:
        """Let go of the lease's memory: nothing in this process reaches it afterwards
        (its lender may free it). The span may map nothing until :meth:`restore`; the
        caller keeps device work off it meanwhile. Idempotent once it has succeeded."""

    def restore(self) -> None:
        """Map the authoritative pages wherever the span lacks them (after :meth:`cut`;
        nothing where the span is whole). A retry maps what a failed one left out."""

    def evict(self) -> None:
        """:meth:`cut`, then :meth:`restore`: the authoritative pages back over the span
        and the lease's memory let go. Idempotent."""


@runtime_checkable
class AddressRange(Protocol):
    """One reserved virtual address range of ``nbytes``, chunks backed by any tier."""

    nbytes: int
    granularity: int

    @property
    def device(self) -> "torch.device":
        """The device the range is addressed from."""

    @property
    def lease_tier(self) -> Tier:
        """The tier a lease placed in this range counts as."""

    @property
    def lease_backend(self) -> str:
        """The backend kind (``"host"``, ``"cuda-vmm"``) of the leases it can place."""

    def tensor(self) -> "torch.Tensor":
        """A ``uint8`` tensor over the whole range, on :attr:`device` (no copy)."""

    def authoritative(self) -> "torch.Tensor":
        """A ``uint8`` tensor over the authoritative copy, addressable from :attr:`device`
        (no copy): writes keep it current, fills and remaps read it."""

    def map_local(self, offset: int, nbytes: int) -> None:
        """Back ``[offset, offset + nbytes)`` with this process's own memory, filled with
        the authoritative bytes."""

    def stage(self, imported: Any, alloc_bytes: int, offset: int, nbytes: int) -> LeasePages:
        """Take an imported lease allocation (the backend's handle) for the span
        ``[offset, offset + nbytes)``: map it privately and fill it. Owns ``imported``
        from here on, failures included."""

    def synchronize(self) -> None:
        """Wait for the device work that may read the range (nothing on a CPU)."""

    def close(self) -> None:
        """Unmap everything; the address range goes when the last tensor over it does."""
