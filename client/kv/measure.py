"""Measure the rates a KV fetch plan is made from (:class:`client.kv.plan.Rates`): each
link's bandwidth and fixed cost, and how fast K and V are recomputed, the way
:func:`client.kv.fetch.fetch_kv` moves and computes."""

from __future__ import annotations

import logging
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable

from client.kv.fetch import DEFAULT_CHUNK_TOKENS, _project
from client.kv.plan import KVShape, Rates
from harvestd.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def timer(
    device: "torch.device", warmup: int, repeats: int
) -> Callable[[Callable[[], Any]], float]:
    """A function timing a callable: median seconds of ``repeats`` runs after ``warmup``
    (CUDA events on the current stream, or the wall clock on the CPU)."""
    import torch

    def run(fn: Callable[[], Any]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                began = time.perf_counter()
                fn()
                times.append(time.perf_counter() - began)
        return max(statistics.median(times), 1e-9)

    return run


def _link(src: Any, dst: Any, nbytes: int, time_it: Callable) -> tuple[float, float]:
    """``(bytes/s, latency s)`` of copies from ``src`` into ``dst``: a large copy for the
    bandwidth, a 64 KiB one for the fixed cost."""
    import torch

    src = src.reshape(-1).view(torch.uint8)
    n = min(nbytes, src.numel(), dst.numel())
    if n <= 0:
        raise InvalidArgument("a link source to measure must not be empty")
    big = time_it(lambda: dst[:n].copy_(src[:n], non_blocking=True))
    small_n = min(n, 64 << 10)
    small = time_it(lambda: dst[:small_n].copy_(src[:small_n], non_blocking=True))
    bps = n / big
    return bps, max(0.0, small - small_n / bps)


def measure_rates(
    shape: KVShape,
    device: Any = "cuda",
    *,
    host: Any = None,
    peer: Any = None,
    dtype: Any = None,
    nbytes: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    repeats: int = 5,
    warmup: int = 2,
) -> Rates:
    """Measure :class:`Rates` on ``device`` the way :func:`fetch_kv` moves and computes.

    ``host``: a pinned CPU tensor to read from (a host lease's ``as_bytes()``); without
    one a pinned buffer is made. ``peer``: a tensor on the GPU lease (``as_bytes()``);
    without one there is no peer. ``nbytes``: bytes per bandwidth copy (256 MiB on CUDA,
    4 MiB on the CPU). The recompute rate times both GEMMs on ``chunk_tokens``-row
    chunks of ``dtype`` (default: bf16 for 2-byte shapes, float32 for 4). On the CPU the
    sizes are small and the rates say the paths run one after another."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    if dtype is None:
        dtype = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}.get(shape.dtype_bytes)
        if dtype is None:
            raise InvalidArgument(f"no GEMM dtype of {shape.dtype_bytes} bytes: pass dtype")
    nbytes = nbytes or ((256 << 20) if cuda else (4 << 20))
    time_it = timer(device, warmup, repeats)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if host is None:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    host_bps, host_lat = _link(host, dst, nbytes, time_it)
    peer_bps = peer_lat = None
    if peer is not None:
        peer_bps, peer_lat = _link(peer, dst, nbytes, time_it)
    rows = chunk_tokens if cuda else min(chunk_tokens, 64)
    reps = 8 if cuda else 2
    x = torch.randn(rows, shape.hidden_size, device=device).to(dtype)
    w_k, w_v = (
        torch.randn(shape.kv_dim, shape.hidden_size, device=device).to(dtype) for _ in range(2)
    )
    b = torch.randn(shape.kv_dim, device=device).to(dtype)
    out_k, out_v = (torch.empty(rows, shape.kv_dim, device=device, dtype=dtype) for _ in range(2))

    def gemms() -> None:
        for _ in range(reps):
            _project(x, w_k, b, out_k)
            _project(x, w_v, b, out_v)

    rate = rows * reps / time_it(gemms)
    rates = Rates(
        peer_bps=peer_bps,
        host_bps=host_bps,
        recompute_tokens_per_s=rate,
        peer_latency_s=peer_lat or 0.0,
        host_latency_s=host_lat,
        concurrent=cuda,
    )
    log.info("measured on %s for %s: %s", device, shape, rates)
    return rates
