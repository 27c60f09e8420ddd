"""What every offloaded experts module shares: a fused experts module split into the
experts that stay resident (kept in ``gate_up_proj`` / ``down_proj``, only those) and
those that leave, with the map from an expert to its resident slot."""

from __future__ import annotations

from typing import Callable, Sequence, cast

import torch
from torch import nn

from client.moe.compute import Compute
from harvestd.errors import InvalidArgument


def fused_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused experts module's ``gate_up_proj`` and ``down_proj`` (tensors: that is what
    :func:`client.moe.offload.find_experts` looks for; ``nn.Module`` types its attributes
    as either)."""
    return cast(torch.Tensor, module.gate_up_proj), cast(torch.Tensor, module.down_proj)


class SplitExperts(nn.Module):
    """A fused experts module's resident part, and which experts left it
    (:attr:`offloaded`, ascending); subclasses say where those went."""

    gate_up_proj: nn.Parameter
    down_proj: nn.Parameter
    act_fn: Callable[[torch.Tensor], torch.Tensor]

    def __init__(
        self, original: nn.Module, name: str, offloaded: Sequence[int], compute: Compute
    ) -> None:
        super().__init__()
        gate_up, down = fused_weights(original)
        self.num_experts = int(gate_up.shape[0])
        self.name = name
        self.compute = compute
        self.act_fn = cast(Callable[[torch.Tensor], torch.Tensor], original.act_fn)
        off = sorted(set(int(e) for e in offloaded))
        if any(e < 0 or e >= self.num_experts for e in off):
            raise InvalidArgument(f"{name}: experts to offload must lie in [0, {self.num_experts})")
        resident = [e for e in range(self.num_experts) if e not in set(off)]
        self._slot = [-1] * self.num_experts  # expert: its row in the resident weights
        for i, e in enumerate(resident):
            self._slot[e] = i
        self._slot_of = torch.tensor(self._slot, dtype=torch.long)  # for the grouped plan
        self.offloaded = off
        self.row_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
        with torch.no_grad():
            index = torch.tensor(resident, dtype=torch.long, device=gate_up.device)
            self.gate_up_proj = nn.Parameter(
                gate_up.detach().index_select(0, index), requires_grad=False
            )
            self.down_proj = nn.Parameter(down.detach().index_select(0, index), requires_grad=False)
