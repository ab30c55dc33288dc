"""The network tier's own GET/SET path (``kvtier.tiers.network.wire``), tested as a client is.

Against real redis-server processes (standalone, cluster), through the tier's public API where
a user would see the effect, and on a socket pair where the fault is one a real server never
makes (a broken stream): misses, error replies, MOVED/ASK during a real resharding, values that
are not records of ours (larger than the slot, too short, of another type) in the middle of a
pipelined batch, short reads and writes, a connection cut or stalled in the middle of a reply.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from fault_proxy import FaultProxy
from helpers import block_bytes_for, load_and_check, lookup_until, make_key, settle, store_blocks
from redis_servers import RedisClusterNodes, RedisServer, make_tls_files, start_server
from test_network_tier import make_manager, redis_key, tier_stats

import kvtier
from kvtier.format.record import header_prefix, namespace_fingerprint, pack_header
from kvtier.tiers.network.wire import (
    BAD,
    ERROR,
    HIT,
    MISS,
    ProtocolError,
    Wire,
    read_record,
    read_records,
    read_status,
    read_statuses,
)

pytestmark = pytest.mark.redis

BLOCK = 16 * 1024


@pytest.fixture
def managers() -> Iterator[list[kvtier.OffloadingManager]]:
    """Managers made by a test; shut down at the end even when it fails."""
    made: list[kvtier.OffloadingManager] = []
    yield made
    for m in made:
        m.shutdown()


# -- the wire on a socket pair: exact byte streams ------------------------------------------
FP = namespace_fingerprint("wire-test")


def _record(key: bytes, payload: np.ndarray, fp: bytes = FP) -> bytes:
    return pack_header(fp, key, memoryview(payload)) + payload.tobytes()


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _feed(sock: socket.socket, data: bytes, seed: int) -> threading.Thread:
    """Send ``data`` from a thread in random pieces of 1-300 bytes (the reader's short reads)."""
    rng = random.Random(seed)

    def run() -> None:
        i = 0
        while i < len(data):
            n = rng.randint(1, 300)
            sock.sendall(data[i:i + n])
            i += n
            if rng.random() < 0.05:
                time.sleep(0.0002)
        sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected socket pair: (the client's end, the scripted server's end)."""
    a, b = socket.socketpair()
    a.settimeout(5)  # like redis-py's sockets: a timeout, so non-blocking underneath
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("mode", ["expected-header", "full-parse", "batch"])
def test_replies_of_every_kind_stay_in_sync_through_short_reads(pair, mode: str) -> None:
    client, server = pair
    keys = [make_key(i, "wire") for i in range(8)]
    payloads = [block_bytes_for(k, BLOCK) for k in keys]
    bigger = _record(keys[3], block_bytes_for(keys[3], 3 * BLOCK))  # another geometry
    flipped = bytearray(_record(keys[5], payloads[5]))
    flipped[-10] ^= 0xFF
    bad_header = bytearray(_record(keys[2], payloads[2]))
    bad_header[50] ^= 0x01  # the header checksum
    stream = b"".join([
        _bulk(_record(keys[0], payloads[0])),  # a record
        b"$-1\r\n",  # nil: absent
        b"_\r\n",  # RESP3 null: absent
        _bulk(bigger),  # larger than the slot: not ours, skipped whole
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        _bulk(bytes(flipped)),  # payload checksum fails
        _bulk(b"short"),  # shorter than a header
        _bulk(_record(keys[6], payloads[6], namespace_fingerprint("other"))),  # other namespace
        _bulk(_record(keys[0], payloads[0])),  # a valid record, but of another key
        _bulk(_record(keys[7], payloads[7])),  # a record again: the stream is still in sync
        _bulk(bytes(bad_header)),  # header checksum fails
        _bulk(_record(keys[1], payloads[1])),  # and a record after it
    ])
    feeder = _feed(server, stream, seed=1)
    dests = np.zeros((12, BLOCK), dtype=np.uint8)
    wire = Wire()
    wire.attach(client)
    wanted = [keys[0], keys[1], keys[2], keys[3], keys[4], keys[5], keys[6], keys[6], keys[1],
              keys[7], keys[2], keys[1]]
    views = [memoryview(d) for d in dests]
    if mode == "batch":
        got = read_records(wire, wanted, views, namespace_fp=FP, block_bytes=BLOCK)
    else:
        prefix = header_prefix(FP, len(keys[0]), BLOCK) if mode == "expected-header" else None
        got = [read_record(wire, k, views[i], namespace_fp=FP, block_bytes=BLOCK,
                           prefix=prefix) for i, k in enumerate(wanted)]
    feeder.join()
    assert [s for s, _ in got] == [HIT, MISS, MISS, BAD, ERROR, BAD, BAD, BAD, BAD, HIT, BAD,
                                   HIT]
    assert got[4][1] is not None and got[4][1].startswith("WRONGTYPE")
    assert got[5][1] == "payload checksum mismatch"
    assert got[7][1] == "namespace mismatch" and got[8][1] == "key mismatch"
    assert got[10][1] == "header checksum mismatch"
    assert np.array_equal(dests[0], payloads[0]) and np.array_equal(dests[9], payloads[7])
    assert np.array_equal(dests[11], payloads[1])
    assert not dests[3].any() and not dests[6].any()  # rejected before a byte reached the slot
    assert not dests[10].any()
    assert client.recv(1) == b""  # every byte consumed, nothing more expected
    wire.detach()
    assert client.gettimeout() == 5  # the socket's own timeout is back after the exchange


def test_a_stalled_payload_times_out_and_the_timeout_is_given_back(pair) -> None:
    client, server = pair
    client.settimeout(0.3)
    key = make_key(0, "wire")
    rec = _bulk(_record(key, block_bytes_for(key, BLOCK)))
    server.sendall(rec[: len(rec) // 2])  # half a reply, then nothing: a stalled server
    wire = Wire()
    wire.attach(client)
    t0 = time.monotonic()
    with pytest.raises((TimeoutError, BlockingIOError)):
        read_records(wire, [key], [memoryview(np.zeros(BLOCK, dtype=np.uint8))],
                     namespace_fp=FP, block_bytes=BLOCK)
    assert time.monotonic() - t0 < 5
    wire.detach()
    assert client.gettimeout() == 0.3


def test_status_replies_in_a_run_through_short_reads(pair) -> None:
    client, server = pair
    stream = (b"+OK\r\n" * 5 + b"-OOM command not allowed\r\n" + b"+OK\r\n" * 3
              + b"-MOVED 12 127.0.0.1:7001\r\n" + b"+OK\r\n" * 40)
    feeder = _feed(server, stream, seed=6)
    wire = Wire()
    wire.attach(client)
    got = read_statuses(wire, 50)
    feeder.join()
    assert got == ([None] * 5 + ["OOM command not allowed"] + [None] * 3
                   + ["MOVED 12 127.0.0.1:7001"] + [None] * 40)
    assert client.recv(1) == b""


@pytest.mark.parametrize("stream", [
    b"+OK\r\n",  # a status where a bulk string must be
    b":1\r\n",  # an integer
    b"*1\r\n$-1\r\n",  # an array
    b"$12x\r\n",  # a broken length
    _bulk(b"x" * 60)[:-2] + b"!!",  # a bulk string without its CRLF
    b"-" + b"e" * (70 * 1024),  # an endless line
])
@pytest.mark.parametrize("batch", [False, True], ids=["one", "batch"])
def test_a_broken_stream_raises_protocol_error(pair, stream: bytes, batch: bool) -> None:
    client, server = pair
    feeder = _feed(server, stream, seed=2)
    wire = Wire()
    wire.attach(client)
    dest = memoryview(np.zeros(BLOCK, dtype=np.uint8))
    key = make_key(0, "wire")
    with pytest.raises((ProtocolError, redis.ConnectionError)):
        if batch:
            read_records(wire, [key], [dest], namespace_fp=FP, block_bytes=BLOCK)
        else:
            read_record(wire, key, dest, namespace_fp=FP, block_bytes=BLOCK)
    feeder.join()


@pytest.mark.parametrize("batch", [False, True], ids=["one", "batch"])
def test_a_connection_closed_mid_payload_is_an_error_not_a_record(pair, batch: bool) -> None:
    client, server = pair
    key = make_key(0, "wire")
    rec = _bulk(_record(key, block_bytes_for(key, BLOCK)))
    _feed(server, rec[: len(rec) // 2], seed=3).join()
    wire = Wire()
    wire.attach(client)
    dest = memoryview(np.zeros(BLOCK, dtype=np.uint8))
    with pytest.raises(redis.ConnectionError):
        if batch:
            read_records(wire, [key], [dest], namespace_fp=FP, block_bytes=BLOCK)
        else:
            read_record(wire, key, dest, namespace_fp=FP, block_bytes=BLOCK)


def test_status_replies(pair) -> None:
    client, server = pair
    _feed(server, b"+OK\r\n-OOM command not allowed\r\n-MOVED 12 127.0.0.1:7001\r\n",
          seed=4).join()
    wire = Wire()
    wire.attach(client)
    assert read_status(wire) is None
    assert read_status(wire) == "OOM command not allowed"
    assert read_status(wire) == "MOVED 12 127.0.0.1:7001"
    with pytest.raises(redis.ConnectionError):
        read_status(wire)


def test_send_resumes_short_writes_without_losing_a_byte(pair) -> None:
    client, server = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    rng = np.random.default_rng(5)
    pieces: list[bytes | memoryview] = []
    for i in range(1500):  # more buffers than one sendmsg takes (1024), 3 MiB in all
        if i % 2:
            pieces.append(memoryview(rng.integers(0, 256, 4000, dtype=np.uint8)))
        else:
            pieces.append(rng.bytes(int(rng.integers(0, 40))))  # empty pieces too
    expect = b"".join(bytes(p) for p in pieces)
    received = bytearray()

    def drain() -> None:  # a slow reader: the client's sends fill the buffer and come back short
        while len(received) < len(expect):
            data = server.recv(3000)
            if not data:
                return
            received.extend(data)
            if len(received) % 7 == 0:
                time.sleep(0.0005)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    wire = Wire()
    wire.attach(client)
    wire.send(pieces)
    t.join(timeout=30)
    assert bytes(received) == expect


# -- hostile values on a real server, in the middle of a pipelined batch --------------------
def test_values_that_are_not_our_records_fail_alone_in_a_batch(
        redis_server: RedisServer, managers, namespace: str) -> None:
    _hostile_values_in_a_batch(redis_server, managers, namespace)


def test_values_that_are_not_our_records_fail_alone_over_tls(
        redis_tools: None, tmp_path, managers, namespace: str) -> None:
    # ssl sockets have no sendmsg and return at most one TLS record per read
    server = start_server(tmp_path / "tls", tls=make_tls_files(tmp_path / "certs"))
    try:
        _hostile_values_in_a_batch(server, managers, namespace)
    finally:
        for m in managers:
            m.shutdown()
        server.stop()


def _hostile_values_in_a_batch(redis_server: RedisServer, managers, namespace: str) -> None:
    # One I/O thread and 4 records per round trip: the 12 blocks are one task streamed in 3
    # round trips, two in flight at a time.
    m = make_manager(redis_server.url, namespace, slots=32, block=BLOCK, pool_size=1,
                     max_batch_bytes=4 * BLOCK)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(12)]
    store_blocks(m, keys)
    settle(m)
    prefix = tier_stats(m)["key_prefix"].encode()
    other_geometry = make_manager(redis_server.url, namespace, slots=4, block=4 * BLOCK,
                                  key_prefix=prefix.decode())
    managers.append(other_geometry)
    store_blocks(other_geometry, [keys[2]])  # a valid record 4x larger than the slot
    settle(other_geometry)
    hostile = {2: "larger record", 4: "junk", 6: "empty", 8: "list", 10: "short"}
    with redis_server.client() as c:
        assert len(c.get(prefix + keys[2])) > 4 * BLOCK
        c.set(prefix + keys[4], b"\xab" * (3 << 20))  # 3 MiB of junk
        c.set(prefix + keys[6], b"")
        c.delete(prefix + keys[8])
        c.rpush(prefix + keys[8], b"a", b"b")  # WRONGTYPE
        c.set(prefix + keys[10], b"KVTR")
    m.reset_cache()
    before = tier_stats(m)
    # One lookup: every key is in the presence cache, so one promotion job, one batch.
    assert lookup_until(m, keys) == 2
    st = tier_stats(m)
    assert st["hits"] - before["hits"] == len(keys) - len(hostile)
    assert st["corrupt"] - before["corrupt"] == len(hostile)
    good = [k for i, k in enumerate(keys) if i not in hostile]
    assert load_and_check(m, good) == len(good)
    with redis_server.client() as c:
        for i in hostile:
            assert c.exists(prefix + keys[i]) == 0, f"{hostile[i]} left on the server"


def test_error_replies_fail_the_blocks_and_delete_nothing(
        own_redis_server: RedisServer, managers, namespace: str) -> None:
    server = own_redis_server
    writer = make_manager(server.url, namespace, slots=16, block=BLOCK)
    managers.append(writer)
    keys = [make_key(i, namespace) for i in range(8)]
    store_blocks(writer, keys)
    settle(writer)
    with server.client() as c:  # a user who may ask EXISTS but not GET: -NOPERM to each GET
        c.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@all", "-get")
    reader = make_manager(server.url, namespace, slots=16, block=BLOCK, username="reader",
                          password="pw")
    managers.append(reader)
    assert lookup_until(reader, keys) == 0  # found by EXISTS, refused by GET: misses
    st = tier_stats(reader)
    assert st["load_failures"] >= len(keys) and st["corrupt"] == 0 and st["hits"] == 0
    assert st["available"] is True  # the server answers: it is not down
    with server.client() as c:
        assert all(c.exists(redis_key(writer, k)) for k in keys), "a refused block was deleted"
    assert _wrong_blocks(reader, keys) == 0


# -- short reads and writes, cuts and stalls through a proxy --------------------------------
def test_round_trip_through_a_stream_chopped_into_small_pieces(
        redis_server: RedisServer, managers, namespace: str) -> None:
    with FaultProxy(redis_server.port, chunk=97, seed=7) as proxy:
        m = make_manager(proxy.url, namespace, slots=32, block=BLOCK, pool_size=2,
                         socket_timeout_seconds=10, max_batch_bytes=4 * BLOCK)
        managers.append(m)
        keys = [make_key(i, namespace) for i in range(24)]
        store_blocks(m, keys)
        settle(m, timeout=60)
        st = tier_stats(m)
        assert st["blocks_written"] == len(keys) and st["store_failures"] == 0
        m.reset_cache()
        assert lookup_until(m, keys[:8], timeout=60) == 8  # one job, one pipelined batch
        assert load_and_check(m, keys) == len(keys)
        assert tier_stats(m)["corrupt"] == 0
        m.shutdown()
    with redis_server.client() as c:  # what went through the proxy is what the server holds
        value = c.get(redis_key(m, keys[0]))
        assert value is not None and value.endswith(block_bytes_for(keys[0], BLOCK).tobytes())


def _wrong_blocks(m: kvtier.OffloadingManager, keys: list[bytes]) -> int:
    """Keys the manager would serve now whose bytes are not the ones stored."""
    ctx = kvtier.ReqContext("audit")
    region = m.primary_blocks()
    n = m.lookup(keys, ctx) or 0
    if not n:
        return 0
    spec = m.prepare_load(keys[:n], ctx)
    wrong = sum(not np.array_equal(region[s], block_bytes_for(k, region.shape[1]))
                for k, s in zip(keys[:n], spec.block_ids))
    m.complete_load(keys[:n], ctx)
    return wrong


def test_connection_cut_mid_reply_is_closed_and_never_reused(
        redis_server: RedisServer, managers, namespace: str) -> None:
    with FaultProxy(redis_server.port) as proxy:
        m = make_manager(proxy.url, namespace, slots=16, block=BLOCK, pool_size=1,
                         max_batch_bytes=4 * BLOCK)
        managers.append(m)
        keys = [make_key(i, namespace) for i in range(16)]
        store_blocks(m, keys)
        settle(m)
        inside_4th = 3 * BLOCK + BLOCK // 2  # inside the 4th record's payload

        # Cut once: the batch is sent again on a fresh connection and every block loads.
        m.reset_cache()
        connections = proxy.accepted
        proxy.cut_next_reply_after(inside_4th)
        assert lookup_until(m, keys) == len(keys)
        assert proxy.cuts == 1 and proxy.accepted > connections
        assert _wrong_blocks(m, keys) == 0

        # Cut twice (the retry too): the blocks of that batch are misses, none is served.
        settle(m)
        m.reset_cache()
        connections = proxy.accepted
        proxy.cut_next_reply_after(inside_4th, times=2)
        assert lookup_until(m, keys) < len(keys)
        assert proxy.cuts == 3 and proxy.accepted > connections  # the retry: a new one
        assert _wrong_blocks(m, keys) == 0
        settle(m)
        step_until_available(m)
        assert load_and_check(m, keys) == len(keys)  # on a new connection, not the cut one
        assert _wrong_blocks(m, keys) == 0
        assert tier_stats(m)["corrupt"] == 0


def test_a_reply_stalled_past_the_timeout_is_never_read_later(
        own_redis_server: RedisServer, managers, namespace: str) -> None:
    server = own_redis_server
    with FaultProxy(server.port) as proxy:
        m = make_manager(proxy.url, namespace, slots=16, block=BLOCK, pool_size=1,
                         socket_timeout_seconds=0.5)
        managers.append(m)
        keys = [make_key(i, namespace) for i in range(16)]
        store_blocks(m, keys)
        settle(m)
        m.reset_cache()
        assert server.proc is not None
        with redis_server_paused(server):
            # The replies stop coming: the load times out and the connection is dropped.
            assert lookup_until(m, keys, timeout=10) == 0
        # The server now answers what it was asked before; nobody must read that.
        settle(m)
        step_until_available(m)
        assert load_and_check(m, keys) == len(keys)
        assert _wrong_blocks(m, keys) == 0


class redis_server_paused:  # noqa: N801 - used as a context manager
    """SIGSTOP the server for the block's duration."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server

    def __enter__(self) -> None:
        import signal
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGSTOP)

    def __exit__(self, *exc: object) -> None:
        import signal
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGCONT)


def step_until_available(m: kvtier.OffloadingManager, timeout: float = 10.0) -> None:
    """Step the manager until its network tier serves again."""
    deadline = time.monotonic() + timeout
    while not tier_stats(m)["available"]:
        assert time.monotonic() < deadline, "the tier did not come back"
        m.on_schedule_end()
        time.sleep(0.01)


@pytest.mark.parametrize("configured", [None, 1], ids=["default", "one-block"])
def test_large_blocks_travel_two_to_a_window_unless_configured(
        redis_server: RedisServer, managers, namespace: str, configured: int | None) -> None:
    # Blocks over 1 MiB: by default a window holds two records (a reply stays queued behind
    # the one being read); a max_batch_bytes that is set is kept as it is.
    block = (1 << 20) + 4096
    params = {} if configured is None else {"max_batch_bytes": configured * block}
    m = make_manager(redis_server.url, namespace, slots=16, block=block, pool_size=1, **params)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(8)]
    store_blocks(m, keys)
    settle(m)
    m.reset_cache()
    st = tier_stats(m)
    trips, queries = st["round_trips"], st["lookup_queries"]
    assert lookup_until(m, keys) == len(keys)
    st = tier_stats(m)
    load_trips = (st["round_trips"] - trips) - (st["lookup_queries"] - queries)
    assert load_trips == (4 if configured is None else 8)
    assert _wrong_blocks(m, keys) == 0


# -- cluster: streams to every node, MOVED and ASK during a real resharding -----------------
def test_cluster_batches_stream_to_every_node_at_once(
        redis_cluster: RedisClusterNodes, managers, namespace: str) -> None:
    m = make_manager(redis_cluster.url, namespace, cluster=True, slots=96, block=BLOCK,
                     pool_size=1, max_batch_bytes=4 * BLOCK)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(64)]
    store_blocks(m, keys)
    settle(m)
    m.reset_cache()
    before = tier_stats(m)["round_trips"]
    assert lookup_until(m, keys) == len(keys)  # one task: every node, several windows each
    assert tier_stats(m)["round_trips"] - before >= 64 // 4
    assert _wrong_blocks(m, keys) == 0
    for node in redis_cluster.nodes:
        with node.client() as c:
            assert c.dbsize() > 0


def _node_id(node: RedisServer) -> str:
    with node.client() as c:
        nid = c.execute_command("CLUSTER", "MYID")
    return nid.decode() if isinstance(nid, bytes) else str(nid)


def _owner(cluster: RedisClusterNodes, slot: int) -> RedisServer:
    with cluster.nodes[0].client() as c:
        table = c.execute_command("CLUSTER", "SLOTS")
    for start, end, primary, *_replicas in table:
        if start <= slot <= end:
            return next(n for n in cluster.nodes if n.port == int(primary[1]))
    raise AssertionError(f"no node owns slot {slot}")


def _set_slot(cluster: RedisClusterNodes, slot: int, owner: RedisServer) -> None:
    oid = _node_id(owner)
    for node in cluster.nodes:
        with node.client() as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", oid)


def _migrate(src: RedisServer, dst: RedisServer, slot: int, keys: list[bytes]) -> None:
    with dst.client() as c:
        c.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", _node_id(src))
    with src.client() as c:
        c.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", _node_id(dst))
        if keys:
            c.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)


def test_moved_and_ask_during_resharding_are_followed(
        redis_cluster: RedisClusterNodes, managers, namespace: str) -> None:
    m = make_manager(redis_cluster.url, namespace, cluster=True, slots=64, block=BLOCK)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(24)]
    store_blocks(m, keys)
    settle(m)
    prefix = tier_stats(m)["key_prefix"].encode()
    probe = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    try:
        target = keys[5]
        slot = probe.keyslot(prefix + target)
        in_slot = [prefix + k for k in keys if probe.keyslot(prefix + k) == slot]
    finally:
        probe.close()
    src = _owner(redis_cluster, slot)
    dst = next(n for n in redis_cluster.nodes if n is not src)
    try:
        # ASK: the slot is migrating and the key already left the old owner: the tier asks the
        # importing node, as the redirection says.
        _migrate(src, dst, slot, in_slot)
        m.reset_cache()
        assert lookup_until(m, [target]) == 1
        assert _wrong_blocks(m, [target]) == 0
        asked = tier_stats(m)["redirects"]
        assert asked >= 1
        # MOVED: the migration is over and the tier's slot table is stale: it refreshes the
        # table and sends the GETs again to the new owner.
        _set_slot(redis_cluster, slot, dst)
        redis_cluster.wait_ok()
        m.reset_cache()
        assert lookup_until(m, keys) == len(keys)
        assert tier_stats(m)["redirects"] >= asked + len(in_slot)  # each key in the slot
        assert load_and_check(m, keys) == len(keys)
        assert _wrong_blocks(m, keys) == 0
        st = tier_stats(m)
        assert st["corrupt"] == 0 and st["load_failures"] == 0
        # Stores into the moved slot are redirected the same way.
        fresh = [make_key(100 + i, namespace) for i in range(24)]
        store_blocks(m, fresh)
        settle(m)
        assert tier_stats(m)["store_failures"] == 0
        assert load_and_check(m, fresh) == len(fresh)
    finally:  # leave the cluster consistent (the slot stays with dst)
        with src.client() as c:
            left = c.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
            if left:
                c.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *left)
        _set_slot(redis_cluster, slot, dst)
        redis_cluster.wait_ok()
