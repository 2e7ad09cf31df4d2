"""Sizes: parse what users type ("2GiB", "1.5 GB", "512M") and format bytes for people.

Everything inside the package is ``int`` bytes; only what is shown goes through :func:`format_bytes`.
"""

from __future__ import annotations

import re

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10

_UNITS = {
    "": 1, "b": 1, "byte": 1, "bytes": 1,
    "k": KiB, "kb": KiB, "kib": KiB,
    "m": MiB, "mb": MiB, "mib": MiB,
    "g": GiB, "gb": GiB, "gib": GiB,
    "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
}  # fmt: skip
# ASCII digits only: `\d` would take "１GiB" (full-width) or Arabic-Indic digits as sizes
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$", re.ASCII)


def parse_size(text: str) -> int:
    """Parse a size such as ``2GiB``, ``1.5 GB``, ``512M`` or ``1073741824`` into bytes.

    Like torch and nvidia-smi, ``GB`` means GiB here: nobody sizes a GPU in powers of ten.
    Raises ``ValueError`` with a message fit to show a user.
    """
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (try 2GiB, 512MiB or 1.5GB)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return n


def format_bytes(n: int | None, *, digits: int = 2) -> str:
    """``11.17 GiB``, ``512 MiB``, ``0 B``; ``n/a`` for an unavailable reading."""
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for limit, div, unit in ((GiB, GiB, "GiB"), (MiB, MiB, "MiB"), (KiB, KiB, "KiB")):
        if n >= limit:
            value = n / div
            text = (
                f"{value:.{digits}f}".rstrip("0").rstrip(".")
                if value >= 100
                else f"{value:.{digits}f}"
            )
            return f"{sign}{text} {unit}"
    return f"{sign}{n} B"


def format_gib(n: int | None, *, digits: int = 2) -> str:
    """Always in GiB (``0.31 GiB``), for numbers that sit side by side."""
    return "n/a" if n is None else f"{n / GiB:.{digits}f} GiB"
