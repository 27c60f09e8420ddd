"""Copy-engine ceilings between GPUs, measured in the benchmark's own run, for the
multi-GPU benchmarks (bench_bandwidth, bench_aggregate) to hold borrowed reads against.

A ceiling is a device-to-device copy of 1 GiB with peer access enabled: ``dst.copy_(src)``
across devices, which torch runs as ``cudaMemcpyAsync`` on the source's stream after
enabling peer access (``cudaDeviceEnablePeerAccess``) between the two. Concurrent copies
each get a stream of their own on both devices, so several links (or several copy
engines of one GPU) run at once; they are timed by the wall clock between full syncs of
every device involved (one copy of 1 GiB takes milliseconds; a sync costs microseconds).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

from harvestd.sizes import GiB


def gpu_count() -> int:
    """CUDA devices this process sees (0 without torch or CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def can_access_peer(a: int, b: int) -> bool:
    """Whether GPU ``a`` can map GPU ``b``'s memory directly (NVLink or PCIe P2P)."""
    import torch

    return a == b or bool(torch.cuda.can_device_access_peer(a, b))


def _sync(devices: Sequence[int]) -> None:
    import torch

    for d in sorted(set(devices)):
        torch.cuda.synchronize(d)


def concurrent_copies(
    pairs: Sequence[tuple[int, int]], nbytes: int = GiB, reps: int = 5, warmup: int = 2
) -> dict[str, Any]:
    """Copy ``nbytes`` from ``src`` to ``dst`` for every ``(src, dst)`` CUDA ordinal
    pair at once; the median aggregate GB/s over ``reps`` rounds."""
    import torch

    if not pairs:
        return {"pairs": [], "GBps": 0.0}
    srcs = [torch.empty(nbytes, dtype=torch.uint8, device=s).fill_(1) for s, _ in pairs]
    dsts = [torch.empty(nbytes, dtype=torch.uint8, device=d) for _, d in pairs]
    streams = [(torch.cuda.Stream(device=s), torch.cuda.Stream(device=d)) for s, d in pairs]
    devices = [x for pair in pairs for x in pair]
    times = []
    for rep in range(warmup + reps):
        _sync(devices)
        start = time.perf_counter()
        for (src_stream, dst_stream), src, dst in zip(streams, srcs, dsts, strict=True):
            # The copy runs on the source's current stream and fences the destination's:
            # a stream of its own on both keeps the copies from queueing behind each other.
            with torch.cuda.stream(src_stream), torch.cuda.stream(dst_stream):
                dst.copy_(src, non_blocking=True)
        _sync(devices)
        if rep >= warmup:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    del srcs, dsts
    torch.cuda.empty_cache()
    return {
        "pairs": [list(p) for p in pairs],
        "bytes_each": nbytes,
        "seconds": sec,
        "GBps": len(pairs) * nbytes / sec / 1e9,
        "reps": reps,
        "peer_access": [can_access_peer(d, s) for s, d in pairs],
    }


def peer_ceiling(src: int, dst: int, nbytes: int = GiB, reps: int = 10) -> dict[str, Any]:
    """One 1 GiB device-to-device copy from GPU ``src`` to GPU ``dst`` (peer access
    enabled), timed with CUDA events on ``dst``'s stream (the copy fences it both ways)."""
    import torch

    s = torch.empty(nbytes, dtype=torch.uint8, device=src).fill_(1)
    d = torch.empty(nbytes, dtype=torch.uint8, device=dst)
    for _ in range(3):
        d.copy_(s, non_blocking=True)
    _sync([src, dst])
    times = []
    with torch.cuda.device(dst):
        for _ in range(reps):
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            d.copy_(s, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
    ok = bool(torch.equal(d[:4096], s[:4096]))
    del s, d
    torch.cuda.empty_cache()
    sec = statistics.median(times)
    return {
        "src": src,
        "dst": dst,
        "bytes": nbytes,
        "GBps": nbytes / sec / 1e9,
        "us": sec * 1e6,
        "reps": reps,
        "peer_access": can_access_peer(dst, src),
        "verified": ok,
        "method": "torch copy_ across devices (cudaMemcpyAsync, peer access enabled)",
    }


def ordinal(text: str) -> int:
    """A CUDA ordinal from an index or a ``GPU-...`` UUID."""
    if text.upper().startswith("GPU-"):
        from lender.backends import cuda_driver as cu

        return cu.ordinal_of_uuid(text)
    return int(text)
