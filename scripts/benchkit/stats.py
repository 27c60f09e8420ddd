"""How a benchmark repeats and reports: every mode measured ``repeats`` times in the same
run, the modes in a different order each repeat (so that no mode always runs first, on a
cold cache, or last, on a warm GPU), and each figure reported as the median with its
minimum and maximum, every repeat kept."""

from __future__ import annotations

import statistics
from typing import Iterator, Sequence

MIN_REPEATS = 3
MIN_STEPS = 64


def alternating(modes: Sequence[str], repeats: int = MIN_REPEATS) -> Iterator[tuple[int, str]]:
    """``(repeat, mode)`` pairs: each repeat runs every mode once, the order rotated by one
    (and reversed every other repeat) from one repeat to the next."""
    modes = list(modes)
    for r in range(repeats):
        k = r % len(modes) if modes else 0
        order = modes[k:] + modes[:k]
        yield from ((r, mode) for mode in (order if r % 2 == 0 else order[::-1]))


def spread(values: Sequence[float]) -> dict[str, float | list[float]]:
    """``{"median", "min", "max", "values"}`` of the repeats of one figure."""
    if not values:
        raise ValueError("no values to summarise")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


def fmt(s: dict[str, float | list[float]], scale: float = 1.0, digits: int = 1) -> str:
    """``median (min-max)`` of a :func:`spread`, times ``scale``."""
    med, lo, hi = (float(s[k]) * scale for k in ("median", "min", "max"))  # type: ignore[arg-type]
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"
