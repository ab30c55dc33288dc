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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from network_clients import (
    GB,
    MiB,
    Servers,
    client_kvtier,
    client_raw_socket,
    client_raw_sockets,
    client_redis_py,
)
from network_peers import bench_lmcache, redis_benchmark

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
# The kvtier before the bulk path: main when issue 15 was filed.
DEFAULT_BASELINE_REF = "284a424"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * MiB), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


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
