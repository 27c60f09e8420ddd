"""Which GPU a client means by ``near``, by UUID (Ray remaps CUDA_VISIBLE_DEVICES, so
ordinals alone cannot name a physical GPU across processes)."""

from __future__ import annotations

from typing import Any

from harvestd.errors import InvalidArgument


def cuda_uuid(index: int) -> str:
    """The ``GPU-...`` UUID of the CUDA device with ordinal ``index`` in this process."""
    import torch

    props = torch.cuda.get_device_properties(index)
    raw = str(props.uuid)
    return raw if raw.startswith("GPU-") else f"GPU-{raw}"


def _index_of_uuid(uuid: str) -> int:
    import torch

    for i in range(torch.cuda.device_count()):
        if cuda_uuid(i) == uuid:
            return i
    raise InvalidArgument(f"no CUDA device visible here has UUID {uuid}")


def resolve_near(near: Any) -> tuple[Any, str]:
    """``(device to map for, GPU UUID to place near)`` for a ``near`` argument.

    ``None`` or ``"cpu"``: the CPU, no GPU. An int, ``"cuda:N"`` or ``torch.device``: that
    CUDA device. A ``"GPU-..."`` string: the visible device with that UUID.
    """
    if near is None or near == "cpu":
        return None, ""
    import torch

    if isinstance(near, str) and near.startswith("GPU-"):
        index = _index_of_uuid(near)
        return torch.device("cuda", index), near
    try:
        device = torch.device("cuda", near) if isinstance(near, int) else torch.device(near)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"near={near!r} names no device") from exc
    if device.type == "cpu":
        return None, ""
    if device.type != "cuda":
        raise InvalidArgument(f"near={near!r}: only CUDA devices and the CPU are supported")
    if not torch.cuda.is_available():
        raise InvalidArgument(f"near={near!r}: no CUDA device is available in this process")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise InvalidArgument(f"near={near!r}: only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index), cuda_uuid(index)
