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

This module is the scheduler side; what the threads do is in :mod:`kvtier.tiers.object.workers`,
the presence index in :mod:`kvtier.tiers.object.index`, the S3 client in
:mod:`kvtier.tiers.object.client`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from kvtier.config import ConfigError
from kvtier.format.record import header_size
from kvtier.tiers.base import Completions, Health, SecondaryTier, TierContext, TierEvent, TierJobResult
from kvtier.tiers.object.client import INSTALL_HINT, ClientSettings, S3Client, client_available
from kvtier.tiers.object.index import PresenceIndex
from kvtier.tiers.object.params import DEFAULTS, PARAMS, validate
from kvtier.tiers.object.workers import P_DELETE, P_LOAD, P_STORE, Job, ObjectIO, bind

_WAVE = 16  # keys asked about in a request's first lookup wave
_MAX_BACKOFF_S = 1.0  # longest wait between probes of a down bucket
_APPLY_BUDGET = 16384  # keys folded in per call, so one step never stalls on a big listing


class ObjectTier(ObjectIO, SecondaryTier):
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
        job = Job(job_id, len(keys))
        for key, slot in zip(keys, slots):
            self._put_task(P_LOAD, bind(self._load_one, job, key, int(slot)))

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
        job = Job(job_id, len(keys))
        puts = [bind(self._store_one, job, k, int(s)) for k, s in zip(keys, slots)]
        if evicted:
            with self._stats_lock:
                self._stats["evictions"] += len(evicted)
            self._events.append(TierEvent(evicted, removed=True))
            self._queue_delete(evicted, puts)
        else:
            for fn in puts:
                self._put_task(P_STORE, fn)

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
        self._put_task(P_DELETE, lambda: self._delete_task(paths, then))

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
