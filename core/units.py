"""Sizes and counts as text: the one place tunedeck writes bytes ("18.6 MiB", "6.57 GiB")
and counts ("1.23M", "4.3M").

Each screen and command keeps the style it has always printed (a file on disk in the unit
that fits, a Hub download from KiB up, a memory figure in GiB); the styles differ only in
the parameters below. This module is light (no torch): the UI imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

KIB = 2**10
MIB = 2**20
GIB = 2**30

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")  # each 1024 times the one before
COUNT_UNITS = (("B", 1e9), ("M", 1e6), ("K", 1e3))  # largest first


def format_gib(n: float) -> str:
    """Bytes in GiB, the one way tunedeck prints a memory figure: "6.57 GiB" (two decimals,
    one from 10 GiB up)."""
    value = n / GIB
    return f"{value:.2f} GiB" if round(value, 2) < 10 else f"{value:.1f} GiB"


def format_in(n: float, unit: str, spec: str = ".1f") -> str:
    """Bytes in one given unit, whatever their size: "80 GiB", "3.5 MiB" (a figure read beside
    others of its kind, such as a GPU's memory or the space left on a disk)."""
    return f"{n / 1024 ** BYTE_UNITS.index(unit):{spec}} {unit}"


def format_bytes(
    n: object,
    *,
    smallest: str = "B",
    largest: str = "GiB",
    spec: str = ".1f",
    specs: Mapping[str, str] | None = None,
    memory_gib: bool = False,
    missing: str = "?",
) -> str:
    """Bytes in the largest unit from ``smallest`` to ``largest`` that they fill at least once
    (``smallest`` below that): "512 B", "18.6 MiB", "2.3 GiB".

    ``spec`` is the format of the number (".1f"; ",.1f" puts thousands commas), ``specs`` a
    unit's own ({"GiB": ".2f"}; whole bytes are ".0f" unless given); ``memory_gib`` writes
    GiB as :func:`format_gib` does. Anything but a number (None: not known) reads as ``missing``."""
    if not isinstance(n, (int, float)):
        return missing
    first, last = BYTE_UNITS.index(smallest), BYTE_UNITS.index(largest)
    power = first
    while power < last and n >= 1024 ** (power + 1):
        power += 1
    unit = BYTE_UNITS[power]
    if memory_gib and unit == "GiB":
        return format_gib(n)
    shown = (specs or {}).get(unit, ".0f" if unit == "B" else spec)
    return f"{n / 1024**power:{shown}} {unit}"


def format_count(
    n: object,
    *,
    spec: str = ".3g",
    specs: Mapping[str, str] | None = None,
    smallest: str = "",
    missing: str = "?",
) -> str:
    """A count of things (parameters, downloads) short: 950, 12.3K, 1.23M, 4.5B.

    ``spec`` is the format of the scaled number (".3g": three significant digits), ``specs`` a
    suffix's own ({"B": ".2f"}); ``smallest`` ("K", "M") scales smaller counts too (0.5K),
    else they are written whole. Anything but a number (None: not known) reads as ``missing``."""
    if not isinstance(n, (int, float)):
        return missing
    for suffix, scale in COUNT_UNITS:
        if n >= scale or suffix == smallest:
            return f"{n / scale:{(specs or {}).get(suffix, spec)}}{suffix}"
    return str(n)
