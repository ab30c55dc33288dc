"""Storage tier throughput against raw parallel O_DIRECT I/O on the same disk, in the same run.

For each block size (256 KiB and 2 MiB by default) it measures, on the same directory:

* raw: N threads, each writing then reading its own file (laid out with fallocate first, as fio
  does) with O_DIRECT ``pwritev``/``preadv`` of one block at a time from an aligned buffer (what
  ``fio --direct=1 --numjobs=N --rw=write`` then ``--rw=read`` measures); N is the number of I/O
  threads the tier uses (readers + writers);
* kvtier tier: the ``storage`` tier driven through its contract (``submit_store``/
  ``submit_load``/``poll``), jobs of ``--job-blocks`` blocks, up to ``--jobs-in-flight`` jobs at a
  time, polled like an engine step loop; loads verify every checksum;
* kvtier manager: the same tier behind kvtier's manager, driven with the engine's calls
  (``prepare_store``/``complete_store``, then ``lookup`` until promoted, one step at a time);
* vLLM 0.33's ``fs`` tier (one file per block) through its ``TieringOffloadingManager``, when vLLM
  imports;
* LMCache 0.5.6's ``LocalDiskBackend``, run as a subprocess under ``--peers-python`` when given.

Then it times the index rebuild of a tier holding ``--rebuild-blocks`` small blocks.
Ratios are tier / raw from the same run. Usage::

    python benchmarks/bench_storage.py --dir /work/bench-storage [--sizes 262144,2097152]
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

MiB = 1 << 20
JOB_BLOCKS = 32  # blocks per job / per request


def _progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# -- raw ---------------------------------------------------------------------------------------
def raw_throughput(directory: str, block: int, threads: int, total: int) -> tuple[float, float]:
    """(write GB/s, read GB/s) of ``threads`` threads doing O_DIRECT I/O on their own files."""
    per = max(1, total // threads // block)
    paths = [os.path.join(directory, f"raw-{i}") for i in range(threads)]

    for p in paths:  # lay the files out first, as fio does (fallocate) before a write job
        fd = os.open(p, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, per * block)
        finally:
            os.close(fd)

    def run(mode: str) -> float:
        barrier = threading.Barrier(threads + 1)

        def work(i: int) -> None:
            buf = mmap.mmap(-1, block)
            buf.write(os.urandom(block))
            fd = os.open(paths[i], os.O_RDWR | os.O_DIRECT)
            barrier.wait()
            try:
                for j in range(per):
                    if mode == "w":
                        os.pwritev(fd, [buf], j * block)
                    else:
                        os.preadv(fd, [buf], j * block)
            finally:
                os.close(fd)

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        return per * threads * block / (time.perf_counter() - t0) / 1e9

    try:
        return run("w"), run("r")
    finally:
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)


# -- kvtier ------------------------------------------------------------------------------------
def _primary(slots: int, block: int) -> np.ndarray:
    buf = mmap.mmap(-1, slots * block)
    arr = np.frombuffer(buf, dtype=np.uint8).reshape(slots, block)
    arr[:] = np.random.default_rng(0).integers(0, 256, (slots, block), dtype=np.uint8)
    return arr


def _drive(tier: Any, submit: Callable[[int, list[bytes], np.ndarray], None], keys: list[bytes],
           slots: int, job_blocks: int, in_flight: int) -> tuple[float, int]:
    """Submit ``keys`` in jobs, at most ``in_flight`` at a time; returns (seconds, failed keys)."""
    jobs = [keys[i : i + job_blocks] for i in range(0, len(keys), job_blocks)]
    pending: set[int] = set()
    failed = 0
    next_slot = 0
    t0 = time.perf_counter()
    j = 0
    while j < len(jobs) or pending:
        while j < len(jobs) and len(pending) < in_flight:
            ks = jobs[j]
            sl = (np.arange(len(ks)) + next_slot) % slots
            next_slot = (next_slot + len(ks)) % slots
            submit(j + 1, ks, sl)
            pending.add(j + 1)
            j += 1
        for res in tier.poll():
            pending.discard(res.job_id)
            failed += len(res.failed_keys)
        time.sleep(0.0002)  # an engine step's worth of other work
    return time.perf_counter() - t0, failed


def kvtier_throughput(directory: str, block: int, total: int, args: argparse.Namespace
                      ) -> tuple[float, float]:
    """(write GB/s, read GB/s) of the storage tier through submit_store/submit_load/poll."""
    from kvtier.format.record import namespace_fingerprint
    from kvtier.tiers.base import TierContext
    from kvtier.tiers.storage import StorageTier

    n = max(1, total // block)
    slots = min(n, args.jobs_in_flight * args.job_blocks)
    primary = _primary(slots, block)
    ns = f"bench/{block}"
    ctx = TierContext(ns, namespace_fingerprint(ns), block, primary, "storage0")
    path = os.path.join(directory, "kvtier")
    shutil.rmtree(path, ignore_errors=True)
    tier = StorageTier(ctx, path=path, capacity_bytes=2 * n * (block + 8192),
                       n_read_threads=args.threads // 2, n_write_threads=args.threads - args.threads // 2)
    try:
        keys = [i.to_bytes(8, "little") * 4 for i in range(n)]
        dt_w, fw = _drive(tier, tier.submit_store, keys, slots, args.job_blocks, args.jobs_in_flight)
        dt_r, fr = _drive(tier, tier.submit_load, keys, slots, args.job_blocks, args.jobs_in_flight)
        st = tier.stats()
        if fw or fr or st["corrupt"]:
            raise RuntimeError(f"storage tier failed keys: store {fw}, load {fr}, stats {st}")
        return n * block / dt_w / 1e9, n * block / dt_r / 1e9
    finally:
        tier.shutdown()
        shutil.rmtree(path, ignore_errors=True)


def rebuild_seconds(directory: str, blocks: int, block: int) -> float:
    """Index rebuild time of a tier holding ``blocks`` blocks of ``block`` bytes."""
    from kvtier.format.record import namespace_fingerprint
    from kvtier.tiers.base import TierContext
    from kvtier.tiers.storage import StorageTier

    slots = 256
    primary = _primary(slots, block)
    ns = "bench/rebuild"
    ctx = TierContext(ns, namespace_fingerprint(ns), block, primary, "storage0")
    path = os.path.join(directory, "rebuild")
    shutil.rmtree(path, ignore_errors=True)
    cap = blocks * (block + 8192) + 64 * MiB
    tier = StorageTier(ctx, path=path, capacity_bytes=cap)
    try:
        keys = [i.to_bytes(8, "little") * 4 for i in range(blocks)]
        _, failed = _drive(tier, tier.submit_store, keys, slots, 256, 1)
        assert failed == 0 and tier.stats()["blocks"] == blocks
    finally:
        tier.shutdown()
    os.sync()
    tier = StorageTier(ctx, path=path, capacity_bytes=cap)
    try:
        st = tier.stats()
        assert st["blocks"] == blocks, st
        return float(st["index_rebuild_seconds"])
    finally:
        tier.shutdown()
        shutil.rmtree(path, ignore_errors=True)


def kvtier_manager_throughput(directory: str, block: int, total: int, args: argparse.Namespace
                              ) -> tuple[float, float]:
    """(write GB/s, read GB/s) through kvtier's manager: the engine's calls, cascades, promotions."""
    import kvtier

    n = max(1, total // block)
    path = os.path.join(directory, "kvtier-manager")
    shutil.rmtree(path, ignore_errors=True)
    half = args.threads // 2
    cfg = {"cpu_bytes_to_use": 2 * args.jobs_in_flight * JOB_BLOCKS * block, "secondary_tiers": [
        {"type": "storage", "path": path, "capacity_bytes": 2 * n * (block + 8192),
         "n_read_threads": half, "n_write_threads": args.threads - half}]}
    spec = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=block,
                                        namespace=f"bench/{block}")
    m = spec.get_manager()
    m.primary_blocks()[:] = 1  # an engine's worker has written the slots before they are stored
    keys = [i.to_bytes(8, "little") * 4 for i in range(n)]
    try:
        t0 = time.perf_counter()
        for j in range(0, n, JOB_BLOCKS):
            ctx = kvtier.ReqContext(f"w{j}")
            batch = keys[j : j + JOB_BLOCKS]
            out = m.prepare_store(batch, ctx)
            while out is None:  # every slot is still being written out: next step
                m.on_schedule_end()
                time.sleep(0.0002)
                out = m.prepare_store(batch, ctx)
            m.complete_store(out.keys_to_store, ctx)
            m.on_schedule_end()
        while m.has_pending_work():
            m.on_schedule_end()
            time.sleep(0.0002)
        dt_w = time.perf_counter() - t0
        m.reset_cache()
        t0 = time.perf_counter()
        pending: dict[str, list[bytes]] = {}
        nxt = 0
        served = 0
        while nxt < n or pending:
            while nxt < n and len(pending) < args.jobs_in_flight:
                pending[f"r{nxt}"] = keys[nxt : nxt + JOB_BLOCKS]
                nxt += JOB_BLOCKS
            for rid, batch in list(pending.items()):
                r = m.lookup(batch, kvtier.ReqContext(rid))
                if r is not None:
                    served += r
                    del pending[rid]
            m.on_schedule_end()
            time.sleep(0.0002)
        dt_r = time.perf_counter() - t0
        if served != n:
            raise RuntimeError(f"kvtier manager served {served} of {n} blocks")
        return n * block / dt_w / 1e9, n * block / dt_r / 1e9
    finally:
        m.shutdown()
        shutil.rmtree(path, ignore_errors=True)


def vllm_throughput(directory: str, block: int, total: int, args: argparse.Namespace
                    ) -> tuple[float, float]:
    """(write GB/s, read GB/s) of vLLM 0.33's fs tier through its TieringOffloadingManager."""
    from vllm.v1.kv_offload.base import LookupResult, ReqContext, ScheduleEndContext, make_offload_key
    from vllm.v1.kv_offload.config import (
        OffloadingCacheConfig,
        OffloadingConfig,
        OffloadingGroupConfig,
        OffloadingModelConfig,
        OffloadingParallelConfig,
    )
    from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec as VllmSpec

    n = max(1, total // block)
    root = os.path.join(directory, "vllm-fs")
    shutil.rmtree(root, ignore_errors=True)
    half = args.threads // 2
    extra = {"cpu_bytes_to_use": 2 * args.jobs_in_flight * JOB_BLOCKS * block, "secondary_tiers": [
        {"type": "fs", "root_dir": root, "n_read_threads": half, "n_write_threads": args.threads - half}]}
    cfg = OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=("layer0",), group_id=0),),
        worker_kv_bytes_per_block=block, enable_kv_cache_events=False, extra_config=extra,
        engine_id=f"bench-storage-{os.getpid()}-{block}",
        model=OffloadingModelConfig(name="bench", dtype="bfloat16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(
            rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1,
            data_parallel_index=0, data_parallel_size=1, data_parallel_rank_local=None,
            is_parallelism_agnostic=True),
    )
    spec = VllmSpec(cfg)
    m: Any = spec.get_manager()  # a TieringOffloadingManager
    region = np.frombuffer(m.primary_tier.get_kv_memoryview().cast("B"), dtype=np.uint8)
    region[:] = 1  # as for kvtier: the slots hold written KV data before they are stored
    del region
    step = ScheduleEndContext((), ())
    keys = [make_offload_key(i.to_bytes(8, "little") * 4, 0) for i in range(n)]
    try:
        t0 = time.perf_counter()
        for j in range(0, n, JOB_BLOCKS):
            ctx = ReqContext(req_id=f"w{j}")
            m.on_new_request(ctx)
            batch = keys[j : j + JOB_BLOCKS]
            out = m.prepare_store(batch, ctx)
            while out is None:
                m.on_schedule_end(step)
                time.sleep(0.0002)
                out = m.prepare_store(batch, ctx)
            m.complete_store(out.keys_to_store, ctx)
            m.on_request_finished(ctx)
            m.on_schedule_end(step)
        while m.has_pending_work():
            m.on_schedule_end(step)
            time.sleep(0.0002)
        dt_w = time.perf_counter() - t0
        m.reset_cache()
        m.on_reset_flushed()
        m.on_schedule_end(step)
        t0 = time.perf_counter()
        pending: dict[str, tuple[Any, list[Any]]] = {}
        nxt = 0
        hits = 0
        while nxt < n or pending:
            while nxt < n and len(pending) < args.jobs_in_flight:
                ctx = ReqContext(req_id=f"r{nxt}")
                m.on_new_request(ctx)
                pending[ctx.req_id] = (ctx, list(keys[nxt : nxt + JOB_BLOCKS]))
                nxt += JOB_BLOCKS
            for rid, (ctx, batch) in list(pending.items()):
                left = []
                for k in batch:
                    r = m.lookup(k, ctx)
                    if r is LookupResult.HIT:
                        hits += 1
                    elif r is not LookupResult.MISS:
                        left.append(k)
                if left:
                    pending[rid] = (ctx, left)
                else:
                    m.on_request_finished(ctx)
                    del pending[rid]
            m.on_schedule_end(step)
            time.sleep(0.0002)
        dt_r = time.perf_counter() - t0
        if hits != n:
            raise RuntimeError(f"vLLM fs tier served {hits} of {n} blocks")
        return n * block / dt_w / 1e9, n * block / dt_r / 1e9
    finally:
        m.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def lmcache_worker(directory: str, block: int, total: int, threads: int) -> dict[str, Any]:
    """Under LMCache's venv: its LocalDiskBackend's write/read GB/s and blocks found after restart."""
    import asyncio

    import torch
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_allocators.host_memory_allocator import HostMemoryAllocator
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend

    logging.getLogger("lmcache").setLevel(logging.ERROR)
    n = max(1, total // block)
    path = os.path.join(directory, "lmcache") + "/"
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    cfg = LMCacheEngineConfig.from_defaults(
        chunk_size=256, local_cpu=False, max_local_cpu_size=2.0, local_disk="file://" + path,
        max_local_disk_size=2 * n * block / 2**30, extra_config={"disk_io_threads": threads})
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def backend() -> tuple[Any, Any]:
        cpu = LocalCPUBackend(cfg, memory_allocator=HostMemoryAllocator(
            2 * JOB_BLOCKS * 8 * block + (64 << 20)))
        return cpu, LocalDiskBackend(cfg, loop, cpu, dst_device="cpu")

    cpu, disk = backend()
    shape, dtype = torch.Size([block // 2]), torch.bfloat16
    keys = [CacheEngineKey("bench", 1, 0, i, dtype) for i in range(n)]
    objs = [cpu.allocate(shape, dtype, MemoryFormat.KV_2LTD) for _ in range(JOB_BLOCKS * 8)]
    t0 = time.perf_counter()
    for i, k in enumerate(keys):
        disk.submit_put_task(k, objs[i % len(objs)])
    deadline = time.monotonic() + 300
    while sum(1 for k in keys if disk.contains(k)) < n and time.monotonic() < deadline:
        time.sleep(0.0005)
    dt_w = time.perf_counter() - t0
    stored = sum(1 for k in keys if disk.contains(k))
    os.sync()
    for name in os.listdir(path):  # its files are buffered: read them from the disk, not the cache
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    t0 = time.perf_counter()
    got = 0
    for i in range(0, n, JOB_BLOCKS):
        for r in disk.batched_get_blocking(keys[i : i + JOB_BLOCKS]):
            if r is not None:
                got += 1
                r.ref_count_down()
    dt_r = time.perf_counter() - t0
    disk.close()
    _cpu2, disk2 = backend()  # a restarted engine on the same directory
    after = sum(1 for k in keys if disk2.contains(k))
    disk2.close()
    shutil.rmtree(path, ignore_errors=True)
    return {"write_gbps": n * block / dt_w / 1e9, "read_gbps": n * block / dt_r / 1e9,
            "stored": stored, "read": got, "after_restart": after, "blocks": n}


def lmcache_throughput(directory: str, block: int, total: int, args: argparse.Namespace
                       ) -> tuple[float, float]:
    """Run ``lmcache_worker`` as a subprocess under ``--peers-python``."""
    cmd = [args.peers_python, os.path.abspath(__file__), "--lmcache-worker", "--dir", directory,
           "--sizes", str(block), "--total-mib", str(total // MiB), "--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"LMCache worker failed (rc={r.returncode}): {r.stderr.strip()[-400:]}")
    res = json.loads(lines[-1])
    LMCACHE_NOTES.append(
        f"LMCache {block >> 10} KiB: wrote {res['stored']}/{res['blocks']} blocks, read back "
        f"{res['read']}, found {res['after_restart']} after a restart on the same directory")
    return res["write_gbps"], res["read_gbps"]


LMCACHE_NOTES: list[str] = []


def main() -> None:
    """Run the storage benchmark and print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/work/bench-storage", help="directory on the disk to measure")
    ap.add_argument("--sizes", default=f"{256 << 10},{2 << 20}", help="block sizes in bytes")
    ap.add_argument("--total-mib", type=int, default=1024, help="data per measurement")
    ap.add_argument("--threads", type=int, default=16, help="I/O threads (readers + writers)")
    ap.add_argument("--job-blocks", type=int, default=JOB_BLOCKS, help="blocks per tier job")
    ap.add_argument("--jobs-in-flight", type=int, default=8)
    ap.add_argument("--rebuild-blocks", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per system, each paired with a raw run")
    ap.add_argument("--peers-python", default="/work/peers-venv/bin/python",
                    help="python of a venv with lmcache==0.5.6 ('' to skip LMCache)")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM's fs tier")
    ap.add_argument("--json", help="also write results here")
    ap.add_argument("--lmcache-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lmcache_worker:
        print(json.dumps(lmcache_worker(args.dir, int(args.sizes), args.total_mib * MiB, args.threads)))
        return
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("vllm").setLevel(logging.ERROR)
    os.makedirs(args.dir, exist_ok=True)
    st = os.statvfs(args.dir)
    df = subprocess.run(["df", "--output=source,fstype", args.dir], capture_output=True, text=True)
    dev = " ".join(df.stdout.split()[2:4])
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"{platform.platform()}")
    print(f"disk: {args.dir} on {dev}, free {st.f_bavail * st.f_frsize / 2**30:.1f} GiB")
    print(f"{args.threads} I/O threads everywhere; jobs of {args.job_blocks} blocks, "
          f"{args.jobs_in_flight} in flight; {args.total_mib} MiB per measurement, {args.repeat} runs")
    total = args.total_mib * MiB
    systems: list[tuple[str, Callable[..., tuple[float, float]]]] = [
        ("raw O_DIRECT", lambda d, b, t, a: raw_throughput(d, b, a.threads, t)),
        ("kvtier tier", kvtier_throughput),
        ("kvtier manager", kvtier_manager_throughput),
    ]
    skipped: list[str] = []
    if not args.no_vllm:
        try:
            import vllm.v1.kv_offload.tiering.spec  # noqa: F401
            systems.append(("vLLM fs (manager)", vllm_throughput))
        except Exception as e:
            skipped.append(f"vLLM 0.33 fs tier: cannot import ({type(e).__name__}: {e})")
    if args.peers_python:
        if os.path.exists(args.peers_python):
            systems.append(("LMCache LocalDisk", lmcache_throughput))
        else:
            skipped.append(f"LMCache: {args.peers_python} does not exist")
    rows: list[dict[str, Any]] = []
    raw_fn = systems[0][1]
    for block in [int(x) for x in args.sizes.split(",") if x]:
        # Every system run is paired with a raw run just before it, and the ratio is taken per
        # pair: this disk's speed drifts by tens of percent within minutes.
        runs: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n, _ in systems}
        failed: set[str] = set()
        for rep in range(args.repeat):
            for name, fn in systems[1:]:
                if name in failed:
                    continue
                _progress(f"{block >> 10} KiB, run {rep + 1}/{args.repeat}: raw, then {name}")
                rw, rr = raw_fn(args.dir, block, total, args)
                runs["raw O_DIRECT"].append((rw, rr, 1.0, 1.0))
                try:
                    w, r = fn(args.dir, block, total, args)
                except Exception as e:
                    skipped.append(f"{name} at {block >> 10} KiB failed: {type(e).__name__}: {e}")
                    failed.add(name)
                    continue
                runs[name].append((w, r, w / rw, r / rr))
        for name, vals in runs.items():
            if not vals:
                continue
            med = [statistics.median(v[i] for v in vals) for i in range(4)]
            rows.append({"block": block, "system": name, "write_gbps": med[0], "read_gbps": med[1],
                         "write_ratio": med[2], "read_ratio": med[3], "runs": vals})
    print()
    print("| block | system | write GB/s | x raw | read GB/s | x raw |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['block'] >> 10} KiB | {row['system']} | {row['write_gbps']:.2f} | "
              f"{row['write_ratio']:.2f} | {row['read_gbps']:.2f} | {row['read_ratio']:.2f} |")
    print("(medians over the runs; 'x raw' is the median of each run's ratio to the raw run just "
          "before it)")
    for note in dict.fromkeys(LMCACHE_NOTES + skipped):
        print(f"note: {note}")
    rebuilds: list[dict[str, float]] = []
    plan = [(args.rebuild_blocks, 4096), (args.rebuild_blocks // 10, 256 << 10)]
    for blocks, size in plan if args.rebuild_blocks else []:
        _progress(f"index rebuild: writing {blocks} blocks of {size >> 10} KiB")
        rb = rebuild_seconds(args.dir, blocks, size)
        rebuilds.append({"blocks": blocks, "block_bytes": size, "seconds": rb})
        print(f"index rebuild at start: {blocks} blocks of {size >> 10} KiB in {rb:.2f} s "
              f"({rb / blocks * 1e6:.1f} us per block)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "rebuilds": rebuilds, "notes": LMCACHE_NOTES + skipped}, f, indent=2)


if __name__ == "__main__":
    main()
