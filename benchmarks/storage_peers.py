"""The peers that ``bench_storage.py`` measures beside kvtier: vLLM 0.33's ``fs`` tier through its
``TieringOffloadingManager``, and LMCache 0.5.6's ``LocalDiskBackend`` (run as a subprocess under
another venv: ``bench_storage.py --lmcache-worker`` calls ``lmcache_worker`` there).

Each returns (write GB/s, read GB/s, phases) like the kvtier measurements; they report no phases.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from typing import Any

import numpy as np

MiB = 1 << 20
JOB_BLOCKS = 32  # blocks per job / per request
LMCACHE_NOTES: list[str] = []


def vllm_throughput(directory: str, block: int, total: int, args: argparse.Namespace
                    ) -> tuple[float, float, dict[str, float]]:
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
        return n * block / dt_w / 1e9, n * block / dt_r / 1e9, {}
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
                       ) -> tuple[float, float, dict[str, float]]:
    """Run ``lmcache_worker`` as a subprocess under ``--peers-python``."""
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_storage.py")
    cmd = [args.peers_python, bench, "--lmcache-worker", "--dir", directory,
           "--sizes", str(block), "--total-mib", str(total // MiB), "--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"LMCache worker failed (rc={r.returncode}): {r.stderr.strip()[-400:]}")
    res = json.loads(lines[-1])
    LMCACHE_NOTES.append(
        f"LMCache {block >> 10} KiB: wrote {res['stored']}/{res['blocks']} blocks, read back "
        f"{res['read']}, found {res['after_restart']} after a restart on the same directory")
    return res["write_gbps"], res["read_gbps"], {}
