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
from functools import partial
from typing import Any

import numpy as np

from kvtier.format.record import (
    header_from_prefix,
    header_prefix,
    header_size,
    payload_checksum,
)
from kvtier.tiers.base import Completions, Health, TierEvent, TierJobResult
from kvtier.tiers.network.client import Servers, pack
from kvtier.tiers.network.presence import ABSENT, PRESENT, UNKNOWN
from kvtier.tiers.network.stats import Counters
from kvtier.tiers.network.wire import (
    ASKING,
    BAD,
    HIT,
    HIT_REPLY,
    MISS,
    Wire,
    get_command,
    read_record,
    read_records,
    read_status,
    read_statuses,
    set_head,
    set_tail,
)

log = logging.getLogger("kvtier.tiers.network")

QUERY_CHUNK = 8192  # most keys per EXISTS batch (one batch is one round trip per server)
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


Task = Callable[[], None]


class Transfers:
    """The work the tier's threads do, and the queues that carry its results back."""

    def __init__(self, *, name: str, servers: Servers, primary: np.ndarray, block_bytes: int,
                 namespace_fp: bytes, prefix: bytes, ttl_ms: int | None, lookup_timeout: float,
                 stats: Counters, health: Health, write_health: Health,
                 updates: deque[tuple[str, list[bytes]]], window: int = 1,
                 query_chunk: int = QUERY_CHUNK) -> None:
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
        self.window = window  # records per round trip on one connection
        self.query_chunk = query_chunk  # keys per EXISTS round trip
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
            chunk = self.query_chunk
            while len(batch) < chunk:  # fold queries queued meanwhile into this one
                try:
                    more = queries.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    queries.put(None)
                    break
                batch.extend(more)
            for i in range(0, len(batch), chunk):
                self.run_query(batch[i:i + chunk])

    def io_loop(self, tasks: queue.PriorityQueue[tuple[int, int, Task | None]]) -> None:
        """An I/O thread: run tasks until a None task arrives."""
        while True:
            _prio, _seq, fn = tasks.get()
            if fn is None:
                return
            try:
                fn()
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

    def _exchange(self, rkeys: list[bytes], request: Callable[[list[int], bool], list[Any]],
                  reader: Callable[[Wire, list[int], bool], list[Any]],
                  ) -> dict[int, Any]:
        """Run a bulk command for every key, following cluster redirections once.

        ``request(window, asking)`` builds the pieces for the keys of ``window`` on one
        connection (with ``ASKING`` before each command when ``asking``), ``reader(wire,
        window, asking)`` reads their replies. Returns key index -> reply. A key answered
        ``MOVED`` is sent again after the slot table is refreshed, one answered ``ASK`` to the
        node it names; a second redirection is its reply.
        """
        servers = self.servers
        groups = [(pool, idx, False) for pool, idx in servers.route(rkeys)]
        out: dict[int, Any] = {}
        for attempt in range(2):
            replies, trips = servers.bulk_exchange([
                (pool, idx, partial(_bind_flag, request, asking),
                 partial(_bind_reader, reader, asking))
                for pool, idx, asking in groups
            ], self.window)
            self.stats.add(round_trips=trips)
            moved: list[int] = []
            ask: dict[tuple[str, int], list[int]] = {}
            for (_pool, idx, _asking), rep in zip(groups, replies):
                for i, r in zip(idx, rep):
                    out[i] = r
                    if r is None or r is HIT_REPLY or attempt:
                        continue  # +OK, a verified record, or a second redirection
                    target = _redirect(r)
                    if target is None:
                        continue
                    if target[0] == "MOVED":
                        moved.append(i)
                    else:
                        ask.setdefault((target[1], target[2]), []).append(i)
            if not moved and not ask:
                break
            self.stats.add(redirects=len(moved) + sum(len(v) for v in ask.values()))
            groups = []
            if moved:
                servers.request_refresh()
                sub = [rkeys[i] for i in moved]
                groups += [(pool, [moved[j] for j in idx], False)
                           for pool, idx in servers.route(sub)]
            for (host, port), idx in ask.items():
                pool = servers.pool_for(host, port)
                if pool is not None:
                    groups.append((pool, idx, True))
            if not groups:
                break
        return out

    def load_batch(self, job: Job, keys: list[bytes], slots: np.ndarray) -> None:
        """GET ``keys`` straight into their slots; only verified records count as loaded."""
        if self.stop.is_set():
            self.finish_part(job, keys, 0)
            return
        prefix = self.prefix
        rkeys = [prefix + k for k in keys]
        primary = self.primary
        bb, fp = self.bb, self.fp
        dests = [memoryview(primary[int(s)]) for s in slots]  # type: ignore[arg-type]
        hint = 4 + len(b"$%d" % (header_size(len(keys[0])) + bb)) + header_size(len(keys[0]))
        prefixes = {n: header_prefix(fp, n, bb) for n in {len(k) for k in keys}}

        def request(idx: list[int], asking: bool) -> list[Any]:
            if asking:
                return [b"".join([ASKING + get_command(rkeys[i]) for i in idx])]
            return [b"".join([get_command(rkeys[i]) for i in idx])]

        def reader(wire: Wire, idx: list[int], asking: bool) -> list[Any]:
            wire.hint = hint  # the next reply's length line and record header, no more
            if not asking:
                return read_records(wire, [keys[i] for i in idx], [dests[i] for i in idx],
                                    namespace_fp=fp, block_bytes=bb)
            out = []
            for i in idx:
                read_status(wire)  # +OK (an error here shows in the GET's reply)
                key = keys[i]
                out.append(read_record(wire, key, dests[i], namespace_fp=fp, block_bytes=bb,
                                       prefix=prefixes.get(len(key))))
            return out

        try:
            replies = self._exchange(rkeys, request, reader)
        except Exception as e:
            self.health.record_failure(e)
            self.stats.add(load_failures=len(keys))
            self.finish_part(job, keys, 0)
            return
        self.health.record_success()
        failed: list[bytes] = []
        gone: list[bytes] = []
        bad: list[bytes] = []
        good: list[bytes] = []
        refused: str | None = None
        for i, key in enumerate(keys):
            status, detail = replies[i]
            if status == HIT:
                good.append(key)
            elif status == MISS:
                gone.append(key)
            elif status == BAD:
                log.debug("tier %s: record of %s rejected: %s", self.name, key.hex(), detail)
                bad.append(key)
            elif detail is not None and detail.startswith("WRONGTYPE"):
                bad.append(key)  # not a string: not one of our records
            else:
                failed.append(key)
                refused = detail
        if refused is not None:
            log.warning("tier %s: the server refused %d GET(s): %s", self.name, len(failed),
                        refused)
        if bad:
            self.delete([prefix + k for k in bad])
            log.warning("tier %s: %d corrupt record(s) deleted", self.name, len(bad))
        moved = bb * len(good)
        self.stats.add(hits=len(good), bytes_read=moved,
                       load_failures=len(failed) + len(gone) + len(bad),
                       evicted_at_load=len(gone), corrupt=len(bad))
        if good:
            self.updates.append((PRESENT, good))
        if gone or bad:
            self.events.append(TierEvent(gone + bad, removed=True))
        if gone or bad or failed:
            # A refused block stays on the server but is not loadable now: lookups treat it as
            # absent until the negative cache expires, so no request waits on it meanwhile.
            self.updates.append((ABSENT, gone + bad + failed))
        self.finish_part(job, failed + gone + bad, moved)

    def delete(self, rkeys: list[bytes]) -> None:
        """DEL ``rkeys`` (corrupt records); a failure is logged, not raised."""
        try:
            self.servers.per_key(b"DEL", rkeys)
        except Exception as e:
            log.warning("tier %s: could not delete corrupt records: %s", self.name, e)

    def store_batch(self, job: Job, keys: list[bytes],
                    slots: np.ndarray) -> None:
        """SET a record for each of ``keys``: its header, then its slot's bytes, uncopied.

        The manager leaves a store job's slots unchanged until the job is polled, so the
        checksum taken here describes exactly the bytes the socket sends.
        """
        if self.stop.is_set():
            self.finish_part(job, keys, 0)
            return
        primary = self.primary
        bb, fp, prefix, ttl = self.bb, self.fp, self.prefix, self.ttl_ms
        rkeys = [prefix + k for k in keys]
        views = [memoryview(primary[int(s)]) for s in slots]  # type: ignore[arg-type]
        tail = set_tail(ttl)
        shapes = {n: header_prefix(fp, n, bb) for n in {len(k) for k in keys}}

        def request(idx: list[int], asking: bool) -> list[Any]:
            # Headers are made window by window, just before they are sent: the checksum of a
            # window's slots is taken while the server still works on the previous windows.
            pieces: list[bytes | memoryview] = []
            ask = ASKING if asking else b""
            before = ask
            for i in idx:
                view, key = views[i], keys[i]
                header = header_from_prefix(shapes[len(key)], key, payload_checksum(view))
                pieces.append(before + set_head(rkeys[i], len(header) + bb, ttl) + header)
                pieces.append(view)
                before = tail + ask
            pieces.append(tail)
            return pieces

        def reader(wire: Wire, idx: list[int], asking: bool) -> list[Any]:
            if not asking:
                return read_statuses(wire, len(idx))
            out = []
            for _ in idx:
                read_status(wire)
                out.append(read_status(wire))
            return out

        try:
            replies = self._exchange(rkeys, request, reader)
        except Exception as e:
            self.health.record_failure(e)
            self.stats.add(store_failures=len(keys))
            self.finish_part(job, keys, 0)
            return
        self.health.record_success()
        failed: list[bytes] = []
        stored: list[bytes] = []
        written = 0
        full: str | None = None
        for i, key in enumerate(keys):
            err = replies[i]
            if err is None:
                stored.append(key)
                written += header_size(len(key)) + bb
                continue
            failed.append(key)
            if err.startswith(("OOM", "READONLY")):
                full = err
            else:
                log.debug("tier %s: SET failed: %s", self.name, err)
        if full is not None:
            self.write_health.record_failure(
                f"SET refused: {full} (maxmemory reached with maxmemory-policy noeviction, or "
                "a read-only replica; run the server with maxmemory-policy allkeys-lru)")
        elif failed and not stored:
            self.write_health.record_failure(f"{len(failed)} SET command(s) failed")
        else:
            self.write_health.record_success()
        self.stats.add(blocks_written=len(stored), bytes_written=written,
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
            cmds: list[list[tuple[bytes | int, ...]]]
            if self.ttl_ms is None:
                cmds = [[(b"TOUCH", rkeys[i]) for i in idx] for _, idx in groups]
            else:
                cmds = [[(b"PEXPIRE", rkeys[i], self.ttl_ms) for i in idx] for _, idx in groups]
            self.servers.exchange([
                (pool, pack(c), len(c)) for (pool, _), c in zip(groups, cmds)
            ])
            self.stats.add(touches=len(keys), round_trips=1)
        except Exception as e:
            self.health.record_failure(e)
        finally:
            self.touch_running = False


def _redirect(reply: Any) -> tuple[str, str, int] | None:
    """("MOVED" or "ASK", host, port) when ``reply`` is a cluster redirection, else None."""
    msg = reply[1] if isinstance(reply, tuple) else reply
    if not isinstance(msg, str) or not msg.startswith(("MOVED ", "ASK ")):
        return None
    parts = msg.split(" ")
    if len(parts) < 3:
        return None
    host, _, port = parts[2].rpartition(":")
    if not host or not port.isdigit():
        return None
    return parts[0], host, int(port)


def _bind_flag(fn: Callable[[list[int], bool], Any], flag: bool, idx: list[int]) -> Any:
    return fn(idx, flag)


def _bind_reader(fn: Callable[[Wire, list[int], bool], Any], flag: bool, wire: Wire,
                 idx: list[int]) -> Any:
    return fn(wire, idx, flag)
