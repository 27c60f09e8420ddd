"""Values a test passes where their type is wrong, on purpose."""

from __future__ import annotations

from typing import Any


def ill_typed(value: object) -> Any:
    """``value``, typed ``Any``: for a test that hands a function an argument of the wrong
    type (a float where an int belongs, a string for a number) to check that the function
    refuses it at run time. The type checker would rightly reject the call otherwise; this
    marks the mistake as deliberate, where it is made."""
    return value
