"""Byte sizes and counts: parsing user input and formatting output.

Inside memplan every size is an integer number of bytes; GiB (2**30) appears only at the edges.
"""

from __future__ import annotations

import math
import re

from memplan.errors import MemplanError

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40

# Bytes per element of each dtype memplan plans with.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}

_COUNT_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_BYTE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
}
_NUMBER = r"([+-]?[0-9][0-9_,]*(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)"


def _finite_positive(number: float, text: str, what: str) -> None:
    if not math.isfinite(number) or number <= 0:
        raise MemplanError(f"{what} must be a positive number, got {text!r}")


def parse_count(text: str | int | float, what: str = "count") -> int:
    """Parse a parameter count such as ``7e9``, ``7B``, ``6.7b``, ``124,439,808`` or ``350M``."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        _finite_positive(float(text), str(text), what)
        return int(text)
    raw = str(text).strip()
    match = re.fullmatch(_NUMBER + r"\s*([kmbgt]?)", raw.lower())
    if not match:
        raise MemplanError(
            f"{what} {raw!r} is not a number; write it like 7e9, 7B, 350M or 124,439,808"
        )
    number = float(match.group(1).replace(",", "").replace("_", "")) * _COUNT_SUFFIX[match.group(2)]
    _finite_positive(number, raw, what)
    if number < 1:
        raise MemplanError(f"{what} must be at least 1, got {raw!r}")
    return int(round(number))


def parse_bytes(text: str | int, what: str = "memory") -> int:
    """Parse a memory size with an explicit unit: ``24GiB``, ``80GB``, ``512MiB``.

    GB means 10**9 bytes (as vendors use it) and GiB 2**30. A bare number is refused, since
    it is ambiguous.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        _finite_positive(float(text), str(text), what)
        return text
    raw = str(text).strip()
    match = re.fullmatch(_NUMBER + r"\s*([a-z]*)", raw.lower())
    if not match or match.group(2) not in _BYTE_UNITS:
        raise MemplanError(
            f"{what} {raw!r} needs a unit; write it like 24GiB, 80GB or 512MiB"
        )
    number = float(match.group(1).replace(",", "").replace("_", "")) * _BYTE_UNITS[match.group(2)]
    _finite_positive(number, raw, what)
    if number < 1:
        raise MemplanError(f"{what} must be at least one byte, got {raw!r}")
    return int(number)


def gib(n_bytes: int) -> float:
    """Bytes to GiB (2**30), for display only."""
    return n_bytes / GiB


def format_bytes(n_bytes: int) -> str:
    """A human-readable size in binary units: '12.55 GiB', '310.0 MiB'."""
    sign = "-" if n_bytes < 0 else ""
    value = abs(n_bytes)
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if value >= size:
            return f"{sign}{value / size:.2f} {unit}"
    return f"{sign}{value} B"


def format_count(n: int) -> str:
    """A parameter count with a short suffix: '6.74B', '124.4M', '4.19M'."""
    for suffix, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)
