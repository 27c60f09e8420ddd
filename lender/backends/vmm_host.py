"""Pinned host memory a GPU maps through the VMM API (``cuMemCreate`` on the GPU's host
NUMA node, else anywhere on the host): what a placed tensor's authoritative copy is
made of, so that a revocation remaps it instead of copying. Where the driver cannot make
it, placed tensors are not available on that GPU and the copy path serves
(``harvestd doctor`` says which a machine gets)."""

from __future__ import annotations

import threading
from typing import Any

from harvestd.errors import BackendUnavailable, HarvestError
from lender.backends import cuda_driver as cu

_lock = threading.Lock()
_hosts: dict[int, tuple[Any, int, str]] = {}  # ordinal: (host prop, granularity, where)


def granularity(drv: Any, prop: Any) -> int:
    """``prop``'s recommended ``cuMemCreate`` granularity."""
    flag = drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
    return int(cu.check(drv.cuMemGetAllocationGranularity(prop, flag), "granularity"))


def host_location(ordinal: int) -> tuple[Any, int, str]:
    """``(cuMemCreate properties, granularity, "host-numa" | "host")`` of the pinned host
    memory device ``ordinal`` maps through the VMM API: on the GPU's host NUMA node where
    the driver can, else anywhere on the host; :class:`BackendUnavailable` where neither
    works (then the copy path serves, and ``harvestd doctor`` can say so)."""
    with _lock:
        if ordinal in _hosts:
            return _hosts[ordinal]
    try:
        numa = cu.attribute(ordinal, "HOST_NUMA_ID")  # -1 where there is no NUMA
    except (HarvestError, AttributeError):  # older driver or bindings
        numa = -1
    tried = []
    for where, ident in (("HOST_NUMA", max(numa, 0)), ("HOST", 0)):
        try:  # a driver may name a location it cannot allocate on: try one granule
            with cu.on_device(ordinal) as drv:
                prop = drv.CUmemAllocationProp()
                prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
                prop.location.type = getattr(drv.CUmemLocationType, f"CU_MEM_LOCATION_TYPE_{where}")
                prop.location.id = ident
                gran = granularity(drv, prop)
                drv.cuMemRelease(cu.check(drv.cuMemCreate(gran, prop, 0), "cuMemCreate"))
        except (HarvestError, AttributeError) as err:
            tried.append(f"{where}: {err}")
            continue
        with _lock:
            _hosts[ordinal] = (prop, gran, where.lower().replace("_", "-"))
            return _hosts[ordinal]
    raise BackendUnavailable(f"CUDA device {ordinal} cannot map VMM host memory: {tried}")
