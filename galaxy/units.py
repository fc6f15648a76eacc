"""Human units in cluster files and flags: sizes ('2GB', '512MiB') and link rates ('100mbit')."""

from __future__ import annotations

import re

_SIZE = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_RATE = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bps": 1, "kbps": 10**3, "mbps": 10**6,
         "gbps": 10**9}
_NUM = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z/]*)\s*$")


def _split(text) -> tuple[float, str]:
    m = _NUM.match(str(text).lower())
    if not m:
        raise ValueError
    unit = m.group(2)
    return float(m.group(1)), unit[:-2] if unit.endswith("/s") else unit


def parse_bytes(text) -> int:
    """'2GB', '512MiB', '1.5G', 1000000 -> bytes (decimal units; *iB binary)."""
    try:
        num, unit = _split(text)
        return int(num * _SIZE[unit])
    except (ValueError, KeyError):
        raise ValueError(f"not a size: {text!r} (use e.g. 2GB, 512MiB)") from None


def parse_rate(text) -> float:
    """'100mbit', '1gbit', '50Mbit/s', 1e9 -> bits per second."""
    try:
        num, unit = _split(text)
        return num * _RATE[unit or "bit"]
    except (ValueError, KeyError):
        raise ValueError(f"not a link rate: {text!r} (use e.g. 100mbit, 1gbit)") from None


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_rate(bps: float) -> str:
    for unit, size in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= size:
            return f"{bps / size:.3g} {unit}"
    return f"{bps:.0f} bit/s"


def format_rows(lines: list[tuple]) -> str:
    """Rows of cells as a plain text table, each column as wide as its widest cell."""
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)
