"""The memory ``Backend`` seam: how a kind of memory is allocated, exported, imported,
mapped and freed.

A backend has two sides that speak to each other only through an :class:`Exported`
handle (a file descriptor, or an IPC handle's bytes): the lender's side allocates and
exports; the client's side imports and maps. Everything above this module depends on
the :class:`Backend` protocol, never on a concrete class.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from protos import harvest_pb2 as pb


class BackendKind(str, enum.Enum):
    """The kinds of memory Harvest lends."""

    HOST = "host"
    CUDA_VMM = "cuda-vmm"
    CUDA_IPC = "cuda-ipc"

    @property
    def pb(self) -> pb.Backend:
        """The wire enum value."""
        return _TO_PB[self]

    @classmethod
    def from_pb(cls, value: int) -> "BackendKind":
        """The kind for a wire enum value; ``ValueError`` for an unknown one."""
        for kind, wire in _TO_PB.items():
            if wire == value:
                return kind
        raise ValueError(f"unknown backend {value}")

    @property
    def is_gpu(self) -> bool:
        """Whether the memory sits on a GPU."""
        return self is not BackendKind.HOST


_TO_PB = {
    BackendKind.HOST: pb.BACKEND_HOST,
    BackendKind.CUDA_VMM: pb.BACKEND_CUDA_VMM,
    BackendKind.CUDA_IPC: pb.BACKEND_CUDA_IPC,
}


@dataclass
class Allocation:
    """Memory a lender owns: ``nbytes`` is a whole multiple of the backend's granularity."""

    nbytes: int
    handle: Any
    gpu_uuid: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Exported:
    """What travels from lender to client: an fd (SCM_RIGHTS) or an IPC handle's bytes."""

    kind: BackendKind
    alloc_bytes: int
    fd: int | None = None
    ipc_handle: bytes = b""
    gpu_uuid: str = ""

    def close(self) -> None:
        """Close the fd this side holds (the receiver has its own copy)."""
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@runtime_checkable
class Mapping(Protocol):
    """Borrowed memory mapped into this process; readable and writable with no copy."""

    nbytes: int

    @property
    def device(self) -> Any:
        """The ``torch.device`` the memory is addressed from."""

    def as_tensor(self) -> Any:
        """A ``torch.uint8`` tensor of ``nbytes`` over the memory itself (no copy)."""

    def fence(self) -> None:
        """Cut this process off from the lender's memory for good, as fast as it can:
        the lender may free it once this returns. Idempotent.

        Afterwards no tensor made from this mapping reaches the lender's memory: a stale
        view can neither read the next owner's data nor corrupt it. Host mappings read
        private zero pages from here on; a CUDA VMM mapping is left unmapped (a stale
        view faults) until :meth:`close` covers it with private memory.
        """

    def close(self) -> None:
        """Fence, cover the range with private memory where the fence left it unmapped,
        and release this process's resources as soon as no view is left.

        A lease closes its fenced mapping a little after acknowledging (covers are not on
        the tenant's path), or at once after the acknowledgement where the mapping has a
        true ``cover_at_once`` attribute (a placed tensor's uses wait for it)."""


@runtime_checkable
class Backend(Protocol):
    """One kind of lendable memory: allocate, export, import, map, free."""

    kind: BackendKind

    @property
    def granularity(self) -> int:
        """Allocations are whole multiples of this many bytes."""

    def allocate(self, nbytes: int) -> Allocation:
        """Allocate at least ``nbytes`` (rounded up to the granularity), zeroed."""

    def zero(self, alloc: Allocation) -> None:
        """Overwrite the allocation with zeros (before it is handed out again)."""

    def export(self, alloc: Allocation) -> Exported:
        """A shareable handle for the allocation; the caller closes it after sending."""

    def free(self, alloc: Allocation) -> None:
        """Give the allocation back to the system."""

    def import_handle(self, exported: Exported) -> Any:
        """Client side: turn a received handle into this process's own reference."""

    def map(self, imported: Any, nbytes: int, device: Any = None) -> Mapping:
        """Client side: map ``nbytes`` of an imported allocation, addressed from ``device``."""
