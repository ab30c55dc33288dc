"""The other clients ``bench_network.py`` compares with, each run as its own program: Redis's own
``redis-benchmark`` and LMCache 0.5.6's ``redis://`` and ``resp://`` connectors (under a Python
that has LMCache installed).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
from pathlib import Path
from typing import Any

import redis
from network_clients import GB


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

