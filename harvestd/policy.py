"""Placement: which lender serves a grant. The ``Policy`` seam and the default policy."""
from __future__ import annotations

from typing import Protocol, Sequence

from harvestd.model import LenderRecord, LenderState
from lender.backends.base import round_up


class Policy(Protocol):
    """Chooses a lender for a request, or None when none fits."""

    def place(self, lenders: Sequence[LenderRecord], nbytes: int, node: str,
              near_gpu: str = "", backend: int = 0) -> LenderRecord | None:
        """The lender to grant ``nbytes`` from."""


class NearestBestFit:
    """Same node as the client, never the client's own GPU, fastest link first, then
    GPU memory before host memory, then the tightest fit (so large holes stay whole)."""

    def place(self, lenders: Sequence[LenderRecord], nbytes: int, node: str,
              near_gpu: str = "", backend: int = 0) -> LenderRecord | None:
        """See the class docstring."""
        best: tuple | None = None
        choice: LenderRecord | None = None
        for lender in lenders:
            if lender.state is not LenderState.UP or lender.node != node:
                continue
            if backend and lender.backend != backend:
                continue
            if near_gpu and lender.gpu_uuid == near_gpu:
                continue
            need = round_up(nbytes, lender.granularity)
            if need > lender.free:
                continue
            links = lender.links.get(near_gpu, 0) if near_gpu else 0
            is_gpu = 1 if lender.gpu_uuid else 0
            key = (-links, -is_gpu, lender.free - need, lender.id)
            if best is None or key < best:
                best, choice = key, lender
        return choice
