"""Glue to redis-py: the client(s), routing keys to servers, and batched exchanges.

redis-py owns the connections: their setup, authentication, TLS, database selection and, in
cluster mode, the slot table. :class:`Servers` adds the one thing the tier does with them: send a
batch of commands to each server in one write and read all the replies, with error replies
returned in their place instead of raised. Small commands (EXISTS, DEL, TOUCH, PING) go through
redis-py's own reply parser (:meth:`Servers.exchange`); GET and SET of block records go through
the bulk path on the same connections' sockets (:meth:`Servers.bulk_exchange`, :mod:`.wire`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.exceptions import AskError, MovedError, ResponseError

from kvtier.tiers.network.wire import ProtocolError, Wire, command

log = logging.getLogger("kvtier.tiers.network")

_JOIN_LIMIT = 64 * 1024  # small protocol pieces are joined up to this size before a send
IN_FLIGHT = 2  # windows a bulk exchange keeps outstanding on one connection
R = TypeVar("R")
# One server's part of a bulk exchange: (connection pool, key indices, request builder,
# reply reader). ``request(window)`` gives the pieces that ask for the keys of ``window`` (a
# slice of the indices); ``reader(wire, window)`` reads exactly their replies.
BulkBatch = tuple[Any, list[int], Callable[[list[int]], Sequence[bytes | memoryview]],
                  Callable[[Wire, list[int]], list[R]]]


def _socket_of(conn: Any) -> Any:
    """The connected socket of a redis-py connection (ssl.SSLSocket for TLS)."""
    sock = getattr(conn, "_sock", None)
    if sock is None:
        raise redis.ConnectionError("the connection has no socket")
    return sock


def pack(commands: Sequence[Sequence[bytes | int]]) -> list[bytes]:
    """Small commands in RESP, joined into pieces of about 64 KiB for few sends."""
    out: list[bytes] = []
    pieces: list[bytes] = []
    size = 0
    for cmd in commands:
        piece = command(*cmd)
        pieces.append(piece)
        size += len(piece)
        if size >= _JOIN_LIMIT:
            out.append(b"".join(pieces))
            pieces, size = [], 0
    if pieces:
        out.append(b"".join(pieces))
    return out


class Servers:
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
        self._local = threading.local()  # each thread's Wire objects (their buffers)
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

    def per_key(self, name: bytes, rkeys: Sequence[bytes],
                timeout: float | None = None) -> tuple[list[tuple[Any, list[int]]], list[list[Any]]]:
        """``name key`` for every key, one pipeline per server: (groups, replies per group)."""
        groups = self.route(rkeys)
        batches = [
            (pool, pack([(name, rkeys[i]) for i in idx]), len(idx))
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

    def request_refresh(self) -> None:
        """Re-read the cluster's slot table before the next routing (after MOVED or ASK)."""
        if self.cluster:
            self._refresh = True

    def pool_for(self, host: str, port: int) -> Any:
        """The connection pool of the cluster node at host:port (None: not a known node)."""
        client = self._client
        if not self.cluster or client is None:
            return None
        node = client.get_node(host=host, port=port)
        if node is None:
            return None
        return client.get_redis_connection(node).connection_pool

    def bulk_exchange(self, batches: Sequence[BulkBatch[R]],
                      window: int) -> tuple[list[list[R]], int]:
        """Stream each batch over a connection of its pool, ``window`` keys per round trip.

        Each connection has at most two windows outstanding: the next window's requests go out
        as soon as the oldest window's replies are read, so the server always has work queued
        while the bytes in flight per connection stay bounded. The servers of a cluster are
        served side by side. Returns each batch's replies, in the order of its indices, and
        the number of round trips (windows) sent.

        A connection error or a broken reply stream closes the connections involved (never
        reused with bytes left unread) and the whole exchange is tried once more on fresh
        connections (GET and SET are idempotent); a timeout is not retried.
        """
        try:
            return self._bulk_once(batches, window)
        except (redis.ConnectionError, ConnectionError):
            if self.cluster:
                self._refresh = True
            return self._bulk_once(batches, window)

    def _wires(self, n: int) -> list[Wire]:
        wires: list[Wire] | None = getattr(self._local, "wires", None)
        if wires is None:
            wires = self._local.wires = []
        while len(wires) < n:
            wires.append(Wire())
        return wires

    def _bulk_once(self, batches: Sequence[BulkBatch[R]],
                   window: int) -> tuple[list[list[R]], int]:
        conns: list[tuple[Any, Any]] = []
        wires = self._wires(len(batches))
        window = max(1, window)
        windows = [[idx[i:i + window] for i in range(0, len(idx), window)]
                   for _pool, idx, _req, _read in batches]
        todo = [deque(w) for w in windows]
        sent: list[deque[list[int]]] = [deque() for _ in batches]
        out: list[list[R]] = [[] for _ in batches]
        clean = False
        try:
            for (pool, _idx, _req, _read), wire in zip(batches, wires):
                conn = pool.get_connection()
                conns.append((pool, conn))
                wire.attach(_socket_of(conn))
            for _ in range(IN_FLIGHT):
                for b, (_pool, _idx, request, _read) in enumerate(batches):
                    if todo[b]:
                        w = todo[b].popleft()
                        wires[b].send(request(w))
                        sent[b].append(w)
            busy = True
            while busy:
                busy = False
                for b, (_pool, _idx, request, reader) in enumerate(batches):
                    if not sent[b]:
                        continue
                    busy = True
                    out[b].extend(reader(wires[b], sent[b].popleft()))
                    if todo[b]:
                        w = todo[b].popleft()
                        wires[b].send(request(w))
                        sent[b].append(w)
            if any(wire.buffered() for wire in wires[:len(conns)]):
                raise ProtocolError("bytes after the last reply")
            clean = True
            return out, sum(len(todo_b) for todo_b in windows)
        except (TimeoutError, BlockingIOError) as e:  # a socket timeout (BlockingIOError: the
            # kernel's, while the socket blocks): say it as redis-py would
            raise redis.TimeoutError(f"Timeout reading from the server: {e}") from e
        finally:
            for wire in wires[:len(conns)]:
                wire.detach()
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
