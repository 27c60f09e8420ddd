"""What a benchmark's own process holds on its GPU, two ways: torch's allocator
(``torch.cuda.memory_allocated``: the tensors it made) and NVML's per-process figure (also
what torch's allocator never sees: the CUDA context, cached free blocks, memory a library
maps itself through the VMM API). Every mode of a benchmark lives in one process, so what
a setup holds is what each figure grew by across it (:func:`grown`).

    before = gpu_memory(device)
    setup = make()
    kept = grown(before, gpu_memory(device))   # {"gpu_allocated_bytes": ..., ...}

On the CPU, or where NVML cannot tell, a figure is None.
"""

from __future__ import annotations

import functools
import os
from typing import Any

GpuBytes = dict[str, int | None]


@functools.lru_cache(maxsize=None)
def _nvml_handle(uuid: str) -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetHandleByUUID(uuid)


def nvml_process_bytes(device: Any) -> int | None:
    """This process's memory on ``device`` as NVML counts it; None where NVML cannot tell:
    no CUDA device, no NVML, no per-process figure (some drivers and MIG withhold it), or
    this process missing from NVML's list (in a PID namespace NVML lists the host's PIDs,
    which ``os.getpid()`` does not match)."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        from client.devices import cuda_uuid

        handle = _nvml_handle(cuda_uuid(device.index or 0))
        # pynvml's name for nvmlDeviceGetComputeRunningProcesses_v3.
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:  # noqa: BLE001 - NVML is a second opinion: None says it had none
        return None
    pid = os.getpid()
    used = next((p.usedGpuMemory for p in procs if p.pid == pid), None)
    return None if used is None else int(used)


def gpu_memory(device: Any) -> GpuBytes:
    """This process's memory on ``device`` now: ``gpu_allocated_bytes`` (torch's
    allocator) and ``gpu_process_bytes`` (NVML); None on the CPU."""
    import torch

    cuda = device.type == "cuda"
    return {
        "gpu_allocated_bytes": int(torch.cuda.memory_allocated(device)) if cuda else None,
        "gpu_process_bytes": nvml_process_bytes(device),
    }


def grown(before: GpuBytes, after: GpuBytes) -> GpuBytes:
    """How much each figure grew from ``before`` to ``after`` (None where either is)."""
    out: GpuBytes = {}
    for key, now in after.items():
        then = before.get(key)
        out[key] = None if now is None or then is None else now - then
    return out
