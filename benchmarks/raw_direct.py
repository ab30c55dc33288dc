"""The raw-disk baseline the storage benchmarks share: threads doing O_DIRECT I/O, timed together."""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Sequence


def direct_io(targets: Sequence[tuple[str, Sequence[int]]], block: int, mode: str) -> float:
    """GB/s of one thread per ``(path, offsets)`` target, each writing (``mode`` "w") or reading
    ("r") ``block`` bytes at every offset with O_DIRECT from its own page-aligned buffer. The
    clock starts once every thread has its file open."""
    barrier = threading.Barrier(len(targets) + 1)

    def work(path: str, offsets: Sequence[int]) -> None:
        buf = mmap.mmap(-1, block)
        buf.write(os.urandom(block))
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        barrier.wait()
        try:
            for off in offsets:
                if mode == "w":
                    os.pwritev(fd, [buf], off)
                else:
                    os.preadv(fd, [buf], off)
        finally:
            os.close(fd)

    ts = [threading.Thread(target=work, args=t) for t in targets]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return sum(len(offs) for _, offs in targets) * block / (time.perf_counter() - t0) / 1e9
