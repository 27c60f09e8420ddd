"""How fast a Harvest cache's blocks come back from its leases (every layer at once, on the
decode path's fetch, checked byte for byte) and the yardstick the run holds it against: a
pinned host-to-device copy of 1 GiB measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchkit.kvmodel import sync
from harvestd.sizes import GiB


def reload(cache: Any, kv: list[tuple[Any, Any]], device: Any, reps: int = 3) -> dict[str, Any]:
    """Every layer's blocks at once, on the decode path's fetch: bytes per second; and a
    check that the bytes are the K/V that went in."""
    import torch

    layers = [layer for layer in cache.layers if layer.blocks]
    bufs = [
        torch.empty((layer.blocks, layer.row_bytes), dtype=torch.uint8, device=device)
        for layer in layers
    ]
    times = []
    for _ in range(reps):
        sync(device)
        began = time.perf_counter()
        fetches = [
            cache.cache.fetch(cache.block_keys(layer.index), buf)
            for layer, buf in zip(layers, bufs, strict=True)
        ]
        for fetch in fetches:
            fetch.wait()
        sync(device)
        times.append(time.perf_counter() - began)
    size = cache.block_tokens
    k, v = kv[0]
    first = bufs[0][0].view(k.dtype).view(2, *k.shape[:2], size, k.shape[3])
    nbytes = sum(buf.numel() for buf in bufs)
    seconds = statistics.median(times)
    return {
        "bytes": nbytes,
        "s": seconds,
        "GBps": nbytes / seconds / 1e9,
        "verified": bool(
            torch.equal(first[0], k[:, :, :size]) and torch.equal(first[1], v[:, :, :size])
        ),
        "tier_bytes": cache.stats.tier_bytes,
    }


def pinned_h2d(device: Any) -> dict[str, float] | None:
    """A pinned host-to-device copy of 1 GiB: median GB/s over CUDA events."""
    import torch

    if device.type != "cuda":
        return None
    src = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(GiB, dtype=torch.uint8, device=device)
    times = []
    for i in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    seconds = statistics.median(times)
    return {"bytes": GiB, "s": seconds, "GBps": GiB / seconds / 1e9}
