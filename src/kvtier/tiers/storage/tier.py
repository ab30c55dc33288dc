"""The ``storage`` tier (and vLLM's ``fs`` alias): blocks in slab files on a local or shared file system.

The scheduler thread owns the decisions: ``lookup`` answers from the in-memory index, and
``submit_store`` picks (and, at capacity, evicts for) the slot of every new block, so capacity is
enforced before any byte is written. The I/O threads do the copying: a job's blocks are cut into
chunks spread over the threads, loads before stores, each block moving with one ``preadv`` or
``pwritev`` straight between its primary slot and its file slot. A stored block enters the index
only after its record is written; a loaded block counts only after its checksum verifies.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from kvtier.config import ConfigError, require_int, require_str
from kvtier.tiers.base import (
    Completions,
    Health,
    SecondaryTier,
    TierContext,
    TierEvent,
    TierJobResult,
)
from kvtier.tiers.storage.slab import (
    ALIGN,
    MAX_KEY_BYTES,
    LaneBusyError,
    SlabStore,
    aligned_buffer,
    probe_direct_io,
)

log = logging.getLogger("kvtier.tiers.storage")

_MAX_LANES = 64
_CHUNK_MAX = 32  # blocks per I/O task


@dataclass
class _JobState:
    job_id: int
    pending: int
    failed: set[bytes] = field(default_factory=set)
    moved: int = 0
    t0: float = field(default_factory=time.perf_counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Task:
    kind: str  # "load", "store", "open" or "regrow"
    job: _JobState | None
    items: list[tuple[bytes, int, int]]  # (key, primary slot, file slot)


class StorageTier(SecondaryTier):
    """Blocks as checksummed records in slab files under ``path`` (bounded by ``capacity_bytes``)."""

    #: after the file system filled up, how often (seconds) to look for room to grow back
    REGROW_CHECK_S = 5.0

    medium = "STORAGE"
    PARAMS: ClassVar[Mapping[str, str] | None] = {
        "path": "directory for the tier's files (created if missing)",
        "capacity_bytes": "bytes the tier may occupy on its file system, files and metadata",
        "n_read_threads": "I/O threads that serve loads first",
        "n_write_threads": "I/O threads that serve stores first",
        "direct_io": '"auto", true or false',
        "fsync": '"none", "batch" or "always"',
        "slab_bytes": "size of one slab file",
    }
    ALIASES: ClassVar[Mapping[str, str]] = {"root_dir": "path"}
    DEFAULTS: Mapping[str, Any] = {
        "n_read_threads": 8,
        "n_write_threads": 8,
        "direct_io": "auto",
        "fsync": "none",
        "slab_bytes": 1 << 30,
    }
    capacity_required = True

    @classmethod
    def validate_params(cls, params: Mapping[str, Any], label: str) -> dict[str, Any]:
        out = super().validate_params(params, label)
        path = out.get("path")
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ConfigError(f"{label}.path", "a directory path (string, required)", path)
        out["path"] = os.fspath(path)
        if cls.capacity_required or out.get("capacity_bytes") is not None:
            out["capacity_bytes"] = require_int(out, "capacity_bytes", label=f"{label}.capacity_bytes")
        for k in ("n_read_threads", "n_write_threads"):
            out[k] = require_int(out, k, default=cls.DEFAULTS[k], label=f"{label}.{k}")
            if out[k] > 256:
                raise ConfigError(f"{label}.{k}", "an integer between 1 and 256", out[k])
        dio = out.get("direct_io", cls.DEFAULTS["direct_io"])
        if isinstance(dio, str) and dio.lower() in ("true", "false"):
            dio = dio.lower() == "true"
        if dio not in ("auto", True, False) or dio in (0, 1) and not isinstance(dio, bool):
            raise ConfigError(f"{label}.direct_io", '"auto", true or false', dio)
        out["direct_io"] = dio
        out["fsync"] = require_str(
            out, "fsync", default=cls.DEFAULTS["fsync"], label=f"{label}.fsync",
            choices=("none", "batch", "always"),
        )
        out["slab_bytes"] = require_int(
            out, "slab_bytes", default=cls.DEFAULTS["slab_bytes"], minimum=1 << 20,
            label=f"{label}.slab_bytes",
        )
        return out

    def __init__(
        self,
        ctx: TierContext,
        path: str,
        capacity_bytes: int | None = None,
        n_read_threads: int = 8,
        n_write_threads: int = 8,
        direct_io: str | bool = "auto",
        fsync: str = "none",
        slab_bytes: int = 1 << 30,
    ) -> None:
        super().__init__(
            ctx, path=path, capacity_bytes=capacity_bytes, n_read_threads=n_read_threads,
            n_write_threads=n_write_threads, direct_io=direct_io, fsync=fsync, slab_bytes=slab_bytes,
        )
        self.root = os.path.abspath(path)
        self.capacity_bytes = self._resolve_capacity(capacity_bytes)
        self.n_read_threads = n_read_threads
        self.n_write_threads = n_write_threads
        self.direct_io_setting = direct_io
        self.fsync = fsync
        self.slab_bytes = slab_bytes
        block_bytes = ctx.block_bytes
        if direct_io is True and block_bytes % ALIGN:
            raise ConfigError(
                f"{ctx.name}.direct_io",
                f"false or \"auto\": blocks of {block_bytes} bytes are not a multiple of {ALIGN}",
                direct_io,
            )
        self._primary = ctx.primary
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> slot, LRU first
        self._writing: dict[bytes, int] = {}
        self._pins: dict[int, int] = {}
        self._doomed: set[int] = set()  # invalidated slots still pinned by readers
        self._free: list[int] = []
        self._hwm = 0
        self._max_slots = 0
        self._cap_slots = 0  # what capacity_bytes allows; _max_slots is lower after ENOSPC
        self._regrowing = False
        self._next_regrow = 0.0
        self._seq = 1
        self._events: list[TierEvent] = []
        self._stats: dict[str, float] = {
            "hits": 0, "misses": 0, "lookup_hits": 0, "bytes_read": 0, "bytes_written": 0,
            "load_failures": 0, "store_failures": 0, "corrupt": 0, "evictions": 0, "recency_refreshes": 0,
            "start_verified": 0, "start_invalidated": 0, "index_rebuild_seconds": 0.0,
        }
        self._read_health = Health(f"{self.name} (reads)")
        self._write_health = Health(f"{self.name} (writes)")
        self._store: SlabStore | None = None
        self._open_error: str | None = None
        self._opening = False
        self.lane_dir = ""
        self.direct = False
        self._done = Completions()
        self._in_flight = 0
        self._cond = threading.Condition(threading.Lock())
        self._load_q: deque[_Task] = deque()
        self._store_q: deque[_Task] = deque()
        self._stop = False
        self._closed = False
        try:
            self._open()
        except OSError as e:
            self._open_error = str(e)
            self._read_health.record_failure(e)
            self._write_health.record_failure(e)
        n = n_read_threads + n_write_threads
        self._threads = [
            threading.Thread(
                target=self._worker, args=(i, i < n_read_threads),
                name=f"kvtier-{self.name}-io{i}", daemon=True,
            )
            for i in range(n)
        ]
        for t in self._threads:
            t.start()

    # -- start -----------------------------------------------------------------------------
    def _resolve_capacity(self, capacity_bytes: int | None) -> int:
        assert capacity_bytes is not None
        return capacity_bytes

    def _lane_capacity(self, lane: str) -> int:
        """The capacity for the lane just taken (``fs`` without capacity_bytes measures it here)."""
        return self.capacity_bytes

    def _open(self) -> None:
        """Take a lane, rebuild the index from the records on disk (raises OSError)."""
        t0 = time.perf_counter()
        ctx = self.ctx
        os.makedirs(self.root, exist_ok=True)
        base = os.path.join(self.root, ctx.namespace_fp.hex())
        n_threads = self.n_read_threads + self.n_write_threads
        store: SlabStore | None = None
        lane = base
        for i in range(_MAX_LANES):
            lane = base if i == 0 else f"{base}.{i}"
            try:
                store = SlabStore(
                    lane, namespace=ctx.namespace, namespace_fp=ctx.namespace_fp,
                    block_bytes=ctx.block_bytes, slab_bytes=self.slab_bytes, direct=False,
                    fsync=self.fsync, n_threads=n_threads,
                )
                break
            except LaneBusyError:
                continue
        if store is None:
            raise OSError(errno.EBUSY, f"all {_MAX_LANES} lanes of this namespace are in use", base)
        if lane != base:
            log.warning("tier %s: %s is in use by another process; using %s", self.name, base, lane)
        try:
            direct = self.direct_io_setting
            if direct == "auto":
                direct = ctx.block_bytes % ALIGN == 0 and probe_direct_io(lane)
            store.direct = bool(direct)
            self.capacity_bytes = self._lane_capacity(lane)
            budget = self.capacity_bytes - store.meta_bytes()
            max_slots = max(0, budget // store.slot_size)
            if max_slots == 0:
                log.warning(
                    "tier %s: capacity_bytes=%d holds no block of %d bytes (plus metadata)",
                    self.name, self.capacity_bytes, ctx.block_bytes,
                )
            # Slots named by intent files were being written when the last run ended.
            suspects = store.read_intents()
            found: dict[bytes, tuple[int, int]] = {}
            stale: list[int] = []
            invalid = 0
            checked = 0
            zeros = aligned_buffer(ALIGN)
            try:
                for rec in store.scan(max_slots):
                    if rec.slot in suspects:
                        checked += 1
                        if not store.verify_slot(rec.slot):
                            store.invalidate(rec.slot, zeros)
                            invalid += 1
                            continue
                    prev = found.get(rec.key)
                    if prev is None or prev[1] < rec.seq:
                        if prev is not None:
                            stale.append(prev[0])
                        found[rec.key] = (rec.slot, rec.seq)
                    else:
                        stale.append(rec.slot)
                for s in stale:
                    store.invalidate(s, zeros)
            finally:
                with contextlib.suppress(BufferError):
                    zeros.close()
            store.truncate_to(max_slots)
            store.limit_slots = max_slots
            store.clear_intents()
        except BaseException:
            store.close()
            raise
        used = {slot for slot, _ in found.values()}
        hwm = 0
        for f, _p in store.slab_files():
            size = os.path.getsize(_p)
            n = -(-size // store.slot_size)
            hwm = max(hwm, min(f * store.slots_per_file + n, max_slots))
        entries = sorted(found.items(), key=lambda kv: kv[1][1])
        with self._lock:
            self._store = store
            self.lane_dir = lane
            self.direct = store.direct
            self._max_slots = max_slots
            self._cap_slots = max_slots
            self._hwm = hwm
            self._free = [s for s in range(hwm - 1, -1, -1) if s not in used]
            self._index = OrderedDict((k, slot) for k, (slot, _seq) in entries)
            self._seq = 1 + max((seq for _slot, seq in found.values()), default=0)
            self._stats["start_invalidated"] += invalid
            self._stats["start_verified"] += checked
            self._stats["index_rebuild_seconds"] = time.perf_counter() - t0
            self._open_error = None
        log.info(
            "tier %s: %s, %d blocks found in %.3fs (%d torn records removed), capacity %d bytes "
            "(%d slots of %d bytes), %s I/O, fsync=%s",
            self.name, lane, len(entries), time.perf_counter() - t0, invalid, self.capacity_bytes,
            max_slots, store.slot_size, "direct" if store.direct else "buffered", self.fsync,
        )

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> int | None:
        if self._store is None:
            return 0
        health = self._read_health
        if not health.up and not health.should_probe():
            return 0  # reads are failing: answer 0 until the next probe is due
        n = 0
        index = self._index
        with self._lock:
            for key in keys:
                if key not in index:
                    break
                n += 1
            self._stats["lookup_hits"] += n
            if n < len(keys):
                self._stats["misses"] += 1
        return n

    def touch(self, keys: Sequence[bytes]) -> None:
        index = self._index
        with self._lock:
            for key in keys:
                if key in index:
                    index.move_to_end(key)

    # -- jobs ------------------------------------------------------------------------------
    def _request_open(self) -> None:
        with self._cond:
            if self._opening or self._stop:
                return
            self._opening = True
            self._load_q.appendleft(_Task("open", None, []))
            self._cond.notify()

    def _fail_now(self, job_id: int, keys: Sequence[bytes], stat: str) -> None:
        self._in_flight += 1
        with self._lock:
            self._stats[stat] += len(keys)
        self._done.put(TierJobResult(job_id, frozenset(keys)))

    def submit_load(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        if self._store is None:
            self._fail_now(job_id, keys, "load_failures")
            return
        failed: set[bytes] = set()
        work: list[tuple[bytes, int, int]] = []
        index = self._index
        pins = self._pins
        with self._lock:
            for key, ps in zip(keys, slots):
                s = index.get(key)
                if s is None:
                    failed.add(key)
                    continue
                pins[s] = pins.get(s, 0) + 1
                index.move_to_end(key)
                work.append((key, int(ps), s))
            self._stats["load_failures"] += len(failed)
        self._enqueue("load", job_id, work, failed)

    def submit_store(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        if self._store is None:
            self._fail_now(job_id, keys, "store_failures")
            return
        failed: set[bytes] = set()
        work: list[tuple[bytes, int, int]] = []
        evicted: list[bytes] = []
        index = self._index
        writing = self._writing
        with self._lock:
            for key, ps in zip(keys, slots):
                if key in index:
                    index.move_to_end(key)
                    continue
                if key in writing:
                    continue
                s = self._alloc_slot_locked(evicted) if len(key) <= MAX_KEY_BYTES else None
                if s is None:
                    failed.add(key)
                    continue
                writing[key] = s
                work.append((key, int(ps), s))
            self._stats["store_failures"] += len(failed)
            self._stats["evictions"] += len(evicted)
            if evicted:
                self._events.append(TierEvent(evicted, removed=True))
        self._enqueue("store", job_id, work, failed)

    def _alloc_slot_locked(self, evicted: list[bytes]) -> int | None:
        """A file slot for a new record: a free one, a new one, or the LRU block's (evicted)."""
        free = self._free
        while free:
            s = free.pop()
            if s < self._max_slots:
                return s
        if self._hwm < self._max_slots:
            self._hwm += 1
            return self._hwm - 1
        index = self._index
        pins = self._pins
        for _ in range(len(index)):
            key, s = next(iter(index.items()))
            if pins.get(s):
                index.move_to_end(key)
                continue
            del index[key]
            evicted.append(key)
            if s < self._max_slots:
                return s
        return None

    def _enqueue(
        self, kind: str, job_id: int, work: list[tuple[bytes, int, int]], failed: set[bytes]
    ) -> None:
        self._in_flight += 1
        if not work:
            self._done.put(TierJobResult(job_id, frozenset(failed)))
            return
        n_threads = self.n_read_threads if kind == "load" else self.n_write_threads
        per = min(_CHUNK_MAX, max(1, -(-len(work) // n_threads)))
        chunks = [work[i : i + per] for i in range(0, len(work), per)]
        job = _JobState(job_id, len(chunks), failed)
        q = self._load_q if kind == "load" else self._store_q
        with self._cond:
            for c in chunks:
                q.append(_Task(kind, job, c))
            self._cond.notify(len(chunks))

    # -- I/O threads -----------------------------------------------------------------------
    def _worker(self, idx: int, load_first: bool) -> None:
        hdr = aligned_buffer(ALIGN)
        zeros = aligned_buffer(ALIGN)
        cond = self._cond
        try:
            while True:
                with cond:
                    while not (self._stop or self._load_q or self._store_q):
                        cond.wait()
                    if self._stop:
                        return
                    first, second = (
                        (self._load_q, self._store_q) if load_first else (self._store_q, self._load_q)
                    )
                    task = first.popleft() if first else second.popleft()
                try:
                    if task.kind == "load":
                        self._run_load(task, hdr, zeros)
                    elif task.kind == "store":
                        self._run_store(task, idx, hdr)
                    elif task.kind == "regrow":
                        self._run_regrow()
                    else:
                        self._run_open()
                except Exception as e:  # never let an I/O thread die
                    log.exception("tier %s: I/O task failed", self.name)
                    if task.job is not None:
                        self._finish_chunk(task.job, {k for k, _, _ in task.items}, 0)
                    self._read_health.record_failure(e)
        finally:
            with contextlib.suppress(BufferError):
                hdr.close()
                zeros.close()

    def _run_open(self) -> None:
        try:
            if self._store is None:
                self._open()
                self._read_health.record_success()
                self._write_health.record_success()
        except OSError as e:
            self._open_error = str(e)
            self._read_health.record_failure(e)
            self._write_health.record_failure(e)
        finally:
            self._opening = False

    def _run_load(self, task: _Task, hdr: Any, zeros: Any) -> None:
        store = self._store
        assert store is not None and task.job is not None
        primary = self._primary
        failed: set[bytes] = set()
        bad: list[tuple[bytes, int]] = []
        moved = 0
        ok = 0
        io_error: OSError | None = None
        for key, ps, s in task.items:
            try:
                reason = store.read_record(s, key, memoryview(primary[ps]), hdr)
            except OSError as e:
                io_error = e
                failed.add(key)
                continue
            if reason is None:
                moved += store.block_bytes
                ok += 1
                self._refresh_recency(store, key, s, hdr)
            else:
                failed.add(key)
                bad.append((key, s))
                log.warning("tier %s: block in slot %d is invalid (%s); removed", self.name, s, reason)
        removed: list[bytes] = []
        if bad:
            with self._lock:
                for key, s in bad:
                    if self._index.get(key) == s:
                        del self._index[key]
                        removed.append(key)
                    self._doomed.add(s)
                self._stats["corrupt"] += len(removed)
                if removed:
                    self._events.append(TierEvent(removed, removed=True))
            for _key, s in bad:
                try:
                    store.invalidate(s, zeros)
                except OSError as e:
                    io_error = e
        with self._lock:
            pins = self._pins
            for _key, _ps, s in task.items:
                c = pins[s] - 1
                if c:
                    pins[s] = c
                else:
                    del pins[s]
                    if s in self._doomed:
                        self._doomed.discard(s)
                        if s < self._max_slots:
                            self._free.append(s)
            self._stats["hits"] += ok
            self._stats["bytes_read"] += moved
            self._stats["load_failures"] += len(failed)
        if io_error is not None:
            self._read_health.record_failure(io_error)
        elif ok:
            self._read_health.record_success()
        self._finish_chunk(task.job, failed, moved)

    @property
    def refresh_window(self) -> int:
        """A loaded block whose sequence is this far behind the newest gets a new one."""
        return max(1, self._max_slots // 2)

    def _refresh_recency(self, store: Any, key: bytes, slot: int, hdr: Any) -> None:
        """Persist a hit's recency, for blocks in the older half of the write sequence.

        The index is rebuilt at start in sequence order. A loaded block whose sequence is at
        least ``refresh_window`` behind the newest gets a new sequence (one header page), so a
        restart keeps blocks in use among the recent ones; young blocks cost no extra write.
        Runs while the slot is pinned.
        """
        stored = store.stored_seq(key, hdr)
        with self._lock:
            if stored + self.refresh_window > self._seq:
                return
            seq = self._seq
            self._seq += 1
        try:
            store.rewrite_seq(slot, key, seq, hdr)
        except OSError as e:  # only recency is lost; the block itself was served
            log.debug("tier %s: could not refresh the recency of slot %d: %s", self.name, slot, e)
            return
        with self._lock:
            self._stats["recency_refreshes"] += 1

    def _run_store(self, task: _Task, idx: int, hdr: Any) -> None:
        store = self._store
        assert store is not None and task.job is not None
        primary = self._primary
        items = task.items
        done: list[tuple[bytes, int]] = []
        failed_items: list[tuple[bytes, int]] = []
        err: OSError | None = None
        with self._lock:
            seq0 = self._seq
            self._seq += len(items)
        try:
            store.write_intent(idx, [s for _, _, s in items], hdr)
        except OSError as e:
            err = e
            failed_items = [(k, s) for k, _, s in items]
            items = []
        files: set[int] = set()
        for i, (key, ps, s) in enumerate(items):
            try:
                files.add(store.write_record(s, key, memoryview(primary[ps]), seq0 + i, hdr))
                done.append((key, s))
            except OSError as e:
                err = e
                failed_items.append((key, s))
        if done and self.fsync == "batch":
            try:
                store.sync_files(files)
            except OSError as e:
                err = e
                failed_items.extend(done)
                done = []
        if err is not None and err.errno == errno.ENOSPC:
            self._shrink_to_fit([s for _, s in failed_items])
        with self._lock:
            writing = self._writing
            stored: list[bytes] = []
            for key, s in done:
                writing.pop(key, None)
                self._index[key] = s
                stored.append(key)
            for key, s in failed_items:
                writing.pop(key, None)
                if s < self._max_slots:
                    self._free.append(s)
            if stored:
                self._events.append(TierEvent(stored, removed=False))
            self._stats["bytes_written"] += len(done) * store.block_bytes
            self._stats["store_failures"] += len(failed_items)
        if err is not None:
            self._write_health.record_failure(err)
        elif done:
            self._write_health.record_success()
        self._finish_chunk(task.job, {k for k, _ in failed_items}, len(done) * store.block_bytes)

    def _shrink_to_fit(self, slots: list[int]) -> None:
        """The file system is full: from now on, stay below the first slot that found no space.

        Blocks already written above it stay readable until evicted; their slots are not reused.
        """
        if not slots:
            return
        new_max = min(slots)
        with self._lock:
            if new_max < self._max_slots:
                store = self._store
                log.warning(
                    "tier %s: file system full; keeping to %d blocks (%d bytes) from now on",
                    self.name, new_max, new_max * (store.slot_size if store else 0),
                )
                self._max_slots = new_max
                if store is not None:
                    store.limit_slots = new_max

    def _run_regrow(self) -> None:
        """After ENOSPC: give back as many slots as the file system has room for again."""
        try:
            store = self._store
            if store is None:
                return
            try:
                st = os.statvfs(self.lane_dir)
            except OSError:
                return
            room = (st.f_bavail * st.f_frsize) // store.slot_size - 1  # keep one slot spare
            with self._lock:
                old = self._max_slots
                new = min(self._cap_slots, old + max(0, room))
                if new <= old:
                    return
                self._max_slots = new
                store.limit_slots = new
                # Slots at or past the old limit that hold nothing were dropped, not freed: hand
                # them out again (never one that is in use, doomed, or already on the free list).
                taken = (set(self._index.values()) | set(self._writing.values())
                         | self._doomed | set(self._free))
                self._free.extend(s for s in range(min(self._hwm, new) - 1, old - 1, -1)
                                  if s not in taken)
            log.warning("tier %s: the file system has room again; growing back to %d blocks",
                        self.name, new)
        finally:
            self._regrowing = False

    def _finish_chunk(self, job: _JobState, failed: set[bytes], moved: int) -> None:
        with job.lock:
            job.failed |= failed
            job.moved += moved
            job.pending -= 1
            last = job.pending == 0
        if last:
            self._done.put(
                TierJobResult(job.job_id, frozenset(job.failed), job.moved, time.perf_counter() - job.t0)
            )

    # -- results and housekeeping ----------------------------------------------------------
    def poll(self) -> list[TierJobResult]:
        if self._store is None and not self._opening and self._read_health.should_probe():
            self._request_open()  # the directory could not be opened: try again, off this thread
        if self._max_slots < self._cap_slots and not self._regrowing:
            now = time.monotonic()
            if now >= self._next_regrow:  # the disk filled up once: look for room again, off-thread
                self._next_regrow = now + self.REGROW_CHECK_S
                self._regrowing = True
                with self._cond:
                    self._store_q.append(_Task("regrow", None, []))
                    self._cond.notify()
        done = self._done.drain()
        self._in_flight -= len(done)
        return done

    def take_events(self) -> list[TierEvent]:
        with self._lock:
            ev, self._events = self._events, []
        return ev

    def has_pending_work(self) -> bool:
        return self._in_flight > 0

    @property
    def available(self) -> bool:
        """False while the directory cannot be opened or writes fail (until a probe is due)."""
        if self._store is None:
            return False
        health = self._write_health
        return health.up or health.should_probe()

    def record_location(self, key: bytes) -> tuple[str, int] | None:
        """Where ``key``'s record lies: (slab file path, byte offset), or None (for tools and tests)."""
        store = self._store
        with self._lock:
            slot = self._index.get(key)
        if store is None or slot is None:
            return None
        f, off = store.locate(slot)
        return store.slab_path(f), off

    def usage_bytes(self) -> int:
        """Bytes on the medium that count against capacity: slots handed out plus metadata."""
        store = self._store
        if store is None:
            return 0
        return max(self._hwm * store.slot_size, store.allocated_bytes()) + store.meta_bytes()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            st: dict[str, Any] = dict(self._stats)
            st["blocks"] = len(self._index)
            st["writing_blocks"] = len(self._writing)
        st["usage_bytes"] = self.usage_bytes()
        st["capacity_bytes"] = self.capacity_bytes
        st["path"] = self.lane_dir
        st["direct_io"] = self.direct
        st["fsync"] = self.fsync
        st["max_blocks"] = self._max_slots
        st["next_seq"] = self._seq
        if self._open_error:
            st["error"] = self._open_error
        return st

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._cond:
            self._stop = True
            self._load_q.clear()
            self._store_q.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=10)
        if self._store is not None:
            if not any(t.is_alive() for t in self._threads):
                try:
                    self._store.clear_intents()  # every write has ended: nothing to re-verify
                except OSError as e:
                    log.warning("tier %s: could not clear intent files: %s", self.name, e)
            self._store.close()


class FsTier(StorageTier):
    """vLLM's ``fs`` tier configuration (``root_dir``, ``n_read_threads``, ``n_write_threads``).

    ``capacity_bytes`` is optional: by default 90% of the file system's free space at start.
    vLLM's ``enable_kv_events`` and ``locality`` are accepted and ignored (events are always on).
    """

    PARAMS: ClassVar[Mapping[str, str] | None] = {
        **(StorageTier.PARAMS or {}),
        "enable_kv_events": "accepted for vLLM compatibility (events are always produced)",
        "locality": "accepted for vLLM compatibility (ignored)",
    }
    capacity_required = False

    def __init__(
        self,
        ctx: TierContext,
        path: str,
        capacity_bytes: int | None = None,
        enable_kv_events: Any = None,
        locality: Any = None,
        **params: Any,
    ) -> None:
        super().__init__(ctx, path, capacity_bytes, **params)

    def _resolve_capacity(self, capacity_bytes: int | None) -> int:
        self._auto_capacity = capacity_bytes is None
        return capacity_bytes if capacity_bytes is not None else self._free_space_share(self.root, 0)

    def _lane_capacity(self, lane: str) -> int:
        if not self._auto_capacity:
            return self.capacity_bytes
        held = 0  # what this tier already holds there is space it may keep using
        for name in os.listdir(lane):
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(lane, name))
                held += max(st.st_size, st.st_blocks * 512)
        return self._free_space_share(lane, held)

    def _free_space_share(self, path: str, held: int) -> int:
        """90% of the free space of ``path``'s file system, plus ``held`` bytes already used."""
        probe = path
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        try:
            st = os.statvfs(probe)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 0
        cap = max(int((free + held) * 0.9), 1)
        log.info(
            "tier %s: capacity_bytes not set; using 90%% of the free space of %s%s: %d bytes",
            self.name, probe, f" (including {held} bytes it holds)" if held else "", cap,
        )
        return cap
