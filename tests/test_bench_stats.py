"""The benchmarks' repeats (scripts/benchkit/stats.py): every mode once per repeat, in a
different order each time, and figures as median with min and max."""

from __future__ import annotations

import pytest
from benchkit.stats import alternating, fmt, spread


def test_every_mode_runs_once_per_repeat_and_no_mode_always_runs_first():
    modes = ["resident", "best-host-offload", "harvest-gpu"]
    pairs = list(alternating(modes, 3))
    for r in range(3):
        assert sorted(m for rr, m in pairs if rr == r) == sorted(modes)
    firsts = [next(m for rr, m in pairs if rr == r) for r in range(3)]
    lasts = [[m for rr, m in pairs if rr == r][-1] for r in range(3)]
    assert len(set(firsts)) > 1 and len(set(lasts)) > 1


def test_spread_keeps_every_value_and_formats_median_min_max():
    s = spread([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["values"]) == (2.0, 1.0, 3.0, [3.0, 1.0, 2.0])
    assert fmt(s, scale=10) == "20.0 (10.0-30.0)"
    with pytest.raises(ValueError):
        spread([])
