"""The GPUs of this node, through NVML: discovery (UUID, memory, NVLink peers, VMM
support) and a cheap watch of one GPU's memory that says how much may be lent.

NVML numbers GPUs physically and ignores ``CUDA_VISIBLE_DEVICES``; CUDA numbers only the
visible ones, in an order Ray may rewrite. The UUID is the one name both agree on, so
everything here is keyed by it. On a machine with no driver or GPU every entry point
degrades cleanly: ``discover_gpus()`` returns ``[]``.

The arithmetic lives in plain functions (:func:`reserve_for`, :func:`lendable_bytes`) so
that it is tested without a GPU.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from harvestd.errors import BackendUnavailable, InvalidArgument

log = logging.getLogger(__name__)

_init_lock = threading.Lock()
_nvml: Any = None


# ---------------------------------------------------------------- arithmetic


def reserve_for(total: int, reserve_bytes: int = 0, reserve_fraction: float = 0.0) -> int:
    """Bytes kept free for the GPU's own tenant: the larger of the absolute and the
    fractional reserve."""
    if reserve_bytes < 0 or not 0.0 <= reserve_fraction <= 1.0:
        raise InvalidArgument(f"bad reserve: {reserve_bytes} bytes, fraction {reserve_fraction}")
    return max(int(reserve_bytes), int(reserve_fraction * total))


def lendable_bytes(free: int, held_by_lender: int, reserve: int, cap: int | None = None) -> int:
    """What the lender may hold in all: ``clamp(free + held - reserve, 0, cap)``.

    Memory the lender already holds counts as available to it (it is not the tenant's),
    so a steady lender does not see its own allocations as pressure."""
    value = max(0, free + held_by_lender - reserve)
    return value if cap is None else min(value, max(0, cap))


def others_used(processes: Iterable[tuple[int, int | None]], own_pids: Iterable[int]) -> int:
    """Bytes used by ``(pid, used_bytes)`` processes that are not in ``own_pids``
    (NVML reports ``None`` where it cannot tell; those count as 0)."""
    own = set(own_pids)
    return sum(used or 0 for pid, used in processes if pid not in own)


# ---------------------------------------------------------------- NVML


def nvml_lib() -> Any:
    """``pynvml``, initialised once; :class:`BackendUnavailable` without a driver."""
    global _nvml
    with _init_lock:
        if _nvml is None:
            try:
                import pynvml

                pynvml.nvmlInit()
            except Exception as exc:  # noqa: BLE001 - ImportError or any NVMLError
                raise BackendUnavailable(f"NVML is not available: {exc}") from exc
            _nvml = pynvml
    return _nvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bus_id(value: Any) -> str:
    """A PCI bus id normalised for comparison (NVML pads the domain differently in
    different calls)."""
    text = _text(value).strip().lower()
    domain, _, rest = ("0", "", text) if text.count(":") == 1 else text.partition(":")
    try:
        return f"{int(domain or '0', 16):08x}:{rest}"
    except ValueError:
        return text


@dataclass
class GpuInfo:
    """One GPU as NVML (and, where this process sees it, CUDA) describes it."""

    uuid: str
    index: int  # NVML index (physical order, not CUDA's)
    name: str
    total: int
    free: int
    used: int
    nvlinks: dict[str, int] = field(default_factory=dict)  # peer UUID -> NVLink count
    vmm_supported: bool | None = None  # None: CUDA does not see it, or no bindings
    fd_handles_supported: bool | None = None


def _links(lib: Any, handle: Any) -> tuple[dict[str, int], int]:
    """``({peer bus id: direct links}, links to NVSwitches)`` of one GPU."""
    direct: dict[str, int] = {}
    switched = 0
    for link in range(getattr(lib, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if not lib.nvmlDeviceGetNvLinkState(handle, link):
                continue
        except lib.NVMLError:
            continue  # not supported, or no such link
        try:
            kind = lib.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link)
        except (lib.NVMLError, AttributeError):
            kind = None
        if kind == getattr(lib, "NVML_NVLINK_DEVICE_TYPE_SWITCH", -1):
            switched += 1
            continue
        try:
            peer = _bus_id(lib.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)
        except lib.NVMLError:
            continue
        direct[peer] = direct.get(peer, 0) + 1
    return direct, switched


def _cuda_support() -> dict[str, tuple[bool, bool]]:
    """``{uuid: (vmm, fd handles)}`` for the GPUs CUDA sees here; ``{}`` without CUDA."""
    try:
        from lender.backends import cuda_driver as cu

        out = {}
        for ordinal in range(cu.device_count()):
            out[cu.device_uuid(ordinal)] = (
                bool(cu.attribute(ordinal, "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED")),
                bool(cu.attribute(ordinal, "HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED")),
            )
        return out
    except Exception as exc:  # noqa: BLE001 - CUDA is optional for discovery
        log.debug("no CUDA attributes: %s", exc)
        return {}


def discover_gpus(probe_cuda: bool = True) -> list[GpuInfo]:
    """Every GPU NVML sees, with memory and NVLink peers; ``[]`` with no driver or GPU.

    ``probe_cuda`` also asks the CUDA driver whether each GPU supports VMM and fd
    handles (it initialises the driver in this process, but creates no context)."""
    try:
        lib = nvml_lib()
        count = lib.nvmlDeviceGetCount()
    except Exception as exc:  # noqa: BLE001 - no GPU is a normal answer here
        log.debug("no GPUs: %s", exc)
        return []
    gpus: list[GpuInfo] = []
    by_bus: dict[str, str] = {}
    links: dict[str, tuple[dict[str, int], int]] = {}
    for index in range(count):
        try:
            handle = lib.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(lib.nvmlDeviceGetUUID(handle))
            mem = lib.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GpuInfo(
                    uuid=uuid,
                    index=index,
                    name=_text(lib.nvmlDeviceGetName(handle)),
                    total=int(mem.total),
                    free=int(mem.free),
                    used=int(mem.used),
                )
            )
            by_bus[_bus_id(lib.nvmlDeviceGetPciInfo(handle).busId)] = uuid
            links[uuid] = _links(lib, handle)
        except lib.NVMLError as exc:
            log.warning("skipping GPU %d: %s", index, exc)
    for gpu in gpus:
        direct, switched = links[gpu.uuid]
        for bus, count_ in direct.items():
            if bus in by_bus and by_bus[bus] != gpu.uuid:
                gpu.nvlinks[by_bus[bus]] = gpu.nvlinks.get(by_bus[bus], 0) + count_
        if switched:  # through NVSwitches every switched peer is reachable
            for peer in gpus:
                if peer.uuid != gpu.uuid and links[peer.uuid][1]:
                    gpu.nvlinks[peer.uuid] = min(switched, links[peer.uuid][1])
    support = _cuda_support() if probe_cuda else {}
    for gpu in gpus:
        if gpu.uuid in support:
            gpu.vmm_supported, gpu.fd_handles_supported = support[gpu.uuid]
    return gpus


# ---------------------------------------------------------------- watching one GPU


@dataclass
class GpuSample:
    """One look at a GPU's memory, with the watch's reserve and cap applied."""

    total: int
    free: int
    used_by_others: int  # bytes of processes other than the lender's (may lag, see GpuWatch)
    reserve: int
    cap: int | None = None

    def lendable(self, held_by_lender: int) -> int:
        """Bytes the lender may hold in all, given what it holds now."""
        return lendable_bytes(self.free, held_by_lender, self.reserve, self.cap)


class GpuWatch:
    """Watch one GPU (by UUID) for how much its tenant leaves free.

    ``sample()`` costs one NVML memory query, cheap enough to run every few
    milliseconds; the per-process breakdown (``used_by_others``) is slower and is
    refreshed at most every ``others_interval_s``. ``nvml`` replaces pynvml (tests)."""

    def __init__(
        self,
        uuid: str,
        reserve_bytes: int = 0,
        reserve_fraction: float = 0.0,
        cap_bytes: int | None = None,
        *,
        own_pids: Iterable[int] | None = None,
        others_interval_s: float = 0.5,
        nvml: Any = None,
    ) -> None:
        self.uuid = uuid
        self.reserve_bytes = reserve_bytes
        self.reserve_fraction = reserve_fraction
        self.cap_bytes = cap_bytes
        self.own_pids = set(own_pids) if own_pids is not None else {os.getpid()}
        self.others_interval_s = others_interval_s
        self._lib = nvml if nvml is not None else nvml_lib()
        try:
            self._handle = self._lib.nvmlDeviceGetHandleByUUID(uuid)
        except Exception as exc:  # noqa: BLE001 - any NVMLError
            raise BackendUnavailable(f"NVML knows no GPU {uuid}: {exc}") from exc
        reserve_for(0, reserve_bytes, reserve_fraction)  # validate now, not at first sample
        self._others = 0
        self._others_at = float("-inf")

    def others_bytes(self, own_pids: Iterable[int] | None = None) -> int:
        """Bytes of this GPU used by compute processes not in ``own_pids`` (default: the
        watch's own, i.e. this lender)."""
        try:
            procs = self._lib.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception as exc:  # noqa: BLE001 - any NVMLError
            raise BackendUnavailable(f"NVML cannot list processes on {self.uuid}: {exc}") from exc
        pids = self.own_pids if own_pids is None else set(own_pids)
        return others_used(((p.pid, p.usedGpuMemory) for p in procs), pids)

    def sample(self) -> GpuSample:
        """Total and free memory now, the tenant's use (refreshed every
        ``others_interval_s``), and the reserve and cap to apply."""
        try:
            mem = self._lib.nvmlDeviceGetMemoryInfo(self._handle)
        except Exception as exc:  # noqa: BLE001 - any NVMLError
            raise BackendUnavailable(f"NVML cannot read memory of {self.uuid}: {exc}") from exc
        now = time.monotonic()
        if now - self._others_at >= self.others_interval_s:
            try:
                self._others = self.others_bytes()
            except BackendUnavailable as exc:  # e.g. inside a container without PID info
                log.debug("%s", exc)
            self._others_at = now
        total = int(mem.total)
        return GpuSample(
            total=total,
            free=int(mem.free),
            used_by_others=self._others,
            reserve=reserve_for(total, self.reserve_bytes, self.reserve_fraction),
            cap=self.cap_bytes,
        )
