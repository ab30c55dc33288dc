"""The ``network`` tier: blocks in Redis or Valkey (standalone or cluster), shared by instances.

Every block is one Redis string under ``key_prefix + key`` whose value is the self-describing
block record (:mod:`kvtier.format.record`): header, then the payload exactly as in a primary slot.
Any instance with the same namespace and block geometry computes the same prefix and so shares
the blocks; a record is verified on every load (magic, namespace, key, length, checksum) and a
record that fails is a miss, is deleted from the server and is counted.

How the work is spread:

* ``lookup`` answers from a local presence cache when it knows every key it needs. Otherwise it
  queues one query for the unknown keys and answers None; a query thread sends one ``EXISTS`` per
  key, all of them in one write per server (one round trip per server touched), and the answer
  is ready by the next step. Negative answers expire after ``negative_cache_seconds`` so that
  blocks another instance stores later are found again.
* Load and store jobs are cut into batches of at most ``max_batch_bytes`` and spread over
  ``pool_size`` I/O threads, each with its own connection per server. A batch is one pipelined
  write per server followed by the replies. Stores build each record in a reusable per-thread
  buffer (one copy out of the slot, needed for the checksummed snapshot) and hand it to the
  socket as a memoryview, without joining it into the command; loads copy each verified payload
  once, from the reply into its slot.
* Failures never raise into the caller: a connection error or timeout fails the batch and marks
  the tier down (lookups answer 0, the manager skips it); the query thread probes the server with
  a growing interval (at most 0.5 s) and the tier serves again as soon as a probe succeeds. An
  out-of-memory reply fails the stores and pauses writes (with the same backoff) while reads go
  on.

All commands go through redis-py (hiredis parses replies); in cluster mode keys are routed by
hash slot with redis-py's slot table, and a ``MOVED`` reply refreshes it.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.exceptions import AskError, MovedError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.retry import Retry

from kvtier.config import ConfigError
from kvtier.format.record import (
    RecordError,
    header_size,
    pack_header,
    parse_header,
    payload_checksum,
    verify,
)
from kvtier.tiers.base import Completions, Health, SecondaryTier, TierContext, TierEvent, TierJobResult

try:  # redis-py's own RESP serializers: hiredis for small commands, the Python one for big values
    from redis._parsers import Encoder as _Encoder
    from redis.connection import PythonRespSerializer as _PySerializer

    _ZERO_COPY: Any = _PySerializer(6000, _Encoder("utf-8", "strict", False).encode)
except ImportError:  # pragma: no cover - older redis-py: let each connection pack
    _ZERO_COPY = None
try:
    from redis.connection import HiredisRespSerializer as _HiSerializer

    _FAST: Any = _HiSerializer()
    _FAST.pack(b"PING")
except Exception:  # pragma: no cover - no hiredis: the Python serializer packs everything
    _FAST = _ZERO_COPY

log = logging.getLogger("kvtier.tiers.network")

_MIB = 1 << 20
_JOIN_LIMIT = 64 * 1024  # small protocol pieces are joined up to this size before a send
_QUERY_CHUNK = 8192  # keys per EXISTS batch (one batch is one round trip per server)
_PROBE_IDLE_S = 0.05  # how often the query thread looks at a down tier
_MAX_BACKOFF_S = 0.5  # longest wait between probes of a down server
_CONN_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
)

# Parameter name -> meaning (the README's table says the same).
_PARAMS: dict[str, str] = {
    "url": "redis://[user:password@]host:port[/db] or rediss:// for TLS (required)",
    "cluster": "True for Redis Cluster (the url names any node)",
    "username": "ACL user name (instead of putting it in the url)",
    "password": "password (instead of putting it in the url)",
    "key_prefix": "prefix of every Redis key (default kvtier:<namespace fingerprint>:)",
    "ttl_seconds": "expire blocks this long after they are stored (default: never)",
    "connect_timeout_seconds": "TCP connect timeout",
    "socket_timeout_seconds": "timeout of one socket read or write of a load or store",
    "lookup_timeout_seconds": "longest wait for the server's answer to a lookup query",
    "pool_size": "I/O threads for loads and stores (each holds one connection per server)",
    "max_batch_bytes": "largest batch of records sent or received in one round trip",
    "negative_cache_seconds": "how long a 'not on the server' answer is trusted",
    "presence_cache_keys": "how many known-present keys are remembered",
}


def _require_number(params: Mapping[str, Any], key: str, label: str, default: float | None,
                    *, minimum: float = 0.0, optional: bool = False) -> float | None:
    value = params.get(key, default)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > minimum \
            or not math.isfinite(value):
        raise ConfigError(f"{label}.{key}", f"a number > {minimum}", value)
    return float(value)


def _require_int(params: Mapping[str, Any], key: str, label: str, default: int,
                 lo: int, hi: int) -> int:
    value = params.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{label}.{key}", f"an integer from {lo} to {hi}", value)
    return int(value)


def _redact(url: str) -> str:
    """The url with its password replaced (for messages and logs)."""
    p = urlparse(url)
    if p.password is None:
        return url
    netloc = p.netloc.rsplit("@", 1)[1]
    user = p.username or ""
    return p._replace(netloc=f"{user}:***@{netloc}").geturl()


@dataclass
class _Job:
    """A load or store job cut into batches that finish on different threads."""

    job_id: int
    kind: str
    remaining: int
    t0: float = field(default_factory=time.perf_counter)
    failed: set[bytes] = field(default_factory=set)
    moved: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _ThreadState:
    """What one I/O thread keeps between batches: the buffer records are built in."""

    def __init__(self) -> None:
        self.buf = np.empty(0, dtype=np.uint8)

    def buffer(self, n: int) -> np.ndarray:
        """A scratch buffer of at least ``n`` bytes (grown, never shrunk)."""
        if self.buf.nbytes < n:
            self.buf = np.empty(max(n, 2 * self.buf.nbytes), dtype=np.uint8)
        return self.buf


def _pack(commands: Sequence[Sequence[Any]], *, zero_copy: bool) -> list[Any]:
    """Pack commands with redis-py's serializers, joining small pieces into few sends."""
    packer = _ZERO_COPY if zero_copy and _ZERO_COPY is not None else _FAST
    out: list[Any] = []
    pieces: list[bytes] = []
    size = 0
    for cmd in commands:
        for chunk in packer.pack(*cmd):
            n = len(chunk) if not isinstance(chunk, memoryview) else chunk.nbytes
            if isinstance(chunk, memoryview) or n > _JOIN_LIMIT:
                if pieces:
                    out.append(b"".join(pieces))
                    pieces, size = [], 0
                out.append(chunk)
                continue
            pieces.append(chunk)
            size += n
            if size > _JOIN_LIMIT:
                out.append(b"".join(pieces))
                pieces, size = [], 0
    if pieces:
        out.append(b"".join(pieces))
    return out


class _Servers:
    """The redis-py client(s) and the one thing we do with them: batched exchanges per server."""

    def __init__(self, url: str, cluster: bool, kwargs: dict[str, Any]) -> None:
        self.url = url
        self.cluster = cluster
        self.kwargs = kwargs
        self._client: Any = None
        self._lock = threading.Lock()
        self._refresh = False
        self._ready = threading.Event()
        self._wait = float(kwargs.get("socket_connect_timeout") or 2.0)
        if not cluster:  # building a standalone client does no I/O
            pool = redis.ConnectionPool.from_url(url, **kwargs)
            self._client = redis.Redis(connection_pool=pool)
            self._ready.set()

    @property
    def ready(self) -> bool:
        """True once a client exists."""
        return self._client is not None

    def connect(self) -> None:
        """Build the client (cluster: read the slot table) and check the server answers."""
        with self._lock:
            if self._client is None:
                self._client = redis.RedisCluster.from_url(self.url, **self.kwargs)
                self._ready.set()
        self.ping()

    def ping(self) -> None:
        """One PING to every server (raises on failure)."""
        client = self._client
        if client is None:
            raise redis.ConnectionError("not connected")
        if self.cluster:
            if self._refresh:
                self._refresh = False
                client.nodes_manager.initialize()
            for node in client.get_primaries():
                client.get_redis_connection(node).ping()
        else:
            client.ping()

    def warm(self, n: int) -> None:
        """Open ``n`` connections to every server now, so that no job waits for a handshake."""
        client = self._client
        if client is None:
            return
        if self.cluster:
            pools = [client.get_redis_connection(node).connection_pool
                     for node in client.get_primaries()]
        else:
            pools = [client.connection_pool]
        for pool in pools:
            conns: list[Any] = []
            try:
                for _ in range(n):
                    conns.append(pool.get_connection())
            finally:
                for conn in conns:
                    pool.release(conn)

    def route(self, rkeys: Sequence[bytes]) -> list[tuple[Any, list[int]]]:
        """Group key indices by the server that holds them: [(connection pool, indices)]."""
        client = self._client
        if client is None and self._ready.wait(self._wait):
            client = self._client
        if client is None:
            raise redis.ConnectionError("not connected to the cluster yet")
        if not self.cluster:
            return [(client.connection_pool, list(range(len(rkeys))))]
        if self._refresh:
            with self._lock:
                if self._refresh:
                    self._refresh = False
                    client.nodes_manager.initialize()
        nm = client.nodes_manager
        keyslot = client.keyslot
        groups: dict[str, tuple[Any, list[int]]] = {}
        slot_node: dict[int, Any] = {}
        for i, k in enumerate(rkeys):
            slot = keyslot(k)
            node = slot_node.get(slot)
            if node is None:
                node = slot_node[slot] = nm.get_node_from_slot(slot)
            g = groups.get(node.name)
            if g is None:
                pool = client.get_redis_connection(node).connection_pool
                g = groups[node.name] = (pool, [])
            g[1].append(i)
        return list(groups.values())

    def per_key(self, command: bytes, rkeys: Sequence[bytes],
                timeout: float | None = None) -> tuple[list[tuple[Any, list[int]]], list[list[Any]]]:
        """``command key`` for every key, one pipeline per server: (groups, replies per group)."""
        groups = self.route(rkeys)
        batches = [
            (pool, _pack([(command, rkeys[i]) for i in idx], zero_copy=False), len(idx))
            for pool, idx in groups
        ]
        return groups, self.exchange(batches, timeout)

    def exchange(self, batches: Sequence[tuple[Any, list[Any], int]],
                 timeout: float | None = None) -> list[list[Any]]:
        """Send every batch (pool, packed pieces, reply count) first, then read the replies.

        Error replies come back as exception objects in their place. A connection error is
        retried once on fresh connections (the commands used here are idempotent). ``timeout``
        bounds each wait for reply bytes (default: the socket timeout).
        """
        try:
            return self._exchange_once(batches, timeout)
        except redis.ConnectionError:
            if self.cluster:
                self._refresh = True
            return self._exchange_once(batches, timeout)

    def _exchange_once(self, batches: Sequence[tuple[Any, list[Any], int]],
                       timeout: float | None) -> list[list[Any]]:
        kw = {} if timeout is None else {"timeout": timeout}
        conns: list[tuple[Any, Any]] = []
        clean = False
        try:
            for pool, pieces, _n in batches:
                conn = pool.get_connection()
                conns.append((pool, conn))
                conn.send_packed_command(pieces, check_health=False)
            out: list[list[Any]] = []
            for (_pool, conn), (_p, _pieces, n) in zip(conns, batches):
                replies: list[Any] = []
                for _ in range(n):
                    try:
                        replies.append(conn.read_response(**kw))
                    except ResponseError as e:
                        if isinstance(e, (MovedError, AskError)):
                            self._refresh = True
                        replies.append(e)
                out.append(replies)
            clean = True
            return out
        finally:
            for pool, conn in conns:
                if not clean:
                    conn.disconnect()  # replies may be left unread: never reuse it
                pool.release(conn)

    def close(self) -> None:
        """Close every connection."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if self.cluster:
                client.close()
            else:
                client.connection_pool.disconnect()
                client.close()
        except Exception:  # closing a broken client must not raise
            log.debug("closing the redis client failed", exc_info=True)


class NetworkTier(SecondaryTier):
    """Secondary tier on a Redis or Valkey server or cluster (see the module docstring)."""

    medium = "NETWORK"
    PARAMS = _PARAMS

    @classmethod
    def validate_params(cls, params: Mapping[str, Any], label: str) -> dict[str, Any]:
        """Check names (base class) and values; the url's password never appears in errors."""
        out = super().validate_params(params, label)
        url = out.get("url")
        if not isinstance(url, str) or not url:
            raise ConfigError(f"{label}.url", "a redis:// or rediss:// url (required)",
                              url, show_got=isinstance(url, str) or url is None)
        try:
            p = urlparse(url)
            _ = p.port
        except ValueError:
            raise ConfigError(f"{label}.url", "a redis://host:port[/db] url with a valid port",
                              url, show_got="@" not in url) from None
        if p.scheme not in ("redis", "rediss") or not p.hostname:
            raise ConfigError(f"{label}.url", "a redis://host:port[/db] or rediss:// url",
                              _redact(url))
        db_text = p.path.lstrip("/")
        if db_text and not db_text.isdigit():
            raise ConfigError(f"{label}.url", "a database number after the host (/0)",
                              _redact(url))
        cluster = out.get("cluster", False)
        if not isinstance(cluster, bool):
            raise ConfigError(f"{label}.cluster", "true or false", cluster)
        if cluster and db_text not in ("", "0"):
            raise ConfigError(f"{label}.url", "database 0 (Redis Cluster has only one)",
                              _redact(url))
        for key in ("username", "password"):
            v = out.get(key)
            if v is not None and (not isinstance(v, str) or not v):
                raise ConfigError(f"{label}.{key}", "a non-empty string", v,
                                  show_got=key != "password")
        if out.get("password") is not None and p.password is not None:
            raise ConfigError(f"{label}.password", "a password in the url or in 'password', "
                              "not both", show_got=False)
        prefix = out.get("key_prefix")
        if prefix is not None and (not isinstance(prefix, str) or not prefix):
            raise ConfigError(f"{label}.key_prefix", "a non-empty string", prefix)
        _require_number(out, "ttl_seconds", label, None, minimum=0.0, optional=True)
        if out.get("ttl_seconds") is not None and out["ttl_seconds"] < 0.001:
            raise ConfigError(f"{label}.ttl_seconds", "at least 0.001 (a millisecond)",
                              out["ttl_seconds"])
        _require_number(out, "connect_timeout_seconds", label, 2.0)
        _require_number(out, "socket_timeout_seconds", label, 2.0)
        _require_number(out, "lookup_timeout_seconds", label, 1.0)
        _require_number(out, "negative_cache_seconds", label, 1.0)
        _require_int(out, "pool_size", label, 4, 1, 64)
        _require_int(out, "max_batch_bytes", label, 16 * _MIB, 64 * 1024, 1 << 31)
        _require_int(out, "presence_cache_keys", label, 262144, 1024, 1 << 26)
        return out

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
        pool_size: int = 4,
        max_batch_bytes: int = 16 * _MIB,
        negative_cache_seconds: float = 1.0,
        presence_cache_keys: int = 262144,
    ) -> None:
        super().__init__(ctx, url=_redact(url), cluster=cluster, key_prefix=key_prefix,
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
        self.max_batch_bytes = int(max_batch_bytes)
        self.negative_ttl = float(negative_cache_seconds)
        self.presence_limit = int(presence_cache_keys)
        self._bb = ctx.block_bytes
        self._fp = ctx.namespace_fp

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
        self._servers = _Servers(url, cluster, kwargs)

        # Scheduler-thread state.
        self._present: dict[bytes, float] = {}  # key -> when it was last known present (LRU)
        self._negative: dict[bytes, float] = {}  # key -> until when 'absent' is trusted (FIFO)
        self._inflight: set[bytes] = set()  # keys a query is asking about now
        self._jobs_open = 0
        self._seen_down_events = 0
        self._touch_pending: set[bytes] = set()
        self._touch_running = False
        # Hand-over from the I/O threads (drained on the scheduler thread).
        self._updates: deque[tuple[str, list[bytes]]] = deque()
        self._done = Completions()
        self._events: deque[TierEvent] = deque()

        self._health = Health(ctx.name, min_backoff=0.05, max_backoff=_MAX_BACKOFF_S)
        self._write_health = Health(f"{ctx.name} (writes)", min_backoff=0.1,
                                    max_backoff=_MAX_BACKOFF_S)
        self._stats_lock = threading.Lock()
        self._stats: dict[str, int] = dict.fromkeys(
            ("hits", "lookup_hits", "misses", "bytes_read", "blocks_written", "bytes_written",
             "load_failures", "store_failures", "corrupt", "evicted_at_load", "oom_errors",
             "round_trips", "lookup_queries", "lookup_keys_queried", "stores_skipped",
             "touches"),
            0,
        )
        self._closed = False
        self._stop = threading.Event()
        self._queries: queue.Queue[list[bytes] | None] = queue.Queue()
        self._tasks: queue.PriorityQueue[tuple[int, int, Callable[[_ThreadState], None] | None]]
        self._tasks = queue.PriorityQueue()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._query_loop, name=f"kvtier-{self.name}-q", daemon=True)
        ]
        for i in range(self.pool_size):
            self._threads.append(threading.Thread(
                target=self._io_loop, name=f"kvtier-{self.name}-io{i}", daemon=True))
        for t in self._threads:
            t.start()

    # -- scheduler side: lookups -----------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> int | None:
        """Leading run of ``keys`` on the server, from the presence cache or after one query."""
        self._apply_updates()
        if not self._health.up:
            return 0
        present = self._present
        n, nk = 0, len(keys)
        while n < nk and keys[n] in present:
            n += 1
        if n < nk:
            now = time.monotonic()
            neg = self._negative
            until = neg.get(keys[n])
            if until is None or until <= now:
                ask: list[bytes] = []
                inflight = self._inflight
                for k in keys[n:]:
                    if k in present:
                        continue
                    until = neg.get(k)
                    if until is not None and until > now:
                        break
                    if k not in inflight:
                        ask.append(k)
                if ask:
                    inflight.update(ask)
                    self._queries.put(ask)
                return None
        for k in keys[:n]:  # refresh LRU order of what was asked about
            present[k] = present.pop(k)
        self._stats["lookup_hits"] += n
        if n < nk:
            self._stats["misses"] += 1
        return n

    def _apply_updates(self) -> None:
        """Fold what the I/O threads learnt into the caches (scheduler thread only)."""
        h = self._health
        if h.down_events != self._seen_down_events:
            # The server went away: it may come back empty, so forget what it held.
            self._seen_down_events = h.down_events
            self._present.clear()
            self._negative.clear()
        upd = self._updates
        if not upd:
            return
        now = time.monotonic()
        present, neg, inflight = self._present, self._negative, self._inflight
        until = now + self.negative_ttl
        while upd:
            kind, keys = upd.popleft()
            if kind == "present":
                for k in keys:
                    neg.pop(k, None)
                    present.pop(k, None)
                    present[k] = now
            elif kind == "absent":
                for k in keys:
                    present.pop(k, None)
                    neg.pop(k, None)
                    neg[k] = until
            if inflight:
                inflight.difference_update(keys)
        limit = self.presence_limit
        while len(present) > limit:  # least recently used first
            del present[next(iter(present))]
        while neg:  # insertion order is expiry order: drop from the front
            k = next(iter(neg))
            if neg[k] > now and len(neg) <= limit:
                break
            del neg[k]

    # -- scheduler side: jobs --------------------------------------------------------------
    def submit_load(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        """Queue GET batches for ``keys`` (verified, then copied into ``slots``)."""
        self._submit("load", job_id, list(keys), np.asarray(slots, dtype=np.int64))

    def submit_store(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        """Queue SET batches writing ``slots`` as records under ``keys``."""
        keys = list(keys)
        slots = np.asarray(slots, dtype=np.int64)
        if self.ttl_ms is None and keys:
            # A block this tier confirmed on the server moments ago need not travel again.
            present = self._present
            fresh = time.monotonic() - self.negative_ttl
            keep = [i for i, k in enumerate(keys) if present.get(k, -1.0) < fresh]
            if len(keep) < len(keys):
                with self._stats_lock:
                    self._stats["stores_skipped"] += len(keys) - len(keep)
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
                with self._stats_lock:
                    self._stats["load_failures" if kind == "load" else "store_failures"] += len(
                        failed)
            self._done.put(TierJobResult(job_id, failed))
            return
        per = self._bb + header_size(len(keys[0])) + 64
        batch = max(1, min(self.max_batch_bytes // per, -(-len(keys) // self.pool_size)))
        parts = [(keys[i:i + batch], slots[i:i + batch]) for i in range(0, len(keys), batch)]
        job = _Job(job_id, kind, len(parts))
        fn = self._load_batch if kind == "load" else self._store_batch
        prio = 0 if kind == "load" else 1
        for part_keys, part_slots in parts:
            self._put_task(prio, _bind(fn, job, part_keys, part_slots))

    def _put_task(self, prio: int, fn: Callable[[_ThreadState], None] | None) -> None:
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
        self._tasks.put((prio, seq, fn))

    def poll(self) -> list[TierJobResult]:
        """Finished jobs; also folds lookup answers into the caches and sends touches."""
        self._apply_updates()
        done = self._done.drain()
        self._jobs_open -= len(done)
        if self._touch_pending and not self._touch_running and self._health.up:
            keys = list(self._touch_pending)
            self._touch_pending.clear()
            self._touch_running = True
            self._put_task(2, _bind(self._touch_batch, None, keys, None))
        return done

    def touch(self, keys: Sequence[bytes]) -> None:
        """Recency hint: refresh the server's LRU clock (or TTL) of keys it holds, batched."""
        if not self._health.up:
            return
        pending = self._touch_pending
        if len(pending) >= 4096:
            return
        present = self._present
        for k in keys:
            if k in present:
                pending.add(k)

    def take_events(self) -> list[TierEvent]:
        """Keys stored and keys found gone (evicted or corrupt) since the last call."""
        out: list[TierEvent] = []
        ev = self._events
        while ev:
            out.append(ev.popleft())
        return out

    def has_pending_work(self) -> bool:
        """True while jobs or lookup queries are in flight."""
        return self._jobs_open > 0 or bool(self._inflight) or bool(self._updates)

    def stats(self) -> dict[str, Any]:
        """Counters plus state (see the README's network section)."""
        with self._stats_lock:
            st: dict[str, Any] = dict(self._stats)
        st["available"] = self._health.up
        st["writes_available"] = self._write_health.up
        st["down_events"] = self._health.down_events
        st["failures"] = self._health.failures + self._write_health.failures
        st["presence_cache_keys"] = len(self._present)
        st["negative_cache_keys"] = len(self._negative)
        st["key_prefix"] = self.key_prefix
        st["cluster"] = self.cluster
        st["url"] = _redact(self.url)
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
        self._stop.set()
        self._queries.put(None)
        for _ in range(self.pool_size):
            self._tasks.put((99, 1 << 62, None))
        for t in self._threads:
            t.join(timeout=5)
        self._servers.close()

    # -- I/O threads -----------------------------------------------------------------------
    def _failure(self, err: BaseException) -> None:
        self._health.record_failure(err)

    def _query_loop(self) -> None:
        servers, health = self._servers, self._health
        warm = False
        while not self._stop.is_set():
            if not warm or not health.up:
                if health.should_probe():
                    try:
                        servers.connect()
                        servers.warm(self.pool_size + 1)
                        warm = True
                        health.record_success()
                    except Exception as e:
                        health.record_failure(e)
            try:
                item = self._queries.get(timeout=_PROBE_IDLE_S if not health.up else 0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            batch = list(item)
            while len(batch) < _QUERY_CHUNK:  # fold queries queued meanwhile into this one
                try:
                    more = self._queries.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queries.put(None)
                    break
                batch.extend(more)
            for i in range(0, len(batch), _QUERY_CHUNK):
                self._run_query(batch[i:i + _QUERY_CHUNK])

    def _run_query(self, keys: list[bytes]) -> None:
        if not self._health.up or not self._servers.ready:
            self._updates.append(("unknown", keys))
            return
        prefix = self._prefix
        rkeys = [prefix + k for k in keys]
        try:
            groups, replies = self._servers.per_key(b"EXISTS", rkeys, self.lookup_timeout)
        except Exception as e:
            self._updates.append(("unknown", keys))
            self._failure(e)
            return
        self._health.record_success()
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
        with self._stats_lock:
            self._stats["round_trips"] += 1
            self._stats["lookup_queries"] += 1
            self._stats["lookup_keys_queried"] += len(keys)
        if present:
            self._updates.append(("present", present))
        if absent:
            self._updates.append(("absent", absent))
        if unknown:
            self._updates.append(("unknown", unknown))

    def _io_loop(self) -> None:
        state = _ThreadState()
        while True:
            _prio, _seq, fn = self._tasks.get()
            if fn is None:
                return
            try:
                fn(state)
            except Exception:  # a bug must not kill the thread; the job already failed
                log.exception("tier %s: unexpected error in an I/O task", self.name)

    def _finish_part(self, job: _Job, failed: Sequence[bytes], moved: int) -> None:
        with job.lock:
            job.failed.update(failed)
            job.moved += moved
            job.remaining -= 1
            last = job.remaining == 0
        if last:
            self._done.put(TierJobResult(job.job_id, frozenset(job.failed), job.moved,
                                         time.perf_counter() - job.t0))

    def _load_batch(self, state: _ThreadState, job: _Job | None, keys: list[bytes],
                    slots: np.ndarray | None) -> None:
        assert job is not None and slots is not None
        if self._stop.is_set():
            self._finish_part(job, keys, 0)
            return
        prefix = self._prefix
        rkeys = [prefix + k for k in keys]
        try:
            groups, replies = self._servers.per_key(b"GET", rkeys)
        except Exception as e:
            self._failure(e)
            with self._stats_lock:
                self._stats["load_failures"] += len(keys)
            self._finish_part(job, keys, 0)
            return
        self._health.record_success()
        primary = self.ctx.primary
        bb, fp = self._bb, self._fp
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
            self._delete([prefix + k for k in bad])
            log.warning("tier %s: %d corrupt record(s) deleted", self.name, len(bad))
        with self._stats_lock:
            st = self._stats
            st["round_trips"] += 1
            st["hits"] += len(good)
            st["bytes_read"] += moved
            st["load_failures"] += len(failed) + len(gone) + len(bad)
            st["evicted_at_load"] += len(gone)
            st["corrupt"] += len(bad)
        if good:
            self._updates.append(("present", good))
        if gone or bad:
            self._updates.append(("absent", gone + bad))
            self._events.append(TierEvent(gone + bad, removed=True))
        self._finish_part(job, failed + gone + bad, moved)

    def _delete(self, rkeys: list[bytes]) -> None:
        try:
            self._servers.per_key(b"DEL", rkeys)
        except Exception as e:
            log.warning("tier %s: could not delete corrupt records: %s", self.name, e)

    def _store_batch(self, state: _ThreadState, job: _Job | None, keys: list[bytes],
                     slots: np.ndarray | None) -> None:
        assert job is not None and slots is not None
        if self._stop.is_set():
            self._finish_part(job, keys, 0)
            return
        primary = self.ctx.primary
        bb, fp, prefix = self._bb, self._fp, self._prefix
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
            groups = self._servers.route(rkeys)
            batches = []
            for pool, idx in groups:
                cmds = [
                    (b"SET", rkeys[i], values[i]) if ttl is None
                    else (b"SET", rkeys[i], values[i], *ttl)
                    for i in idx
                ]
                batches.append((pool, _pack(cmds, zero_copy=True), len(idx)))
            replies = self._servers.exchange(batches)
        except Exception as e:
            self._failure(e)
            with self._stats_lock:
                self._stats["store_failures"] += len(keys)
            self._finish_part(job, keys, 0)
            return
        finally:
            del values, whole
        self._health.record_success()
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
            self._write_health.record_failure(
                f"SET refused: {full} (maxmemory reached with maxmemory-policy noeviction, or "
                "a read-only replica; run the server with maxmemory-policy allkeys-lru)")
        elif failed and not stored:
            self._write_health.record_failure(f"{len(failed)} SET command(s) failed")
        else:
            self._write_health.record_success()
        with self._stats_lock:
            st = self._stats
            st["round_trips"] += 1
            st["blocks_written"] += len(stored)
            st["bytes_written"] += written
            st["store_failures"] += len(failed)
            if full is not None:
                st["oom_errors"] += len(failed)
        if stored:
            self._updates.append(("present", stored))
            self._events.append(TierEvent(stored, removed=False))
        self._finish_part(job, failed, bb * len(stored))

    def _touch_batch(self, state: _ThreadState, job: _Job | None, keys: list[bytes],
                     slots: np.ndarray | None) -> None:
        try:
            if self._stop.is_set() or not self._health.up:
                return
            prefix = self._prefix
            rkeys = [prefix + k for k in keys]
            groups = self._servers.route(rkeys)
            cmds: list[list[tuple[Any, ...]]]
            if self.ttl_ms is None:
                cmds = [[(b"TOUCH", rkeys[i]) for i in idx] for _, idx in groups]
            else:
                cmds = [[(b"PEXPIRE", rkeys[i], self.ttl_ms) for i in idx] for _, idx in groups]
            self._servers.exchange([
                (pool, _pack(c, zero_copy=False), len(c)) for (pool, _), c in zip(groups, cmds)
            ])
            with self._stats_lock:
                self._stats["touches"] += len(keys)
                self._stats["round_trips"] += 1
        except Exception as e:
            self._failure(e)
        finally:
            self._touch_running = False


def _bind(fn: Callable[..., None], job: _Job | None, keys: list[bytes],
          slots: np.ndarray | None) -> Callable[[_ThreadState], None]:
    """A task for an I/O thread: ``fn(state, job, keys, slots)``."""
    def task(state: _ThreadState) -> None:
        fn(state, job, keys, slots)
    return task
