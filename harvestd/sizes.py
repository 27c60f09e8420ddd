"""Byte sizes as people write them: ``1GiB``, ``512M``, ``4096``."""

from __future__ import annotations

import re
from decimal import Decimal

from harvestd.errors import InvalidArgument

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1000**4,
    "tib": 1 << 40,
}
MAX_SIZE = (1 << 63) - 1  # what every size field on the wire can carry
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in ``text``; InvalidArgument for anything else (negative sizes included, and
    sizes past what the wire carries)."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise InvalidArgument(f"{text!r} is not a size (write e.g. 4096, 512MiB, 2GiB)")
        # Decimal, not float: a float of many digits is inf, and int(inf) raises.
        size = int(Decimal(match.group(1)) * _UNITS[unit])
    if size > MAX_SIZE:
        raise InvalidArgument(f"{text!r} is too large (at most {MAX_SIZE} bytes)")
    return size


def format_size(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit that keeps it at 1 or more."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"


def round_up(nbytes: int, granularity: int) -> int:
    """``nbytes`` rounded up to a whole multiple of ``granularity``."""
    return -(-nbytes // granularity) * granularity


def reserve_parts(text: str) -> tuple[int, float]:
    """``(bytes, fraction)`` of a validated reserve setting."""
    text = text.strip()
    if text.endswith("%"):
        return 0, float(text[:-1]) / 100
    return parse_size(text), 0.0
