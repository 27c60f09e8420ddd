"""Which path a workload takes: compute on placed tensors, or copy into staging.

``placement="auto"`` (the default of ``offload_experts`` and ``HarvestCache``) is placed
tensors on a CUDA device whose driver maps pinned host memory through the VMM API (what
a revocation remaps to), and the copy path everywhere else: the CPU, and GPUs whose
driver cannot (``harvestd doctor`` says which a machine gets).
"""

from __future__ import annotations

import logging
from typing import Any

from harvestd.errors import HarvestError, InvalidArgument

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "copy", "placed")


def check_placement(placement: Any) -> str:
    """``placement`` if it is one of :data:`PLACEMENTS`, else :class:`InvalidArgument`."""
    if placement not in PLACEMENTS:
        raise InvalidArgument(
            f"placement must be one of {', '.join(PLACEMENTS)}; got {placement!r}"
        )
    return placement


def choose_placement(placement: str, device: Any = None) -> str:
    """``"copy"`` or ``"placed"`` for ``placement`` on ``device`` (default: this
    process's current CUDA device, if it has one)."""
    if check_placement(placement) != "auto":
        return placement
    return "placed" if places_in_place(device) else "copy"


def places_in_place(device: Any = None) -> bool:
    """Whether placed tensors on ``device`` read their pages in place (a CUDA device
    that maps VMM host memory); False on the CPU."""
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return False
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return False
    try:
        from lender.backends.vmm_host import host_location

        index = device.index if device.index is not None else torch.cuda.current_device()
        host_location(index)
    except (HarvestError, ImportError) as err:
        log.info("placed tensors unavailable on %s (%s): the copy path serves", device, err)
        return False
    return True
