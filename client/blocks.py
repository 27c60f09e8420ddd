"""Move many equal-size blocks between borrowed memory and a local tensor in one launch.

Borrowed memory is fast only in bulk: one kernel gathering 16 KiB blocks from a peer
GPU runs at link speed, while a ``.copy_`` per block runs at launch speed (two orders of
magnitude slower). torch already has the one-launch kernels: ``index_select`` (gather)
and ``index_copy_`` (scatter) over the byte range viewed as rows of ``block_bytes``.

* Offsets that are multiples of ``block_bytes``: the range is viewed as
  ``[n_blocks, block_bytes]`` and rows are selected.
* Other offsets: the range is viewed (``as_strided``) as overlapping rows starting every
  word, and the row at ``offset / word`` is selected (scatter uses a flat element index).
* Bytes move as 8-, 4- or 2-byte words when sizes, offsets and addresses allow.
* Pinned host memory feeding a CUDA tensor (or fed by one) is seen by the GPU through
  its device address (UVA), so the gather still runs as one GPU kernel over PCIe.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Sequence

import torch

from harvestd.errors import InvalidArgument

log = logging.getLogger(__name__)

# Wide words cut the per-element work of the kernels. On an H100, index_select of 16 KiB
# rows ran at 1.37-1.38 TB/s for 1-, 4-, 8- and 16-byte elements alike (memory-bound), so
# integer words up to 8 bytes suffice.
_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))

Offsets = Sequence[int] | torch.Tensor


def bytes_of(t: torch.Tensor, what: str) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (no copy); ``InvalidArgument`` naming
    ``what`` for anything else."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_contiguous():
        raise InvalidArgument(f"{what} must be contiguous")
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _source(t: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise InvalidArgument(f"{what} must be a 1-D torch.uint8 tensor (a mapping's bytes)")
    if t.stride(0) != 1:
        raise InvalidArgument(f"{what} must be contiguous")
    return t


def _check_offsets(
    offsets: Offsets, block_bytes: int, limit: int, check: bool
) -> tuple[torch.Tensor | list[int], int, int]:
    """``(offsets, count, alignment)``: alignment is the largest power of two up to 8
    dividing every offset, or ``block_bytes`` itself when every offset is a multiple."""
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes <= 0:
        raise InvalidArgument(f"block_bytes must be a positive int, got {block_bytes!r}")
    if isinstance(offsets, torch.Tensor):
        if offsets.dim() != 1 or offsets.dtype not in (torch.int64, torch.int32):
            raise InvalidArgument("offsets must be a 1-D int64 or int32 tensor")
        n = offsets.numel()
        if n == 0 or not check:
            return offsets, n, block_bytes
        off = offsets.long()
        flags = torch.stack(
            [off.min(), off.max()] + [(off % m == 0).all().long() for m in (block_bytes, 8, 4, 2)]
        ).tolist()  # one sync
        lo, hi, aligned = flags[0], flags[1], flags[2:]
    else:
        try:
            off_list = [operator.index(o) for o in offsets]
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"offsets must be integers: {exc}") from exc
        n = len(off_list)
        if n == 0:
            return off_list, 0, block_bytes
        lo, hi = min(off_list), max(off_list)
        g = 0
        for o in off_list:
            g = math.gcd(g, o)
        aligned = [g % m == 0 for m in (block_bytes, 8, 4, 2)]
        offsets = off_list
    if lo < 0 or hi + block_bytes > limit:
        raise InvalidArgument(
            f"offsets must lie in [0, {limit - block_bytes}] for "
            f"{block_bytes}-byte blocks in {limit} bytes; got "
            f"[{lo}, {hi}]"
        )
    align = (
        block_bytes
        if aligned[0]
        else next((m for m, ok in zip((8, 4, 2), aligned[1:], strict=True) if ok), 1)
    )
    return offsets, n, align


def _word(align: int, block_bytes: int, *tensors: torch.Tensor) -> tuple[int, torch.dtype]:
    """The widest word dividing the offsets' alignment, the block, and every address."""
    for size, dtype in _WORDS:
        if (
            align % size == 0
            and block_bytes % size == 0
            and all(t.data_ptr() % size == 0 and t.storage_offset() % size == 0 for t in tensors)
        ):
            return size, dtype
    return 1, torch.uint8


def _index(offsets: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    if isinstance(offsets, torch.Tensor):
        return offsets.to(device=device, dtype=torch.int64, non_blocking=True)
    return torch.tensor(offsets, dtype=torch.int64).to(device, non_blocking=True)


def _as_cuda(t: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor over the same bytes as CPU tensor ``t`` if ``t`` is pinned host
    memory (its UVA device address), else ``None``."""
    if t.device.type != "cpu" or device.type != "cuda":
        return None
    from lender.backends import cuda_driver as cu

    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        dptr = cu.host_device_pointer(t.data_ptr(), index)
    except Exception:  # noqa: BLE001 - no cuda-bindings: trust torch's own pinned check
        dptr = t.data_ptr() if t.is_pinned() else None
    if dptr is None:
        return None
    return cu.tensor_over(dptr, t.numel(), index, t)


def _rows(
    src: torch.Tensor,
    offsets: torch.Tensor,
    n: int,
    block_bytes: int,
    align: int,
    word: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(view, row index)``: ``view[row index]`` are the blocks, in words."""
    usable = src.numel() - src.numel() % word
    words = src[:usable].view(dtype)
    bw = block_bytes // word
    if align % block_bytes == 0:
        nrows = usable // block_bytes
        return words[: nrows * bw].view(nrows, bw), offsets // block_bytes
    nrows = words.numel() - bw + 1
    return words.as_strided((nrows, bw), (1, 1)), offsets // word


def gather(
    src: torch.Tensor, offsets: Offsets, block_bytes: int, out: torch.Tensor, *, check: bool = True
) -> torch.Tensor:
    """Copy the ``block_bytes``-long blocks at byte ``offsets`` of ``src`` (a 1-D uint8
    tensor, e.g. a lease's bytes) into ``out``, block ``i`` to bytes
    ``[i * block_bytes, (i + 1) * block_bytes)`` of ``out``; returns ``out``.

    One kernel when ``src`` and ``out`` share a device, or ``src`` is pinned host memory
    and ``out`` is on a GPU. ``check=False`` skips validating tensor offsets (which costs
    one device sync); they must then be in range and multiples of ``block_bytes``."""
    _source(src, "src")
    out_b = bytes_of(out, "out")
    offsets, n, align = _check_offsets(offsets, block_bytes, src.numel(), check)
    total = n * block_bytes
    if out_b.numel() < total:
        raise InvalidArgument(
            f"out holds {out_b.numel()} bytes; {n} blocks of {block_bytes} need {total}"
        )
    if n == 0:
        return out
    dst = out_b[:total]
    if src.device != out_b.device:
        view = _as_cuda(src, out_b.device)
        if view is not None:
            src = view
    work = (
        dst
        if src.device == dst.device
        else torch.empty(total, dtype=torch.uint8, device=src.device)
    )
    word, dtype = _word(align, block_bytes, src, work)
    table, rows = _rows(src, _index(offsets, src.device), n, block_bytes, align, word, dtype)
    torch.index_select(table, 0, rows, out=work.view(dtype).view(n, block_bytes // word))
    if work is not dst:
        dst.copy_(work)
    return out


def scatter(
    dst: torch.Tensor, src: torch.Tensor, offsets: Offsets, block_bytes: int, *, check: bool = True
) -> None:
    """Copy block ``i`` of ``src`` (bytes ``[i * block_bytes, (i + 1) * block_bytes)``)
    to byte ``offsets[i]`` of ``dst`` (a 1-D uint8 tensor, e.g. a lease's bytes).

    Blocks must not overlap (overlapping blocks land in no defined order). One kernel
    under the same conditions as :func:`gather`."""
    _source(dst, "dst")
    src_b = bytes_of(src, "src")
    offsets, n, align = _check_offsets(offsets, block_bytes, dst.numel(), check)
    total = n * block_bytes
    if src_b.numel() < total:
        raise InvalidArgument(
            f"src holds {src_b.numel()} bytes; {n} blocks of {block_bytes} need {total}"
        )
    if n == 0:
        return
    target = dst
    if dst.device != src_b.device:
        view = _as_cuda(dst, src_b.device)
        if view is not None:
            target = view
    rows_src = src_b[:total]
    if rows_src.device != target.device:
        rows_src = rows_src.to(target.device)
    word, dtype = _word(align, block_bytes, target, rows_src)
    index = _index(offsets, target.device)
    bw = block_bytes // word
    values = rows_src.view(dtype)
    if align % block_bytes == 0:
        table, rows = _rows(target, index, n, block_bytes, align, word, dtype)
        table.index_copy_(0, rows, values.view(n, bw))
        return
    # Overlapping row views cannot be written through: index the words themselves.
    usable = target.numel() - target.numel() % word
    flat = (index // word).unsqueeze(1) + torch.arange(bw, device=index.device)
    target[:usable].view(dtype).index_copy_(0, flat.reshape(-1), values)
