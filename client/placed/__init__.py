"""Placed tensors: one address range, pages in any tier, revocation by remapping.

    from client import connect
    placed = connect().place(weights, device="cuda:0")
    with placed.use() as w:
        y = x @ w.T

See :class:`PlacedTensor` and docs/placed.md.
"""

from client.placed.space import Tier
from client.placed.tensor import PlacedTensor

__all__ = ["PlacedTensor", "Tier"]
