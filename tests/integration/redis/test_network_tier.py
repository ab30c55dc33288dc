"""The network tier against real redis-server processes, driven through the kvtier API."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import block_bytes_for, load_and_check, lookup_until, make_key, settle, store_blocks
from redis_servers import (
    RedisClusterNodes,
    RedisServer,
    free_port,
    make_tls_files,
    start_server,
)

import kvtier

pytestmark = pytest.mark.redis

BLOCK = 64 * 1024  # bytes per offloaded block in most tests
SLOTS = 16


def make_manager(url: str, namespace: str, *, slots: int = SLOTS, block: int = BLOCK,
                 **params: object) -> kvtier.TieringManager:
    """A manager with a CPU primary tier of ``slots`` blocks and one network tier."""
    tier = {"type": "network", "url": url, **params}
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": slots * block, "secondary_tiers": [tier]},
        gpu_block_size=16, bytes_per_gpu_block=block, namespace=namespace,
    )
    manager = spec.get_manager()
    assert isinstance(manager, kvtier.TieringManager)
    return manager


def tier_stats(manager: kvtier.OffloadingManager) -> dict:
    """The network tier's counters from get_stats()."""
    return manager.get_stats()["tiers"]["network0"]


def redis_key(manager: kvtier.OffloadingManager, key: bytes) -> bytes:
    """The Redis key the tier stores ``key`` under."""
    return tier_stats(manager)["key_prefix"].encode() + key


def step_until(manager: kvtier.OffloadingManager, cond, timeout: float = 10.0) -> float:
    """Step the manager until ``cond()``; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("condition not reached")
        manager.on_schedule_end()
        time.sleep(0.005)
    return time.monotonic() - t0


@pytest.fixture
def managers() -> Iterator[list[kvtier.OffloadingManager]]:
    """Managers made by a test; shut down at the end even when it fails."""
    made: list[kvtier.OffloadingManager] = []
    yield made
    for m in made:
        m.shutdown()


# -- round trips ----------------------------------------------------------------------------
def _round_trip(manager: kvtier.TieringManager, namespace: str) -> None:
    keys = [make_key(i, namespace) for i in range(3 * SLOTS)]
    store_blocks(manager, keys)
    settle(manager)
    st = tier_stats(manager)
    assert st["blocks_written"] == len(keys)
    assert st["store_failures"] == 0
    # Most blocks left the primary tier long ago: they can only come back from Redis.
    assert load_and_check(manager, keys) == len(keys)
    st = tier_stats(manager)
    assert st["hits"] >= 2 * SLOTS
    assert st["corrupt"] == 0 and st["load_failures"] == 0


def test_round_trip_standalone(redis_server: RedisServer, managers, namespace: str) -> None:
    m = make_manager(redis_server.url, namespace)
    managers.append(m)
    _round_trip(m, namespace)
    with redis_server.client() as c:
        assert c.exists(redis_key(m, make_key(0, namespace))) == 1
        assert c.ttl(redis_key(m, make_key(0, namespace))) == -1  # no ttl_seconds: no expiry
    stored = {k for ev in m.take_events() if ev.medium == "NETWORK" and not ev.removed
              for k in ev.keys}
    assert stored == {make_key(i, namespace) for i in range(3 * SLOTS)}


def test_ttl_expires_blocks_and_touch_refreshes_it(redis_server: RedisServer, managers,
                                                   namespace: str) -> None:
    m = make_manager(redis_server.url, namespace, ttl_seconds=0.6)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(4)]
    store_blocks(m, keys)
    settle(m)
    with redis_server.client() as c:
        pttl = c.pttl(redis_key(m, keys[0]))
        assert 0 < pttl <= 600
        time.sleep(0.4)
        m.touch(keys[:1], kvtier.ReqContext("t"))  # keys[0] is still used: keep it
        step_until(m, lambda: tier_stats(m)["touches"] >= 1)
        assert c.pttl(redis_key(m, keys[0])) > 300
        time.sleep(0.5)
        assert c.exists(redis_key(m, keys[1])) == 0  # expired on the server
    other = make_manager(redis_server.url, namespace, slots=8)
    managers.append(other)
    assert lookup_until(other, keys[1:]) == 0


def test_round_trip_cluster(redis_cluster: RedisClusterNodes, managers, namespace: str) -> None:
    m = make_manager(redis_cluster.url, namespace, cluster=True)
    managers.append(m)
    _round_trip(m, namespace)
    # Keys are spread by hash slot: every node holds some of them.
    for node in redis_cluster.nodes:
        with node.client() as c:
            assert c.dbsize() > 0


def test_cluster_lookup_spans_all_nodes(redis_cluster: RedisClusterNodes, managers,
                                        namespace: str) -> None:
    store = make_manager(redis_cluster.url, namespace, cluster=True)
    managers.append(store)
    keys = [make_key(i, namespace) for i in range(200)]
    store_blocks(store, keys)
    settle(store)
    other = make_manager(redis_cluster.url, namespace, cluster=True, slots=256)
    managers.append(other)
    assert lookup_until(other, keys) == len(keys)
    st = tier_stats(other)
    assert st["lookup_queries"] == 1 and st["lookup_keys_queried"] == len(keys)
    assert load_and_check(other, keys[:20]) == 20


def test_cluster_node_killed_and_restarted(redis_cluster: RedisClusterNodes, managers,
                                           namespace: str) -> None:
    m = make_manager(redis_cluster.url, namespace, cluster=True, slots=64)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(48)]
    store_blocks(m, keys)
    settle(m)
    node = redis_cluster.nodes[1]
    prefix = tier_stats(m)["key_prefix"].encode()
    with node.client() as c:
        on_node = {k[len(prefix):] for k in c.scan_iter(match=prefix + b"*", count=1000)}
    assert 0 < len(on_node) < len(keys)
    first_lost = min(i for i, k in enumerate(keys) if k in on_node)
    try:
        node.kill()
        m.reset_cache()
        # The blocks before the first one on the dead node still load; nothing raises.
        assert lookup_until(m, keys) <= first_lost
        assert tier_stats(m)["down_events"] >= 1
        for _ in range(10):
            assert lookup_until(m, keys) <= first_lost
            m.on_schedule_end()
    finally:
        node.start()  # same port and nodes.conf: it rejoins, empty
    back = step_until(m, lambda: tier_stats(m)["available"], timeout=10)
    assert back < 2.0
    redis_cluster.wait_ok()
    m.reset_cache()
    assert load_and_check(m, keys) == len(keys) - len(on_node)
    fresh = [make_key(100 + i, namespace) for i in range(48)]
    store_blocks(m, fresh)
    settle(m)
    assert load_and_check(m, fresh) == len(fresh)


# -- sharing and isolation ------------------------------------------------------------------
_STORE_SCRIPT = textwrap.dedent("""
    import sys
    import kvtier
    from helpers import make_key, settle, store_blocks
    url, namespace, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": 16 * 65536,
         "secondary_tiers": [{"type": "network", "url": url}]},
        gpu_block_size=16, bytes_per_gpu_block=65536, namespace=namespace)
    m = spec.get_manager()
    keys = [make_key(i, namespace) for i in range(n)]
    store_blocks(m, keys)
    settle(m)
    st = m.get_stats()["tiers"]["network0"]
    m.shutdown()
    print("stored", st["blocks_written"])
""")


def test_two_processes_share_blocks(redis_server: RedisServer, managers, namespace: str) -> None:
    n = 24
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-c", _STORE_SCRIPT, redis_server.url, namespace, str(n)],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert res.returncode == 0, res.stderr
    assert f"stored {n}" in res.stdout
    m = make_manager(redis_server.url, namespace)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(n)]
    assert load_and_check(m, keys) == n
    assert tier_stats(m)["hits"] == n


def test_namespaces_never_share(redis_server: RedisServer, managers, namespace: str) -> None:
    a = make_manager(redis_server.url, namespace + "/a")
    managers.append(a)
    keys = [make_key(i, namespace) for i in range(8)]
    store_blocks(a, keys)
    settle(a)
    b = make_manager(redis_server.url, namespace + "/b")
    c = make_manager(redis_server.url, namespace + "/a", block=2 * BLOCK)  # other geometry
    managers.extend([b, c])
    assert lookup_until(b, keys) == 0
    assert lookup_until(c, keys) == 0
    a2 = make_manager(redis_server.url, namespace + "/a")
    managers.append(a2)
    assert lookup_until(a2, keys) == len(keys)


def test_block_stored_later_by_another_instance_is_found(redis_server: RedisServer, managers,
                                                          namespace: str) -> None:
    reader = make_manager(redis_server.url, namespace)
    writer = make_manager(redis_server.url, namespace)
    managers.extend([reader, writer])
    key = make_key(0, namespace)
    assert lookup_until(reader, [key]) == 0  # absent, and now remembered as absent
    store_blocks(writer, [key])
    settle(writer)
    found = step_until(reader, lambda: reader.lookup([key], kvtier.ReqContext("r")) == 1)
    assert found < 5.0
    assert load_and_check(reader, [key]) == 1


# -- verification ---------------------------------------------------------------------------
def test_corrupt_records_are_never_served(redis_server: RedisServer, managers,
                                          namespace: str) -> None:
    m = make_manager(redis_server.url, namespace)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(6)]
    store_blocks(m, keys)
    settle(m)
    bad = keys[:4]
    with redis_server.client() as c:
        value = c.get(redis_key(m, bad[0]))
        assert value is not None and len(value) > BLOCK
        c.setrange(redis_key(m, bad[0]), len(value) - 100, b"\xff\x00\xff")  # payload bytes
        c.setrange(redis_key(m, bad[1]), 30, b"\x01")  # inside the header
        c.set(redis_key(m, bad[2]), value[: len(value) // 2])  # truncated
        c.set(redis_key(m, bad[3]), value)  # a valid record, but of another key
    m.reset_cache()
    assert load_and_check(m, keys) == 2
    for key in bad:
        assert lookup_until(m, [key]) == 0
    st = tier_stats(m)
    assert st["corrupt"] == 4
    with redis_server.client() as c:
        for key in bad:
            assert c.exists(redis_key(m, key)) == 0, "a corrupt record was left on the server"
        for key in keys[4:]:
            assert c.exists(redis_key(m, key)) == 1


def test_key_evicted_between_lookup_and_load_is_a_miss(redis_server: RedisServer, managers,
                                                       namespace: str) -> None:
    m = make_manager(redis_server.url, namespace)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(4)]
    store_blocks(m, keys)
    settle(m)
    m.reset_cache()
    with redis_server.client() as c:  # the server drops one behind the tier's back
        c.delete(redis_key(m, keys[1]))
    assert lookup_until(m, keys) == 1  # the tier believed in it, the load found it gone
    assert tier_stats(m)["evicted_at_load"] == 1
    assert load_and_check(m, [keys[0], keys[2], keys[3]]) == 3


# -- failures -------------------------------------------------------------------------------
def test_server_killed_and_restarted(own_redis_server: RedisServer, managers,
                                     namespace: str) -> None:
    server = own_redis_server
    m = make_manager(server.url, namespace)
    managers.append(m)
    before = [make_key(i, namespace) for i in range(8)]
    store_blocks(m, before[:4])
    server.kill()  # mid-run: cascades of the next blocks are still to come
    store_blocks(m, before[4:])
    settle(m)
    m.reset_cache()
    fresh = [make_key(100 + i, namespace) for i in range(4)]
    for _ in range(20):  # lookups keep answering, as misses, and nothing raises
        assert lookup_until(m, before, timeout=5) == 0
        assert lookup_until(m, fresh, timeout=5) == 0
        m.on_schedule_end()
    st = tier_stats(m)
    assert st["available"] is False and st["down_events"] >= 1
    assert m.get_stats()["manager"]["cascade_failures"] + st["store_failures"] > 0

    server.start()  # same port, empty
    t0 = time.monotonic()
    back = step_until(m, lambda: tier_stats(m)["available"], timeout=10)
    assert back < 2.0, f"the tier took {back:.2f}s to serve again"
    after = [make_key(200 + i, namespace) for i in range(3 * SLOTS)]
    store_blocks(m, after)
    settle(m)
    assert load_and_check(m, after) == len(after)
    assert time.monotonic() - t0 < 30


def test_stalled_server_is_a_miss_then_serves_again(own_redis_server: RedisServer, managers,
                                                    namespace: str) -> None:
    server = own_redis_server
    m = make_manager(server.url, namespace, lookup_timeout_seconds=0.5, socket_timeout_seconds=1)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(8)]
    store_blocks(m, keys)
    settle(m)
    m.reset_cache()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)  # alive but silent: every reply times out
    try:
        t0 = time.monotonic()
        assert lookup_until(m, [make_key(99, namespace)], timeout=10) == 0
        assert time.monotonic() - t0 < 5
        assert lookup_until(m, keys, timeout=10) == 0
        assert tier_stats(m)["available"] is False
    finally:
        server.proc.send_signal(signal.SIGCONT)
    back = step_until(m, lambda: tier_stats(m)["available"], timeout=10)
    assert back < 2.0
    assert load_and_check(m, keys) == len(keys)


def test_out_of_memory_server_fails_stores_not_the_engine(
    redis_tools: None, tmp_path: Path, managers, namespace: str
) -> None:
    server = start_server(tmp_path / "oom", ["--maxmemory", "3mb",
                                             "--maxmemory-policy", "noeviction"])
    try:
        m = make_manager(server.url, namespace)
        managers.append(m)
        keys = [make_key(i, namespace) for i in range(6 * SLOTS)]  # 6 MiB into a 3 MiB server
        store_blocks(m, keys)
        settle(m)
        st = tier_stats(m)
        assert st["oom_errors"] > 0 and st["store_failures"] > 0
        assert st["available"] is True  # reads still work
        assert st["blocks_written"] > 0
        m.reset_cache()
        assert load_and_check(m, keys) == st["blocks_written"]
    finally:
        for mm in managers:
            mm.shutdown()
        server.stop()


# -- batching: one round trip through a slow link -------------------------------------------
class DelayProxy:
    """A loopback TCP proxy delaying every client-to-server chunk by ``delay`` seconds."""

    def __init__(self, upstream_port: int, delay: float = 0.02) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.port = 0
        self.chunks = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        for w in self._writers:
            try:
                await w.wait_closed()
            except OSError:
                pass
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [cw, sw]
        pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def upstream_reader() -> None:
            while data := await cr.read(65536):
                self.chunks += 1
                pending.put_nowait((loop.time() + self.delay, data))
            pending.put_nowait((0.0, b""))

        async def upstream_writer() -> None:
            while True:
                due, data = await pending.get()
                if not data:
                    sw.close()
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                sw.write(data)
                await sw.drain()

        async def downstream() -> None:
            while data := await sr.read(65536):
                cw.write(data)
                await cw.drain()
            cw.close()

        await asyncio.gather(upstream_reader(), upstream_writer(), downstream(),
                             return_exceptions=True)


def test_lookup_of_1000_keys_is_one_round_trip(redis_server: RedisServer, managers,
                                               namespace: str) -> None:
    block = 4096
    n = 1000
    keys = [make_key(i, namespace) for i in range(n)]
    writer = make_manager(redis_server.url, namespace, slots=64, block=block)
    managers.append(writer)
    store_blocks(writer, keys)
    settle(writer)
    assert tier_stats(writer)["blocks_written"] == n
    with DelayProxy(redis_server.port, delay=0.02) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        reader = make_manager(url, namespace, slots=n + 24, block=block)
        managers.append(reader)
        # Warm the connection up (an engine's tier is connected long before a request comes).
        # Through the proxy the first query may take longer than the promotion deadline, which
        # then answers the warm-up as a miss before the server did: wait for the server's answer.
        assert lookup_until(reader, [make_key(-1, namespace)]) == 0
        deadline = time.monotonic() + 30
        while tier_stats(reader)["lookup_queries"] < 1:
            assert time.monotonic() < deadline, "the warm-up query was never answered"
            reader.on_schedule_end()
            time.sleep(0.01)
        ctx = kvtier.ReqContext("long-prefix")
        steps = 0
        t0 = time.monotonic()
        while (r := reader.lookup(keys, ctx)) is None:
            steps += 1
            reader.on_schedule_end()
            time.sleep(0.01)  # an engine step
            assert time.monotonic() - t0 < 5, "lookup did not settle"
        elapsed = time.monotonic() - t0
    assert r == n
    st = tier_stats(reader)
    assert st["lookup_keys_queried"] == n + 1 and st["lookup_queries"] == 2
    # Without batching this is 1,000 round trips of 20 ms: 20 s. Batched: the query, then the
    # promotion's GETs (a few batches in parallel).
    assert elapsed < 0.5, f"lookup took {elapsed:.3f}s over {steps} steps"
    assert steps <= 40
    region = reader.primary_blocks()
    spec = reader.prepare_load(keys[:5], ctx)
    for key, slot in zip(keys[:5], spec.block_ids):
        assert np.array_equal(region[slot], block_bytes_for(key, block))
    reader.complete_load(keys[:5], ctx)


# -- configuration --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"bogus": 1}, "secondary_tiers[0].bogus"),
        ({"url": None}, "secondary_tiers[0].url"),
        ({"url": "http://127.0.0.1:1"}, "secondary_tiers[0].url"),
        ({"url": "redis://127.0.0.1:99999"}, "secondary_tiers[0].url"),
        ({"url": "redis://127.0.0.1:1/x"}, "secondary_tiers[0].url"),
        ({"cluster": "yes"}, "secondary_tiers[0].cluster"),
        ({"cluster": True, "url": "redis://127.0.0.1:1/3"}, "secondary_tiers[0].url"),
        ({"ttl_seconds": -1}, "secondary_tiers[0].ttl_seconds"),
        ({"ttl_seconds": "1h"}, "secondary_tiers[0].ttl_seconds"),
        ({"pool_size": 0}, "secondary_tiers[0].pool_size"),
        ({"pool_size": True}, "secondary_tiers[0].pool_size"),
        ({"max_batch_bytes": 10}, "secondary_tiers[0].max_batch_bytes"),
        ({"key_prefix": ""}, "secondary_tiers[0].key_prefix"),
        ({"socket_timeout_seconds": 0}, "secondary_tiers[0].socket_timeout_seconds"),
        ({"negative_cache_seconds": float("nan")}, "secondary_tiers[0].negative_cache_seconds"),
        ({"username": 5}, "secondary_tiers[0].username"),
    ],
)
def test_config_errors_name_the_key(params: dict, where: str) -> None:
    tier = {"type": "network", "url": "redis://127.0.0.1:1/0", **params}
    if tier["url"] is None:
        del tier["url"]
    with pytest.raises(kvtier.ConfigError) as e:
        kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20, "secondary_tiers": [tier]})
    assert where in str(e.value)


def test_config_errors_never_show_the_password() -> None:
    for tier in (
        {"type": "network", "url": "http://user:s3cret@127.0.0.1:1"},
        {"type": "network", "url": "redis://user:s3cret@127.0.0.1:1", "password": "s3cret"},
        {"type": "network", "url": "redis://127.0.0.1:1", "password": ""},
    ):
        with pytest.raises(kvtier.ConfigError) as e:
            kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20, "secondary_tiers": [tier]})
        assert "s3cret" not in str(e.value)


def test_unreachable_server_is_a_miss_not_an_error(managers, namespace: str) -> None:
    m = make_manager(f"redis://127.0.0.1:{free_port()}/0", namespace, connect_timeout_seconds=0.5)
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(4)]
    store_blocks(m, keys)
    settle(m)
    m.reset_cache()
    assert lookup_until(m, keys) == 0
    assert tier_stats(m)["available"] is False


def test_tls_round_trip(redis_tools: None, tmp_path: Path, managers, namespace: str) -> None:
    server = start_server(tmp_path / "tls", tls=make_tls_files(tmp_path / "certs"))
    try:
        assert server.url.startswith("rediss://")
        m = make_manager(server.url, namespace)
        managers.append(m)
        _round_trip(m, namespace)
        plain = make_manager(f"redis://127.0.0.1:{server.port}/0", namespace, slots=64,
                             connect_timeout_seconds=0.5, socket_timeout_seconds=0.5)
        managers.append(plain)  # no TLS against a TLS port: misses, no exception
        assert lookup_until(plain, [make_key(0, namespace)]) == 0
    finally:
        for mm in managers:
            mm.shutdown()
        server.stop()


def test_password_from_params(redis_tools: None, tmp_path: Path, managers, namespace: str) -> None:
    server = start_server(tmp_path / "auth", ["--requirepass", "pw-123"])
    try:
        good = make_manager(server.url, namespace, password="pw-123")
        managers.append(good)
        keys = [make_key(i, namespace) for i in range(3 * SLOTS)]
        store_blocks(good, keys)
        settle(good)
        assert load_and_check(good, keys) == len(keys)
        in_url = make_manager(f"redis://:pw-123@127.0.0.1:{server.port}/0", namespace,
                              slots=64)
        wrong = make_manager(server.url, namespace, password="nope")
        managers.extend([in_url, wrong])
        assert lookup_until(in_url, keys) == len(keys)
        assert lookup_until(wrong, keys) == 0
        assert "nope" not in str(wrong.get_stats())
    finally:
        for mm in managers:
            mm.shutdown()
        server.stop()
