"""This process's virtual memory, through libc: ``mmap`` at an address of our choosing,
``mremap`` to move pages, ``munmap``, and punching holes in a memfd.

Python's :mod:`mmap` module picks the address itself; fencing a lease (private pages over
the lender's, at the same addresses) and placing tensors (pages of any tier in one
reserved range) need ``MAP_FIXED``.
"""

from __future__ import annotations

import ctypes
import mmap
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
]
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2

MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)
MAP_ANONYMOUS = getattr(mmap, "MAP_ANONYMOUS", 0x20)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
PROT_NONE = 0


def _failed(ptr: int | None) -> bool:
    return ptr is None or ptr == _MAP_FAILED


def map_pages(
    addr: int | None, nbytes: int, flags: int, fd: int = -1, offset: int = 0, prot: int = PROT_RW
) -> int:
    """``mmap``: ``nbytes`` at ``addr`` (with ``MAP_FIXED`` in ``flags``: exactly there,
    replacing what was mapped, in one step) of ``fd`` from ``offset``; the address."""
    ptr = _libc.mmap(addr, nbytes, prot, flags, fd, offset)
    if _failed(ptr):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {nbytes} bytes failed: {os.strerror(err)}")
    return ptr


def reserve(nbytes: int) -> int:
    """``nbytes`` of address space that maps nothing (every access faults) until pages
    are mapped over it with ``MAP_FIXED``."""
    return map_pages(None, nbytes, mmap.MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, prot=PROT_NONE)


def move_pages(src: int, nbytes: int, dst: int) -> None:
    """``mremap`` the pages at ``src`` to ``dst``, replacing what ``dst`` mapped, in one
    step (readers of ``dst`` see the old pages or the new, never a hole)."""
    ptr = _libc.mremap(src, nbytes, nbytes, _MREMAP_MAYMOVE | _MREMAP_FIXED, dst)
    if _failed(ptr):
        err = ctypes.get_errno()
        raise OSError(err, f"mremap of {nbytes} bytes failed: {os.strerror(err)}")


def unmap(addr: int, nbytes: int) -> None:
    """``munmap``; returns quietly (it may run in a finalizer)."""
    _libc.munmap(addr, nbytes)


def punch_hole(fd: int, nbytes: int) -> None:
    """Give the first ``nbytes`` of a memfd's pages back to the kernel: they read as
    zeros, and the size stays (a mapping elsewhere reads zeros rather than faulting)."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, nbytes) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"zeroing a host allocation failed: {os.strerror(err)}")
