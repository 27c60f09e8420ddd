"""What GPU memory a ``scripts/bench_kv.py`` run holds: the decoding process's own (torch's
allocator) and the whole GPU's (NVML, every process), and whether the GPU leases it
borrows sit in that same GPU's memory (on a one-GPU machine they do, and then count as
memory the run holds). The decode loop and the run of each mode read these figures, so
they live apart from both.
"""

from __future__ import annotations

from typing import Any


class GpuMemory:
    """What the decoding process holds on its GPU (torch's allocator), and what the
    whole GPU has in use (NVML, every process: lenders too). None on the CPU."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self._nvml: Any = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            from client.devices import cuda_uuid

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByUUID(cuda_uuid(device.index or 0))
            self._nvml = (pynvml, handle)
        except Exception as exc:  # noqa: BLE001 - NVML is a nicety: say so and go on
            print(f"NVML unavailable ({exc!r}): no NVML column", flush=True)

    def allocated(self) -> int | None:
        """Bytes torch's allocator holds on the device now."""
        import torch

        return int(torch.cuda.memory_allocated(self.device)) if self.device.type == "cuda" else None

    def reset_peak(self) -> None:
        """Start a new peak for :meth:`peak`."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        """The most torch's allocator held since the last :meth:`reset_peak`."""
        import torch

        if self.device.type != "cuda":
            return None
        return int(torch.cuda.max_memory_allocated(self.device))

    def nvml_used(self) -> int | None:
        """The whole GPU's used memory as NVML counts it (every process)."""
        if self._nvml is None:
            return None
        pynvml, handle = self._nvml
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def lender_is_here(lender_gpu: str, device: Any) -> bool:
    """Whether the GPU the node lends (an NVML index or a UUID) is the one that decodes."""
    if device.type != "cuda":
        return False
    from client.devices import cuda_uuid

    here = cuda_uuid(device.index or 0)
    if lender_gpu.startswith("GPU-"):
        return lender_gpu == here
    try:
        from benchkit.tenant import gpu_uuid

        return gpu_uuid(lender_gpu) == here
    except Exception:  # noqa: BLE001 - no NVML: CUDA and NVML indices usually agree
        return int(lender_gpu) == (device.index or 0)
