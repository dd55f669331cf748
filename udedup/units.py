"""Sizes in the project's one syntax (``64 MiB``, ``64M``, ``1.5G``, ``4096``: binary units) and
their display."""
from __future__ import annotations

import re

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(value) -> int:
    """``64 MiB``, ``64M``, ``1.5G``, ``4096`` → bytes (binary units)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64 MiB, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative ({value})")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"expected a size such as 4096, 64 MiB or 1G, got {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``; negative sizes keep their sign."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} TiB"


def mib(n: float) -> str:
    """Bytes as ``12.3 MiB`` (log lines and tables that keep one unit)."""
    return f"{n / (1 << 20):.1f} MiB"
