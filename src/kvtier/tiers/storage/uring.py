"""Batches of positioned vector writes through io_uring, issued and reaped by one thread.

A ``Ring`` belongs to one thread. ``pwritev_all`` submits every write of a batch (up to the
ring's depth in flight) and returns each one's result (bytes written, or ``-errno``). The wait
for completions is a read of an eventfd registered with the ring, which releases the GIL: the
``liburing`` package's own wait calls hold it for as long as they wait.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

try:
    import liburing as _lu
except ImportError:  # optional: the tier falls back to its thread pool
    _lu = None


class Ring:
    """One thread's io_uring instance (raises OSError or RuntimeError when it cannot be set up)."""

    def __init__(self, depth: int = 32) -> None:
        if _lu is None:
            raise RuntimeError("the liburing package is not installed")
        self.depth = depth
        self._ring: Any = _lu.Ring()
        _lu.io_uring_queue_init(depth, self._ring, 0)
        self._cqe: Any = _lu.Cqe()
        try:
            self._efd = os.eventfd(0, os.EFD_CLOEXEC)
            _lu.io_uring_register_eventfd(self._ring, self._efd)
        except BaseException:
            _lu.io_uring_queue_exit(self._ring)
            raise

    def pwritev_all(self, ops: Sequence[tuple[int, Sequence[memoryview], int]]) -> list[int]:
        """Write every ``(fd, buffers, offset)``; each one's bytes written or ``-errno``."""
        lu, ring, cqe = _lu, self._ring, self._cqe
        assert lu is not None
        res = [0] * len(ops)
        keep: dict[int, Any] = {}
        nxt = done = 0
        while done < len(ops):
            while nxt < len(ops) and len(keep) < self.depth:
                fd, bufs, off = ops[nxt]
                iov = lu.Iovec(list(bufs))
                keep[nxt] = iov
                sqe = lu.io_uring_get_sqe(ring)
                lu.io_uring_prep_writev(sqe, fd, iov, off)
                sqe.user_data = nxt
                nxt += 1
            lu.io_uring_submit(ring)
            while not lu.io_uring_cq_ready(ring):
                os.eventfd_read(self._efd)  # lets go of the GIL while it waits
            n = 0
            for _ in lu.CqeIter(ring, cqe):
                e = cqe[0]
                i = e.user_data
                try:
                    res[i] = e.res
                except OSError as err:  # the package raises for a negative result
                    res[i] = -(err.errno or 5)
                del keep[i]
                n += 1
            lu.io_uring_cq_advance(ring, n)
            done += n
        return res

    def close(self) -> None:
        """Tear the ring down."""
        assert _lu is not None
        _lu.io_uring_queue_exit(self._ring)
        os.close(self._efd)
