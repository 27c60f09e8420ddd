"""One run of one mode in ``scripts/bench_kv.py``: a fresh cache of that mode loaded with the
prefilled K/V, decoded, its memory measured (and, for Harvest, its reload), as the row the
JSON keeps. The top-level loop over contexts, batches and repeats stays in the script.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchkit.kvmemory import GpuMemory
from benchkit.kvmodel import decode, sync
from benchkit.kvmodes import HARVEST, PLACED_MODES, PLAIN, make_baseline
from benchkit.kvreload import reload
from harvestd.sizes import GiB, MiB


def make_cache(
    mode: str, model: Any, client: Any, args: argparse.Namespace, kv_bytes: int, max_tokens: int
) -> Any:
    """An empty cache of ``mode``."""
    from client.kv import HarvestCache

    slab = args.slab_bytes
    if mode in PLACED_MODES:
        return HarvestCache(
            client,
            block_tokens=args.block_tokens,
            config=model.config,
            placement="placed",
            max_tokens=max_tokens,
            backends=("cuda-vmm",) if mode == "harvest-gpu-placed" else ("host",),
            slab_bytes=slab,
            borrow_bytes=0 if mode == "host-placed" else kv_bytes + 2 * slab + GiB,
            refill_every=None,
        )
    if mode not in HARVEST:
        return make_baseline(mode, model.config, max_tokens, args.block_tokens)
    return HarvestCache(
        client,
        block_tokens=args.block_tokens,
        config=model.config,
        backends=("host",) if mode == "harvest-host" else ("cuda-vmm",),
        slab_bytes=slab,
        borrow_bytes=kv_bytes + 2 * slab + GiB,
        refill_every=None,
        placement="copy",
    )


def run_mode(
    doc: dict[str, Any],
    mode: str,
    repeat: int,
    model: Any,
    client: Any,
    args: argparse.Namespace,
    device: Any,
    memory: GpuMemory,
    kv: list[tuple[Any, Any]],
    first: Any,
) -> tuple[dict[str, Any], Any, Any]:
    """A fresh cache of ``mode``: load the prefilled K/V, decode, measure its memory and
    (for Harvest) the reload. The run's row, its tokens and its last logits."""
    import torch

    batch, context = first.shape[0], kv[0][0].shape[2]
    kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
    max_tokens = context + args.warmup + args.decode + 1
    base, nvml_base = memory.allocated(), memory.nvml_used()
    cache = make_cache(mode, model, client, args, kv_bytes, max_tokens)
    try:
        began = time.perf_counter()
        with torch.no_grad():
            for i, (k, v) in enumerate(kv):
                cache.update(k, v, i)
        sync(device)
        load_s = time.perf_counter() - began
        tokens, logits, seconds, extra = decode(model, cache, first, args, device, memory)
        allocated, peak, nvml = memory.allocated(), memory.peak(), memory.nvml_used()
        row: dict[str, Any] = {
            "context": context,
            "batch": batch,
            "mode": mode,
            "repeat": repeat,
            "steps": args.decode,
            "warmup": args.warmup,
            "seconds": seconds,
            "tokens_per_s": batch * args.decode / seconds,
            "ms_per_step": seconds / args.decode * 1e3,
            "kv_bytes": kv_bytes,
            "load_s": load_s,
            "gpu_bytes": None if allocated is None or base is None else allocated - base,
            "gpu_peak_bytes": None if peak is None or base is None else peak - base,
            "nvml_used_bytes": nvml,
            "nvml_delta_bytes": None if nvml is None or nvml_base is None else nvml - nvml_base,
            "cache_class": f"{type(cache).__module__}.{type(cache).__name__}",
            "transformers_offloading": getattr(cache, "offloading", None)
            if mode in (PLAIN, "offloaded-dynamic", "offloaded-static")
            else None,
            **extra,
        }
        if hasattr(cache, "host_bytes"):  # PinnedHostCache
            row.update(host_bytes=cache.host_bytes, device_bytes=cache.device_bytes)
        if mode in HARVEST or mode in PLACED_MODES:
            stats = cache.stats
            row.update(
                tier_bytes=stats.tier_bytes,
                leased_bytes=stats.leased_bytes,
                device_bytes=stats.device_bytes,
                host_bytes=stats.stored_bytes,  # the pinned authoritative copy
                revocations=stats.revocations,
                redone_rows=stats.redone_rows,
            )
            if mode in PLACED_MODES:
                # The authoritative copy is the placed tensors' whole capacity.
                row["host_bytes"] = sum(p.nbytes for p in cache.placed.tensors())
            if (
                mode in ("harvest-gpu", "harvest-gpu-placed")
                and args.leases_here
                and row["gpu_bytes"] is not None
            ):
                # On one GPU the leases are this GPU's memory (another process's: torch
                # does not count them, and the lender pools freed memory, so NVML's
                # delta misses them after the first run).
                row["gpu_bytes_with_leases"] = row["gpu_bytes"] + stats.leased_bytes
        gpu = row["gpu_bytes"]
        print(
            f"  r{repeat} {mode:20s} {row['tokens_per_s']:9.1f} tok/s "
            f"{row['ms_per_step']:8.2f} ms/step"
            + (f"  GPU {gpu / MiB:8.1f} MiB" if gpu is not None else ""),
            flush=True,
        )
        if mode in HARVEST and args.reload:
            got = reload(cache, kv, device)
            got.update(context=context, batch=batch, mode=mode, repeat=repeat)
            doc["reload"].append(got)
            print(
                f"  r{repeat} {mode:20s} reload {got['bytes'] / GiB:.2f} GiB: "
                f"{got['GBps']:.1f} GB/s (verified: {got['verified']})",
                flush=True,
            )
    finally:
        if hasattr(cache, "close"):
            cache.close()
        del cache
    return row, tokens, logits
