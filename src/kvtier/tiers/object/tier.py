"""The ``object`` tier (alias ``s3``): one object per block in an S3-compatible bucket.

Every block is the object ``prefix + key.hex()`` holding the self-describing block record
(:mod:`kvtier.format.record`), the same the other tiers store; a load verifies it (size, magic,
header checksum, namespace, key, length, payload checksum) before the slot counts as written.

How the work is spread:

* ``lookup`` answers from the :class:`~kvtier.tiers.object.index.PresenceIndex` when it can. Keys
  it does not know are asked about with one ``HEAD`` each, up to ``lookup_concurrency`` in flight
  at once on the tier's lookup thread (an asyncio loop), and ``lookup`` answers None until the
  answers are back (the next step, usually). A request's unknown keys are asked about a wave at
  a time: 16 at first, then as many as the run already found, so a miss costs a few requests
  and a long hit a few rounds. "Not there" is believed for
  ``negative_cache_seconds``; a complete listing is as good as a ``HEAD`` for every key it did
  not show, for as long.
* A control thread probes the bucket (one ``GET`` of a key that need not exist) at start and while
  the tier is down, and lists the prefix every ``list_interval_seconds``: what other instances
  stored becomes known without a request per key, and what they deleted is forgotten.
* Loads and stores are one request per block on the I/O threads, loads first. A
  store uploads the header and the primary slot as two buffers of one ``PUT`` body, without
  copying the slot; a load asks for exactly the record's bytes (a ranged ``GET``, so a wrong or
  hostile object is never read past that) and copies the verified payload once, into its slot.
* With ``capacity_bytes`` the scheduler thread reserves room for each upload before it starts,
  evicting (deleting) the least recently used objects it knows; the deletions go out before
  the uploads.
* Failures never raise into the caller: a request that fails (after the client's own retries)
  fails its block and marks the tier down; the control thread probes with a growing interval
  (at most 1 s) and the tier serves again when a probe succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.config import ConfigError
from kvtier.format.record import RecordError, header_size, pack_header, parse_header, verify
from kvtier.tiers.base import Completions, Health, SecondaryTier, TierContext, TierEvent, TierJobResult
from kvtier.tiers.object.client import (
    INSTALL_HINT,
    ClientSettings,
    Kind,
    S3Client,
    S3Failure,
    classify,
    client_available,
)
from kvtier.tiers.object.index import PresenceIndex
from kvtier.tiers.object.params import DEFAULTS, PARAMS, validate

log = logging.getLogger("kvtier.tiers.object")

_WAVE = 16  # keys asked about in a request's first lookup wave
_MAX_BACKOFF_S = 1.0  # longest wait between probes of a down bucket
_PROBE_NAME = "kvtier-probe"  # a key under the prefix that is never written
_DELETE_BATCH = 1000  # keys per bulk delete request
_APPLY_BUDGET = 16384  # keys folded in per call, so one step never stalls on a big listing

# Task priorities: loads, then deletions (they make room), then uploads.
_P_LOAD, _P_DELETE, _P_STORE = 1, 2, 3


@dataclass
class _Job:
    """A load or store job; its blocks finish on different threads."""

    job_id: int
    remaining: int
    t0: float = field(default_factory=time.perf_counter)
    failed: set[bytes] = field(default_factory=set)
    moved: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _down_message(f: S3Failure, bucket: str, where: str) -> str:
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


class ObjectTier(SecondaryTier):
    """Secondary tier on an S3-compatible object store (see the module docstring)."""

    medium = "OBJECT"
    PARAMS = PARAMS

    @classmethod
    def validate_params(cls, params: Mapping[str, Any], label: str) -> dict[str, Any]:
        """Check names (base class) and values; credentials never appear in errors."""
        out = super().validate_params(params, label)
        out = validate(out, label)
        if not client_available():
            raise ConfigError(f"{label}.type", f"an installed S3 client for the object tier: "
                              f"{INSTALL_HINT}", "object")
        return out

    def __init__(
        self,
        ctx: TierContext,
        bucket: str,
        prefix: str | None = None,
        endpoint: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        addressing: str | None = None,
        ca_file: str | None = None,
        sign_payload: bool | None = None,
        capacity_bytes: int | None = None,
        ttl_seconds: float | None = None,
        threads: int = DEFAULTS["threads"],
        lookup_concurrency: int = DEFAULTS["lookup_concurrency"],
        timeout_seconds: float = DEFAULTS["timeout_seconds"],
        connect_timeout_seconds: float = DEFAULTS["connect_timeout_seconds"],
        lookup_timeout_seconds: float = DEFAULTS["lookup_timeout_seconds"],
        max_retries: int = DEFAULTS["max_retries"],
        negative_cache_seconds: float = DEFAULTS["negative_cache_seconds"],
        list_interval_seconds: float = DEFAULTS["list_interval_seconds"],
        presence_cache_keys: int = DEFAULTS["presence_cache_keys"],
    ) -> None:
        super().__init__(ctx, bucket=bucket, prefix=prefix, endpoint=endpoint, region=region,
                         capacity_bytes=capacity_bytes, ttl_seconds=ttl_seconds, threads=threads)
        smallest = header_size(32) + ctx.block_bytes
        if capacity_bytes is not None and capacity_bytes < smallest:
            raise ConfigError(f"{ctx.name}.capacity_bytes", f"at least one record ({smallest} bytes: "
                              f"{ctx.block_bytes} block bytes, 56 header bytes and the key)",
                              capacity_bytes)
        self.bucket = bucket
        self.prefix = prefix if prefix is not None else f"kvtier/{ctx.namespace_fp.hex()}/"
        self.endpoint = endpoint
        self.where = endpoint or f"AWS S3 ({region})"
        self.capacity_bytes = capacity_bytes
        self.ttl = ttl_seconds
        self.threads = int(threads)
        self.list_interval = float(list_interval_seconds)
        self.lookup_timeout = float(lookup_timeout_seconds)
        self._bb = ctx.block_bytes
        self._fp = ctx.namespace_fp
        if addressing is None:
            addressing = "path" if endpoint is not None else "virtual"
        if sign_payload is None:
            sign_payload = endpoint is not None and endpoint.startswith("http://")
        self._settings = ClientSettings(
            bucket=bucket, endpoint=endpoint, region=region, addressing=addressing,
            access_key_id=access_key_id, secret_access_key=secret_access_key,
            session_token=session_token, profile=profile, ca_file=ca_file,
            sign_payload=bool(sign_payload), timeout_seconds=float(timeout_seconds),
            connect_timeout_seconds=float(connect_timeout_seconds),
            lookup_timeout_seconds=float(lookup_timeout_seconds), max_retries=int(max_retries),
            threads=self.threads,
        )
        self._client: S3Client | None = None

        # Scheduler-thread state.
        self._index = PresenceIndex(ctx.block_bytes, capacity_bytes=capacity_bytes,
                                    ttl_seconds=ttl_seconds,
                                    negative_seconds=float(negative_cache_seconds),
                                    max_keys=int(presence_cache_keys))
        self._jobs_open = 0
        self._deleting = 0
        # Hand-over from the threads (drained on the scheduler thread).
        self._updates: deque[tuple[str, Any]] = deque()
        self._done = Completions()
        self._events: deque[TierEvent] = deque()

        self._health = Health(ctx.name, min_backoff=0.05, max_backoff=_MAX_BACKOFF_S)
        self._write_health = Health(f"{ctx.name} (writes)", min_backoff=0.1,
                                    max_backoff=_MAX_BACKOFF_S)
        self._stats_lock = threading.Lock()
        self._stats: dict[str, int] = dict.fromkeys(
            ("hits", "lookup_hits", "misses", "bytes_read", "bytes_fetched", "blocks_written",
             "bytes_written", "load_failures", "store_failures", "corrupt", "foreign", "evicted_at_load",
             "expired", "evictions", "stores_skipped", "requests_get", "requests_put",
             "requests_head", "requests_list", "requests_delete", "lookup_queries",
             "lookup_keys_queried", "listings", "listed_objects", "throttled"),
            0,
        )
        self._last_error = ""
        self._closed = False
        self._stop = threading.Event()
        self._probed = threading.Event()  # the first probe has an outcome
        self._list_now = threading.Event()
        self._tasks: queue.PriorityQueue[tuple[int, int, Callable[[], None] | None]]
        self._tasks = queue.PriorityQueue()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._lookup_concurrency = int(lookup_concurrency)
        self._loop = asyncio.new_event_loop()
        self._threads = [
            threading.Thread(target=self._control_loop, name=f"kvtier-{self.name}-ctl", daemon=True),
            threading.Thread(target=self._lookup_thread, name=f"kvtier-{self.name}-lookup",
                             daemon=True),
        ]
        for i in range(self.threads):
            self._threads.append(threading.Thread(target=self._io_loop,
                                                  name=f"kvtier-{self.name}-io{i}", daemon=True))
        for t in self._threads:
            t.start()

    # -- naming ----------------------------------------------------------------------------
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

    # -- scheduler side: lookups -----------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> int | None:
        """Leading run of ``keys`` in the bucket, from the index or after one wave of HEADs."""
        self._apply_updates()
        if self._closed or not self._health.up:
            return 0
        idx = self._index
        n, nk = idx.run_length(keys), len(keys)
        if n < nk:
            now = time.monotonic()
            if not idx.known_absent(keys[n], now):
                cap = max(_WAVE, n)
                ask: list[bytes] = []
                asked = 0
                inflight = idx.inflight
                wall = time.time()
                for k in keys[n:]:
                    if idx.has(k, wall):
                        continue
                    if idx.known_absent(k, now):
                        break
                    if k not in inflight:
                        ask.append(k)
                    asked += 1
                    if asked >= cap:
                        break
                if ask:
                    inflight.update(ask)
                    with self._stats_lock:
                        self._stats["lookup_queries"] += 1
                        self._stats["lookup_keys_queried"] += len(ask)
                    self._loop.call_soon_threadsafe(self._start_heads, ask)
                return None
        idx.touch(keys[:n])
        self._stats["lookup_hits"] += n
        if n < nk:
            self._stats["misses"] += 1
        return n

    def _apply_updates(self) -> None:
        """Fold what the threads learnt into the index (scheduler thread only)."""
        idx = self._index
        upd = self._updates
        now = time.monotonic()
        removed: list[bytes] = []
        budget = _APPLY_BUDGET
        while upd and budget > 0:
            kind, items = upd.popleft()
            budget -= len(items) if isinstance(items, list) else 1
            if kind == "present":
                for k, mtime in items:
                    idx.inflight.discard(k)
                    idx.add(k, mtime)
            elif kind == "absent":
                for k in items:
                    idx.inflight.discard(k)
                    idx.absent(k, now)
            elif kind == "unknown":
                idx.inflight.difference_update(items)
            elif kind == "stored":
                k, mtime, nbytes = items
                idx.release(nbytes)
                idx.add(k, mtime)
            elif kind == "released":
                idx.release(items)
            elif kind == "listed":
                idx.add_listed(items)
            elif kind == "listing_done":
                idx.listing_complete(*items)
            elif kind == "deleted":
                self._deleting -= 1
        idx.sweep()  # entries deleted elsewhere: forgotten, nothing of ours to report
        evicted = idx.over_capacity()
        if evicted:
            removed.extend(evicted)
            with self._stats_lock:
                self._stats["evictions"] += len(evicted)
            self._queue_delete(evicted, None)
        idx.trim(now)
        if removed:
            self._events.append(TierEvent(removed, removed=True))

    # -- scheduler side: jobs --------------------------------------------------------------
    def submit_load(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        """Queue one ranged GET per key (verified, then copied into its slot)."""
        keys = list(keys)
        slots = np.asarray(slots, dtype=np.int64)
        self._jobs_open += 1
        if self._refuse(keys, self._health, "load_failures"):
            self._done.put(TierJobResult(job_id, frozenset(keys)))
            return
        job = _Job(job_id, len(keys))
        for key, slot in zip(keys, slots):
            self._put_task(_P_LOAD, _bind(self._load_one, job, key, int(slot)))

    def submit_store(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        """Queue one PUT per key not known to be in the bucket, after any evictions."""
        self._apply_updates()
        keys = list(keys)
        slots = np.asarray(slots, dtype=np.int64)
        self._jobs_open += 1
        if self._refuse(keys, self._write_health, "store_failures"):
            self._done.put(TierJobResult(job_id, frozenset(keys)))
            return
        idx = self._index
        wall = time.time()
        fresh = None if self.ttl is None else wall - self.ttl / 2
        keep = [i for i, k in enumerate(keys)
                if not idx.has(k, wall) or fresh is not None and idx.present[k] < fresh]
        if len(keep) < len(keys):
            with self._stats_lock:
                self._stats["stores_skipped"] += len(keys) - len(keep)
            keys = [keys[i] for i in keep]
            slots = slots[keep]
        if not keys:
            self._done.put(TierJobResult(job_id))
            return
        need = sum(idx.record_bytes(k) for k in keys)
        ok, evicted = idx.make_room(need)
        if not ok:  # larger than the capacity with what is in flight: refuse, nothing evicted
            with self._stats_lock:
                self._stats["store_failures"] += len(keys)
            self._done.put(TierJobResult(job_id, frozenset(keys)))
            return
        job = _Job(job_id, len(keys))
        puts = [_bind(self._store_one, job, k, int(s)) for k, s in zip(keys, slots)]
        if evicted:
            with self._stats_lock:
                self._stats["evictions"] += len(evicted)
            self._events.append(TierEvent(evicted, removed=True))
            self._queue_delete(evicted, puts)
        else:
            for fn in puts:
                self._put_task(_P_STORE, fn)

    def _refuse(self, keys: list[bytes], health: Health, counter: str) -> bool:
        """True (and counted) when the job must fail without a request."""
        if keys and not self._closed and self._health.up and (health.up or health.should_probe()):
            return False
        if keys:
            with self._stats_lock:
                self._stats[counter] += len(keys)
        return True

    def _queue_delete(self, keys: list[bytes], then: list[Callable[[], None]] | None) -> None:
        """Delete ``keys``' objects; queue ``then`` (uploads) once that is done."""
        paths = [self.path(k) for k in keys]
        self._deleting += 1
        self._put_task(_P_DELETE, lambda: self._delete_task(paths, then))

    def _put_task(self, prio: int, fn: Callable[[], None] | None) -> None:
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
        self._tasks.put((prio, seq, fn))

    def poll(self) -> list[TierJobResult]:
        """Finished jobs; also folds lookup answers and listings into the index."""
        self._apply_updates()
        done = self._done.drain()
        self._jobs_open -= len(done)
        return done

    def touch(self, keys: Sequence[bytes]) -> None:
        """Recency hint for capacity eviction (the bucket itself keeps no access times)."""
        self._index.touch(keys)

    def take_events(self) -> list[TierEvent]:
        """Keys stored, evicted, or found gone or corrupt since the last call."""
        out: list[TierEvent] = []
        ev = self._events
        while ev:
            out.append(ev.popleft())
        return out

    def has_pending_work(self) -> bool:
        """True while jobs, lookup queries or deletions are in flight."""
        return (self._jobs_open > 0 or bool(self._index.inflight) or self._deleting > 0
                or bool(self._updates))

    def stats(self) -> dict[str, Any]:
        """Counters plus state (see the README's object section); never credentials."""
        with self._stats_lock:
            st: dict[str, Any] = dict(self._stats)
        idx = self._index
        st.update(
            available=self._health.up,
            writes_available=self._write_health.up,
            down_events=self._health.down_events,
            failures=self._health.failures + self._write_health.failures,
            usage_bytes=idx.usage,
            capacity_bytes=self.capacity_bytes,
            presence_cache_keys=len(idx.present),
            negative_cache_keys=len(idx.negative),
            bucket=self.bucket,
            prefix=self.prefix,
            endpoint=self.where,
            last_error=self._last_error,
        )
        return st

    @property
    def available(self) -> bool:
        """False while the bucket cannot be reached (the control thread keeps probing)."""
        return self._health.up

    def shutdown(self) -> None:
        """Stop the threads (requests in flight end within their timeout); objects stay."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._list_now.set()
        for _ in range(self.threads):
            self._tasks.put((99, 1 << 62, None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        deadline = time.monotonic() + 5.0
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    # -- threads ---------------------------------------------------------------------------
    def _failure(self, f: S3Failure, *, write: bool = False) -> None:
        """Count a failed request; mark the tier (or its writes) down."""
        self._last_error = f.reason
        if f.kind is Kind.THROTTLED:
            with self._stats_lock:
                self._stats["throttled"] += 1
        msg = _down_message(f, self.bucket, self.where)
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

    def _finish(self, job: _Job, failed: Sequence[bytes], moved: int) -> None:
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

    def _load_one(self, job: _Job, key: bytes, slot: int) -> None:
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

    def _gone(self, job: _Job, key: bytes, counter: str | None) -> None:
        """``key`` has no usable object: a miss, forgotten, reported removed."""
        with self._stats_lock:
            self._stats["load_failures"] += 1
            if counter is not None:
                self._stats[counter] += 1
        self._updates.append(("absent", [key]))
        self._events.append(TierEvent([key], removed=True))
        self._finish(job, [key], 0)

    def _bad(self, job: _Job, key: bytes, path: str, reason: str) -> None:
        """A corrupt object: never served, deleted, counted."""
        log.warning("tier %s: object %s rejected (%s); deleting it", self.name, path, reason)
        with self._stats_lock:
            self._stats["corrupt"] += 1
        self._delete_paths([path], None)
        self._gone(job, key, None)

    def _store_one(self, job: _Job, key: bytes, slot: int) -> None:
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
                self._put_task(_P_STORE, fn)

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


def _bind(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    """A task for an I/O thread: ``fn(*args)``."""
    def task() -> None:
        fn(*args)
    return task
