"""The network tier's I/O threads: lookup queries, loads, stores and touches.

One query thread answers lookups (one ``EXISTS`` per key, one write per server) and probes the
server while the tier is down; ``pool_size`` I/O threads run load, store and touch batches from a
priority queue (loads first). Nothing here touches the scheduler thread's state: results go out
through the update queue of the presence cache, the event queue and the completions.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from redis.exceptions import AskError, MovedError, OutOfMemoryError, ReadOnlyError

from kvtier.format.record import (
    RecordError,
    header_size,
    pack_header,
    parse_header,
    payload_checksum,
    verify,
)
from kvtier.tiers.base import Completions, Health, TierEvent, TierJobResult
from kvtier.tiers.network.client import Servers, pack
from kvtier.tiers.network.presence import ABSENT, PRESENT, UNKNOWN
from kvtier.tiers.network.stats import Counters

log = logging.getLogger("kvtier.tiers.network")

QUERY_CHUNK = 8192  # keys per EXISTS batch (one batch is one round trip per server)
PROBE_IDLE_S = 0.05  # how often the query thread looks at a down tier


@dataclass
class Job:
    """A load or store job cut into batches that finish on different threads."""

    job_id: int
    kind: str
    remaining: int
    t0: float = field(default_factory=time.perf_counter)
    failed: set[bytes] = field(default_factory=set)
    moved: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ThreadState:
    """What one I/O thread keeps between batches: the buffer records are built in."""

    def __init__(self) -> None:
        self.buf = np.empty(0, dtype=np.uint8)

    def buffer(self, n: int) -> np.ndarray:
        """A scratch buffer of at least ``n`` bytes (grown, never shrunk)."""
        if self.buf.nbytes < n:
            self.buf = np.empty(max(n, 2 * self.buf.nbytes), dtype=np.uint8)
        return self.buf


Task = Callable[[ThreadState], None]


class Transfers:
    """The work the tier's threads do, and the queues that carry its results back."""

    def __init__(self, *, name: str, servers: Servers, primary: np.ndarray, block_bytes: int,
                 namespace_fp: bytes, prefix: bytes, ttl_ms: int | None, lookup_timeout: float,
                 stats: Counters, health: Health, write_health: Health,
                 updates: deque[tuple[str, list[bytes]]]) -> None:
        self.name = name
        self.servers = servers
        self.primary = primary
        self.bb = block_bytes
        self.fp = namespace_fp
        self.prefix = prefix
        self.ttl_ms = ttl_ms
        self.lookup_timeout = lookup_timeout
        self.stats = stats
        self.health = health
        self.write_health = write_health
        self.updates = updates  # the presence cache's update queue
        self.events: deque[TierEvent] = deque()
        self.done = Completions()
        self.stop = threading.Event()
        self.touch_running = False

    # -- thread loops ----------------------------------------------------------------------
    def query_loop(self, queries: queue.Queue[list[bytes] | None], warm_conns: int) -> None:
        """The query thread: (re)connect and probe while down, answer lookup queries."""
        servers, health = self.servers, self.health
        warm = False
        while not self.stop.is_set():
            if not warm or not health.up:
                if health.should_probe():
                    try:
                        servers.connect()
                        servers.warm(warm_conns)
                        warm = True
                        health.record_success()
                    except Exception as e:
                        health.record_failure(e)
            try:
                item = queries.get(timeout=PROBE_IDLE_S if not health.up else 0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            batch = list(item)
            while len(batch) < QUERY_CHUNK:  # fold queries queued meanwhile into this one
                try:
                    more = queries.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    queries.put(None)
                    break
                batch.extend(more)
            for i in range(0, len(batch), QUERY_CHUNK):
                self.run_query(batch[i:i + QUERY_CHUNK])

    def io_loop(self, tasks: queue.PriorityQueue[tuple[int, int, Task | None]]) -> None:
        """An I/O thread: run tasks until a None task arrives."""
        state = ThreadState()
        while True:
            _prio, _seq, fn = tasks.get()
            if fn is None:
                return
            try:
                fn(state)
            except Exception:  # a bug must not kill the thread; the job already failed
                log.exception("tier %s: unexpected error in an I/O task", self.name)

    # -- lookups ---------------------------------------------------------------------------
    def run_query(self, keys: list[bytes]) -> None:
        """Ask the server which of ``keys`` it holds; the answer goes to the update queue."""
        if not self.health.up or not self.servers.ready:
            self.updates.append((UNKNOWN, keys))
            return
        prefix = self.prefix
        rkeys = [prefix + k for k in keys]
        try:
            groups, replies = self.servers.per_key(b"EXISTS", rkeys, self.lookup_timeout)
        except Exception as e:
            self.updates.append((UNKNOWN, keys))
            self.health.record_failure(e)
            return
        self.health.record_success()
        present: list[bytes] = []
        absent: list[bytes] = []
        unknown: list[bytes] = []
        for (_pool, idx), rep in zip(groups, replies):
            for i, r in zip(idx, rep):
                if isinstance(r, Exception):
                    unknown.append(keys[i])
                elif r:
                    present.append(keys[i])
                else:
                    absent.append(keys[i])
        self.stats.add(round_trips=1, lookup_queries=1, lookup_keys_queried=len(keys))
        if present:
            self.updates.append((PRESENT, present))
        if absent:
            self.updates.append((ABSENT, absent))
        if unknown:
            self.updates.append((UNKNOWN, unknown))

    # -- jobs ------------------------------------------------------------------------------
    def finish_part(self, job: Job, failed: Sequence[bytes], moved: int) -> None:
        """One batch of ``job`` is over; the last one reports the job."""
        with job.lock:
            job.failed.update(failed)
            job.moved += moved
            job.remaining -= 1
            last = job.remaining == 0
        if last:
            self.done.put(TierJobResult(job.job_id, frozenset(job.failed), job.moved,
                                        time.perf_counter() - job.t0))

    def load_batch(self, state: ThreadState, job: Job, keys: list[bytes],
                   slots: np.ndarray) -> None:
        """GET ``keys``; verify each record and copy its payload into its slot."""
        if self.stop.is_set():
            self.finish_part(job, keys, 0)
            return
        prefix = self.prefix
        rkeys = [prefix + k for k in keys]
        try:
            groups, replies = self.servers.per_key(b"GET", rkeys)
        except Exception as e:
            self.health.record_failure(e)
            self.stats.add(load_failures=len(keys))
            self.finish_part(job, keys, 0)
            return
        self.health.record_success()
        primary = self.primary
        bb, fp = self.bb, self.fp
        failed: list[bytes] = []
        gone: list[bytes] = []
        bad: list[bytes] = []
        good: list[bytes] = []
        moved = 0
        for (_pool, idx), rep in zip(groups, replies):
            for i, value in zip(idx, rep):
                key = keys[i]
                if value is None:
                    gone.append(key)
                    continue
                if isinstance(value, Exception):
                    if isinstance(value, (MovedError, AskError)):
                        failed.append(key)
                    else:
                        bad.append(key)  # e.g. WRONGTYPE: not one of our records
                    continue
                mv = memoryview(value)
                try:
                    header = parse_header(mv)
                    payload = mv[header.header_len:]
                    reason = verify(header, payload, namespace_fp=fp, key=key, payload_len=bb)
                except RecordError as e:
                    reason = str(e)
                if reason is not None:
                    log.debug("tier %s: record of %s rejected: %s", self.name, key.hex(), reason)
                    bad.append(key)
                    continue
                primary[int(slots[i])] = np.frombuffer(payload, dtype=np.uint8)
                moved += bb
                good.append(key)
        if bad:
            self.delete([prefix + k for k in bad])
            log.warning("tier %s: %d corrupt record(s) deleted", self.name, len(bad))
        self.stats.add(round_trips=1, hits=len(good), bytes_read=moved,
                       load_failures=len(failed) + len(gone) + len(bad),
                       evicted_at_load=len(gone), corrupt=len(bad))
        if good:
            self.updates.append((PRESENT, good))
        if gone or bad:
            self.updates.append((ABSENT, gone + bad))
            self.events.append(TierEvent(gone + bad, removed=True))
        self.finish_part(job, failed + gone + bad, moved)

    def delete(self, rkeys: list[bytes]) -> None:
        """DEL ``rkeys`` (corrupt records); a failure is logged, not raised."""
        try:
            self.servers.per_key(b"DEL", rkeys)
        except Exception as e:
            log.warning("tier %s: could not delete corrupt records: %s", self.name, e)

    def store_batch(self, state: ThreadState, job: Job, keys: list[bytes],
                    slots: np.ndarray) -> None:
        """SET a record for each of ``keys`` built from its slot."""
        if self.stop.is_set():
            self.finish_part(job, keys, 0)
            return
        primary = self.primary
        bb, fp, prefix = self.bb, self.fp, self.prefix
        hlens = [header_size(len(k)) for k in keys]
        total = sum(hlens) + bb * len(keys)
        buf = state.buffer(total)
        whole = memoryview(buf)  # type: ignore[arg-type]
        ttl = None if self.ttl_ms is None else (b"PX", self.ttl_ms)
        rkeys: list[bytes] = []
        values: list[memoryview] = []
        off = 0
        for key, slot, hlen in zip(keys, slots, hlens):
            start = off + hlen
            body = buf[start:start + bb]
            body[:] = primary[int(slot)]  # the one copy: a snapshot the checksum describes
            view = memoryview(body)  # type: ignore[arg-type]
            header = pack_header(fp, key, view, checksum=payload_checksum(view))
            buf[off:start] = np.frombuffer(header, dtype=np.uint8)
            values.append(whole[off:start + bb])
            rkeys.append(prefix + key)
            off = start + bb
        try:
            groups = self.servers.route(rkeys)
            batches = []
            for pool, idx in groups:
                cmds = [
                    (b"SET", rkeys[i], values[i]) if ttl is None
                    else (b"SET", rkeys[i], values[i], *ttl)
                    for i in idx
                ]
                batches.append((pool, pack(cmds, zero_copy=True), len(idx)))
            replies = self.servers.exchange(batches)
        except Exception as e:
            self.health.record_failure(e)
            self.stats.add(store_failures=len(keys))
            self.finish_part(job, keys, 0)
            return
        finally:
            del values, whole
        self.health.record_success()
        failed: list[bytes] = []
        stored: list[bytes] = []
        written = 0
        full: Exception | None = None
        for (_pool, idx), rep in zip(groups, replies):
            for i, r in zip(idx, rep):
                if isinstance(r, Exception):
                    failed.append(keys[i])
                    if isinstance(r, (OutOfMemoryError, ReadOnlyError)) or str(r).startswith(
                            "OOM"):
                        full = r
                    elif not isinstance(r, (MovedError, AskError)):
                        log.debug("tier %s: SET failed: %s", self.name, r)
                else:
                    stored.append(keys[i])
                    written += hlens[i] + bb
        if full is not None:
            self.write_health.record_failure(
                f"SET refused: {full} (maxmemory reached with maxmemory-policy noeviction, or "
                "a read-only replica; run the server with maxmemory-policy allkeys-lru)")
        elif failed and not stored:
            self.write_health.record_failure(f"{len(failed)} SET command(s) failed")
        else:
            self.write_health.record_success()
        self.stats.add(round_trips=1, blocks_written=len(stored), bytes_written=written,
                       store_failures=len(failed),
                       oom_errors=len(failed) if full is not None else 0)
        if stored:
            self.updates.append((PRESENT, stored))
            self.events.append(TierEvent(stored, removed=False))
        self.finish_part(job, failed, bb * len(stored))

    def touch_batch(self, keys: list[bytes]) -> None:
        """Refresh the server's LRU clock (TOUCH) or TTL (PEXPIRE) of ``keys``."""
        try:
            if self.stop.is_set() or not self.health.up:
                return
            prefix = self.prefix
            rkeys = [prefix + k for k in keys]
            groups = self.servers.route(rkeys)
            cmds: list[list[tuple[object, ...]]]
            if self.ttl_ms is None:
                cmds = [[(b"TOUCH", rkeys[i]) for i in idx] for _, idx in groups]
            else:
                cmds = [[(b"PEXPIRE", rkeys[i], self.ttl_ms) for i in idx] for _, idx in groups]
            self.servers.exchange([
                (pool, pack(c, zero_copy=False), len(c)) for (pool, _), c in zip(groups, cmds)
            ])
            self.stats.add(touches=len(keys), round_trips=1)
        except Exception as e:
            self.health.record_failure(e)
        finally:
            self.touch_running = False
