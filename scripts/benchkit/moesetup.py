"""Setting a mode of ``scripts/bench_moe.py`` up: its model made once from the model as
built (a copy with Harvest's experts module or accelerate's CPU offload, or the model
itself), with what the setup kept on the GPU and its staging (``FIELDS``), and why a mode
cannot run on this machine. Every mode of a run lives in one process, so a setup is
measured by what it grew the process's GPU figures by."""

from __future__ import annotations

import argparse
import copy
import gc
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from benchkit.gpumem import GpuBytes, gpu_memory, grown
from benchkit.moemodes import MODES, NEEDS_CUDA, OPTIONAL_MODES


@dataclass
class Setup:
    """One mode's model, made once for a model and fraction and decoded at every batch
    size and repeat; ``offload`` is Harvest's :class:`~client.moe.ExpertOffload` where the
    mode runs Harvest's module."""

    mode: str
    model: Any
    offload: Any = None
    info: dict[str, Any] = field(default_factory=dict)


def release(device: torch.device) -> None:
    """Free what dropped objects still hold (Python's garbage, torch's CUDA cache), so
    that the next figure of GPU memory counts only what is alive."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def accelerate_offload(model: Any, fraction: float, device: torch.device, pinned: bool) -> dict:
    """accelerate's CPU offload of the experts of ``fraction`` of the layers (``pinned``:
    with its host copy in pinned memory, given through ``state_dict``); what it did."""
    from accelerate import cpu_offload

    from client.moe import find_experts

    modules = list(find_experts(model).values())
    count = max(1, round(fraction * len(modules)))
    moved = 0
    all_pinned = True
    for module in modules[:count]:
        moved += sum(p.numel() * p.element_size() for p in module.parameters())
        state_dict = None
        if pinned and device.type == "cuda":
            state_dict = {
                n: t.detach().to("cpu").pin_memory() for n, t in module.state_dict().items()
            }
        elif pinned:
            all_pinned = False  # pinning needs CUDA: on the CPU there is no copy to speed up
            state_dict = {n: t.detach().to("cpu") for n, t in module.state_dict().items()}
        cpu_offload(module, execution_device=device, state_dict=state_dict)
    release(device)
    info: dict[str, Any] = {
        "offloaded_bytes": moved,
        # Every weight of an offloaded module is copied in before each call of it.
        "copied_bytes_per_step": moved,
        "offloaded_layers": count,
        "layers": len(modules),
        "host_copy_pinned": bool(pinned and all_pinned and device.type == "cuda"),
    }
    if pinned and device.type != "cuda":
        info["note"] = "on the CPU there is nothing to pin: the host copy is plain memory"
    return info


def setup_mode(
    mode: str,
    base: Any,
    fraction: float,
    client: Any,
    args: argparse.Namespace,
    device: torch.device,
) -> Setup:
    """Make ``mode``'s model from ``base`` (``resident`` is ``base`` itself)."""
    if mode == "resident":
        return Setup(mode, base, info={"offloaded_bytes": 0})
    if mode == "resident-grouped-mm":
        model = copy.deepcopy(base)
        model.config._experts_implementation = "grouped_mm"
        return Setup(mode, model, info={"offloaded_bytes": 0})
    if mode in ("accelerate-pinned", "accelerate-default"):
        model = copy.deepcopy(base)
        info = accelerate_offload(model, fraction, device, pinned=mode == "accelerate-pinned")
        return Setup(mode, model, info=info)
    # The copy modes ask for the copy path: the default ("auto") is placed on a GPU.
    kwargs: dict[str, Any] = {"slab_bytes": args.slab_bytes, "compute": args.compute}
    if mode in ("resident-same-code", "best-host-offload", "harvest-host", "harvest-gpu"):
        kwargs["placement"] = "copy"
    if mode == "resident-same-code":
        kwargs.update(fraction=0.0, backends=("host",))
    elif mode == "best-host-offload":
        kwargs.update(fraction=fraction, backends=("host",), borrow_bytes=0, refill_every=None)
    elif mode == "harvest-host":
        kwargs.update(fraction=fraction, backends=("host",))
    elif mode == "harvest-gpu":
        kwargs.update(fraction=fraction, backends=("cuda-vmm",))
    elif mode == "host-placed":
        kwargs.update(fraction=fraction, placement="placed", borrow_bytes=0, refill_every=None)
    elif mode == "harvest-gpu-placed":
        kwargs.update(fraction=fraction, placement="placed")
    else:
        raise SystemExit(f"unknown mode {mode!r} ({', '.join(MODES + OPTIONAL_MODES)})")
    return harvest_setup(mode, base, client, device, **kwargs)


def harvest_setup(mode: str, base: Any, client: Any, device: torch.device, **kwargs: Any) -> Setup:
    """``mode``'s model: a copy of ``base`` with ``offload_experts(model, client,
    **kwargs)``; what it offloaded and borrowed (and, placed, in how many placed
    tensors). A mode that must read its host copy and borrowed is refused."""
    from client.moe import offload_experts

    model = copy.deepcopy(base)
    offload = offload_experts(model, client, **kwargs)
    release(device)
    info: dict[str, Any] = {
        "offloaded_bytes": offload.stats.bytes_offloaded,
        "offloaded_experts": offload.stats.experts_offloaded,
        "experts": offload.stats.experts_total,
        "host_copy_pinned": device.type == "cuda",
    }
    if offload.placement == "placed":
        tiers = offload.tiers()
        placed = placed_tensors(offload)
        info.update(
            tiers=tiers,
            borrowed_bytes=tiers["gpu-lease"] + tiers["host-lease"],
            placed_objects=len(placed),
            placed_chunk_bytes=max((p.chunk_bytes for p in placed), default=0),
        )
    else:
        info["borrowed_bytes"] = offload.cache.borrowed_bytes
    if mode in ("best-host-offload", "host-placed") and info["borrowed_bytes"]:
        offload.close()
        raise RuntimeError(f"{mode} borrowed memory: it must read its host copy")
    return Setup(mode, model, offload, info)


def measured_setup(make: Callable[[], Setup], device: torch.device, model: GpuBytes) -> Setup:
    """``make()``, with what it kept on the GPU and its staging in its info (``FIELDS``);
    ``model``: what the model as built holds (``resident``'s figures: it is that model)."""
    release(device)
    before = gpu_memory(device)
    setup = make()
    release(device)
    if setup.mode == "resident":
        setup.info.update(model)
    else:
        setup.info.update(grown(before, gpu_memory(device)))
        setup.info.update(staging(setup.info, model))
    return setup


def staging(info: dict[str, Any], model: GpuBytes) -> GpuBytes:
    """A set-up mode's own GPU memory beyond the model's own non-offloaded part (what
    the model as built holds, ``model``, less what the mode offloaded), both ways."""
    out: GpuBytes = {}
    for key, of in (
        ("staging_bytes", "gpu_allocated_bytes"),
        ("staging_process_bytes", "gpu_process_bytes"),
    ):
        own, whole = info.get(of), model.get(of)
        out[key] = None if own is None or whole is None else own - (whole - info["offloaded_bytes"])
    return out


def close(setup: Setup) -> None:
    """Close ``setup``'s offload (its leases go back); a mode without one holds none."""
    if setup.offload is not None:
        setup.offload.close()


def skip_reason(mode: str, device: torch.device, lenders: dict[str, Any]) -> str | None:
    """Why ``mode`` cannot run here (None: it can)."""
    if mode in ("harvest-gpu", "harvest-gpu-placed", "resident-grouped-mm") and (
        device.type != "cuda"
    ):
        return NEEDS_CUDA
    if mode in ("harvest-gpu", "harvest-gpu-placed") and "cuda-vmm" not in lenders:
        return "skipped (no cuda-vmm lender on this node)"
    return None


def placed_tensors(offload: Any) -> list[Any]:
    """The placed tensors (:class:`client.placed.PlacedTensor`) of a placed offload."""
    return [p for m in offload.modules.values() for p in getattr(m, "placed", None) or ()]
