"""Placement: which lender serves a grant. The ``Policy`` seam and the default policy."""

from __future__ import annotations

from typing import Collection, Protocol, Sequence

from harvestd.model import LenderRecord, LenderState
from harvestd.sizes import round_up

# A placement key: smaller is better. See NearestBestFit.key.
PlacementKey = tuple[int, int, float, int, str]


class Policy(Protocol):
    """Chooses a lender for a request, or None when none fits."""

    def place(
        self,
        lenders: Sequence[LenderRecord],
        nbytes: int,
        node: str,
        near_gpu: str = "",
        backend: int = 0,
        avoid: Collection[str] = (),
    ) -> LenderRecord | None:
        """The lender to grant ``nbytes`` from; never one whose id is in ``avoid``."""


class NearestBestFit:
    """Same node as the client, never the client's own GPU, fastest link first, then GPU
    memory before host memory, then the least loaded, then the tightest fit (so large
    holes stay whole).

    Load is the lender's granted share, ``held / lendable``: among lenders reached over
    equally fast links, borrowers on several GPUs (and the stripes of one borrower) spread
    over the lenders instead of piling onto the one whose hole fits best, so that each
    lender's link and memory carry a fair part of the reads. ``spread=False`` drops load
    from the key (pure best fit, as before load was considered).

    One pass over the node's lenders: O(lenders on the node) per grant.
    """

    def __init__(self, spread: bool = True) -> None:
        self.spread = spread

    def key(
        self,
        lender: LenderRecord,
        nbytes: int,
        node: str,
        near_gpu: str = "",
        backend: int = 0,
        avoid: Collection[str] = (),
    ) -> PlacementKey | None:
        """``lender``'s rank for this request (smaller is better), or None if it may not
        serve it. Exposed so that tools can show the whole ranking (a dry run)."""
        if lender.state is not LenderState.UP or lender.node != node:
            return None
        if backend and lender.backend != backend:
            return None
        if near_gpu and lender.gpu_uuid == near_gpu:
            return None
        if lender.id in avoid:
            return None
        need = round_up(nbytes, lender.granularity)
        if need > lender.free:
            return None
        links = lender.links.get(near_gpu, 0) if near_gpu else 0
        is_gpu = 1 if lender.gpu_uuid else 0
        # free >= need > 0 here, so lendable > 0. Exact integer ratios give equal floats
        # for equal shares, so ties stay ties and fall to the fit.
        load = lender.held / lender.lendable if self.spread else 0.0
        return (-links, -is_gpu, load, lender.free - need, lender.id)

    def rank(
        self,
        lenders: Sequence[LenderRecord],
        nbytes: int,
        node: str,
        near_gpu: str = "",
        backend: int = 0,
        avoid: Collection[str] = (),
    ) -> list[tuple[PlacementKey, LenderRecord]]:
        """Every lender that may serve the request, best first, with its key."""
        keyed = []
        for lender in lenders:
            key = self.key(lender, nbytes, node, near_gpu, backend, avoid)
            if key is not None:
                keyed.append((key, lender))
        keyed.sort(key=lambda pair: pair[0])
        return keyed

    def place(
        self,
        lenders: Sequence[LenderRecord],
        nbytes: int,
        node: str,
        near_gpu: str = "",
        backend: int = 0,
        avoid: Collection[str] = (),
    ) -> LenderRecord | None:
        """See the class docstring."""
        best: PlacementKey | None = None
        choice: LenderRecord | None = None
        for lender in lenders:
            key = self.key(lender, nbytes, node, near_gpu, backend, avoid)
            if key is not None and (best is None or key < best):
                best, choice = key, lender
        return choice
