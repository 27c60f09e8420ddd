"""Offloaded experts the model computes on where they lie: each layer's offloaded
experts in two placed tensors (``gate_up [n, 2I, H]``, ``down [n, H, I]``), backed by
leases and the authoritative host copy (see :mod:`client.placed`), read in place by the
same eager or grouped compute as the resident experts. No staging, no fetch: a revoked
lease's experts read the host copy at the same addresses until a refill brings them back.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence, cast

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
from harvestd.errors import InvalidArgument


class PlacedExperts(nn.Module):
    """Stands in for a fused experts module: resident experts stay in ``gate_up_proj`` /
    ``down_proj`` (only those), offloaded ones live in :attr:`placed` (two placed
    tensors) and are read there."""

    gate_up_proj: nn.Parameter
    down_proj: nn.Parameter
    act_fn: Callable[[torch.Tensor], torch.Tensor]

    def __init__(
        self,
        original: nn.Module,
        name: str,
        offloaded: Sequence[int],
        client: Any,
        compute: Compute = Compute.EAGER,
        place_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        gate_up = cast(torch.Tensor, original.gate_up_proj).detach()
        down = cast(torch.Tensor, original.down_proj).detach()
        self.num_experts = int(gate_up.shape[0])
        self.name = name
        self.compute = compute
        self.act_fn = cast(Callable[[torch.Tensor], torch.Tensor], original.act_fn)
        off = sorted(set(int(e) for e in offloaded))
        if any(e < 0 or e >= self.num_experts for e in off):
            raise InvalidArgument(f"{name}: experts to offload must lie in [0, {self.num_experts})")
        resident = [e for e in range(self.num_experts) if e not in set(off)]
        self._slot = [-1] * self.num_experts
        for i, e in enumerate(resident):
            self._slot[e] = i
        self._slot_of = torch.tensor(self._slot, dtype=torch.long)
        self._position = {e: i for i, e in enumerate(off)}
        self.offloaded = off
        self.row_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
        with torch.no_grad():
            index = torch.tensor(resident, dtype=torch.long, device=gate_up.device)
            self.gate_up_proj = nn.Parameter(gate_up.index_select(0, index), requires_grad=False)
            self.down_proj = nn.Parameter(down.index_select(0, index), requires_grad=False)
        self.placed: tuple[Any, Any] | None = None
        if off:
            chosen = torch.tensor(off, dtype=torch.long, device=gate_up.device)
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
