"""Network tier throughput and lookup latency against a raw redis-py pipeline, in the same run.

It starts its own ``redis-server`` on a free loopback port (no persistence, allkeys-lru) and, for
each block size (256 KiB and 2 MiB by default), measures on that one server:

* raw: one redis-py pipeline of ``SET key value`` for every block (values are ready-made
  ``bytes``), then one pipeline of ``GET`` for them: what a user of redis-py writes by hand;
* kvtier: a manager with a CPU primary tier big enough for the data and one ``network`` tier,
  driven through the public API: the blocks are written into primary slots and
  ``complete_store`` hands them to the tier (stores: until the cascade job is done); then
  ``reset_cache`` and ``lookup`` until the tier has promoted every block back (loads; every record
  is verified);
* LMCache 0.5.6's Redis connectors (``redis://`` and ``resp://``), run as a subprocess under
  ``--peers-python`` (its ``batched_put``, ``batched_get`` and contains calls on the same server).

Then the time to look up 1,000 keys: the tier's query (fresh presence cache), a raw pipeline of
1,000 ``EXISTS``, one multi-key ``EXISTS``, and LMCache's contains calls. Ratios are kvtier /
raw. Usage::

    python benchmarks/bench_network.py [--total-mib 128] [--repeats 3] \\
        [--peers-python /work/peers-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis

import kvtier

GiB = 1 << 30
MiB = 1 << 20


# -- the server -----------------------------------------------------------------------------
def _free_port() -> int:
    while True:
        port = random.randint(20000, 60000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class Server:
    """A redis-server of our own on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("bench_network: redis-server is not on PATH (apt-get install redis-server)")
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--maxmemory", "6gb",
             "--maxmemory-policy", "allkeys-lru", "--protected-mode", "no",
             "--logfile", str(workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=self.port, socket_timeout=1) as c:
                    c.ping()
                    self.version = c.info("server")["redis_version"]
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def url(self) -> str:
        """redis:// URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A plain redis-py client."""
        return redis.Redis(port=self.port, socket_timeout=60)

    def stop(self) -> None:
        """Stop it."""
        self.proc.terminate()
        self.proc.wait(timeout=10)


# -- raw redis-py ---------------------------------------------------------------------------
def bench_raw(server: Server, size: int, n: int, repeats: int) -> dict[str, float]:
    """Best store and load throughput (bytes/s) of plain pipelines of SET and GET."""
    rng = np.random.default_rng(1)
    values = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(n)]
    keys = [b"raw:%d:%d" % (size, i) for i in range(n)]
    client = server.client()
    best_w = best_r = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for k, v in zip(keys, values):
            pipe.set(k, v)
        pipe.execute()
        best_w = max(best_w, n * size / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        out = pipe.execute()
        best_r = max(best_r, n * size / (time.perf_counter() - t0))
        assert out[0] == values[0]
    client.delete(*keys)
    client.close()
    return {"store": best_w, "load": best_r}


def bench_raw_lookup(server: Server, keys: list[bytes], repeats: int) -> dict[str, float]:
    """Seconds to check ``keys``: a pipeline of EXISTS per key, and one multi-key EXISTS."""
    client = server.client()
    pipe_t = multi_t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.exists(k)
        found = pipe.execute()
        pipe_t = min(pipe_t, time.perf_counter() - t0)
        assert sum(found) == len(keys)
        t0 = time.perf_counter()
        assert client.exists(*keys) == len(keys)
        multi_t = min(multi_t, time.perf_counter() - t0)
    client.close()
    return {"pipeline_exists": pipe_t, "multi_key_exists": multi_t}


# -- kvtier ---------------------------------------------------------------------------------
def _manager(url: str, size: int, slots: int, namespace: str, **params: Any) -> Any:
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": slots * size,
         "secondary_tiers": [{"type": "network", "url": url, **params}]},
        gpu_block_size=16, bytes_per_gpu_block=size, namespace=namespace,
    )
    return spec.get_manager()


def _steps(manager: Any, cond: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        manager.on_schedule_end()
        if time.monotonic() > deadline:
            raise TimeoutError("the tier did not finish")
        time.sleep(0.0005)


def bench_kvtier(server: Server, size: int, n: int, repeats: int,
                 params: dict[str, Any]) -> dict[str, Any]:
    """Best store and load throughput (bytes/s) through a manager with a network tier."""
    m = _manager(server.url, size, n, f"bench/{size}/{time.time_ns()}", **params)
    region = m.primary_blocks()
    rng = np.random.default_rng(2)
    ctx = kvtier.ReqContext("bench")
    best_w = best_r = 0.0
    try:
        for rep in range(repeats):
            keys = [b"%032d" % (rep * n + i) for i in range(n)]
            out = m.prepare_store(keys, ctx)
            assert out is not None and len(out.keys_to_store) == n
            for slot in out.store_spec.block_ids:
                region[slot] = rng.integers(0, 256, size, dtype=np.uint8)
            expect = region[out.store_spec.block_ids[:4]].copy()
            t0 = time.perf_counter()
            m.complete_store(out.keys_to_store, ctx)
            _steps(m, lambda: not m.has_pending_work())
            best_w = max(best_w, n * size / (time.perf_counter() - t0))
            m.on_schedule_end()
            m.reset_cache()
            t0 = time.perf_counter()
            got: list[int | None] = [None]

            def done(keys: list[bytes] = keys, got: list[int | None] = got) -> bool:
                got[0] = m.lookup(keys, ctx)
                return got[0] is not None
            _steps(m, done)
            best_r = max(best_r, n * size / (time.perf_counter() - t0))
            assert got[0] == n, got
            spec = m.prepare_load(keys[:4], ctx)
            assert np.array_equal(region[spec.block_ids], expect)
            m.complete_load(keys[:4], ctx)
        stats = m.get_stats()["tiers"]["network0"]
        assert stats["corrupt"] == 0 and stats["load_failures"] == 0
        assert stats["store_failures"] == 0
    finally:
        m.shutdown()
    return {"store": best_w, "load": best_r}


def bench_kvtier_lookup(server: Server, n: int, repeats: int) -> dict[str, Any]:
    """Seconds for the tier to answer a lookup of ``n`` keys it has not seen (one query)."""
    size = 4096
    ns = f"bench/lookup/{time.time_ns()}"
    writer = _manager(server.url, size, 64, ns)
    keys = [b"%032d" % i for i in range(n)]
    region = writer.primary_blocks()
    ctx = kvtier.ReqContext("w")
    for i in range(0, n, 32):
        out = writer.prepare_store(keys[i:i + 32], ctx)
        while out is None:
            writer.on_schedule_end()
            out = writer.prepare_store(keys[i:i + 32], ctx)
        region[out.store_spec.block_ids] = 7
        writer.complete_store(out.keys_to_store, ctx)
        writer.on_schedule_end()
    _steps(writer, lambda: not writer.has_pending_work())
    prefix = writer.get_stats()["tiers"]["network0"]["key_prefix"].encode()
    writer.shutdown()
    best = float("inf")
    for _ in range(repeats):
        reader = _manager(server.url, size, 16, ns)
        try:
            tier = reader.tiers[0]
            probe = [b"absent-key-for-warm-up"]
            _steps(reader, lambda tier=tier, probe=probe: tier.lookup(probe) is not None)
            answer: list[int | None] = [None]
            t0 = time.perf_counter()
            answer[0] = tier.lookup(keys)
            while answer[0] is None:
                time.sleep(0.0001)  # the scheduler does other work between steps
                tier.poll()
                answer[0] = tier.lookup(keys)
            best = min(best, time.perf_counter() - t0)
            assert answer[0] == n
        finally:
            reader.shutdown()
    return {"kvtier": best, "redis_keys": [prefix + k for k in keys]}


# -- LMCache (subprocess under its own venv) ------------------------------------------------
_PEER = r'''
import asyncio, json, sys, threading, time, logging
logging.disable(logging.WARNING)
import torch
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
from lmcache.v1.storage_backend.connector.redis_connector import RedisConnector, RESPConnector
from lmcache.utils import CacheEngineKey

port, sizes, total, repeats, nlookup = (int(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")],
                                        int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
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
        for rep in range(repeats):
            keys = [CacheEngineKey(f"bench{size}{kind}", 1, 0, rep * n + i, torch.bfloat16)
                    for i in range(n)]
            objs = [be.allocate(conn.meta_shapes, conn.meta_dtypes, conn.meta_fmt)
                    for _ in range(n)]
            for o in objs:
                o.tensor.view(torch.uint8).random_(0, 256)
            t0 = time.perf_counter()
            run(conn.batched_put(keys, objs))
            best_w = max(best_w, n * size / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            if kind == "resp":
                got = run(conn.batched_get(keys))
            else:
                got = run(conn.batched_get_non_blocking("bench", keys))
            best_r = max(best_r, n * size / (time.perf_counter() - t0))
            assert len(got) == n and all(g is not None for g in got)
            assert torch.equal(got[0].tensor.view(torch.uint8), objs[0].tensor.view(torch.uint8))
            for o in objs + list(got):
                o.ref_count_down()
        res[str(size)] = {"store": best_w, "load": best_r}
    # lookups of nlookup stored chunks of the first size (store the ones still missing)
    be, conn = setup(sizes[0], kind)
    keys = [CacheEngineKey(f"bench{sizes[0]}{kind}", 1, 0, i, torch.bfloat16) for i in range(nlookup)]
    stored = repeats * max(8, total // sizes[0])
    if stored < nlookup:
        objs = [be.allocate(conn.meta_shapes, conn.meta_dtypes, conn.meta_fmt) for _ in range(64)]
        for i in range(stored, nlookup, 64):
            batch = keys[i:i + 64]
            run(conn.batched_put(batch, objs[:len(batch)]))
    best = float("inf")
    for rep in range(repeats):
        t0 = time.perf_counter()
        if kind == "resp":
            found = conn.batched_contains(keys)
        else:
            found = run(conn.batched_async_contains("bench", keys))
        best = min(best, time.perf_counter() - t0)
    res["lookup"] = {"seconds": best, "found": found}
    out["results"][kind] = res
# (RedisConnector.close() waits on its own event loop thread and never returns: exit instead.)
print("PEER_JSON " + json.dumps(out), flush=True)
import os
os._exit(0)
'''


def bench_lmcache(python: str, server: Server, sizes: list[int], total: int, repeats: int,
                  nlookup: int) -> dict[str, Any]:
    """LMCache's redis:// and resp:// connectors on the same server (or the error)."""
    if not Path(python).exists():
        return {"error": f"{python} not found"}
    try:
        res = subprocess.run(
            [python, "-c", _PEER, str(server.port), ",".join(map(str, sizes)), str(total),
             str(repeats), str(nlookup)],
            capture_output=True, text=True, timeout=600,
        )
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 600 s"}
    for line in res.stdout.splitlines():
        if line.startswith("PEER_JSON "):
            return dict(json.loads(line[len("PEER_JSON "):]))
    tail = (res.stderr or res.stdout).strip().splitlines()[-15:]
    return {"error": f"exit {res.returncode}: " + " | ".join(tail)}


# -- report ---------------------------------------------------------------------------------
def _gbps(x: float) -> str:
    return f"{x / GiB:.2f}"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a Markdown report (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="262144,2097152", help="block sizes in bytes")
    ap.add_argument("--total-mib", type=int, default=128, help="data per size and repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lookup-keys", type=int, default=1000)
    ap.add_argument("--pool-size", type=int, default=4, help="the tier's pool_size")
    ap.add_argument("--peers-python", default="/work/peers-venv/bin/python",
                    help="python with lmcache==0.5.6 installed ('' to skip)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = [int(s) for s in args.sizes.split(",")]
    total = args.total_mib * MiB

    workdir = Path(tempfile.mkdtemp(prefix="kvtier-bench-redis-"))
    server = Server(workdir)
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
                   f"Python {platform.python_version()}, redis-py {redis.__version__}",
        "redis_server": server.version, "sizes": {}, "args": vars(args),
    }
    try:
        for size in sizes:
            n = max(8, total // size)
            raw = {"store": 0.0, "load": 0.0}
            tier = {"store": 0.0, "load": 0.0}
            # Interleaved, so that both see the same background load; best of the repeats.
            for rep in range(args.repeats):
                print(f"[{size // 1024} KiB] repeat {rep + 1}/{args.repeats}: {n} blocks, raw "
                      "pipeline, then kvtier ...", flush=True)
                r = bench_raw(server, size, n, 1)
                t = bench_kvtier(server, size, n, 1, {"pool_size": args.pool_size})
                for op in ("store", "load"):
                    raw[op] = max(raw[op], r[op])
                    tier[op] = max(tier[op], t[op])
            results["sizes"][str(size)] = {"blocks": n, "raw": raw, "kvtier": tier}
        print(f"[lookup] {args.lookup_keys} keys ...", flush=True)
        lk = bench_kvtier_lookup(server, args.lookup_keys, max(3, args.repeats))
        raw_lk = bench_raw_lookup(server, lk.pop("redis_keys"), max(3, args.repeats))
        results["lookup"] = {"kvtier": lk["kvtier"], **raw_lk}
        if args.peers_python:
            print("[lmcache] redis:// and resp:// connectors (subprocess) ...", flush=True)
            results["lmcache"] = bench_lmcache(args.peers_python, server, sizes, total,
                                               args.repeats, args.lookup_keys)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    lm = results.get("lmcache", {})
    lmr = lm.get("results", {})
    print()
    print(f"Machine: {results['machine']}; redis-server {results['redis_server']}, one server "
          "on loopback, started by the benchmark.")
    print()
    print("| block | op | raw redis-py pipeline GiB/s | kvtier GiB/s | kvtier / raw |"
          " LMCache redis:// GiB/s (/raw) | LMCache resp:// GiB/s (/raw) |")
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        r = results["sizes"][str(size)]
        for op in ("store", "load"):
            raw_v, tier_v = r["raw"][op], r["kvtier"][op]
            cells = []
            for kind in ("redis", "resp"):
                v = lmr.get(kind, {}).get(str(size), {}).get(op)
                cells.append("n/a" if v is None else f"{_gbps(v)} ({v / raw_v:.2f})")
            print(f"| {size // 1024} KiB | {op} | {_gbps(raw_v)} | {_gbps(tier_v)} | "
                  f"{tier_v / raw_v:.2f} | {cells[0]} | {cells[1]} |")
    lk = results["lookup"]
    print()
    print(f"Lookup of {args.lookup_keys} keys (ms): kvtier {lk['kvtier'] * 1e3:.2f}; "
          f"raw pipeline of EXISTS {lk['pipeline_exists'] * 1e3:.2f} "
          f"(kvtier / raw {lk['kvtier'] / lk['pipeline_exists']:.2f}); one multi-key EXISTS "
          f"{lk['multi_key_exists'] * 1e3:.2f}", end="")
    for kind in ("redis", "resp"):
        v = lmr.get(kind, {}).get("lookup", {}).get("seconds")
        if v is not None:
            print(f"; LMCache {kind}:// {v * 1e3:.2f}", end="")
    print()
    if "error" in lm:
        print(f"\nLMCache could not run: {lm['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
