"""What the ``object`` tier's threads do: probes and listings, HEADs, GETs, PUTs and deletions.

:class:`ObjectIO` is the thread side of :class:`~kvtier.tiers.object.tier.ObjectTier`: every
method here runs on the control thread, the lookup thread (an asyncio loop) or an I/O thread, and
hands what it learns to the scheduler thread through ``_updates``, ``_done`` and ``_events``. It
never touches the presence index itself.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.format.record import RecordError, pack_header, parse_header, verify
from kvtier.tiers.base import Completions, Health, TierContext, TierEvent, TierJobResult
from kvtier.tiers.object.client import ClientSettings, Kind, S3Client, S3Failure, classify
from kvtier.tiers.object.index import PresenceIndex

log = logging.getLogger("kvtier.tiers.object")

_PROBE_NAME = "kvtier-probe"  # a key under the prefix that is never written
_DELETE_BATCH = 1000  # keys per bulk delete request

# Task priorities: loads, then deletions (they make room), then uploads.
P_LOAD, P_DELETE, P_STORE = 1, 2, 3


@dataclass
class Job:
    """A load or store job; its blocks finish on different threads."""

    job_id: int
    remaining: int
    t0: float = field(default_factory=time.perf_counter)
    failed: set[bytes] = field(default_factory=set)
    moved: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def down_message(f: S3Failure, bucket: str, where: str) -> str:
    """The one log line a user reads when the tier goes down."""
    if f.kind is Kind.NO_BUCKET:
        return f"bucket {bucket!r} does not exist at {where} ({f.reason}); create it, the tier never does"
    if f.kind is Kind.AUTH:
        return (f"{where} rejected the credentials ({f.reason}); check access_key_id / "
                "secret_access_key or the AWS_* environment")
    if f.kind is Kind.DENIED:
        return (f"{where} denied access to bucket {bucket!r} ({f.reason}); the credentials need "
                "s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket on it")
    if f.kind is Kind.THROTTLED:
        return f"{where} is throttling requests ({f.reason}); backing off"
    return f"{where}: {f.reason}"


class ObjectIO:
    """The thread side of the object tier (its state is set up by the tier's constructor)."""

    ctx: TierContext
    name: str
    bucket: str
    prefix: str
    where: str
    ttl: float | None
    list_interval: float
    lookup_timeout: float
    capacity_bytes: int | None
    _bb: int
    _fp: bytes
    _settings: ClientSettings
    _client: S3Client | None
    _index: PresenceIndex
    _updates: deque[tuple[str, Any]]
    _done: Completions
    _events: deque[TierEvent]
    _health: Health
    _write_health: Health
    _stats_lock: threading.Lock
    _stats: dict[str, int]
    _last_error: str
    _stop: threading.Event
    _probed: threading.Event
    _list_now: threading.Event
    _tasks: queue.PriorityQueue[tuple[int, int, Callable[[], None] | None]]
    _seq: int
    _seq_lock: threading.Lock
    _loop: asyncio.AbstractEventLoop
    _lookup_concurrency: int
    _head_slots: asyncio.Semaphore

    def path(self, key: bytes) -> str:
        """The object name of ``key``."""
        return self.prefix + key.hex()

    def _key_of(self, path: str) -> bytes | None:
        name = path[len(self.prefix):] if path.startswith(self.prefix) else ""
        if not name or "/" in name or len(name) % 2:
            return None
        try:
            return bytes.fromhex(name)
        except ValueError:
            return None

    def _put_task(self, prio: int, fn: Callable[[], None] | None) -> None:
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
        self._tasks.put((prio, seq, fn))


    def _failure(self, f: S3Failure, *, write: bool = False) -> None:
        """Count a failed request; mark the tier (or its writes) down."""
        self._last_error = f.reason
        if f.kind is Kind.THROTTLED:
            with self._stats_lock:
                self._stats["throttled"] += 1
        msg = down_message(f, self.bucket, self.where)
        if write and f.kind is Kind.DENIED:
            self._write_health.record_failure(f"writes refused: {msg}")
        else:
            self._health.record_failure(msg)

    def _ensure_client(self) -> S3Client:
        client = self._client
        if client is None:
            client = self._client = S3Client(self._settings)
        return client

    def _ready(self) -> S3Client | None:
        """The client, once the first probe answered and while the tier is up; else None."""
        if not self._probed.is_set():
            self._probed.wait(self.lookup_timeout + 1.0)
        if self._stop.is_set() or not self._health.up:
            return None
        return self._client

    def _control_loop(self) -> None:
        health = self._health
        next_list = 0.0
        while not self._stop.is_set():
            if not self._probed.is_set() or not health.up:
                if not self._probed.is_set() or health.should_probe():
                    try:
                        self._ensure_client().probe(self.prefix + _PROBE_NAME)
                        health.record_success()
                        next_list = 0.0  # relearn the bucket after an outage
                    except Exception as e:
                        self._failure(classify(e))
                    self._probed.set()
            elif self.list_interval > 0 and (time.monotonic() >= next_list or self._list_now.is_set()):
                self._list_now.clear()
                self._list_prefix()
                next_list = time.monotonic() + self.list_interval
            wait = 0.05 if not health.up else (
                min(1.0, max(0.0, next_list - time.monotonic())) if self.list_interval > 0 else 1.0)
            self._list_now.wait(wait)

    def _list_prefix(self) -> None:
        """List the prefix: hand over pages, delete expired objects, report completeness."""
        client = self._client
        if client is None:
            return
        t_mono, t_wall = time.monotonic(), time.time()
        listed: set[bytes] = set()
        expired: list[str] = []
        limit = self._index.max_keys if self.capacity_bytes is None else 1 << 62
        count = 0
        try:
            for page in client.list_pages(self.prefix):
                with self._stats_lock:
                    self._stats["requests_list"] += 1
                entries: list[tuple[bytes, float]] = []
                for path, size, mtime in page:
                    key = self._key_of(path)
                    if key is None or size != self._index.record_bytes(key):
                        continue  # not one of our records: a load would reject it anyway
                    if self.ttl is not None and t_wall - mtime >= self.ttl:
                        expired.append(path)
                        continue
                    entries.append((key, mtime))
                    if len(listed) <= limit:
                        listed.add(key)
                count += len(entries)
                if entries:
                    self._updates.append(("listed", entries))
                if self._stop.is_set():
                    return
        except Exception as e:
            self._failure(classify(e))
            return
        self._health.record_success()
        complete = len(listed) <= limit
        self._updates.append(("listing_done", (t_mono, t_wall, frozenset(listed) if complete
                                               else None)))
        with self._stats_lock:
            self._stats["listings"] += 1
            self._stats["listed_objects"] = count
        if expired:
            self._delete_paths(expired, "expired")

    def _io_loop(self) -> None:
        while True:
            _prio, _seq, fn = self._tasks.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:  # a bug must not kill the thread
                log.exception("tier %s: unexpected error in an I/O task", self.name)

    def _finish(self, job: Job, failed: Sequence[bytes], moved: int) -> None:
        with job.lock:
            job.failed.update(failed)
            job.moved += moved
            job.remaining -= 1
            last = job.remaining == 0
        if last:
            self._done.put(TierJobResult(job.job_id, frozenset(job.failed), job.moved,
                                         time.perf_counter() - job.t0))

    def _lookup_thread(self) -> None:
        """Run the lookup loop until shutdown; then cancel what is still in flight."""
        loop = self._loop
        asyncio.set_event_loop(loop)
        self._head_slots = asyncio.Semaphore(self._lookup_concurrency)
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def _start_heads(self, keys: list[bytes]) -> None:
        """On the lookup loop: one HEAD task per key, bounded by ``lookup_concurrency``."""
        for k in keys:
            self._loop.create_task(self._head_one(k))

    async def _head_one(self, key: bytes) -> None:
        waited = 0.0
        while not self._probed.is_set() and waited < self.lookup_timeout + 1.0:
            await asyncio.sleep(0.01)  # the first probe is still out
            waited += 0.01
        client = self._client
        if client is None or self._stop.is_set() or not self._health.up:
            self._updates.append(("unknown", [key]))
            return
        try:
            async with self._head_slots:
                with self._stats_lock:
                    self._stats["requests_head"] += 1
                found = await client.head_async(self.path(key))
        except asyncio.CancelledError:
            self._updates.append(("unknown", [key]))
            raise
        except Exception as e:
            self._updates.append(("unknown", [key]))
            self._failure(classify(e))
            return
        self._health.record_success()
        if found is None or found[0] != self._index.record_bytes(key) or (
                self.ttl is not None and time.time() - found[1] >= self.ttl):
            self._updates.append(("absent", [key]))
        else:
            self._updates.append(("present", [(key, found[1])]))

    def _load_one(self, job: Job, key: bytes, slot: int) -> None:
        client = self._ready()
        if client is None:
            with self._stats_lock:
                self._stats["load_failures"] += 1
            self._finish(job, [key], 0)
            return
        bb = self._bb
        rec_len = self._index.record_bytes(key)
        path = self.path(key)
        try:
            with self._stats_lock:
                self._stats["requests_get"] += 1
            buf, size, mtime = client.get_record(path, rec_len)
        except Exception as e:
            f = classify(e)
            if f.kind is Kind.NOT_FOUND:
                self._gone(job, key, "evicted_at_load")
            elif f.kind is Kind.RANGE:  # an empty object
                self._bad(job, key, path, "empty object")
            else:
                self._failure(f)
                with self._stats_lock:
                    self._stats["load_failures"] += 1
                self._finish(job, [key], 0)
            return
        self._health.record_success()
        mv = memoryview(buf)
        with self._stats_lock:
            self._stats["bytes_fetched"] += mv.nbytes
        reason: str | None = None
        if size != rec_len or mv.nbytes != rec_len:
            reason = f"object of {size} bytes where a record is {rec_len}"
        elif self.ttl is not None and time.time() - mtime >= self.ttl:
            self._delete_paths([path], None)
            self._gone(job, key, "expired")
            return
        else:
            try:
                header = parse_header(mv)
                payload = mv[header.header_len:]
                reason = verify(header, payload, namespace_fp=self._fp, key=key, payload_len=bb)
            except RecordError as e:
                reason = str(e)
        if reason == "namespace mismatch":  # another namespace's record under a shared prefix
            with self._stats_lock:
                self._stats["foreign"] += 1
            self._gone(job, key, None)
            return
        if reason is not None:
            self._bad(job, key, path, reason)
            return
        self.ctx.primary[slot] = np.frombuffer(payload, dtype=np.uint8)  # the one copy
        with self._stats_lock:
            self._stats["hits"] += 1
            self._stats["bytes_read"] += bb
        self._updates.append(("present", [(key, mtime)]))
        self._finish(job, (), bb)

    def _gone(self, job: Job, key: bytes, counter: str | None) -> None:
        """``key`` has no usable object: a miss, forgotten, reported removed."""
        with self._stats_lock:
            self._stats["load_failures"] += 1
            if counter is not None:
                self._stats[counter] += 1
        self._updates.append(("absent", [key]))
        self._events.append(TierEvent([key], removed=True))
        self._finish(job, [key], 0)

    def _bad(self, job: Job, key: bytes, path: str, reason: str) -> None:
        """A corrupt object: never served, deleted, counted."""
        log.warning("tier %s: object %s rejected (%s); deleting it", self.name, path, reason)
        with self._stats_lock:
            self._stats["corrupt"] += 1
        self._delete_paths([path], None)
        self._gone(job, key, None)

    def _store_one(self, job: Job, key: bytes, slot: int) -> None:
        client = self._ready()
        rec_len = self._index.record_bytes(key)
        if client is None or not self._write_health.up and not self._write_health.should_probe():
            with self._stats_lock:
                self._stats["store_failures"] += 1
            self._updates.append(("released", rec_len))
            self._finish(job, [key], 0)
            return
        view = memoryview(self.ctx.primary[slot])  # type: ignore[arg-type]
        header = pack_header(self._fp, key, view)
        try:
            with self._stats_lock:
                self._stats["requests_put"] += 1
            client.put(self.path(key), (header, view))
        except Exception as e:
            self._failure(classify(e), write=True)
            with self._stats_lock:
                self._stats["store_failures"] += 1
            self._updates.append(("released", rec_len))
            self._finish(job, [key], 0)
            return
        finally:
            del view
        self._health.record_success()
        self._write_health.record_success()
        with self._stats_lock:
            self._stats["blocks_written"] += 1
            self._stats["bytes_written"] += len(header) + self._bb
        self._updates.append(("stored", (key, time.time(), rec_len)))
        self._events.append(TierEvent([key], removed=False))
        self._finish(job, (), self._bb)

    def _delete_task(self, paths: list[str], then: list[Callable[[], None]] | None) -> None:
        try:
            if self._ready() is not None:
                self._delete_paths(paths, None)
        finally:
            self._updates.append(("deleted", None))
            for fn in then or ():
                self._put_task(P_STORE, fn)

    def _delete_paths(self, paths: list[str], counter: str | None) -> None:
        """Bulk-delete objects; a failure is logged and counted, never raised."""
        client = self._client
        if client is None:
            return
        for i in range(0, len(paths), _DELETE_BATCH):
            part = paths[i:i + _DELETE_BATCH]
            try:
                with self._stats_lock:
                    self._stats["requests_delete"] += 1
                client.delete(part)
            except Exception as e:
                f = classify(e)
                self._last_error = f.reason
                log.debug("tier %s: deleting %d object(s) failed: %s", self.name, len(part), f)
                continue
            if counter is not None:
                with self._stats_lock:
                    self._stats[counter] += len(part)


def bind(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    """A task for an I/O thread: ``fn(*args)``."""
    def task() -> None:
        fn(*args)
    return task
