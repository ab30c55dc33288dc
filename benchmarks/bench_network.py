"""Network tier throughput against plain clients, LMCache and the previous kvtier, in one run.

It starts its own ``redis-server`` on a free loopback port (no persistence, allkeys-lru) and a
3-node Redis Cluster, then for each block size (256 KiB and 2 MiB by default) stores and loads
``--total-mib`` of blocks with each of these clients, each in its own process (so that its CPU
time is its own and no allocator setting leaks from one into another):

* ``raw-socket``: a minimal RESP2 client of the benchmark's own on one blocking socket: values
  in one preallocated array (as slots are), ``SET`` sent with ``sendmsg`` of the command head,
  the value and CRLF (no copy), ``GET`` replies read with ``recv_into`` straight into the array,
  ``--window-mib`` of values per round trip. No verification. The plain client to beat;
  ``raw-socket-x2``: two of them in two processes, each over half the blocks, phases started
  together (what the single-threaded server takes from parallel connections);
* ``redis-py``: redis-py 8 with hiredis, one pipeline per window of ready-made ``bytes`` values;
  ``redis-py+malloc``: the same with glibc's ``MALLOC_MMAP_THRESHOLD_=64 MiB`` and
  ``MALLOC_TRIM_THRESHOLD_=1 GiB`` (no page faults per reply);
* ``redis-benchmark``: Redis's own C client, ``-c 1 -P <window>`` with values of the block size;
* ``kvtier``: a manager with a CPU primary tier and one ``network`` tier driven through the
  public API as an engine drives it, one step (ending with ``on_schedule_end``) every
  millisecond: blocks written into primary slots, ``complete_store``, steps until the step that
  collects the tier's job; then ``reset_cache``, a ``lookup`` that starts the promotion of every
  block, and the same ``lookup`` at the start of every step until it answers (every record
  verified), as for a waiting request; ``kvtier@<ref>``: the same script against
  kvtier as it was at git ``--baseline-ref`` (extracted with ``git archive`` into a temporary
  directory);
* LMCache 0.5.6's ``redis://`` and ``resp://`` connectors, under ``--peers-python`` (a Python
  with ``lmcache==0.5.6`` installed): ``batched_put``, then ``batched_get``, once per round
  like every other client (one process per round and block size).

Throughput is the best of ``--repeats`` runs, interleaved (every client once per round, so that
all see the same background load); CPU is the client process's CPU seconds (every thread) per GB
moved, the median over the runs. Then a cluster round (kvtier, kvtier@ref, redis-py's cluster
pipeline), and the time to look up 1,000 keys. Usage::

    python benchmarks/bench_network.py [--total-mib 128] [--repeats 5] \\
        [--peers-python /path/to/python-with-lmcache] [--baseline-ref 284a424] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

GB = 1e9
MiB = 1 << 20
HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
# The kvtier before the bulk path: main when issue 15 was filed.
DEFAULT_BASELINE_REF = "284a424"
STEP_S = 0.001  # the engine's step: the benchmark steps the manager this often
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * MiB), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


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


def run_worker(args: argparse.Namespace) -> int:
    """``--worker``: run one client once and print its result as JSON."""
    logging.basicConfig(level=logging.WARNING)
    size, n, window = args.size, args.blocks, args.window_mib * MiB
    port = int(args.url.rsplit(":", 1)[1].split("/")[0])
    if args.worker == "raw-socket":
        res = client_raw_socket(port, size, n, window)
    elif args.worker == "raw-socket-x2":
        res = client_raw_sockets(port, size, n, window, 2)
    elif args.worker in ("redis-py", "redis-py+malloc"):
        res = client_redis_py(args.url, size, n, window, cluster=args.cluster)
    else:  # kvtier, kvtier@ref (PYTHONPATH says which)
        params: dict[str, Any] = {"cluster": True} if args.cluster else {}
        if args.pool_size:
            params["pool_size"] = args.pool_size
        res = client_kvtier(args.url, size, n, params)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def spawn(name: str, url: str, size: int, n: int, args: argparse.Namespace,
          cluster: bool = False, baseline_src: Path | None = None) -> dict[str, float]:
    """Run one client in a fresh process; its result (or {"error": ...})."""
    env = dict(os.environ)
    if name.endswith("+malloc"):
        env.update(MALLOC_ENV)
    if baseline_src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(baseline_src), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(HERE), "--worker", name, "--url", url, "--size", str(size),
           "--blocks", str(n), "--window-mib", str(args.window_mib),
           "--pool-size", str(args.pool_size or 0)]
    if cluster:
        cmd.append("--cluster")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    return {"error": (res.stderr or res.stdout).strip()[-800:]}


def _fill_benchmark_keys(port: int, size: int, n: int) -> None:
    """Give every key ``redis-benchmark -r n`` may ask for a value of ``size`` bytes.

    Its keys are ``key:`` and 12 digits drawn at random below ``n``: after its own SET run about
    a third of them are still missing (or hold another block size's value), and a GET of those
    answers nil, which it would count as ``size`` bytes moved.
    """
    value = b"v" * size
    with redis.Redis(port=port, socket_timeout=60) as c:
        for i in range(0, n, 16):
            pipe = c.pipeline(transaction=False)
            for j in range(i, min(n, i + 16)):
                pipe.set(b"key:%012d" % j, value)
            pipe.execute()


def _keyspace_misses(port: int) -> int:
    with redis.Redis(port=port) as c:
        return int(c.info("stats")["keyspace_misses"])


def redis_benchmark(port: int, size: int, n: int, window: int) -> dict[str, float]:
    """Redis's own C client: SET then GET of ``n`` values of ``size`` bytes, pipelined.

    Before the GET run every key it can draw holds a value of ``size`` bytes, and the run is
    refused (an error) if any GET missed: nil replies would inflate its rate.
    """
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {"error": "redis-benchmark not on PATH (apt-get install redis-tools)"}
    res: dict[str, float] = {}
    for op, test in (("store", "set"), ("load", "get")):
        if op == "load":
            _fill_benchmark_keys(port, size, n)
            misses = _keyspace_misses(port)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", str(port), "-c", "1", "-P",
             str(max(1, window // size)), "-n", str(n), "-r", str(n), "-d", str(size),
             "-t", test, "--csv"], capture_output=True, text=True, timeout=600)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows = [line.split(",") for line in out.stdout.splitlines() if line.startswith('"')]
        rps = [float(r[1].strip('"')) for r in rows if r[0].strip('"').upper() == test.upper()]
        if not rps:
            return {"error": (out.stderr or out.stdout)[-300:]}
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        if op == "load" and _keyspace_misses(port) != misses:
            return {"error": f"redis-benchmark GET missed {_keyspace_misses(port) - misses} keys"}
        res[op] = rps[0] * size
        res[f"{op}_cpu"] = cpu / (n * size / GB)
    return res


# -- LMCache (its own venv) -------------------------------------------------------------------
_PEER = r'''
import asyncio, json, sys, threading, time, logging
logging.disable(logging.WARNING)
import torch
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
from lmcache.v1.storage_backend.connector.redis_connector import RedisConnector, RESPConnector
from lmcache.utils import CacheEngineKey

port, sizes, total, repeats = (int(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")],
                               int(sys.argv[3]), int(sys.argv[4]))
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()
run = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result()
from importlib.metadata import version
out = {"version": version("lmcache"), "results": {}}

def setup(size, kind):
    chunk = 16
    layers = size // (2 * chunk * 8 * 128 * 2)
    cfg = LMCacheEngineConfig.from_defaults(
        chunk_size=chunk, local_cpu=False, max_local_cpu_size=2 * total / 2**30 + 0.25,
        remote_url=f"{kind}://127.0.0.1:{port}", remote_serde="naive",
        extra_config={"save_chunk_meta": False})
    md = LMCacheMetadata(model_name=f"bench{size}", world_size=1, local_world_size=1,
                         worker_id=0, local_worker_id=0, kv_dtype=torch.bfloat16,
                         kv_shape=(layers, 2, chunk, 8, 128), chunk_size=chunk)
    be = LocalCPUBackend(cfg, md)
    if kind == "redis":
        conn = RedisConnector(f"redis://127.0.0.1:{port}/0", loop, be)
    else:
        conn = RESPConnector("127.0.0.1", port, loop, be)
    assert conn.full_chunk_size_bytes == size, (conn.full_chunk_size_bytes, size)
    return be, conn

for kind in ("redis", "resp"):
    res = {}
    for size in sizes:
        n = max(8, total // size)
        be, conn = setup(size, kind)
        best_w = best_r = 0.0
        cpu_w, cpu_r = [], []
        for rep in range(repeats):
            keys = [CacheEngineKey(f"bench{size}{kind}", 1, 0, rep * n + i, torch.bfloat16)
                    for i in range(n)]
            objs = [be.allocate(conn.meta_shapes, conn.meta_dtypes, conn.meta_fmt)
                    for _ in range(n)]
            for o in objs:
                o.tensor.view(torch.uint8).random_(0, 256)
            t0, c0 = time.perf_counter(), time.process_time()
            run(conn.batched_put(keys, objs))
            best_w = max(best_w, n * size / (time.perf_counter() - t0))
            cpu_w.append((time.process_time() - c0) / (n * size / 1e9))
            t0, c0 = time.perf_counter(), time.process_time()
            if kind == "resp":
                got = run(conn.batched_get(keys))
            else:
                got = run(conn.batched_get_non_blocking("bench", keys))
            best_r = max(best_r, n * size / (time.perf_counter() - t0))
            cpu_r.append((time.process_time() - c0) / (n * size / 1e9))
            assert len(got) == n and all(g is not None for g in got)
            assert torch.equal(got[0].tensor.view(torch.uint8), objs[0].tensor.view(torch.uint8))
            for o in objs + list(got):
                o.ref_count_down()
        cpu_w.sort(); cpu_r.sort()
        res[str(size)] = {"store": best_w, "load": best_r, "store_cpu": cpu_w[len(cpu_w) // 2],
                          "load_cpu": cpu_r[len(cpu_r) // 2]}
    out["results"][kind] = res
# (RedisConnector.close() waits on its own event loop thread and never returns: exit instead.)
print("PEER_JSON " + json.dumps(out), flush=True)
import os
os._exit(0)
'''


def bench_lmcache(python: str, port: int, sizes: list[int], total: int,
                  repeats: int) -> dict[str, Any]:
    """LMCache's redis:// and resp:// connectors on the same server (or the error)."""
    if not Path(python).exists():
        return {"error": f"{python} not found"}
    try:
        res = subprocess.run(
            [python, "-c", _PEER, str(port), ",".join(map(str, sizes)), str(total),
             str(repeats)], capture_output=True, text=True, timeout=900,
        )
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 900 s"}
    for line in res.stdout.splitlines():
        if line.startswith("PEER_JSON "):
            return dict(json.loads(line[len("PEER_JSON "):]))
    tail = (res.stderr or res.stdout).strip().splitlines()[-15:]
    return {"error": f"exit {res.returncode}: " + " | ".join(tail)}


# -- lookups --------------------------------------------------------------------------------
def bench_lookup(url: str, n: int, repeats: int) -> dict[str, float]:
    """Seconds for kvtier's tier to answer a lookup of ``n`` keys it has not seen (one query),
    and for a raw redis-py pipeline of ``n`` EXISTS."""
    import kvtier

    def manager(slots: int) -> Any:
        return kvtier.TieringOffloadingSpec(
            {"cpu_bytes_to_use": slots * 4096,
             "secondary_tiers": [{"type": "network", "url": url, "max_pinned_share": 1.0}]},
            gpu_block_size=16, bytes_per_gpu_block=4096, namespace="bench/lookup",
        ).get_manager()

    keys = [b"%032d" % i for i in range(n)]
    writer = manager(n)
    ctx = kvtier.ReqContext("w")
    out = writer.prepare_store(keys, ctx)
    assert out is not None
    writer.primary_blocks()[out.store_spec.block_ids] = 7
    writer.complete_store(out.keys_to_store, ctx)
    while writer.has_pending_work():
        writer.on_schedule_end()
        time.sleep(0.001)
    prefix = writer.get_stats()["tiers"]["network0"]["key_prefix"].encode()
    writer.shutdown()
    best = float("inf")
    for _ in range(repeats):
        reader = manager(16)
        try:
            tier = reader.tiers[0]
            while tier.lookup([b"absent-key-for-warm-up"]) is None:
                reader.on_schedule_end()
                time.sleep(0.001)
            t0 = time.perf_counter()
            answer = tier.lookup(keys)
            while answer is None:
                time.sleep(0.0001)  # the scheduler does other work between steps
                tier.poll()
                answer = tier.lookup(keys)
            best = min(best, time.perf_counter() - t0)
            assert answer == n
        finally:
            reader.shutdown()
    client = redis.Redis.from_url(url)
    raw = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(prefix + k)
        assert sum(pipe.execute()) == n
        raw = min(raw, time.perf_counter() - t0)
    client.close()
    return {"kvtier": best, "pipeline_exists": raw}


# -- the run --------------------------------------------------------------------------------
def _baseline_src(ref: str, workdir: Path) -> Path | None:
    """``src/`` of kvtier at git ``ref``, extracted into ``workdir`` (None if git cannot)."""
    dest = workdir / "baseline"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"],
                             capture_output=True, timeout=60)
    if archive.returncode != 0:
        print(f"bench_network: git archive {ref} failed: {archive.stderr.decode()[-300:]}",
              file=sys.stderr)
        return None
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


def _collect(acc: dict[str, Any], name: str, res: dict[str, float]) -> None:
    slot = acc.setdefault(name, {"store": 0.0, "load": 0.0, "store_cpu": [], "load_cpu": [],
                                 "errors": []})
    if "error" in res:
        slot["errors"].append(res["error"])
        return
    for op in ("store", "load"):
        slot[op] = max(slot[op], res[op])
        slot[f"{op}_cpu"].append(res[f"{op}_cpu"])


def _finish(acc: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, v in acc.items():
        out[name] = {
            "store": v["store"], "load": v["load"],
            "store_cpu": statistics.median(v["store_cpu"]) if v["store_cpu"] else None,
            "load_cpu": statistics.median(v["load_cpu"]) if v["load_cpu"] else None,
            "errors": v["errors"][:2],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print Markdown tables (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="262144,2097152", help="block sizes in bytes")
    ap.add_argument("--total-mib", type=int, default=128, help="data per client and run")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (every client once each)")
    ap.add_argument("--window-mib", type=int, default=4,
                    help="values per round trip of the plain clients")
    ap.add_argument("--pool-size", type=int, default=0, help="kvtier pool_size (0: default)")
    ap.add_argument("--peers-python", default="",
                    help="a python with lmcache==0.5.6 installed ('' to skip LMCache)")
    ap.add_argument("--baseline-ref", default=DEFAULT_BASELINE_REF,
                    help="git ref of the kvtier to compare with ('' to skip)")
    ap.add_argument("--no-cluster", action="store_true", help="skip the cluster round")
    ap.add_argument("--lookup-keys", type=int, default=1000)
    ap.add_argument("--json", help="also write the results here")
    # worker mode (internal)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--blocks", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cluster", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker(args)

    sizes = [int(s) for s in args.sizes.split(",")]
    total = args.total_mib * MiB
    workdir = Path(tempfile.mkdtemp(prefix="kvtier-bench-redis-"))
    servers = Servers(workdir, cluster=not args.no_cluster)
    url = f"redis://127.0.0.1:{servers.port}/0"
    baseline = _baseline_src(args.baseline_ref, workdir) if args.baseline_ref else None
    old = f"kvtier@{args.baseline_ref}"
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
                   f"Python {platform.python_version()}, redis-py {redis.__version__}",
        "redis_server": servers.version, "sizes": {}, "cluster": {}, "args": vars(args),
    }
    t_start = time.monotonic()
    try:
        acc: dict[int, dict[str, Any]] = {s: {} for s in sizes}
        cacc: dict[int, dict[str, Any]] = {s: {} for s in sizes}
        curl = f"redis://127.0.0.1:{servers.cluster_ports[0]}/0" if servers.cluster_ports else ""
        for rep in range(args.repeats):
            for size in sizes:
                n = max(8, total // size)
                order = ["raw-socket", "raw-socket-x2", "redis-py", "redis-py+malloc",
                         "redis-benchmark", "kvtier"] + ([old] if baseline else [])
                order += ["LMCache"] if args.peers_python else []
                if rep % 2:
                    order.reverse()
                print(f"[round {rep + 1}/{args.repeats}, {size // 1024} KiB x {n}] "
                      + ", ".join(order), flush=True)
                for name in order:
                    if name == "redis-benchmark":
                        r = redis_benchmark(servers.port, size, n, args.window_mib * MiB)
                    elif name == "LMCache":
                        lm = bench_lmcache(args.peers_python, servers.port, [size], total, 1)
                        results["lmcache_version"] = lm.get("version", "")
                        for kind in ("redis", "resp"):
                            r = lm.get("results", {}).get(kind, {}).get(str(size)) or {
                                "error": lm.get("error", "no result")}
                            _collect(acc[size], f"LMCache {kind}://", r)
                        continue
                    else:
                        r = spawn(name, url, size, n, args,
                                  baseline_src=baseline if name == old else None)
                    _collect(acc[size], name, r)
                if curl:
                    for name in ["kvtier", "redis-py"] + ([old] if baseline else []):
                        r = spawn(name, curl, size, n, args, cluster=True,
                                  baseline_src=baseline if name == old else None)
                        _collect(cacc[size], name, r)
        for size in sizes:
            results["sizes"][str(size)] = _finish(acc[size])
            if curl:
                results["cluster"][str(size)] = _finish(cacc[size])
        print(f"[lookup] {args.lookup_keys} keys ...", flush=True)
        results["lookup"] = bench_lookup(url, args.lookup_keys, max(3, args.repeats))
    finally:
        servers.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = time.monotonic() - t_start
    report(results, sizes, old if baseline else None)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _row(name: str, v: dict[str, Any], best: dict[str, float]) -> str:
    cells = []
    for op in ("store", "load"):
        rate, cpu = v.get(op), v.get(f"{op}_cpu")
        if not rate:
            cells += ["n/a", "", ""]
            continue
        cells += [f"{rate / GB:.2f}", f"{rate / best[op]:.2f}",
                  "" if cpu is None else f"{cpu:.2f}"]
    return f"| {name} | " + " | ".join(cells) + " |"


def report(results: dict[str, Any], sizes: list[int], old: str | None) -> None:
    """Print the tables: GB/s, ratio to the best plain client, CPU s/GB per client."""
    print(f"\nMachine: {results['machine']}; redis-server {results['redis_server']}; "
          f"{results['seconds']:.0f} s.")
    plain = ("raw-socket", "raw-socket-x2", "redis-py", "redis-py+malloc", "redis-benchmark")
    for size in sizes:
        r = dict(results["sizes"][str(size)])
        best = {op: max(r[p][op] for p in plain if r.get(p) and r[p].get(op))
                for op in ("store", "load")}
        print(f"\n{size // 1024} KiB blocks (x best plain: store {best['store'] / GB:.2f}, "
              f"load {best['load'] / GB:.2f} GB/s)\n")
        print("| client | store GB/s | x best plain | CPU s/GB | load GB/s | x best plain |"
              " CPU s/GB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, v in r.items():
            print(_row(name, v, best))
        k = r.get("kvtier", {})
        for other, factor in (("LMCache resp://", 1.2), (old, 2.0)):
            o = r.get(other or "")
            if other and o and k and o.get("store") and o.get("load"):
                print(f"\nkvtier / {other}: store {k['store'] / o['store']:.2f}x, "
                      f"load {k['load'] / o['load']:.2f}x ({factor:g}x {other} is "
                      f"{factor * o['store'] / best['store']:.2f} / "
                      f"{factor * o['load'] / best['load']:.2f} of the best plain client)")
        for name, v in r.items():
            if v.get("errors"):
                print(f"\n{name} failed: {v['errors'][0]}")
    for size in sizes:
        c = results.get("cluster", {}).get(str(size))
        if not c:
            continue
        best = {op: c["redis-py"][op] or 1.0 for op in ("store", "load")}
        print(f"\nRedis Cluster (3 nodes), {size // 1024} KiB blocks (x redis-py cluster "
              "pipeline)\n")
        print("| client | store GB/s | x redis-py | CPU s/GB | load GB/s | x redis-py |"
              " CPU s/GB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, v in c.items():
            print(_row(name, v, best))
    lk = results["lookup"]
    print(f"\nLookup of {results['args']['lookup_keys']} keys: kvtier "
          f"{lk['kvtier'] * 1e3:.2f} ms, redis-py pipeline of EXISTS "
          f"{lk['pipeline_exists'] * 1e3:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
