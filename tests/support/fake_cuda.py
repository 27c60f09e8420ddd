"""A fake of NVIDIA's ``cuda.bindings.driver``: the CUDA VMM calls a placed tensor's GPU
range (``client/placed/cuda.py``) makes, strict about the rules that code relies on.

It stands in for hardware this machine lacks, never for our own code: tests install it as
``cuda.bindings.driver`` for one test at a time (see ``tests/test_placed_cuda_fake.py``)
and run the real ``client.placed.cuda`` and ``lender.backends.cuda_driver`` over it.

What it models: one device; physical allocations (``cuMemCreate`` on the device, a host
NUMA node or the host; leases "imported" with :meth:`FakeDriver.import_handle`) that keep
their bytes; address reservations; mappings of allocations into them, each with or
without access; a reference count per allocation (its handle, plus one per mapping), so
an allocation lives until released *and* unmapped, as the driver's does. Kernels and
copies are :meth:`FakeDriver.read` and :meth:`FakeDriver.write` at device addresses.

What it refuses, as a :class:`DriverMisuse` (an ``AssertionError``), each a rule the
driver enforces or a bug of ours it would hide:

* mapping part of an allocation (``offset`` not 0, or ``size`` not the allocation's):
  the range's design maps every allocation whole;
* mapping over an existing mapping, outside a reservation, or of a released handle;
* unmapping anything but whole mappings;
* setting access over a range that is not fully mapped;
* reading or writing an address that is unmapped or mapped without access;
* releasing a handle twice;
* freeing a reservation that was never made, or one with mappings still in it.

Misuses are also recorded in :attr:`FakeDriver.misuses`, because the code under test
logs and swallows failures on its release paths: a test checks that list is empty.

Driver *failures* (out of memory, a refused call) are injected with
:meth:`FakeDriver.fail`: the call returns that ``CUresult``, as the real one would.
"""

from __future__ import annotations

import enum
import itertools
import types
from dataclasses import dataclass, field
from typing import Any, NoReturn

from harvestd.sizes import MiB


class DriverMisuse(AssertionError):
    """A call the real driver would refuse, or one that would hide a bug of ours."""


class CUresult(enum.Enum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_ILLEGAL_ADDRESS = 700
    CUDA_ERROR_NOT_SUPPORTED = 801


class CUdevice_attribute(enum.Enum):
    CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = enum.auto()
    CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID = enum.auto()
    CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = enum.auto()


class CUmemAllocationType(enum.Enum):
    CU_MEM_ALLOCATION_TYPE_PINNED = enum.auto()


class CUmemLocationType(enum.Enum):
    CU_MEM_LOCATION_TYPE_DEVICE = enum.auto()
    CU_MEM_LOCATION_TYPE_HOST = enum.auto()
    CU_MEM_LOCATION_TYPE_HOST_NUMA = enum.auto()


class CUmemAllocationHandleType(enum.Enum):
    CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = enum.auto()


class CUmemAccess_flags(enum.Enum):
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE = enum.auto()


class CUmemAllocationGranularity_flags(enum.Enum):
    CU_MEM_ALLOC_GRANULARITY_MINIMUM = enum.auto()
    CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = enum.auto()


class CUstream_flags(enum.IntEnum):  # an int enum, as in the bindings: ``cu.flag`` reads it
    CU_STREAM_NON_BLOCKING = 1


DEVICE = CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
HOST = CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST
HOST_NUMA = CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST_NUMA
VMM_SUPPORTED = CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
SUCCESS = CUresult.CUDA_SUCCESS
_KIND = {DEVICE: "device", HOST: "host", HOST_NUMA: "host-numa"}


class CUmemLocation:
    def __init__(self) -> None:
        self.type: CUmemLocationType | None = None
        self.id = 0


class CUmemAllocationProp:
    def __init__(self) -> None:
        self.type: CUmemAllocationType | None = None
        self.location = CUmemLocation()
        self.requestedHandleTypes: Any = 0


class CUmemAccessDesc:
    def __init__(self) -> None:
        self.location = CUmemLocation()
        self.flags: CUmemAccess_flags | None = None


@dataclass(eq=False)
class Handle:
    """A physical allocation: ``kind`` is "device", "host-numa", "host" or "lease"."""

    id: int
    size: int
    kind: str
    data: bytearray = field(repr=False)
    refs: int = 1  # the handle itself, until cuMemRelease
    maps: int = 0  # mappings of it

    def __repr__(self) -> str:
        return f"Handle{self.id}({self.kind}, {self.size // MiB} MiB)"


@dataclass
class Mapping:
    size: int
    handle: Handle
    access: bool = False  # every new mapping starts without access, as in the driver


class FakeDriver(types.ModuleType):
    """The fake ``cuda.bindings.driver``: a module object (so that ``from cuda.bindings
    import driver`` finds it) whose state is per instance, so each test starts afresh.

    Knobs: :attr:`granularity` per location type, :attr:`numa_supported`,
    :attr:`attributes`, :meth:`fail`. State to check: :attr:`handles` (live allocations),
    :attr:`reserved`, :attr:`mappings`, :attr:`calls`, :attr:`misuses`."""

    def __init__(self, name: str = "cuda.bindings.driver") -> None:
        super().__init__(name, __doc__)
        self.granularity: dict[CUmemLocationType, int] = {
            DEVICE: 2 * MiB,
            HOST_NUMA: 2 * MiB,
            HOST: 2 * MiB,
        }
        self.numa_supported = True
        self.attributes: dict[CUdevice_attribute, int] = {a: 1 for a in CUdevice_attribute}
        self.attributes[CUdevice_attribute.CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID] = 0
        self.handles: dict[int, Handle] = {}  # id: allocation, until released and unmapped
        self.reserved: dict[int, int] = {}  # address: size
        self.mappings: dict[int, Mapping] = {}  # address: mapping
        self.calls: list[str] = []  # every driver call's name, in order
        self.misuses: list[str] = []
        self._failing: dict[str, tuple[int, CUresult]] = {}  # name: (calls to go, error)
        self._ids = itertools.count(1)
        # Reservations start high and leave gaps, so that running off one faults.
        self._next_va = 1 << 40

    # ------------------------------------------------------------ test-side controls

    def fail(
        self, name: str, nth: int = 1, error: CUresult = CUresult.CUDA_ERROR_INVALID_VALUE
    ) -> None:
        """Make the ``nth`` next call of ``name`` return ``error`` (once)."""
        self._failing[name] = (nth, error)

    def import_handle(self, size: int) -> Handle:
        """A lease's allocation, as importing a lender's fd would give (owned: release it)."""
        return self._new(size, "lease")

    def read(self, va: int, n: int) -> bytes:
        """What a kernel on the device reads at ``[va, va + n)``."""
        out = bytearray()
        while n:
            handle, offset, left = self._locate(va)
            k = min(n, left)
            out += handle.data[offset : offset + k]
            va, n = va + k, n - k
        return bytes(out)

    def write(self, va: int, data: bytes) -> None:
        """A kernel on the device writes ``data`` at ``va``."""
        i = 0
        while i < len(data):
            handle, offset, left = self._locate(va + i)
            k = min(len(data) - i, left)
            handle.data[offset : offset + k] = data[i : i + k]
            i += k

    def clean(self) -> bool:
        """Nothing allocated, reserved or mapped."""
        return not (self.handles or self.reserved or self.mappings)

    # ------------------------------------------------------------ the driver's calls

    def cuInit(self, flags: int) -> tuple[CUresult]:
        self.calls.append("cuInit")
        return (SUCCESS,)

    def cuDeviceGetCount(self) -> tuple[CUresult, int]:
        return (SUCCESS, 1)

    def cuDeviceGet(self, ordinal: int) -> tuple[CUresult, int]:
        if ordinal != 0:
            return (CUresult.CUDA_ERROR_INVALID_VALUE, 0)
        return (SUCCESS, ordinal)

    def cuDeviceGetUuid(self, dev: int) -> tuple[CUresult, Any]:
        return (SUCCESS, types.SimpleNamespace(bytes=bytes(16)))

    def cuDeviceGetAttribute(self, attr: CUdevice_attribute, dev: int) -> tuple[CUresult, int]:
        return (SUCCESS, self.attributes[attr])

    def cuDevicePrimaryCtxRetain(self, dev: int) -> tuple[CUresult, str]:
        return (SUCCESS, "primary context")

    def cuCtxPushCurrent(self, ctx: Any) -> tuple[CUresult]:
        return (SUCCESS,)

    def cuCtxPopCurrent(self) -> tuple[CUresult, str]:
        return (SUCCESS, "primary context")

    def cuCtxSynchronize(self) -> tuple[CUresult]:
        return (self._called("cuCtxSynchronize"),)

    def cuStreamCreate(self, flags: int) -> tuple[CUresult, str]:
        return (SUCCESS, "stream")

    def cuStreamSynchronize(self, stream: Any) -> tuple[CUresult]:
        return (self._called("cuStreamSynchronize"),)

    def cuMemGetAllocationGranularity(self, prop: CUmemAllocationProp, flag: Any) -> tuple:
        assert prop.location.type is not None
        return (SUCCESS, self.granularity[prop.location.type])

    def cuMemCreate(self, size: int, prop: CUmemAllocationProp, flags: int) -> tuple:
        if (err := self._called("cuMemCreate")) is not SUCCESS:
            return (err, None)
        where = prop.location.type
        assert where is not None
        if where is HOST_NUMA and not self.numa_supported:
            return (CUresult.CUDA_ERROR_NOT_SUPPORTED, None)
        if size <= 0 or size % self.granularity[where]:
            return (CUresult.CUDA_ERROR_INVALID_VALUE, None)
        return (SUCCESS, self._new(size, _KIND[where]))

    def cuMemRelease(self, handle: Handle) -> tuple[CUresult]:
        self.calls.append("cuMemRelease")
        if handle.refs <= 0:
            self._misuse(f"double release of {handle}")
        handle.refs -= 1
        self._collect(handle)
        return (SUCCESS,)

    def cuMemAddressReserve(self, size: int, align: int, addr: int, flags: int) -> tuple:
        if (err := self._called("cuMemAddressReserve")) is not SUCCESS:
            return (err, 0)
        if size <= 0 or size % (2 * MiB) or (align and align & (align - 1)):
            return (CUresult.CUDA_ERROR_INVALID_VALUE, 0)
        a = max(align, 2 * MiB)  # 0: the default alignment
        va = -(-self._next_va // a) * a
        self._next_va = va + size + 64 * MiB
        self.reserved[va] = size
        return (SUCCESS, va)

    def cuMemAddressFree(self, va: int, size: int) -> tuple[CUresult]:
        self.calls.append("cuMemAddressFree")
        if self.reserved.get(va) != size:
            self._misuse(f"free of {va:#x}+{size}, not a reservation")
        if any(va <= m < va + size for m in self.mappings):
            self._misuse(f"free of {va:#x}+{size} with mappings still in it")
        del self.reserved[va]
        return (SUCCESS,)

    def cuMemMap(self, va: int, size: int, offset: int, handle: Handle, flags: int) -> tuple:
        if (err := self._called("cuMemMap")) is not SUCCESS:
            return (err,)
        if offset != 0 or size != handle.size:
            self._misuse(f"partial map of {size} bytes at {offset} of {handle}")
        if not any(r <= va and va + size <= r + n for r, n in self.reserved.items()):
            self._misuse(f"map at {va:#x}+{size}, outside every reservation")
        if any(m < va + size and va < m + x.size for m, x in self.mappings.items()):
            self._misuse(f"map at {va:#x}+{size} over a mapping")
        if handle.refs <= 0:
            self._misuse(f"map of released {handle}")
        self.mappings[va] = Mapping(size, handle)
        handle.maps += 1
        return (SUCCESS,)

    def cuMemUnmap(self, va: int, size: int) -> tuple[CUresult]:
        if (err := self._called("cuMemUnmap")) is not SUCCESS:
            return (err,)
        for m in self._whole_mappings(va, size, "unmap"):
            mapping = self.mappings.pop(m)
            mapping.handle.maps -= 1
            self._collect(mapping.handle)
        return (SUCCESS,)

    def cuMemSetAccess(self, va: int, size: int, descs: list, count: int) -> tuple[CUresult]:
        if (err := self._called("cuMemSetAccess")) is not SUCCESS:
            return (err,)
        if count != len(descs) or not descs:
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        for m in self._whole_mappings(va, size, "access"):
            self.mappings[m].access = True
        return (SUCCESS,)

    def cuMemcpyAsync(self, dst: int, src: int, n: int, stream: Any) -> tuple[CUresult]:
        if (err := self._called("cuMemcpyAsync")) is not SUCCESS:
            return (err,)
        self.write(dst, self.read(src, n))  # done at once: the stream sync is a no-op
        return (SUCCESS,)

    # ------------------------------------------------------------ the pieces

    def _called(self, name: str) -> CUresult:
        """Record a call; the error to return if one was injected for it, else success."""
        self.calls.append(name)
        if name in self._failing:
            left, error = self._failing[name]
            if left > 1:
                self._failing[name] = (left - 1, error)
            else:
                del self._failing[name]
                return error
        return SUCCESS

    def _misuse(self, what: str) -> NoReturn:
        self.misuses.append(what)
        raise DriverMisuse(what)

    def _new(self, size: int, kind: str) -> Handle:
        handle = Handle(next(self._ids), size, kind, bytearray(size))
        self.handles[handle.id] = handle
        return handle

    def _collect(self, handle: Handle) -> None:
        if handle.refs == 0 and handle.maps == 0:  # released and unmapped: freed
            self.handles.pop(handle.id, None)

    def _whole_mappings(self, va: int, size: int, what: str) -> list[int]:
        """The mappings that exactly tile ``[va, va + size)``; a misuse if none do."""
        out, at = [], va
        while at < va + size and at in self.mappings:
            out.append(at)
            at += self.mappings[at].size
        if at != va + size:
            self._misuse(f"{what} of {va:#x}+{size}: not whole mappings")
        return out

    def _locate(self, va: int) -> tuple[Handle, int, int]:
        """The allocation behind ``va``, the offset in it and the bytes left in the mapping."""
        for m, mapping in self.mappings.items():
            if m <= va < m + mapping.size:
                if not mapping.access:
                    self._misuse(f"access to {va:#x} without cuMemSetAccess")
                return mapping.handle, va - m, m + mapping.size - va
        self._misuse(f"fault at {va:#x}: nothing mapped")


# The bindings' types, as the driver module's attributes. Set after the class, not in its
# body, where they would shadow the module-level names its annotations use.
for _type in (
    CUresult,
    CUdevice_attribute,
    CUmemAllocationType,
    CUmemLocationType,
    CUmemAllocationHandleType,
    CUmemAccess_flags,
    CUmemAllocationGranularity_flags,
    CUstream_flags,
    CUmemAllocationProp,
    CUmemAccessDesc,
):
    setattr(FakeDriver, _type.__name__, _type)
