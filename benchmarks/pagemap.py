"""How physically contiguous a buffer is, from ``/proc/self/pagemap`` (page frame numbers need
root; elsewhere they read as zero and the answer is None).

O_DIRECT hands the device one segment per run of physically adjacent pages, and on a virtual disk
every segment costs: kvtier's 256 KiB loads from 4 KiB pages (24-36 segments a block) ran at
about 0.7 of their speed from huge pages (docs/BENCHMARKS.md). The
storage benchmark reports this for its baseline's memory and for kvtier's CPU region.
"""

from __future__ import annotations

import numpy as np

PAGE = 4096
_PFN_MASK = np.uint64((1 << 55) - 1)
_PRESENT = np.uint64(1 << 63)


def segments_per_block(array: np.ndarray, block: int) -> float | None:
    """Mean number of physically contiguous runs in each ``block`` bytes of ``array`` (1.0: every
    block one run; ``block / 4096``: no two pages adjacent); None where pagemap is not readable."""
    addr, size = array.ctypes.data, array.nbytes
    if addr % PAGE or size < block or block % PAGE:
        return None
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(addr // PAGE * 8)
            entries = np.frombuffer(f.read(size // PAGE * 8), dtype=np.uint64)
    except OSError:
        return None
    pfn = (entries & _PFN_MASK).astype(np.int64)
    if not (entries & _PRESENT).all() or not pfn.any():
        return None  # pages not faulted in, or frame numbers hidden (not root)
    per = block // PAGE
    blocks = pfn[: len(pfn) // per * per].reshape(-1, per)
    breaks = (np.diff(blocks, axis=1) != 1).sum(axis=1)
    return float(1 + breaks.mean())
