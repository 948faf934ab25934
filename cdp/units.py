"""Parsing of human-written sizes ("64KiB", "1GiB") and durations ("30s", "24h")."""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as '64KiB', '1.5GiB', '100MB'. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64KiB, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    m = _NUMBER_UNIT.match(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 64KiB or 1GiB, got {value!r}")
    n = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if n != int(n):
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(n)


def parse_duration(value: int | float | str) -> float:
    """Seconds from a number or a string such as '30s', '500ms', '24h'. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, got a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"duration must be a finite, non-negative number, got {value}")
        return float(value)
    m = _NUMBER_UNIT.match(str(value))
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"expected a duration such as 30s, 5m or 24h, got {value!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def format_bytes(n: float) -> str:
    """'1.5 GiB' style, for logs and tables."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_hostport(value: str) -> tuple[str, int]:
    """('127.0.0.1', 7400) from '127.0.0.1:7400' or '[::1]:7400'. Raises ValueError."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port such as 127.0.0.1:7400, got {value!r}")
    return host, int(port)
