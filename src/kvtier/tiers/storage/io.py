"""The storage tier's I/O threads: loads and stores.

A job's blocks are cut into tasks spread over the threads: the write threads take stores (and
housekeeping) first, then loads; the read threads take loads, and stores only of blocks of
``MERGE_BYTES`` or more. (With the native record I/O, loads go to the load pump instead: see
below.) So loads have every thread when no store waits, and with smaller blocks
a load that arrives during a burst of stores finds the read threads free instead of waiting for
a store chunk to end; there the write threads' runs of up to ``MERGE_BYTES`` keep enough bytes
in flight (on a 2-core VM, 256 KiB stores ran as fast on 8 threads as on 16). A larger block is
written one record a call, a thread holds one block in flight, and 2 MiB stores ran about 10%
faster on 16 threads than on 8 (docs/BENCHMARKS.md).

A store chunk's work is in :mod:`kvtier.tiers.storage.stores`. A store job is spread over the
write threads, unless the store queue already holds a chunk for each of them: then its chunks
grow to ``STORE_CHUNK_BYTES``.

A load job's chunks are queued in the job's (prefix) order; a chunk reads each run of adjacent
slots of one region (up to ``LOAD_MERGE_BYTES`` of payload) with one ``preadv`` (headers into
the thread's buffer, payloads straight into their primary slots); with the native record I/O
every run of the chunk is read and hashed in one call, so the thread takes the GIL back once a
chunk, not once a run (on a 2-core VM a take-back after a read waited about a millisecond
on average, with the read's slot in the disk's queue left empty meanwhile: docs/BENCHMARKS.md).
With the native record I/O the load chunks go to a :class:`~kvtier.tiers.storage.pump.LoadPump`
instead: native threads read them, and one Python thread checks them as their reads end, so no
read waits for the GIL to be started (the reads of a host's virtual disk end in batches, and
every I/O thread of a batch then wanted the GIL at once).
Every record is verified (magic, header checksum, namespace, key, length, payload checksum)
before its block counts; blocks that count are reported through ``loaded`` as their chunk's
reads end, before the job does, so that a request's leading blocks can be served early.
A load of an own block from the older half of the write order renews its recency with a new
sequence; the PUT entries that log it are appended by a housekeeping task (``RENEW``), not by the
load's thread, so a load never waits for a region log's lock.
Each load chunk adds its time waiting in the queue, reading, verifying and in the rest of its
bookkeeping to the tier's ``load_*_seconds`` counters; each store chunk its time queued, writing
records (header, checksum and ``pwritev``), appending to the logs and in the rest to
``store_*_seconds``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvtier.tiers.base import Completions, TierJobResult
from kvtier.tiers.storage import log as ilog
from kvtier.tiers.storage import stores
from kvtier.tiers.storage.fastio import EngineRead
from kvtier.tiers.storage.index import OwnedRegion
from kvtier.tiers.storage.pump import LoadPump
from kvtier.tiers.storage.shared import LogEntries, Shared
from kvtier.tiers.storage.slab import SLOT_HEADER, Reads, aligned_buffer
from kvtier.tiers.storage.stores import MERGE_BYTES

log = logging.getLogger("kvtier.tiers.storage")

CHUNK_MAX = 32  # blocks per I/O task
LOAD_CHUNK_BYTES = 1 << 20  # payload bytes per load task (at least one block)
#: and one preadv up to this many: at 256 KiB, runs of two records loaded 9-11% faster than runs
#: of four in alternating rounds (a read of four spans 260 pages, more than the 254 segments a
#: request of the virtio disk measured takes), and 4% faster than one record at a time
LOAD_MERGE_BYTES = 512 << 10
MERGE_MAX = 32  # and up to this many records (two iovecs each)
#: a store job queued while the store queue already holds a chunk for every write thread is
#: cut into chunks of up to this many payload bytes (and ``CHUNK_MAX`` blocks): the threads are
#: busy anyway, and a larger chunk pays its log appends and its take-backs of the GIL once
#: for more blocks
STORE_CHUNK_BYTES = 4 << 20
RENEW = "renew"  # the housekeeping task that logs the recency renewals of loads
_T = TypeVar("_T", bound=tuple[Any, ...])
_R = TypeVar("_R")


@dataclass
class JobState:
    """A job in flight: how many of its chunks are left, and what failed."""

    job_id: int
    pending: int
    failed: set[bytes] = field(default_factory=set)
    moved: int = 0
    t0: float = field(default_factory=time.perf_counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class StartedLoad:
    """A load chunk whose reads were started (``_start_load``), to be finished."""

    task: Task
    runs: list[list[tuple[bytes, int, int, bool]]]
    reads: Reads  # its runs' headers' buffer and payload destinations too
    t_pick: float  # when a thread took the chunk
    t_read: float  # seconds spent starting the reads (and in the read engine, once read)
    t_started: float  # when they were started (handed back by the read engine, once read)


@dataclass
class Task:
    """One chunk of a job, or a housekeeping task (``job`` None)."""

    kind: str  # "load", "store", or the name of a housekeeping task
    job: JobState | None
    items: list[tuple[bytes, int, int, bool]]  # (key, primary slot, file slot, flag)
    queued: float = field(default_factory=time.perf_counter)


class IOPool:
    """Worker threads over a load queue and a store queue."""

    def __init__(self, name: str, n_read: int, n_write: int, done: Completions,
                 housekeeping: dict[str, Callable[[], None]]) -> None:
        self.name = name
        self.n_read = n_read
        self.n_write = n_write
        self.done = done
        self.housekeeping = {**housekeeping, RENEW: self.log_renewals}
        self.sh: Shared | None = None
        #: how far behind the newest sequence a loaded own block gets a new one (called with
        #: the index's lock held)
        self.refresh_window: Callable[[], int] = lambda: 1
        lock = threading.Lock()
        self.cond = threading.Condition(lock)  # the write threads wait here
        self.cond_load = threading.Condition(lock)  # and the read threads here
        self.load_q: deque[Task] = deque()
        self.store_q: deque[Task] = deque()
        #: (job id, keys) of load runs that finished before their job; filled once wanted
        self.loaded: deque[tuple[int, list[bytes]]] = deque()
        self.report_loaded = False
        #: recency renewals of loads not logged yet: region -> (its region, [(index key, slot,
        #: new sequence)]), and whether a ``RENEW`` task is queued for them
        self.renewals: dict[int, tuple[OwnedRegion, list[tuple[bytes, int, int]]]] = {}
        self.renew_lock = threading.Lock()
        #: held while renewals are logged, so that a caller of ``log_renewals`` returns only
        #: once the renewals taken by a ``RENEW`` task running meanwhile are logged too
        self.renew_log_lock = threading.Lock()
        self.renew_queued = False
        self.stop = False
        self.pump: LoadPump | None = None
        self.pump_tried = False
        #: False: queue loads to the I/O threads even where a pump can be had (a benchmark
        #: compares both ways in one process)
        self.pump_enabled = True
        self.threads = [
            threading.Thread(target=self._worker, args=(i < n_read,),
                             name=f"kvtier-{name}-io{i}", daemon=True)
            for i in range(n_read + n_write)
        ]
        for t in self.threads:
            t.start()

    @property
    def readers_store(self) -> bool:
        """Whether read threads also take stores when no load waits: for blocks of
        ``MERGE_BYTES`` or more, written one record a call, a write thread holds a single block
        in flight and the write threads alone leave the disk's queue short."""
        return self.sh is not None and self.sh.store.block_bytes >= MERGE_BYTES

    # -- queueing --------------------------------------------------------------------------
    def enqueue(self, kind: str, job_id: int, work: list[tuple[bytes, int, int, bool]],
                failed: set[bytes]) -> None:
        """Queue a job's work in chunks (a job with no work finishes at once)."""
        if not work:
            self.done.put(TierJobResult(job_id, frozenset(failed)))
            return
        n_threads = self.n_read if kind == "load" else self.n_write
        per = min(CHUNK_MAX, max(1, -(-len(work) // n_threads)))
        if kind == "load" and self.sh is not None:  # small chunks, taken in prefix order
            per = min(per, max(1, LOAD_CHUNK_BYTES // self.sh.store.block_bytes))
        elif kind == "store" and self.sh is not None and len(self.store_q) >= self.n_write:
            per = max(per, min(CHUNK_MAX, STORE_CHUNK_BYTES // self.sh.store.block_bytes))
        chunks = [work[i : i + per] for i in range(0, len(work), per)]
        job = JobState(job_id, len(chunks), failed)
        tasks = [Task(kind, job, c) for c in chunks]
        if kind == "load" and (pump := self._load_pump()) is not None and pump.put(tasks):
            return
        q = self.load_q if kind == "load" else self.store_q
        with self.cond:
            q.extend(tasks)
            if kind == "load" or self.readers_store:
                self.cond_load.notify(len(chunks))
            self.cond.notify(len(chunks))  # idle write threads take loads too

    def _load_pump(self) -> LoadPump | None:
        """The pump that has native threads read the loads (made at the first load); None
        without the native record I/O or where its threads cannot be started: the I/O threads
        read the loads then."""
        if not self.pump_enabled:
            return None
        if self.pump is None and not self.pump_tried and self.sh is not None:
            with self.cond:
                if self.pump is None and not self.pump_tried and not self.stop:
                    self.pump_tried = True
                    fast = self.sh.store.fast
                    n = self.n_read + self.n_write
                    engine = fast.read_engine(n) if fast is not None else None
                    if engine is not None:
                        self.pump = LoadPump(self, engine, MERGE_MAX * SLOT_HEADER)
                    elif fast is not None:
                        log.warning("tier %s: native read threads could not be started; the I/O "
                                    "threads read the loads", self.name)
        return self.pump

    @property
    def native_read_threads(self) -> int:
        """The native threads reading loads now: 0 before the first load, and where the I/O
        threads read them (no native record I/O, no threads to be had, the pump stopped)."""
        pump = self.pump
        return pump.engine.n_threads if pump is not None and not pump.stop else 0

    def _runs(self, items: list[_T], limit: int) -> list[list[_T]]:
        """A load chunk's blocks (``item[2]`` the slot) as runs, in order: adjacent slots of
        one region, up to ``limit`` payload bytes (at least one block) and ``MERGE_MAX`` blocks
        each (one ``preadv`` each)."""
        sh = self.sh
        assert sh is not None
        store = sh.store
        per = min(MERGE_MAX, limit // store.block_bytes) if store.mergeable else 1
        if per <= 1:
            return [[w] for w in items]
        spr = sh.geo.slots_per_region
        runs: list[list[_T]] = []
        cur = [items[0]]
        for item in items[1:]:
            prev, s = cur[-1][2], item[2]
            if len(cur) < per and s == prev + 1 and s // spr == prev // spr:
                cur.append(item)
            else:
                runs.append(cur)
                cur = [item]
        runs.append(cur)
        return runs

    def housekeep(self, kind: str, first: bool = False) -> None:
        """Queue a housekeeping task (``first``: ahead of every load)."""
        with self.cond:
            if self.stop:
                return
            if first:
                self.load_q.appendleft(Task(kind, None, []))
                self.cond_load.notify()
            else:
                self.store_q.append(Task(kind, None, []))
            self.cond.notify()

    def shutdown(self) -> bool:
        """Stop the threads; True when all of them ended."""
        with self.cond:
            self.stop = True
            self.load_q.clear()
            self.store_q.clear()
            self.cond.notify_all()
            self.cond_load.notify_all()
            pump = self.pump
        threads = list(self.threads)
        if pump is not None:
            pump.shutdown()
            threads.append(pump.thread)
        for t in threads:
            t.join(timeout=10)
        return not any(t.is_alive() for t in threads)

    # -- threads ---------------------------------------------------------------------------
    def _take(self, reader: bool) -> Task | None:
        """The next task for a read thread (loads, and stores of large blocks when no load
        waits) or a write thread (stores and housekeeping first, then loads), waiting for one;
        None once the pool stops."""
        load_q, store_q = self.load_q, self.store_q
        with self.cond:
            while not (self.stop or load_q or store_q and (not reader or self.readers_store)):
                (self.cond_load if reader else self.cond).wait()
            if self.stop:
                return None
            if reader:
                return load_q.popleft() if load_q else store_q.popleft()
            return store_q.popleft() if store_q else load_q.popleft()

    def _worker(self, reader: bool) -> None:
        """An I/O thread: one task at a time, until the pool stops."""
        hdr = aligned_buffer(MERGE_MAX * SLOT_HEADER)
        zeros = aligned_buffer(SLOT_HEADER)
        try:
            while (task := self._take(reader)) is not None:
                self._attempt(task, self._run, task, hdr, zeros)
        finally:
            with contextlib.suppress(BufferError):
                hdr.close()
                zeros.close()

    def _run(self, task: Task, hdr: Any, zeros: Any) -> None:
        if task.kind == "load":
            self._run_load(task, hdr, zeros)
        elif task.kind == "store":
            self._run_store(task, hdr)
        else:
            self.housekeeping[task.kind]()

    def _attempt(self, task: Task, fn: Callable[..., _R], *args: Any) -> _R | None:
        """``fn(*args)`` for ``task``; an exception fails the task's chunk (never the thread)."""
        try:
            return fn(*args)
        except Exception as e:
            log.exception("tier %s: I/O task failed", self.name)
            if task.job is not None:
                self.finish_chunk(task.job, {k for k, _, _, _ in task.items}, 0)
            if self.sh is not None:
                self.sh.read_health.record_failure(e)
            return None

    def finish_chunk(self, job: JobState, failed: set[bytes], moved: int) -> None:
        """Count a finished chunk; the job's result goes out with its last chunk."""
        with job.lock:
            job.failed |= failed
            job.moved += moved
            job.pending -= 1
            last = job.pending == 0
        if last:
            self.done.put(
                TierJobResult(job.job_id, frozenset(job.failed), job.moved, time.perf_counter() - job.t0)
            )

    def report(self, job: JobState, loaded: list[bytes]) -> None:
        """Verified keys of a chunk still running: loadable before the job ends (``loaded``;
        the job's result cannot go out before its chunk ends)."""
        if loaded and self.report_loaded:
            self.loaded.append((job.job_id, loaded))

    # -- loads -----------------------------------------------------------------------------
    def _run_load(self, task: Task, hdr: Any, zeros: Any) -> None:
        self._finish_load(self._start_load(task, hdr, None), zeros)

    def _start_load(self, task: Task, hdr: Any, job: EngineRead | None) -> StartedLoad:
        """A load chunk's reads started: queued to a native read engine on ``job`` when given
        (and the native path takes them), else made by :meth:`_finish_load`."""
        t_pick = time.perf_counter()
        sh = self.sh
        assert sh is not None and task.job is not None
        primary = sh.primary
        runs = self._runs(task.items, LOAD_MERGE_BYTES)
        t0 = time.perf_counter()
        dests = [[memoryview(primary[ps]) for _k, ps, _s, _r in run] for run in runs]
        reads = sh.store.start_reads([(run[0][2], d) for run, d in zip(runs, dests)], hdr, job)
        now = time.perf_counter()
        return StartedLoad(task, runs, reads, t_pick, now - t0, now)

    def _finish_load(self, started: StartedLoad, zeros: Any) -> None:
        """A load chunk's reads ended, every record verified, and the index told."""
        task, runs, reads, t_pick = started.task, started.runs, started.reads, started.t_pick
        hdr, dests = reads.hdr, [d for _slot, d in reads.runs]
        sh = self.sh
        assert sh is not None and task.job is not None
        store, index = sh.store, sh.index
        items = task.items
        failed: set[bytes] = set()
        bad: list[tuple[bytes, int, str]] = []  # own records that failed verification
        stale: list[tuple[bytes, int]] = []
        refresh: list[tuple[bytes, int]] = []
        hits: list[tuple[bytes, int]] = []
        moved = ok = 0
        io_error: OSError | None = None
        t0 = time.perf_counter()
        elsewhere = t0 - started.t_started  # the thread's time on other chunks meanwhile
        results = store.finish_reads(reads)
        t_done = time.perf_counter()
        t_read = started.t_read + t_done - t0
        hv = memoryview(hdr)
        first = 0  # the run's first header in ``hdr``
        for run, run_dests, result in zip(runs, dests, results):
            at, first = first, first + len(run)
            if isinstance(result, OSError):
                io_error = result
                failed.update(k for k, _ps, _s, _r in run)
                continue
            got, sums = result
            loaded: list[bytes] = []
            for i, (key, _ps, s, is_remote) in enumerate(run):
                if got < 0:
                    reason: str | None = "no slab file"
                elif i >= got:
                    reason = "truncated record"
                else:
                    reason = store.check_record(hv[(at + i) * SLOT_HEADER : (at + i + 1) * SLOT_HEADER],
                                                key, run_dests[i], None if sums is None else sums[i])
                if reason is None:
                    moved += store.block_bytes
                    ok += 1
                    loaded.append(key)
                    (hits if is_remote else refresh).append((key, s))
                elif is_remote:
                    failed.add(key)
                    stale.append((key, s))
                else:
                    failed.add(key)
                    bad.append((key, s, reason))
            self.report(task.job, loaded)
        hv.release()
        del dests
        t_check = time.perf_counter() - t_done
        if bad:
            io_error = self._drop_bad(bad, zeros) or io_error
        k = ilog.index_key
        with index.lock:  # once a chunk: every I/O thread takes this lock
            for key, s in stale:  # another engine overwrote or dropped it since its log said so
                ik = k(key)
                if index.slots.get(s, (b"",))[0] == ik:
                    del index.slots[s]
                index._forget_remote(ik, s)
            renew = self._note_hits(hits, refresh) if hits or refresh else None
            self.unpin(items)
        if renew:
            self._queue_renewals(renew)
        if io_error is not None:
            sh.read_health.record_failure(io_error)
        elif ok:
            sh.read_health.record_success()
        sh.count(hits=ok, bytes_read=moved, load_failures=len(failed), remote_hits=len(hits),
                 stale_misses=len(stale), load_chunks=1, load_wait_seconds=t_pick - task.queued,
                 load_read_seconds=t_read, load_check_seconds=t_check,
                 load_other_seconds=time.perf_counter() - t_pick - elsewhere - t_read - t_check)
        self.finish_chunk(task.job, failed, moved)

    def unpin(self, items: list[tuple[bytes, int, int, bool]]) -> None:
        """Let go of the slots a load chunk pinned when it was queued (with the index's lock
        held); a slot given up meanwhile is freed with its last pin."""
        index = self.sh.index  # type: ignore[union-attr]
        pins = index.pins
        for _key, _ps, s, _r in items:
            c = pins[s] - 1
            if c:
                pins[s] = c
            else:
                del pins[s]
                if s in index.doomed:
                    index.doomed.discard(s)
                    index.free_slot(s)

    def _drop_bad(self, bad: list[tuple[bytes, int, str]], zeros: Any) -> OSError | None:
        """Own records that failed verification: out of the index and the log, header zeroed."""
        sh = self.sh
        assert sh is not None
        index = sh.index
        err: OSError | None = None
        removed = 0
        for key, s, reason in bad:
            log.warning("tier %s: block in slot %d is invalid (%s); removed", sh.name, s, reason)
            ik = ilog.index_key(key)
            with index.lock:
                reg = index.regions.get(index.region_of(s))
                if index.own.get(ik) == s:
                    del index.own[ik]
                    if ik not in index.remote:
                        index._event(ik, True)
                    removed += 1
                if reg is None:
                    continue
                index.doomed.add(s)
            try:
                sh.store.invalidate(s, zeros)

                def forget(s: int = s) -> None:
                    index.slots.pop(s, None)

                sh.append(reg, [(ilog.DEL, s - sh.geo.base(reg.region), 0, 0, b"")], forget)
            except OSError as e:
                err = e
        sh.count(corrupt=removed)
        return err

    def _note_hits(self, hits: list[tuple[bytes, int]], refresh: list[tuple[bytes, int]]
                   ) -> dict[int, tuple[OwnedRegion, list[tuple[bytes, int, int]]]]:
        """Loads that counted, with the index's lock held: remote ones are reported to their
        owner (HIT entries, logged by the sync thread); own old ones get a new sequence, to be
        logged by a ``RENEW`` task (pass what this returns, region -> (its region, renewals), to
        ``_queue_renewals`` once the lock is let go), so that the next engine to take the region
        over keeps them among the recent ones."""
        sh = self.sh
        assert sh is not None
        index = sh.index
        window = self.refresh_window()
        todo: dict[int, tuple[OwnedRegion, list[tuple[bytes, int, int]]]] = {}
        for key, s in hits:
            ik = ilog.index_key(key)
            v = index.slots.get(s)
            if v is not None and v[0] == ik:
                index.remote_hits[(s, ik)] = v[1]
        for key, s in refresh:
            ik = ilog.index_key(key)
            v = index.slots.get(s)
            r = index.region_of(s)
            reg = index.regions.get(r)
            if v is None or v[0] != ik or reg is None or v[1] + window > sh.seq:
                continue
            todo.setdefault(r, (reg, []))[1].append((ik, s, sh.seq))
            sh.seq += 1
        return todo

    def _queue_renewals(self, todo: dict[int, tuple[OwnedRegion, list[tuple[bytes, int, int]]]]
                        ) -> None:
        """Hand renewals from ``_note_hits`` to the ``RENEW`` task (queued once for many)."""
        with self.renew_lock:
            for r, (reg, renewals) in todo.items():
                cur = self.renewals.get(r)
                if cur is None or cur[0] is not reg:
                    self.renewals[r] = (reg, renewals)
                else:
                    cur[1].extend(renewals)
            queue, self.renew_queued = not self.renew_queued, True
        if queue:
            self.housekeep(RENEW)

    def log_renewals(self) -> None:
        """Log the recency renewals of loads so far: one append per region, of the renewals
        whose slot still holds the block with an older sequence (a slot rewritten since, or a
        region given up, keeps what its log says). Returns once those that another thread took
        to log before the call are logged too."""
        with self.renew_log_lock:
            self._log_renewals()

    def _log_renewals(self) -> None:
        sh = self.sh
        with self.renew_lock:
            todo, self.renewals = self.renewals, {}
            self.renew_queued = False
        if sh is None:
            return
        index = sh.index
        for r, (reg, renewals) in todo.items():
            def pick(r: int = r, reg: OwnedRegion = reg,
                     renewals: list[tuple[bytes, int, int]] = renewals
                     ) -> tuple[LogEntries, Callable[[], None] | None]:
                if reg.releasing or index.regions.get(r) is not reg:
                    return [], None
                slots = index.slots
                keep = [(ik, s, seq) for ik, s, seq in renewals
                        if (v := slots.get(s)) is not None and v[0] == ik and v[1] < seq]

                def renew() -> None:  # the log's lock is still held: ``keep`` still holds
                    for ik, s, seq in keep:
                        slots[s] = (ik, seq)

                base = sh.geo.base(r)
                return [(ilog.PUT, s - base, 0, seq, ik) for ik, s, seq in keep], renew

            try:
                n = sh.append_current(reg, pick)
                sh.count(recency_refreshes=n)
            except OSError as e:  # only recency is lost; the blocks themselves were served
                log.debug("tier %s: could not log the recency of %d blocks of region %d: %s",
                          sh.name, len(renewals), r, e)

    # -- stores ----------------------------------------------------------------------------
    def _run_store(self, task: Task, hdr: Any) -> None:
        stores.run_store(self, task, hdr)
