"""A byte pattern two processes can each compute: one writes it into lent memory, the
other checks what it sees."""

from __future__ import annotations

import torch


def pattern(n: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """Bytes both processes can compute: the lender writes them, the client checks them.
    Values stay below 251, so markers 0xFB..0xFF never occur in a pattern by chance."""
    return ((torch.arange(n, device=device, dtype=torch.int64) * 131 + seed) % 251).to(torch.uint8)
