"""The raw-disk baseline the storage benchmarks share: threads doing O_DIRECT I/O, timed together."""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Sequence


def direct_io(targets: Sequence[tuple[str, Sequence[int]]], block: int, mode: str,
              memory: mmap.mmap | memoryview | None = None) -> float:
    """GB/s of one thread per ``(path, offsets)`` target, each writing (``mode`` "w") or reading
    ("r") ``block`` bytes at every offset with O_DIRECT. The clock starts once every thread has
    its file open.

    Without ``memory`` each thread moves every block from or into its own page-aligned buffer
    of one block, the same memory each time (what ``fio`` does). With ``memory`` (an mmap or a
    byte memoryview, page-aligned, a whole number of blocks, filled) the block at file offset
    ``o`` comes from or goes to its own place in it, block ``(o // block) % (len(memory) //
    block)``: distinct memory for every block, as a cache tier's blocks are, where the reused
    buffer of the first way may stay in the caches of whatever copies the data (a virtual disk's
    host)."""
    barrier = threading.Barrier(len(targets) + 1)
    slots = len(memory) // block if memory is not None else 0

    def work(path: str, offsets: Sequence[int]) -> None:
        if memory is None:
            buf = mmap.mmap(-1, block)
            buf.write(os.urandom(block))
            bufs = [memoryview(buf)] * len(offsets)
        else:
            mv = memoryview(memory)
            bufs = [mv[(o // block) % slots * block:][:block] for o in offsets]
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        barrier.wait()
        try:
            for off, b in zip(offsets, bufs):
                if mode == "w":
                    os.pwritev(fd, [b], off)
                else:
                    os.preadv(fd, [b], off)
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
