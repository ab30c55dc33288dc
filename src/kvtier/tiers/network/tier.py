"""The ``network`` tier: the scheduler-side face of the tier (see the package docstring)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvtier.tiers.base import Health, SecondaryTier, TierContext, TierEvent, TierJobResult
from kvtier.tiers.network.client import Servers
from kvtier.tiers.network.config import (
    DEFAULT_POOL_SIZE,
    PARAMS,
    batch_bytes,
    redact,
    validate,
)
from kvtier.tiers.network.io import QUERY_CHUNK, Job, Task, Transfers
from kvtier.tiers.network.presence import PresenceCache
from kvtier.tiers.network.stats import Counters

log = logging.getLogger("kvtier.tiers.network")

_MAX_BACKOFF_S = 0.5  # longest wait between probes of a down server
_TASK_WINDOWS = 16  # round trips one I/O task streams before others get a turn


class NetworkTier(SecondaryTier):
    """Secondary tier on a Redis or Valkey server or cluster (see the package docstring)."""

    medium = "NETWORK"
    PARAMS = PARAMS

    @classmethod
    def validate_params(cls, params: Mapping[str, Any], label: str) -> dict[str, Any]:
        """Check names (base class) and values; the url's password never appears in errors."""
        return validate(super().validate_params(params, label), label)

    def __init__(
        self,
        ctx: TierContext,
        url: str,
        cluster: bool = False,
        username: str | None = None,
        password: str | None = None,
        key_prefix: str | None = None,
        ttl_seconds: float | None = None,
        connect_timeout_seconds: float = 2.0,
        socket_timeout_seconds: float = 2.0,
        lookup_timeout_seconds: float = 1.0,
        pool_size: int = DEFAULT_POOL_SIZE,
        max_batch_bytes: int | None = None,
        negative_cache_seconds: float = 1.0,
        presence_cache_keys: int = 262144,
    ) -> None:
        super().__init__(ctx, url=redact(url), cluster=cluster, key_prefix=key_prefix,
                         ttl_seconds=ttl_seconds, pool_size=pool_size)
        self.url = url
        self.cluster = cluster
        self.key_prefix = key_prefix if key_prefix is not None else (
            f"kvtier:{ctx.namespace_fp.hex()}:"
        )
        self._prefix = self.key_prefix.encode("utf-8")
        self.ttl_ms = None if ttl_seconds is None else max(1, int(round(ttl_seconds * 1000)))
        self.pool_size = int(pool_size)
        self.lookup_timeout = float(lookup_timeout_seconds)
        self.negative_ttl = float(negative_cache_seconds)
        self.presence_limit = int(presence_cache_keys)
        self._bb = ctx.block_bytes
        self.max_batch_bytes = batch_bytes(max_batch_bytes, self._bb)
        # Records per round trip on one connection; two windows at most are in flight.
        self._window = max(1, self.max_batch_bytes // self._bb)

        kwargs: dict[str, Any] = {
            "socket_connect_timeout": float(connect_timeout_seconds),
            "socket_timeout": float(socket_timeout_seconds),
            "socket_keepalive": True,
            # I/O threads and the query thread hold one each per server, warm-up a few more
            "max_connections": 2 * self.pool_size + 4,
            "retry": Retry(NoBackoff(), 1),
            "socket_read_size": 256 * 1024,
            "client_name": f"kvtier-{ctx.name}",
        }
        if username is not None:
            kwargs["username"] = username
        if password is not None:
            kwargs["password"] = password
        self._servers = Servers(url, cluster, kwargs)

        # Scheduler-thread state.
        self._cache = PresenceCache(self.negative_ttl, self.presence_limit)
        self._jobs_open = 0
        self._seen_down_events = 0
        self._touch_pending: set[bytes] = set()

        self._health = Health(ctx.name, min_backoff=0.05, max_backoff=_MAX_BACKOFF_S)
        self._write_health = Health(f"{ctx.name} (writes)", min_backoff=0.1,
                                    max_backoff=_MAX_BACKOFF_S)
        self._stats = Counters()
        self._io = Transfers(
            name=self.name, servers=self._servers, primary=ctx.primary, block_bytes=self._bb,
            namespace_fp=ctx.namespace_fp, prefix=self._prefix, ttl_ms=self.ttl_ms,
            lookup_timeout=self.lookup_timeout, stats=self._stats, health=self._health,
            write_health=self._write_health, updates=self._cache.updates,
            window=self._window, query_chunk=max(64, min(QUERY_CHUNK, self.max_batch_bytes // 256)),
        )
        self._closed = False
        self._queries: queue.Queue[list[bytes] | None] = queue.Queue()
        self._tasks: queue.PriorityQueue[tuple[int, int, Task | None]] = queue.PriorityQueue()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._threads = [threading.Thread(
            target=self._io.query_loop, args=(self._queries, self.pool_size + 1),
            name=f"kvtier-{self.name}-q", daemon=True)]
        for i in range(self.pool_size):
            self._threads.append(threading.Thread(
                target=self._io.io_loop, args=(self._tasks,),
                name=f"kvtier-{self.name}-io{i}", daemon=True))
        for t in self._threads:
            t.start()

    # -- scheduler side: lookups -----------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> int | None:
        """Leading run of ``keys`` on the server, from the presence cache or after one query."""
        self._apply_updates()
        if not self._health.up:
            return 0
        n, ask = self._cache.leading_run(keys)
        if ask is not None:
            if ask:
                self._queries.put(ask)
            return None
        self._stats.add(lookup_hits=n, misses=1 if n < len(keys) else 0)
        return n

    def _apply_updates(self) -> None:
        """Fold what the I/O threads learnt into the caches (scheduler thread only)."""
        h = self._health
        if h.down_events != self._seen_down_events:
            # The server went away: it may come back empty, so forget what it held.
            self._seen_down_events = h.down_events
            self._cache.forget()
        self._cache.apply()

    # -- scheduler side: jobs --------------------------------------------------------------
    def submit_load(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        """Queue GET batches for ``keys`` (verified, then copied into ``slots``)."""
        self._submit("load", job_id, list(keys), np.asarray(slots, dtype=np.int64))

    def submit_store(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        """Queue SET batches writing ``slots`` as records under ``keys``."""
        keys = list(keys)
        slots = np.asarray(slots, dtype=np.int64)
        present = self._cache.present
        if self.ttl_ms is None and keys and present:
            # A block this tier confirmed on the server moments ago need not travel again
            # (the presence cache's ``recently_present``, inlined: one dict look-up a key).
            fresh = time.monotonic() - self.negative_ttl
            seen = present.get
            keep = [i for i, k in enumerate(keys) if seen(k, -1.0) < fresh]
            if len(keep) < len(keys):
                self._stats.add(stores_skipped=len(keys) - len(keep))
                keys = [keys[i] for i in keep]
                slots = slots[keep]
        self._submit("store", job_id, keys, slots)

    def _submit(self, kind: str, job_id: int, keys: list[bytes], slots: np.ndarray) -> None:
        self._jobs_open += 1
        health = self._health if kind == "load" else self._write_health
        if (
            self._closed
            or not keys
            or not self._health.up and not self._health.should_probe()
            or health is self._write_health and not health.up and not health.should_probe()
        ):
            failed = frozenset() if not keys else frozenset(keys)
            if failed:
                if kind == "load":
                    self._stats.add(load_failures=len(failed))
                else:
                    self._stats.add(store_failures=len(failed))
            self._io.done.put(TierJobResult(job_id, failed))
            return
        # One task streams at most _TASK_WINDOWS windows, then other jobs get a turn. A store
        # is spread over the threads: one thread checksums a window while another's is copied
        # into its socket. A load's tasks run one after another, each queued when the one
        # before it ends: its records are verified as they arrive, and two threads splitting
        # one load only contend for the interpreter lock.
        spread = self.pool_size if kind == "store" else 1
        batch = max(1, min(_TASK_WINDOWS * self._window, -(-len(keys) // spread)))
        parts = [(keys[i:i + batch], slots[i:i + batch]) for i in range(0, len(keys), batch)]
        job = Job(job_id, kind, len(parts))
        if kind == "load":
            self._put_task(0, partial(self._load_part, job, parts, 0))
            return
        for part_keys, part_slots in parts:
            self._put_task(1, partial(self._io.store_batch, job, part_keys, part_slots))

    def _load_part(self, job: Job, parts: list[tuple[list[bytes], np.ndarray]], k: int) -> None:
        """Run part ``k`` of a load job, then queue the next part (I/O thread)."""
        self._io.load_batch(job, *parts[k])
        if k + 1 < len(parts):
            if self._closed:  # no thread may be left to run it
                for part_keys, _slots in parts[k + 1:]:
                    self._io.finish_part(job, part_keys, 0)
                return
            self._put_task(0, partial(self._load_part, job, parts, k + 1))

    def _put_task(self, prio: int, fn: Task | None) -> None:
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
        self._tasks.put((prio, seq, fn))

    def poll(self) -> list[TierJobResult]:
        """Finished jobs; also folds lookup answers into the caches and sends touches."""
        self._apply_updates()
        done = self._io.done.drain()
        self._jobs_open -= len(done)
        io = self._io
        if self._touch_pending and not io.touch_running and self._health.up:
            keys = list(self._touch_pending)
            self._touch_pending.clear()
            io.touch_running = True
            self._put_task(2, partial(io.touch_batch, keys))
        return done

    def touch(self, keys: Sequence[bytes]) -> None:
        """Recency hint: refresh the server's LRU clock (or TTL) of keys it holds, batched."""
        if not self._health.up:
            return
        pending = self._touch_pending
        if len(pending) >= 4096:
            return
        present = self._cache.present
        for k in keys:
            if k in present:
                pending.add(k)

    def take_events(self) -> list[TierEvent]:
        """Keys stored and keys found gone (evicted or corrupt) since the last call."""
        out: list[TierEvent] = []
        ev = self._io.events
        while ev:
            out.append(ev.popleft())
        return out

    def has_pending_work(self) -> bool:
        """True while jobs or lookup queries are in flight."""
        return self._jobs_open > 0 or bool(self._cache.inflight) or bool(self._cache.updates)

    def stats(self) -> dict[str, Any]:
        """Counters plus state (see the README's network section)."""
        st: dict[str, Any] = dict(self._stats.snapshot())
        st["available"] = self._health.up
        st["writes_available"] = self._write_health.up
        st["down_events"] = self._health.down_events
        st["failures"] = self._health.failures + self._write_health.failures
        st["presence_cache_keys"] = len(self._cache.present)
        st["negative_cache_keys"] = len(self._cache.negative)
        st["key_prefix"] = self.key_prefix
        st["cluster"] = self.cluster
        st["url"] = redact(self.url)
        return st

    @property
    def available(self) -> bool:
        """False while the server does not answer (the query thread keeps probing it)."""
        return self._health.up

    def shutdown(self) -> None:
        """Stop the threads and close the connections (the server keeps the blocks)."""
        if self._closed:
            return
        self._closed = True
        self._io.stop.set()
        self._queries.put(None)
        for _ in range(self.pool_size):
            self._tasks.put((99, 1 << 62, None))
        for t in self._threads:
            t.join(timeout=5)
        self._servers.close()

