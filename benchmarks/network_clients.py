"""The servers and the clients of ``bench_network.py``: loopback Redis servers (standalone and a
3-node cluster) it starts, and the clients it measures, each run once per worker process: a
minimal RESP2 client on one socket (and two of them in two processes), redis-py, and kvtier's
manager with a ``network`` tier driven as an engine drives it. Each returns its store and load
rate and CPU seconds per GB.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

GB = 1e9
MiB = 1 << 20
STEP_S = 0.001  # the engine's step: the benchmark steps the manager this often


# -- servers --------------------------------------------------------------------------------
def _free_port(top: int = 60000) -> int:
    while True:
        port = random.randint(20000, top)
        with socket.socket() as s, socket.socket() as bus:
            try:
                s.bind(("127.0.0.1", port))
                if top <= 55535:  # a cluster node also needs port + 10000 for its bus
                    bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port


def _redis_server(workdir: Path, port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench_network: redis-server is not on PATH (apt-get install redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--maxmemory", "3gb", "--maxmemory-policy", "allkeys-lru",
         "--protected-mode", "no", "--logfile", str(workdir / "redis.log"), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with redis.Redis(port=port, socket_timeout=1) as c:
                c.ping()
                return proc
        except redis.RedisError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


class Servers:
    """One standalone server and (optionally) a 3-node cluster, on loopback."""

    def __init__(self, workdir: Path, cluster: bool) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = _free_port()
        self.procs.append(_redis_server(workdir / "standalone", self.port, []))
        with redis.Redis(port=self.port) as c:
            self.version = c.info("server")["redis_version"]
        self.cluster_ports: list[int] = []
        if cluster:
            for i in range(3):
                port = _free_port(55535)
                self.procs.append(_redis_server(
                    workdir / f"node{i}", port,
                    ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]))
                self.cluster_ports.append(port)
            res = subprocess.run(
                ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in
                                                       self.cluster_ports],
                 "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, timeout=60)
            if res.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create: {res.stdout[-500:]!r}")
            deadline = time.monotonic() + 30
            while not all(self._cluster_ok(p) for p in self.cluster_ports):
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not become ok")
                time.sleep(0.1)

    @staticmethod
    def _cluster_ok(port: int) -> bool:
        with redis.Redis(port=port) as c:
            return c.cluster("INFO").get("cluster_state") in ("ok", b"ok")

    def stop(self) -> None:
        """Stop every server."""
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=10)



# -- the clients (each runs in a worker process) ----------------------------------------------
def _values(n: int, size: int) -> np.ndarray:
    return np.random.default_rng(size).integers(0, 256, (n, size), dtype=np.uint8)


class _Timer:
    """Wall and process CPU time of one operation over ``nbytes``."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def __enter__(self) -> _Timer:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.t1 = time.perf_counter()
        self.rate = self.nbytes / (self.t1 - self.t0)
        self.cpu = (time.process_time() - self.c0) / (self.nbytes / GB)


def _readline(sock: socket.socket, buf: bytearray) -> bytes:
    while True:
        i = buf.find(b"\r\n")
        if i >= 0:
            line = bytes(buf[:i])
            del buf[:i + 2]
            return line
        chunk = sock.recv(256)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk


def client_raw_socket(port: int, size: int, n: int, window: int, tag: bytes = b"raw",
                      barrier: Any = None) -> dict[str, float]:
    """Pipelined SET (sendmsg, no copy) and GET (recv_into the array) on one plain socket.

    With ``barrier`` (several connections in parallel) every timed phase starts when all the
    connections are ready, and the result also carries each phase's start and end.
    """
    values = _values(n, size)
    out = np.zeros_like(values)
    keys = [b"%s:%d:%d" % (tag, size, i) for i in range(n)]
    per = max(1, window // size)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    res: dict[str, float] = {}
    if barrier is not None:
        barrier.wait()
    with _Timer(n * size) as t:
        for i in range(0, n, per):
            views: list[memoryview] = []
            for j in range(i, min(n, i + per)):
                k = keys[j]
                views.append(memoryview(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n"
                                        % (len(k), k, size)))
                views.append(memoryview(values[j]))  # type: ignore[arg-type]
                views.append(memoryview(b"\r\n"))
            while views:
                sent = sock.sendmsg(views[:1024])
                while sent:
                    if sent >= views[0].nbytes:
                        sent -= views.pop(0).nbytes
                    else:
                        views[0] = views[0][sent:]
                        sent = 0
            buf = bytearray()
            for _ in range(i, min(n, i + per)):
                assert _readline(sock, buf) == b"+OK"
    res["store"], res["store_cpu"] = t.rate, t.cpu
    res["store_t0"], res["store_t1"] = t.t0, t.t1
    if barrier is not None:
        barrier.wait()
    buf = bytearray()
    with _Timer(n * size) as t:
        for i in range(0, n, per):
            sock.sendall(b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k)
                                  for k in keys[i:i + per]))
            for j in range(i, min(n, i + per)):
                length = int(_readline(sock, buf)[1:])
                dest = memoryview(out[j])  # type: ignore[arg-type]
                have = min(len(buf), length)
                dest[:have] = buf[:have]
                del buf[:have]
                while have < length:
                    got = sock.recv_into(dest[have:], length - have)
                    if not got:
                        raise ConnectionError("closed")
                    have += got
                while len(buf) < 2:
                    buf += sock.recv(2)
                del buf[:2]
    res["load"], res["load_cpu"] = t.rate, t.cpu
    res["load_t0"], res["load_t1"] = t.t0, t.t1
    assert np.array_equal(out, values)
    sock.close()
    return res


def _raw_part(port: int, size: int, n: int, window: int, tag: bytes, barrier: Any,
              results: Any) -> None:
    results.put(client_raw_socket(port, size, n, window, tag, barrier))


def client_raw_sockets(port: int, size: int, n: int, window: int,
                       conns: int) -> dict[str, float]:
    """``conns`` raw-socket clients in as many processes, each over its own share of the
    blocks (own keys), every phase started together: what the server takes from parallel
    connections. Throughput is all the bytes over the time from the first start to the last
    end; CPU is the processes' CPU seconds together, per GB moved."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    per = -(-n // conns)
    barrier, results = ctx.Barrier(conns), ctx.Queue()
    procs = [ctx.Process(target=_raw_part, args=(port, size, per, window, b"raw%d" % i, barrier,
                                                 results)) for i in range(conns)]
    for p in procs:
        p.start()
    parts = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    res: dict[str, float] = {}
    moved = per * size * conns
    for op in ("store", "load"):
        res[op] = moved / (max(r[f"{op}_t1"] for r in parts) - min(r[f"{op}_t0"] for r in parts))
        res[f"{op}_cpu"] = sum(r[f"{op}_cpu"] for r in parts) / conns
    return res


def client_redis_py(url: str, size: int, n: int, window: int,
                    cluster: bool = False) -> dict[str, float]:
    """redis-py pipelines of ``window`` bytes of ready-made ``bytes`` values."""
    values = [v.tobytes() for v in _values(n, size)]
    keys = [b"rp:%d:%d" % (size, i) for i in range(n)]
    per = max(1, window // size)
    client: Any = (redis.RedisCluster.from_url(url) if cluster
                   else redis.Redis.from_url(url, socket_timeout=60))
    res: dict[str, float] = {}
    with _Timer(n * size) as t:
        for i in range(0, n, per):
            pipe = client.pipeline(transaction=False)
            for k, v in zip(keys[i:i + per], values[i:i + per]):
                pipe.set(k, v)
            pipe.execute()
    res["store"], res["store_cpu"] = t.rate, t.cpu
    got: list[bytes] = []
    with _Timer(n * size) as t:
        for i in range(0, n, per):
            pipe = client.pipeline(transaction=False)
            for k in keys[i:i + per]:
                pipe.get(k)
            got.extend(pipe.execute())
    res["load"], res["load_cpu"] = t.rate, t.cpu
    assert got == values
    client.close()
    return res


def client_kvtier(url: str, size: int, n: int, params: dict[str, Any]) -> dict[str, float]:
    """Store and load ``n`` blocks through a manager with one network tier (public API)."""
    import kvtier
    from kvtier import config

    top: dict[str, Any] = {}
    tier: dict[str, Any] = {"type": "network", "url": url, **params}
    if "max_pinned_share" in getattr(config, "MANAGER_TIER_KEYS", ()):
        # The whole store is one burst: no backpressure bound, the tier's own speed is measured
        # (a kvtier from before backpressure and the promotion deadline knows neither key).
        top["promotion_deadline_seconds"] = 300
        tier["max_pinned_share"] = 1.0
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": n * size, **top, "secondary_tiers": [tier]},
        gpu_block_size=16, bytes_per_gpu_block=size, namespace=f"bench/{size}",
    )
    m = spec.get_manager()
    region = m.primary_blocks()
    ctx = kvtier.ReqContext("bench")
    keys = [b"%032d" % i for i in range(n)]
    deadline = time.monotonic() + 20
    while not m.get_stats()["tiers"]["network0"]["available"] or m.tiers[0].lookup(
            [b"warm-up"]) is None:  # connected, as an engine's tier long before a request
        assert time.monotonic() < deadline, "the tier did not connect"
        m.on_schedule_end()
        time.sleep(0.01)

    def steps(done: Any, next_step: bool = False) -> Any:
        """Engine steps until ``done()`` answers (not None, not False). A step ends with
        ``on_schedule_end``, then the model runs for ``STEP_S``; ``done`` is asked right after
        ``on_schedule_end`` (a store's job is over once a step has collected it) or, with
        ``next_step``, when the next step begins (as a waiting request's ``lookup`` is)."""
        deadline = time.monotonic() + 300
        while True:
            m.on_schedule_end()
            if not next_step and _answered(answer := done()):
                return answer
            assert time.monotonic() < deadline, "the tier did not finish"
            time.sleep(STEP_S)
            if next_step and _answered(answer := done()):
                return answer

    res: dict[str, float] = {}
    try:
        out = m.prepare_store(keys, ctx)
        assert out is not None and len(out.keys_to_store) == n
        region[out.store_spec.block_ids] = _values(n, size)
        expect = region[out.store_spec.block_ids].copy()
        with _Timer(n * size) as t:
            m.complete_store(out.keys_to_store, ctx)
            steps(lambda: not m.has_pending_work())
        res["store"], res["store_cpu"] = t.rate, t.cpu
        m.on_schedule_end()
        m.reset_cache()
        with _Timer(n * size) as t:
            # The engine asks; the manager promotes the blocks from the tier; the engine asks
            # again at the start of every step until the answer comes, as for a waiting request
            # (``lookup`` collects a promotion that finished since the last step itself).
            assert m.lookup(keys, ctx) is None
            got = steps(lambda: m.lookup(keys, ctx), next_step=True)
        res["load"], res["load_cpu"] = t.rate, t.cpu
        assert got == n, got
        spec_ = m.prepare_load(keys, ctx)
        assert np.array_equal(region[spec_.block_ids], expect), "wrong bytes loaded"
        m.complete_load(keys, ctx)
        st = m.get_stats()["tiers"]["network0"]
        assert st["corrupt"] == 0 and st["load_failures"] == 0 and st["store_failures"] == 0
    finally:
        m.shutdown()
    return res


def _answered(answer: Any) -> bool:
    return answer is not None and answer is not False

