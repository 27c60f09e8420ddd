"""A fake clock for the lease table's tests."""

from __future__ import annotations


class Clock:
    """A clock a test moves by hand (``clock.now += 5``), for the lease table's tests."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
