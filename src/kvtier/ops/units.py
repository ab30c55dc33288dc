"""Sizes, durations and age histograms as the operator commands read and print them."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(i?B?)\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d|w)?\s*$", re.IGNORECASE)
_POW = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

#: bucket upper bounds (exclusive) of the age histograms; the last bucket is open
WRITE_EDGES: tuple[int, ...] = (10, 100, 1_000, 10_000, 100_000, 1_000_000)
SECOND_EDGES: tuple[int, ...] = (60, 600, 3600, 6 * 3600, 86400, 7 * 86400)


class UsageError(ValueError):
    """Bad input on the command line (exit status 2)."""


def parse_size(text: str, flag: str) -> int:
    """``10G``, ``512MiB``, ``1.5GB``, ``4096``: K/M/G/T and KiB/MiB/... are powers of 1024,
    KB/MB/GB/... powers of 1000."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"{flag}: expected a size like 4096, 512M, 10GiB or 1.5GB, got {text!r}")
    num, prefix, suffix = m.group(1), m.group(2).upper(), m.group(3)
    base = 1000 if suffix.upper() == "B" and prefix else 1024
    return int(float(num) * base ** _POW[prefix])


def parse_duration(text: str, flag: str) -> int:
    """``90s``, ``15m``, ``2h``, ``7d``, ``1w`` or plain seconds, as whole seconds."""
    m = _DURATION.match(text)
    if not m:
        raise UsageError(f"{flag}: expected a duration like 90s, 15m, 2h or 7d, got {text!r}")
    return int(float(m.group(1)) * _SECONDS[(m.group(2) or "s").lower()])


def parse_count(text: str, flag: str) -> int:
    """A non-negative integer, optionally with k or M (``50000``, ``50k``, ``2M``)."""
    m = re.match(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmM]?)\s*$", text)
    if not m:
        raise UsageError(f"{flag}: expected a number of writes like 50000 or 50k, got {text!r}")
    mult = {"": 1, "k": 1000, "m": 1_000_000}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def fmt_bytes(n: int | None) -> str:
    """``1.5 GiB``-style sizes for people."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), 5)
    return f"{n / 1024 ** exp:.1f} {' KMGTP'[exp]}iB"


def fmt_seconds(s: int) -> str:
    """``45s``, ``10m``, ``6h``, ``7d``."""
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n and s % n == 0:
            return f"{s // n}{unit}"
    return f"{s}s"


def histogram(ages: Iterable[int], edges: Sequence[int]) -> list[dict[str, Any]]:
    """Counts per bucket: ``[{"below": edge, "blocks": n}, ..., {"below": None, "blocks": n}]``."""
    counts = [0] * (len(edges) + 1)
    for a in ages:
        i = 0
        while i < len(edges) and a >= edges[i]:
            i += 1
        counts[i] += 1
    out: list[dict[str, Any]] = [{"below": e, "blocks": c} for e, c in zip(edges, counts)]
    out.append({"below": None, "blocks": counts[-1]})
    return out
