"""Offloaded experts the model computes on where they lie: each layer's offloaded
experts in two placed tensors (``gate_up [n, 2I, H]``, ``down [n, H, I]``), backed by
leases and the authoritative host copy (see :mod:`client.placed`), read in place by the
same eager or grouped compute as the resident experts. No staging, no fetch: a revoked
lease's experts read the host copy at the same addresses until a refill brings them back.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import nn

from client.moe.compute import (
    Compute,
    Weights,
    eager_experts,
    eager_routes,
    grouped_experts,
    grouped_plan,
)
from client.moe.split import SplitExperts, fused_weights


class PlacedExperts(SplitExperts):
    """Stands in for a fused experts module: resident experts stay in ``gate_up_proj`` /
    ``down_proj`` (only those), offloaded ones live in :attr:`placed` (two placed
    tensors) and are read there."""

    def __init__(
        self,
        original: nn.Module,
        name: str,
        offloaded: Sequence[int],
        client: Any,
        compute: Compute = Compute.EAGER,
        place_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(original, name, offloaded, compute)
        gate_up, down = (w.detach() for w in fused_weights(original))
        self._position = {e: i for i, e in enumerate(self.offloaded)}
        self.placed: tuple[Any, Any] | None = None
        if self.offloaded:
            chosen = torch.tensor(self.offloaded, dtype=torch.long, device=gate_up.device)
            options = dict(place_options or {})
            placed_gate_up = client.place(gate_up.index_select(0, chosen), **options)
            try:
                placed_down = client.place(down.index_select(0, chosen), **options)
            except BaseException:
                placed_gate_up.close()
                raise
            self.placed = (placed_gate_up, placed_down)

    def tiers(self) -> dict[str, int]:
        """Bytes of the offloaded experts in each tier (see ``PlacedTensor.tiers``)."""
        out: dict[str, int] = {}
        for placed in self.placed or ():
            for tier, nbytes in placed.tiers().items():
                out[tier] = out.get(tier, 0) + nbytes
        return out

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The experts' output for the routed tokens, offloaded experts read in place."""
        with contextlib.ExitStack() as uses:
            placed: Weights | None = None
            if self.placed is not None:
                # Held while the kernels are queued: a revocation's remap waits for this
                # block, then for the device, before it changes a page under them.
                placed = (
                    uses.enter_context(self.placed[0].use()),
                    uses.enter_context(self.placed[1].use()),
                )
            if self.compute is Compute.GROUPED:
                plan = grouped_plan(
                    top_k_index, self._slot_of, self.gate_up_proj.shape[0], self.offloaded
                )
                return grouped_experts(
                    hidden_states,
                    top_k_weights,
                    plan,
                    (self.gate_up_proj, self.down_proj),
                    placed,
                    self.act_fn,
                    None,
                )

            def weights(expert: int) -> Weights:
                slot = self._slot[expert]
                if slot >= 0:
                    return self.gate_up_proj[slot], self.down_proj[slot]
                assert placed is not None  # an offloaded expert exists, so it was placed
                i = self._position[expert]
                return placed[0][i], placed[1][i]

            routes = eager_routes(top_k_index, self.num_experts)
            return eager_experts(hidden_states, top_k_weights, routes, weights, self.act_fn, None)

    def close(self) -> None:
        """Give the placed experts' leases back (the module must not run afterwards)."""
        for placed in self.placed or ():
            placed.close()
