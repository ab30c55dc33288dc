"""Loads read by native threads, checked by one Python thread: the storage tier's load pump.

With the native record I/O, an I/O thread that reads a load chunk itself needs the GIL back
before it can check the chunk and start its next read; on a small or busy host that take-back
waits for every thread ahead of it, and the disk's queue stays short meanwhile (at 256 KiB a
chunk's reads took about 5 ms and the wait after them about 3 ms; docs/BENCHMARKS.md). The
pump hands each load chunk to a :class:`~kvtier.tiers.storage.fastio.ReadEngine` instead: its
native threads read the chunk's runs and hash the payloads without the GIL, and take the next
queued chunk as soon as one ends, while the pump's one Python thread checks the chunks whose
reads ended (every record verified as before: :meth:`IOPool._finish_load`) and starts new
ones. Up to ``JOBS_PER_THREAD`` chunks per native thread are started at once, so a thread
finds its next chunk queued while the pump waits for the GIL. The pump starts chunks and takes
those whose reads ended with calls that keep the GIL (none of them waits for I/O), and lets it
go only to wait when no read has ended: where another thread of the process keeps the GIL
busy (an engine's scheduler loop), each give-up would cost a wait behind it, and a pump that
gave the GIL up for every start and every reap loaded at 0.70-0.74 GB/s against the I/O
threads' 1.17-1.20 (256 KiB; with the calls kept: 1.47-1.61 against 1.11-1.25;
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from kvtier.tiers.storage.fastio import EngineRead, ReadEngine
from kvtier.tiers.storage.slab import SLOT_HEADER, aligned_buffer

if TYPE_CHECKING:
    from kvtier.tiers.storage.io import IOPool, StartedLoad, Task

log = logging.getLogger("kvtier.tiers.storage")

JOBS_PER_THREAD = 2  # chunks started per native read thread


class LoadPump:
    """One Python thread feeding a pool's load chunks to native read threads; made by
    :meth:`IOPool.enqueue` for the first load when the native record I/O is at hand."""

    def __init__(self, pool: IOPool, engine: ReadEngine, hdr_bytes: int) -> None:
        self.pool = pool
        self.engine = engine
        self.n_jobs = JOBS_PER_THREAD * engine.n_threads
        self.hdr_bytes = hdr_bytes
        self.queue: deque[Task] = deque()
        self.cond = threading.Condition()
        self.stop = False
        self.thread = threading.Thread(target=self._run, name=f"kvtier-{pool.name}-loads",
                                       daemon=True)
        self.thread.start()

    def put(self, tasks: list[Task]) -> bool:
        """Queue load chunks, in order; False once the pump has stopped (nothing was queued)."""
        with self.cond:
            if self.stop:
                return False
            self.queue.extend(tasks)
            self.cond.notify()
        self.engine.wake()  # the pump may be waiting for reads to end
        return True

    def shutdown(self) -> None:
        """Drop the queued chunks; the thread ends once those started are checked."""
        with self.cond:
            self.stop = True
            self.queue.clear()
            self.cond.notify()
        self.engine.wake()

    def _next(self, n: int, wait: bool) -> list[Task]:
        """Up to ``n`` queued chunks; with ``wait``, waits for one (or the stop)."""
        with self.cond:
            while wait and not self.queue and not self.stop:
                self.cond.wait()
            q = self.queue
            return [q.popleft() for _ in range(min(n, len(q)))]

    def _run(self) -> None:
        pool, engine = self.pool, self.engine
        zeros = aligned_buffer(SLOT_HEADER)
        idle: list[tuple[EngineRead, Any]] = []
        reading: dict[EngineRead, tuple[StartedLoad, Any]] = {}
        try:
            idle = [(engine.job(), aligned_buffer(self.hdr_bytes)) for _ in range(self.n_jobs)]
            while True:
                for task in self._next(len(idle), wait=not reading):
                    job, hdr = idle.pop()
                    started = pool._attempt(task, pool._start_load, task, hdr, job)
                    if started is not None and started.reads.job is None:
                        # not taken natively (a destination it cannot pin): read here
                        pool._attempt(task, pool._finish_load, started, zeros)
                        started = None
                    if started is None:
                        idle.append((job, hdr))
                    else:
                        reading[job] = (started, hdr)
                if not reading:
                    if self.stop:
                        return
                    continue
                # the chunks whose reads ended, without giving the GIL up; waiting (without
                # it) only when none has
                for job in engine.reap(timeout=0) or engine.reap():
                    started, hdr = reading.pop(job)
                    now = time.perf_counter()  # the chunk's time in the engine counts as reading
                    started.t_read += now - started.t_started
                    started.t_started = now
                    pool._attempt(started.task, pool._finish_load, started, zeros)
                    idle.append((job, hdr))
        except Exception:  # not expected: _attempt keeps a chunk's failure to its chunk
            log.exception("tier %s: the load pump stopped; loads go to the I/O threads", pool.name)
        finally:
            engine.close()  # once every started chunk is read: the buffers are free then
            with self.cond:
                self.stop = True
                left = [started.task for started, _hdr in reading.values()] + list(self.queue)
                self.queue.clear()
            if left:  # only after an unexpected error: fail what was not checked
                assert pool.sh is not None
                with pool.sh.index.lock:
                    for task in left:
                        pool.unpin(task.items)
                for task in left:
                    assert task.job is not None
                    pool.finish_chunk(task.job, {k for k, _ps, _s, _r in task.items}, 0)
            for started, _hdr in reading.values():
                started.reads.pinned = started.reads.job = None  # read: the buffers are free
            with contextlib.suppress(BufferError):
                for hdr in [h for _j, h in idle] + [h for _s, h in reading.values()]:
                    hdr.close()
                zeros.close()
