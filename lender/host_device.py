"""The CPU twin of a GPU's memory: a device of ``total`` bytes that a tenant and a host
lender share, so that the tenant's side of lending (pressure, the peak window, a ramp,
a tenant that waits) runs on machines with no GPU, through the same lender, broker and
holders as on a GPU.

On a GPU the driver arbitrates: an allocation that finds no free memory fails, and NVML
shows what is free. Here a small file plays the driver's part: it counts the bytes the
tenant and the lender hold, under an exclusive lock, so an allocation that does not fit
fails exactly as ``cudaMalloc`` would, and :meth:`HostDevice.memory` is the twin of
NVML's ``(total, free)``. The memory itself is real (memfds on the lender's side,
anonymous memory on the tenant's); the file only keeps the books.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from pathlib import Path

from harvestd.errors import InvalidArgument, NoCapacity

_FORMAT = "<qqq"  # total, tenant, lender
_SIZE = struct.calcsize(_FORMAT)
TENANT, LENDER = "tenant", "lender"


class HostDevice:
    """A shared ledger of one simulated device's memory, at ``path``.

    ``HostDevice.create(path, total)`` makes it (empty); any process opens it with
    ``HostDevice(path)``. Every change takes an exclusive ``flock``: the tenant's and
    the lender's allocations are atomic against each other, like a GPU's."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise InvalidArgument(f"no host device at {self.path}: {exc.strerror}") from exc
        if os.fstat(self._fd).st_size < _SIZE:
            os.close(self._fd)
            raise InvalidArgument(f"{self.path} is not a host device")
        self._threads = threading.Lock()

    @classmethod
    def create(cls, path: str | os.PathLike[str], total: int) -> HostDevice:
        """A new device of ``total`` bytes at ``path``, nothing allocated."""
        if total <= 0:
            raise InvalidArgument(f"a host device needs a positive size, got {total}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, struct.pack(_FORMAT, total, 0, 0))
        finally:
            os.close(fd)
        return cls(path)

    def close(self) -> None:
        """Close this process's handle (the books stay)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _books(self) -> tuple[int, int, int]:
        return struct.unpack(_FORMAT, os.pread(self._fd, _SIZE, 0))

    def memory(self) -> tuple[int, int]:
        """``(total, free)`` bytes, as NVML reports a GPU's."""
        total, tenant, lender = self._books()
        return total, max(0, total - tenant - lender)

    def used(self, who: str) -> int:
        """Bytes ``who`` (:data:`TENANT` or :data:`LENDER`) holds now."""
        _, tenant, lender = self._books()
        return tenant if who == TENANT else lender

    def allocate(self, who: str, nbytes: int) -> None:
        """Take ``nbytes`` for ``who``, or raise :class:`NoCapacity` when they do not fit
        (the twin of an out-of-memory error)."""
        self._change(who, nbytes)

    def free(self, who: str, nbytes: int) -> None:
        """Give back ``nbytes`` that ``who`` holds."""
        self._change(who, -nbytes)

    def _change(self, who: str, delta: int) -> None:
        if who not in (TENANT, LENDER):
            raise InvalidArgument(f"a host device is used by {TENANT!r} or {LENDER!r}")
        # flock excludes other processes only: threads of this one share the open file
        # and would all hold the lock at once (the lender frees from several threads), so
        # a lock of our own comes first, or two changes read the same books and one is lost.
        with self._threads:
            self._change_locked(who, delta)

    def _change_locked(self, who: str, delta: int) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            total, tenant, lender = self._books()
            if who == TENANT:
                tenant += delta
            else:
                lender += delta
            if delta > 0 and tenant + lender > total:
                raise NoCapacity(
                    f"host device {self.path}: {delta} bytes do not fit "
                    f"({total - tenant - lender + delta} free of {total})"
                )
            os.pwrite(self._fd, struct.pack(_FORMAT, total, max(0, tenant), max(0, lender)), 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


class HostTenant:
    """A tenant of a :class:`HostDevice`: it holds real anonymous memory, counted on the
    device, and fails an allocation that does not fit, as a GPU's tenant would."""

    def __init__(self, device: HostDevice) -> None:
        self.device = device
        self._blocks: list[mmap.mmap] = []

    @property
    def held(self) -> int:
        """Bytes this tenant holds."""
        return sum(len(block) for block in self._blocks)

    def allocate(self, nbytes: int) -> mmap.mmap:
        """``nbytes`` of memory, touched (so it is really there); raises
        :class:`NoCapacity` when the device has no room."""
        self.device.allocate(TENANT, nbytes)
        try:
            block = mmap.mmap(-1, nbytes)
            block[:: mmap.PAGESIZE] = b"\1" * len(range(0, nbytes, mmap.PAGESIZE))
        except BaseException:
            self.device.free(TENANT, nbytes)
            raise
        self._blocks.append(block)
        return block

    def free_all(self) -> None:
        """Give every allocation back."""
        while self._blocks:
            block = self._blocks.pop()
            self.device.free(TENANT, len(block))
            block.close()
