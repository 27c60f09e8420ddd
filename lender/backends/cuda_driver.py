"""The CUDA driver as the GPU backends use it: one guarded import of NVIDIA's
``cuda.bindings``, error mapping to Harvest's errors, GPUs named by UUID, primary
contexts, and torch tensors over raw device pointers (a hand-built DLPack capsule).

Everything touching the driver is lazy: importing this module needs neither a GPU nor
``cuda-bindings``, so that CPU-only machines can import the backends and skip cleanly.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from typing import Any, Iterator

from harvestd.errors import BackendUnavailable, HarvestError, InvalidArgument, NoCapacity

log = logging.getLogger(__name__)

_lock = threading.Lock()
_driver: Any = None
_contexts: dict[int, Any] = {}


class CudaError(HarvestError):
    """A CUDA driver call failed for a reason none of Harvest's narrower errors names."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


def driver() -> Any:
    """``cuda.bindings.driver``, initialised; :class:`BackendUnavailable` where there is
    no package, no driver library or no GPU."""
    global _driver
    if _driver is not None:
        return _driver
    with _lock:
        if _driver is not None:
            return _driver
        try:
            from cuda.bindings import driver as drv
        except ImportError as exc:
            raise BackendUnavailable(
                "cuda-bindings is not installed (pip install 'harvest[gpu]')"
            ) from exc
        try:
            (err,) = drv.cuInit(0)
        except Exception as exc:  # noqa: BLE001 - a missing libcuda raises its own types
            raise BackendUnavailable(f"no CUDA driver here: {exc}") from exc
        if err != drv.CUresult.CUDA_SUCCESS:
            raise BackendUnavailable(f"cuInit failed: {_name(drv, err)}")
        _driver = drv
        return drv


def _name(drv: Any, err: Any) -> str:
    try:
        return getattr(err, "name", None) or str(err)
    except Exception:  # noqa: BLE001 - naming an error must never raise
        return repr(err)


def check(result: Any, what: str) -> Any:
    """Unpack a ``cuda.bindings`` ``(CUresult, *values)`` tuple, raising Harvest's error
    for a failure: out of memory is ``NoCapacity``, a bad value ``InvalidArgument``,
    missing support ``BackendUnavailable``, anything else ``CudaError``."""
    drv = driver()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        name = _name(drv, err)
        message = f"{what} failed: {name}"
        if name in ("CUDA_ERROR_OUT_OF_MEMORY",):
            raise NoCapacity(message)
        if name in (
            "CUDA_ERROR_INVALID_VALUE",
            "CUDA_ERROR_INVALID_DEVICE",
            "CUDA_ERROR_INVALID_HANDLE",
        ):
            raise InvalidArgument(message)
        if name in (
            "CUDA_ERROR_NOT_SUPPORTED",
            "CUDA_ERROR_NO_DEVICE",
            "CUDA_ERROR_NOT_INITIALIZED",
            "CUDA_ERROR_DEINITIALIZED",
        ):
            raise BackendUnavailable(message)
        raise CudaError(message, err)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def flag(value: Any) -> int:
    """An enum member as the plain int that ``unsigned int`` parameters take."""
    return int(getattr(value, "value", value))


def format_uuid(raw: bytes) -> str:
    """``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx``, as NVML and ``nvidia-smi -L`` write it."""
    h = bytes(raw).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def device_count() -> int:
    """How many CUDA devices this process sees (after ``CUDA_VISIBLE_DEVICES``)."""
    return int(check(driver().cuDeviceGetCount(), "cuDeviceGetCount"))


def device_uuid(ordinal: int) -> str:
    """The UUID of the CUDA device with ``ordinal`` in this process."""
    drv = driver()
    dev = check(drv.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
    return format_uuid(check(drv.cuDeviceGetUuid(dev), "cuDeviceGetUuid").bytes)


def ordinal_of_uuid(uuid: str) -> int:
    """This process's CUDA ordinal for the GPU with ``uuid``.

    Ordinals depend on ``CUDA_VISIBLE_DEVICES`` (which Ray rewrites per worker), so the
    UUID is what names a physical GPU across processes; we never trust the ordering."""
    want = uuid.strip().lower()
    if want and not want.startswith("gpu-"):
        want = "gpu-" + want
    for ordinal in range(device_count()):
        if device_uuid(ordinal).lower() == want:
            return ordinal
    raise BackendUnavailable(f"no CUDA device visible in this process has UUID {uuid}")


_ATTRIBUTE_ALIASES = {"VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED": "VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED"}


def attribute(ordinal: int, name: str) -> int:
    """``cuDeviceGetAttribute(CU_DEVICE_ATTRIBUTE_<name>)`` for device ``ordinal``."""
    drv = driver()
    attr = getattr(drv.CUdevice_attribute, f"CU_DEVICE_ATTRIBUTE_{name}", None)
    if attr is None:  # renamed between CUDA releases; same value
        attr = getattr(
            drv.CUdevice_attribute, f"CU_DEVICE_ATTRIBUTE_{_ATTRIBUTE_ALIASES.get(name, name)}"
        )
    dev = check(drv.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
    return int(check(drv.cuDeviceGetAttribute(attr, dev), f"cuDeviceGetAttribute({name})"))


def _primary(ordinal: int) -> Any:
    # Retained once and never released: it is the very context torch's runtime uses, so
    # our allocations and torch's kernels share one address space and one sync domain.
    ctx = _contexts.get(ordinal)
    if ctx is None:
        drv = driver()
        with _lock:
            ctx = _contexts.get(ordinal)
            if ctx is None:
                dev = check(drv.cuDeviceGet(ordinal), f"cuDeviceGet({ordinal})")
                ctx = check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
                _contexts[ordinal] = ctx
    return ctx


@contextlib.contextmanager
def on_device(ordinal: int) -> Iterator[Any]:
    """Make device ``ordinal``'s primary context current for the block, then restore the
    caller's (push/pop, so torch's notion of the current device is left alone)."""
    drv = driver()
    check(drv.cuCtxPushCurrent(_primary(ordinal)), "cuCtxPushCurrent")
    try:
        yield drv
    finally:
        drv.cuCtxPopCurrent()


def device_index(device: Any) -> int | None:
    """The CUDA ordinal a ``device`` argument names: an int, ``"cuda:N"``, a
    ``torch.device``, or a ``"GPU-..."`` UUID; ``None`` for ``None``; ``InvalidArgument``
    for a CPU or an unknown device."""
    if device is None:
        return None
    if isinstance(device, bool):
        raise InvalidArgument(f"device={device!r} names no CUDA device")
    if isinstance(device, int):
        index = device
    elif isinstance(device, str) and device.upper().startswith("GPU-"):
        return ordinal_of_uuid(device)
    else:
        import torch

        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InvalidArgument(f"device={device!r} names no device") from exc
        if dev.type != "cuda":
            raise InvalidArgument(f"device={device!r} is not a CUDA device")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index < 0 or index >= device_count():
        raise InvalidArgument(f"CUDA device {index} does not exist here ({device_count()} visible)")
    return index


def visible_or_current(gpu_uuid: str) -> int:
    """The ordinal of the GPU with ``gpu_uuid`` if this process sees it, else torch's
    current device: where to map when the caller named no device."""
    if gpu_uuid:
        try:
            return ordinal_of_uuid(gpu_uuid)
        except BackendUnavailable:
            pass
    import torch

    return torch.cuda.current_device()


def host_device_pointer(ptr: int, ordinal: int) -> int | None:
    """The device address of pinned (registered) host memory at ``ptr``, for kernels on
    ``ordinal``; ``None`` where the memory is not pinned."""
    drv = driver()
    with on_device(ordinal):
        err, value = drv.cuPointerGetAttribute(
            drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_POINTER, ptr
        )
    if err != drv.CUresult.CUDA_SUCCESS:
        return None
    return int(value)


# ---------------------------------------------------------------- VMM pieces


def vmm_prop(drv: Any, ordinal: int, exportable: bool = True) -> Any:
    """``cuMemCreate`` properties: pinned device memory on ``ordinal``, fd-exportable
    unless ``exportable`` is false."""
    prop = drv.CUmemAllocationProp()
    prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = ordinal
    if exportable:
        prop.requestedHandleTypes = (
            drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        )
    return prop


def access_desc(drv: Any, ordinal: int) -> Any:
    """Read/write access for device ``ordinal``, for ``cuMemSetAccess``."""
    desc = drv.CUmemAccessDesc()
    desc.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = ordinal
    desc.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return desc


def vmm_granularity(ordinal: int) -> int:
    """The recommended ``cuMemCreate`` granularity of device ``ordinal`` (fd-exportable)."""
    drv = driver()
    flag = drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
    return int(
        check(
            drv.cuMemGetAllocationGranularity(vmm_prop(drv, ordinal), flag),
            "cuMemGetAllocationGranularity",
        )
    )


def map_range(drv: Any, handle: Any, size: int, ordinal: int, align: int) -> int:
    """Reserve ``size`` bytes of address space, map ``handle`` there, grant ``ordinal``
    read/write; unwinds on failure. Returns the address."""
    va = int(check(drv.cuMemAddressReserve(size, align, 0, 0), "cuMemAddressReserve"))
    mapped = False
    try:
        check(drv.cuMemMap(va, size, 0, handle, 0), "cuMemMap")
        mapped = True
        check(drv.cuMemSetAccess(va, size, [access_desc(drv, ordinal)], 1), "cuMemSetAccess")
    except Exception:
        if mapped:
            drv.cuMemUnmap(va, size)
        drv.cuMemAddressFree(va, size)
        raise
    return va


# ---------------------------------------------------------------- DLPack, by hand
# torch.from_dlpack takes a PyCapsule named "dltensor" holding a DLManagedTensor; torch
# calls its deleter when the last tensor over it dies. We keep each capsule's structs and
# its owner in _LIVE until then, so a tensor keeps the mapping it views alive.


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [
    ("dl_tensor", _DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _DELETER),
]
_K_DL_CUDA, _K_DL_UINT = 2, 1
_LIVE: dict[int, tuple[Any, Any, Any]] = {}


@_DELETER
def _release_capsule(managed: Any) -> None:
    address = ctypes.cast(managed, ctypes.c_void_p).value
    if address is not None:  # (a NULL pointer is no tensor of ours)
        _LIVE.pop(address, None)


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def tensor_over(ptr: int, nbytes: int, ordinal: int, owner: Any) -> Any:
    """A ``torch.uint8`` CUDA tensor of ``nbytes`` at device address ``ptr`` on device
    ``ordinal``, with no copy. Every tensor made from it (views, slices) keeps ``owner``
    alive; the memory itself is the caller's to keep valid while ``owner`` lives."""
    import torch

    torch.cuda.init()  # from_dlpack makes a CUDA tensor; torch's CUDA state must exist
    managed = _DLManagedTensor()
    shape = (ctypes.c_int64 * 1)(nbytes)
    managed.dl_tensor.data = ptr
    managed.dl_tensor.device = _DLDevice(_K_DL_CUDA, ordinal)
    managed.dl_tensor.ndim = 1
    managed.dl_tensor.dtype = _DLDataType(_K_DL_UINT, 8, 1)
    managed.dl_tensor.shape = shape
    managed.dl_tensor.byte_offset = 0
    managed.deleter = _release_capsule
    address = ctypes.addressof(managed)
    _LIVE[address] = (managed, shape, owner)
    try:
        return torch.from_dlpack(_capsule_new(address, b"dltensor", None))
    except Exception:
        _LIVE.pop(address, None)
        raise
