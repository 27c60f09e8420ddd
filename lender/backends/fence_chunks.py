"""Local GPU memory to fence CUDA VMM mappings with: a fenced range keeps its addresses
but maps these chunks of the client's own GPU instead of the lender's allocation, so
stale tensors read (and write) this process's private memory, never the lender's.

The chunks are allocated once per device and process and shared by every fenced mapping
there; nothing in them is meaningful (zeros at first, then whatever stale writers left).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from harvestd.errors import NoCapacity
from harvestd.sizes import round_up
from lender.backends import cuda_driver as cu

log = logging.getLogger(__name__)

# A fence covers the range with local chunks, one cuMemMap each (about 30 us apiece):
# granularity-sized chunks alone cost ~17 ms per GiB on an H100. Ranges this large or
# larger are covered with chunks of this size first (allocated once per device and
# process), the rest with granularity-sized ones. 0: granularity-sized chunks only.
FENCE_CHUNK_BYTES = 64 << 20

_fence_lock = threading.Lock()
_fence_chunks: dict[tuple[int, int], Any] = {}  # (ordinal, bytes) -> physical handle


def _fence_chunk(ordinal: int, size: int) -> Any:
    """A zeroed ``size``-byte allocation on ``ordinal``, shared by every fenced mapping of
    this process on that device (kept for the life of the process)."""
    with _fence_lock:
        handle = _fence_chunks.get((ordinal, size))
        if handle is None:
            with cu.on_device(ordinal) as drv:
                handle = cu.check(
                    drv.cuMemCreate(size, cu.vmm_prop(drv, ordinal, False), 0),
                    "cuMemCreate (fence chunk)",
                )
                va = cu.map_range(drv, handle, size, ordinal, size)
                try:
                    cu.check(drv.cuMemsetD8(va, 0, size), "cuMemsetD8")
                    cu.check(drv.cuCtxSynchronize(), "cuCtxSynchronize")
                finally:
                    drv.cuMemUnmap(va, size)
                    drv.cuMemAddressFree(va, size)
            _fence_chunks[(ordinal, size)] = handle
    return handle


def fence_plan(ordinal: int, span: int) -> list[tuple[int, Any, int]]:
    """``(offset, chunk handle, bytes)`` pieces that cover ``span`` bytes with local
    chunks: large ones while they fit, granularity-sized ones for the rest. Allocates
    the chunks it needs now, before anything is unmapped, so a failure changes nothing."""
    gran = cu.vmm_granularity(ordinal)
    big = round_up(FENCE_CHUNK_BYTES, gran) if FENCE_CHUNK_BYTES > gran else 0
    plan: list[tuple[int, Any, int]] = []
    off = 0
    if big and span >= big:
        try:
            handle = _fence_chunk(ordinal, big)
        except NoCapacity:  # the client's GPU is full: small chunks need less
            log.info("no room for a %d-byte fence chunk; fencing with small ones", big)
        else:
            while span - off >= big:
                plan.append((off, handle, big))
                off += big
    if off < span:
        handle = _fence_chunk(ordinal, gran)
        plan += [(o, handle, gran) for o in range(off, span, gran)]
    return plan
