"""How a striped lease lays its bytes over its stripes, and how many stripes to take:
the arithmetic of :mod:`client.striped`, with no lease in it (tested on simulated
topologies in tests/test_placement.py)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from harvestd.errors import InvalidArgument
from harvestd.sizes import round_up

if TYPE_CHECKING:
    import torch

DEFAULT_UNIT = 2 << 20  # the VMM granularity: whole allocation pages per stripe unit
MAX_STRIPES = 64


@dataclass(frozen=True)
class StripeLayout:
    """Where logical byte ``o`` lives: unit ``u = o // unit`` is on stripe ``u % stripes``,
    at that stripe's byte ``(u // stripes) * unit + o % unit``."""

    nbytes: int
    stripes: int
    unit: int = DEFAULT_UNIT

    def __post_init__(self) -> None:
        for name in ("nbytes", "stripes", "unit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgument(f"{name} must be a positive int, got {value!r}")
        if self.stripes > MAX_STRIPES:
            raise InvalidArgument(f"at most {MAX_STRIPES} stripes, got {self.stripes}")
        if self.units < self.stripes:
            raise InvalidArgument(
                f"{self.nbytes} bytes make {self.units} units of "
                f"{self.unit}: too few for {self.stripes} stripes"
            )

    @property
    def units(self) -> int:
        """Stripe units in the logical space (the last may be partial)."""
        return -(-self.nbytes // self.unit)

    def stripe_bytes(self, stripe: int) -> int:
        """Bytes stripe ``stripe`` holds (whole units)."""
        return -(-(self.units - stripe) // self.stripes) * self.unit

    def locate(self, offset: int) -> tuple[int, int]:
        """``(stripe, byte in that stripe)`` of logical byte ``offset``."""
        offset = operator.index(offset)
        if not 0 <= offset < self.nbytes:
            raise InvalidArgument(f"offset {offset} is outside [0, {self.nbytes})")
        unit, within = divmod(offset, self.unit)
        return unit % self.stripes, (unit // self.stripes) * self.unit + within


@dataclass(frozen=True)
class StripePlan:
    """A gather's or scatter's blocks sorted by stripe, made once by
    :meth:`StripedLease.plan` and reusable with no device sync: ``local`` holds the
    stripes' byte offsets in stripe order (``counts[s]`` of them for stripe ``s``),
    ``order`` maps each sorted position to the call's block index (None when the blocks
    already come grouped by stripe, which saves a local copy per call)."""

    layout: StripeLayout
    block_bytes: int
    n: int
    counts: tuple[int, ...]
    local: "torch.Tensor | None"
    order: "torch.Tensor | None"
    aligned: bool
    device: Any
    rows: "torch.Tensor | None" = None  # local // block_bytes, when every block is aligned


# ---------------------------------------------------------------- how many stripes


def _free(lender: Any) -> int:
    return max(0, int(lender.capacity) - int(lender.reclaimed)) - int(lender.granted)


def auto_stripes(
    lenders: Iterable[Any],
    nbytes: int,
    near_gpu: str,
    node: str,
    backend: int = 0,
    unit: int = DEFAULT_UNIT,
    max_stripes: int = 8,
) -> int:
    """How many stripes read ``nbytes`` fastest into GPU ``near_gpu``, from ``lenders``
    (``pb.Lender`` as ``Client.lenders()`` gives them).

    Only lenders with NVLink to ``near_gpu`` and room for a stripe count. Equal stripes
    are read at once, so the slowest link sets the pace: ``k`` stripes on the ``k`` best
    links read about ``k * links[k-1]`` link-widths, and the smallest ``k`` that maximises
    it wins (on NVSwitch, where every peer has the same links, that is every peer up to
    ``max_stripes``). 1 when no lender has NVLink to ``near_gpu``, or there is none."""
    from protos import harvest_pb2 as pb

    if not near_gpu or max_stripes <= 1:
        return 1
    units = -(-nbytes // unit)
    best_k, best_rate = 1, 0
    for k in range(1, min(max_stripes, units, MAX_STRIPES) + 1):
        size = StripeLayout(nbytes, k, unit).stripe_bytes(0)
        links = sorted(
            (
                next((l.nvlinks for l in lender.links if l.peer_uuid == near_gpu), 0)
                for lender in lenders
                if lender.state == pb.LENDER_UP
                and lender.node == node
                and lender.gpu_uuid
                and lender.gpu_uuid != near_gpu
                and (not backend or lender.backend == backend)
                and _free(lender) >= round_up(size, max(1, int(lender.granularity)))
            ),
            reverse=True,
        )
        if len(links) < k or links[k - 1] <= 0:
            continue
        if k * links[k - 1] > best_rate:
            best_k, best_rate = k, k * links[k - 1]
    return best_k
