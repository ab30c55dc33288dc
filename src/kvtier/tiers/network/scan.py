"""The network tier's keys as tools see them: which keys are blocks, of which namespace, how to
read them without disturbing the server's eviction order, and how to remove them safely.

The network tier stores every block as one string, ``kvtier:<namespace fingerprint hex>:<key>``
(its default ``key_prefix``), whose value is the block record (:mod:`kvtier.format.record`) with
an unpadded header. This module is the tools' knowledge of that layout; the operator commands
(``kvtier inspect|fsck|gc|du``) use nothing else to read or change a server's blocks.

Servers: a URL names a standalone server or any node of a Redis Cluster (found with ``INFO
cluster``); a cluster is read node by node, each primary on its own connection, keys where SCAN
found them. Where the server has ``CLIENT NO-TOUCH`` (Redis and Valkey 7.2+) every connection
turns it on, so reading blocks leaves their LRU/LFU clocks as they were; older servers count a
read as an access.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import redis
import xxhash
from redis.exceptions import ResponseError, WatchError

from kvtier.format.record import RecordError, header_size, parse_header, payload_checksum

KEY_PREFIX = b"kvtier:"
_FP_HEX = re.compile(rb"^[0-9a-f]{32}$")
SCAN_COUNT = 1000  # keys asked for per SCAN call
BATCH_KEYS = 500  # keys per pipelined metadata round trip
VALUE_BUDGET = 8 << 20  # bytes of values fetched per round trip


def namespace_prefix(fp: bytes) -> bytes:
    """The key prefix of a namespace's blocks (the network tier's default ``key_prefix``)."""
    return KEY_PREFIX + fp.hex().encode() + b":"


def split_key(rkey: bytes) -> tuple[str, bytes] | None:
    """(namespace fingerprint hex, block key) of a block's Redis key; None for other keys."""
    if not rkey.startswith(KEY_PREFIX):
        return None
    rest = rkey[len(KEY_PREFIX) :]
    if len(rest) < 34 or rest[32:33] != b":" or not _FP_HEX.match(rest[:32]):
        return None
    return rest[:32].decode(), rest[33:]


def record_bytes(key: bytes, block_bytes: int) -> int:
    """Length of the value that holds a block of ``block_bytes`` under ``key``."""
    return header_size(len(key)) + block_bytes


def block_bytes_of(key: bytes, value_len: int) -> int:
    """The block size a value of ``value_len`` bytes under ``key`` holds, if it is intact."""
    return value_len - header_size(len(key))


def check_value(fp: bytes, key: bytes, value: bytes) -> tuple[str | None, bytes | None]:
    """Check a value as the network tier does when it loads it: (reason or None, the key its
    header names, when it still names one)."""
    try:
        h = parse_header(value)
    except RecordError as e:
        return str(e), None
    if h.namespace_fp != fp:
        return f"namespace mismatch: a record of namespace {h.namespace_fp.hex()}", h.key
    if h.key != key:
        return f"key mismatch: the record of key {h.key.hex()}", h.key
    if h.header_len + h.payload_len > len(value):
        return "truncated record", h.key
    if h.header_len + h.payload_len < len(value):
        return "length mismatch: bytes after the payload", h.key
    if payload_checksum(memoryview(value)[h.header_len :]) != h.payload_checksum:
        return "payload checksum mismatch", h.key
    return None, h.key


def value_digest(value: bytes) -> int:
    """A digest of a value, to tell later whether the key still holds the same bytes."""
    return xxhash.xxh3_64_intdigest(value)


@dataclass
class Node:
    """One primary server: its address and a client whose connections all go to it."""

    name: str
    client: redis.Redis


@dataclass
class KeyMeta:
    """What the server says about one key without reading its value."""

    rkey: bytes
    memory: int | None  # MEMORY USAGE (None: the key is gone)
    idle: int | None  # OBJECT IDLETIME seconds (None: not tracked, e.g. an LFU policy)
    ttl_ms: int  # PTTL: -1 no expiry, -2 gone


@dataclass
class Servers:
    """Connections to a standalone server or to every primary of a cluster."""

    url: str
    timeout: float = 5.0
    password: str | None = None
    cluster: bool = False
    nodes: list[Node] = field(default_factory=list)
    no_touch: bool = True  # every connection so far has CLIENT NO-TOUCH on

    def connect(self) -> None:
        """Connect, find out whether it is a cluster, and connect to every primary.

        Raises redis.RedisError (AuthenticationError, ConnectionError, TimeoutError, ...).
        """
        first = self._client(self.url)
        try:
            info = first.info("cluster")
            self.cluster = bool(int(info.get("cluster_enabled", 0) or 0))
            if not self.cluster:
                self.nodes = [Node(self._addr(self.url), first)]
                first.ping()
                return
            primaries = self._primaries(first)
        except BaseException:
            first.close()
            raise
        first.close()
        for host, port in primaries:
            node_url = self._with_host(host, port)
            client = self._client(node_url)
            self.nodes.append(Node(f"{host}:{port}", client))
            client.ping()

    def _client(self, url: str) -> redis.Redis:
        kwargs: dict[str, Any] = {
            "socket_connect_timeout": self.timeout,
            "socket_timeout": self.timeout,
            "redis_connect_func": self._on_connect,
            "client_name": "kvtier-ops",
        }
        if self.password is not None and urlparse(url).password is None:
            kwargs["password"] = self.password
        return redis.Redis.from_url(url, **kwargs)

    def _on_connect(self, conn: Any) -> None:
        conn.on_connect()
        try:
            conn.send_command("CLIENT", "NO-TOUCH", "ON")
            conn.read_response()
        except ResponseError:
            self.no_touch = False

    @staticmethod
    def _addr(url: str) -> str:
        p = urlparse(url)
        return f"{p.hostname or 'localhost'}:{p.port or 6379}"

    def _with_host(self, host: str, port: int) -> str:
        p = urlparse(self.url)
        auth = p.netloc.rsplit("@", 1)[0] + "@" if "@" in p.netloc else ""
        h = f"[{host}]" if ":" in host else host
        return p._replace(netloc=f"{auth}{h}:{port}").geturl()

    def _primaries(self, client: redis.Redis) -> list[tuple[str, int]]:
        """(host, port) of every primary that serves slots, from CLUSTER SLOTS."""
        raw = client.execute_command("CLUSTER SLOTS")
        default_host = urlparse(self.url).hostname or "localhost"
        out: list[tuple[str, int]] = []
        if isinstance(raw, dict):  # redis-py parsed it: {(start, end): {"primary": (host, port)}}
            for entry in raw.values():
                host, port = entry["primary"][:2]
                item = (_text(host) or default_host, int(port))
                if item not in out:
                    out.append(item)
            return out
        for entry in raw:
            host, port = entry[2][0], entry[2][1]
            item = (_text(host) or default_host, int(port))
            if item not in out:
                out.append(item)
        return out

    def close(self) -> None:
        """Close every connection."""
        for n in self.nodes:
            with contextlib.suppress(Exception):
                n.client.close()
        self.nodes = []


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v or "")


def scan_keys(node: Node, pattern: bytes = KEY_PREFIX + b"*") -> Iterator[list[bytes]]:
    """The keys of one node matching ``pattern``, in batches of up to ``BATCH_KEYS``."""
    batch: list[bytes] = []
    for k in node.client.scan_iter(match=pattern, count=SCAN_COUNT):
        batch.append(k)
        if len(batch) >= BATCH_KEYS:
            yield batch
            batch = []
    if batch:
        yield batch


def key_meta(node: Node, rkeys: Sequence[bytes]) -> list[KeyMeta]:
    """MEMORY USAGE, OBJECT IDLETIME and PTTL of each key, in one round trip."""
    pipe = node.client.pipeline(transaction=False)
    for k in rkeys:
        pipe.execute_command("MEMORY USAGE", k, "SAMPLES", "0")
        pipe.execute_command("OBJECT IDLETIME", k)
        pipe.execute_command("PTTL", k)
    replies = pipe.execute(raise_on_error=False)
    out = []
    for i, k in enumerate(rkeys):
        mem, idle, ttl = replies[3 * i : 3 * i + 3]
        out.append(KeyMeta(
            k,
            None if mem is None or isinstance(mem, Exception) else int(mem),
            None if idle is None or isinstance(idle, Exception) else int(idle),
            -2 if isinstance(ttl, Exception) else int(ttl),
        ))
    return out


def value_lengths(node: Node, rkeys: Sequence[bytes]) -> list[int | None]:
    """STRLEN of each key (None for a key that is gone or not a string)."""
    pipe = node.client.pipeline(transaction=False)
    for k in rkeys:
        pipe.execute_command("STRLEN", k)
    out: list[int | None] = []
    for r in pipe.execute(raise_on_error=False):
        out.append(None if isinstance(r, Exception) or not r else int(r))
    return out


def fetch_values(node: Node, rkeys: Sequence[bytes]) -> Iterator[tuple[bytes, bytes | None | Exception]]:
    """(key, value) for each key: bytes, None when the key is gone, or the error the server gave
    (WRONGTYPE, MOVED, ...). Round trips carry about ``VALUE_BUDGET`` bytes each."""
    i = 0
    count = 4
    while i < len(rkeys):
        part = rkeys[i : i + count]
        pipe = node.client.pipeline(transaction=False)
        for k in part:
            pipe.execute_command("GET", k)
        replies = pipe.execute(raise_on_error=False)
        size = 0
        for k, v in zip(part, replies):
            if isinstance(v, (bytes, bytearray)):
                size += len(v)
                yield k, bytes(v)
            elif isinstance(v, Exception):
                yield k, v
            else:
                yield k, None
        i += len(part)
        avg = size // max(1, len(part))
        count = max(1, min(BATCH_KEYS, VALUE_BUDGET // max(1, avg)))


def delete_if_unchanged(node: Node, rkey: bytes, digest: int | None) -> bool:
    """Delete ``rkey`` only if it still holds the value with ``digest`` (None: only if it still
    is not a string). WATCH/MULTI make it atomic: a value an engine writes meanwhile is never
    deleted. True when deleted."""
    with node.client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(rkey)
            if digest is None:
                same = _text(pipe.type(rkey)) not in ("string", "none")
            else:
                v = pipe.get(rkey)
                same = isinstance(v, bytes) and value_digest(v) == digest
            if not same:
                pipe.unwatch()
                return False
            pipe.multi()
            pipe.delete(rkey)
            res = pipe.execute()
            return bool(res and res[0])
        except WatchError:
            return False


def unlink(node: Node, rkeys: Sequence[bytes]) -> int:
    """UNLINK keys in batches; returns how many existed."""
    n = 0
    for i in range(0, len(rkeys), BATCH_KEYS):
        part = list(rkeys[i : i + BATCH_KEYS])
        pipe = node.client.pipeline(transaction=False)
        for k in part:
            pipe.execute_command("UNLINK", k)
        for r in pipe.execute(raise_on_error=False):
            if isinstance(r, int):
                n += r
    return n


def server_info(node: Node) -> dict[str, Any]:
    """Version, memory use, memory limit and eviction policy of one server."""
    info = node.client.info("memory")
    server = node.client.info("server")
    return {
        "node": node.name,
        "version": server.get("valkey_version") or server.get("redis_version"),
        "used_memory": int(info.get("used_memory", 0) or 0),
        "maxmemory": int(info.get("maxmemory", 0) or 0),
        "maxmemory_policy": info.get("maxmemory_policy"),
    }


def engine_clients(node: Node) -> list[dict[str, Any]]:
    """Connections of kvtier engines (client names ``kvtier-<tier>``), where CLIENT LIST is allowed."""
    try:
        clients = node.client.client_list()
    except redis.RedisError:
        return []
    out = []
    for c in clients:
        name = str(c.get("name") or "")
        if name.startswith("kvtier-") and name != "kvtier-ops":
            out.append({"node": node.name, "addr": c.get("addr"), "name": name,
                        "age_s": int(c.get("age", 0) or 0), "idle_s": int(c.get("idle", 0) or 0)})
    return out
