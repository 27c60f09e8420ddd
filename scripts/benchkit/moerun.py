"""One timed run of a set-up mode of ``scripts/bench_moe.py``: a borrowing mode's experts
brought back into borrowed memory first (a run starts from the state its mode promises),
then a decode, with what the mode read from where (the copy path's reads by tier and
fetched bytes per step against the PCIe bound; placed tensors' tiers and revocations) and
what it allocated and kept."""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch

from benchkit.moedecode import decode
from benchkit.moemodes import BORROWING
from benchkit.moesetup import Setup, placed_tensors


def offloaded_keys(offload: Any) -> list[tuple[str, int]]:
    """The cache keys, ``(module name, expert)``, of a copy-path offload's offloaded experts."""
    return [(name, e) for name, module in offload.modules.items() for e in module.offloaded]


def borrowed(offload: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Bring every offloaded expert back into borrowed memory (a refill, as the cache's
    background pass does), waiting up to ``timeout``; how many are there now. A run
    starts from the state the mode promises: nothing left on the host copy after an
    earlier revocation."""
    from client.cache import Tier

    if offload.placement == "placed":
        return placed_borrowed(offload, timeout)
    keys = offloaded_keys(offload)
    began = time.monotonic()
    while True:
        n = sum(offload.cache.tier_of(k) in (Tier.GPU_LEASE, Tier.HOST_LEASE) for k in keys)
        if n == len(keys) or time.monotonic() - began > timeout:
            break
        offload.cache.refill()
        time.sleep(0.02)
    return {
        "borrowed_experts": n,
        "offloaded_experts": len(keys),
        "refill_wait_s": round(time.monotonic() - began, 3),
    }


def placed_borrowed(offload: Any, timeout: float) -> dict[str, Any]:
    """:func:`borrowed` for placed experts: refill until no byte reads the host copy."""
    began = time.monotonic()
    placed = placed_tensors(offload)
    while offload.tiers()["host"] and time.monotonic() - began < timeout:
        for p in placed:
            p.refill()
        time.sleep(0.02)
    return {"tiers": offload.tiers(), "refill_wait_s": round(time.monotonic() - began, 3)}


def placed_revocations(placed: list[Any], marks: list[tuple[int, int]]) -> dict[str, Any]:
    """What revocations ``placed`` (placed tensors) saw since ``marks`` (each one's
    ``(revocations, len(remap_ms))`` then): their count, summed, and each remap's ms."""
    pairs = list(zip(placed, marks, strict=True))
    return {
        "revocations_seen": sum(p.revocations - seen for p, (seen, _) in pairs),
        "remap_ms": [round(ms, 3) for p, (_, n) in pairs for ms in p.remap_ms[n:]],
    }


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def run_once(
    setup: Setup,
    batch: int,
    args: argparse.Namespace,
    device: torch.device,
    pinned: float,
    steps: int,
    seconds: float = 0.0,
    refill: bool = True,
) -> dict[str, Any]:
    """One timed decode of a set-up mode: its figures, and for a mode that copies experts
    what it copied per step against the PCIe bound (``tokens``: popped by the caller);
    for placed experts, their tiers after the run and the revocations they saw. A mode
    that borrows starts with every expert borrowed (``refill``: see to it here)."""
    off = setup.offload
    run: dict[str, Any] = {}
    fetched_at: list[int] = []
    copies = off is not None and off.placement == "copy"
    placed = placed_tensors(off) if off is not None and not copies else []
    if off is not None and refill and setup.mode in BORROWING:
        run.update(borrowed(off))
    marks = [(p.revocations, len(p.remap_ms)) for p in placed]
    kept = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    if copies:
        stats = off.cache.stats
        before = (dict(stats.hits), stats.revocations, stats.fallbacks, off.stats.bytes_fetched)
    res = decode(
        setup.model,
        batch,
        args.prompt,
        steps,
        args.warmup,
        device,
        between=None if not copies else lambda: fetched_at.append(off.stats.bytes_fetched),
        seconds=seconds,
    )
    per_step: float | None = None
    if kept is not None:
        gc.collect()  # the decode's cache and activations go: only what stays counts
        run["gpu_allocated_growth_bytes"] = torch.cuda.memory_allocated(device) - kept
    if off is not None and not copies:
        tiers = run["tiers_after"] = off.tiers()
        if setup.mode == "host-placed" and tiers["gpu-lease"] + tiers["host-lease"]:
            raise RuntimeError(f"host-placed read leased memory: {tiers}")
        run.update(placed_revocations(placed, marks))
    if copies:
        stats = off.cache.stats
        start = fetched_at[args.warmup - 1] if args.warmup else before[3]
        per_step = (fetched_at[-1] - start) / res["steps"]
        run.update(
            fetched_bytes_per_step=per_step,
            reads_by_tier=_delta(dict(stats.hits), before[0]),
            revocations_seen=stats.revocations - before[1],
            fallbacks=stats.fallbacks - before[2],
        )
    elif "copied_bytes_per_step" in setup.info:
        per_step = float(setup.info["copied_bytes_per_step"])
    if per_step and pinned == pinned:  # not NaN
        # Mean bytes over mean time: steps that route more offloaded experts move more,
        # so a median step would not match.
        bound_s = per_step / (pinned * 1e9)
        run.update(
            pcie_bound_step_ms=bound_s * 1e3, of_pcie_bound=bound_s / (res["step_ms_mean"] / 1e3)
        )
    run.update(res)
    return run
