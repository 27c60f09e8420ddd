"""Memory backends behind one seam: host memfd here, CUDA VMM and CUDA IPC beside it."""

from __future__ import annotations

from lender.backends.base import Allocation, Backend, BackendKind, Exported, Mapping


def get_backend(kind: BackendKind | str, **options) -> Backend:
    """The backend for ``kind``; GPU backends import their CUDA bindings only here."""
    kind = BackendKind(kind)
    if kind is BackendKind.HOST:
        from lender.backends.host import HostBackend

        return HostBackend(**options)
    if kind is BackendKind.CUDA_VMM:
        from lender.backends.cuda_vmm import CudaVmmBackend

        return CudaVmmBackend(**options)
    from lender.backends.cuda_ipc import CudaIpcBackend

    return CudaIpcBackend(**options)


__all__ = ["Allocation", "Backend", "BackendKind", "Exported", "Mapping", "get_backend"]
