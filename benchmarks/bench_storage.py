"""Storage tier throughput against raw parallel O_DIRECT I/O on the same disk, in the same run.

For each block size (256 KiB and 2 MiB by default) it measures, on the same directory:

* raw: N threads, each writing then reading its own file with O_DIRECT ``pwritev``/``preadv``
  of one block at a time from an aligned buffer (what ``fio --direct=1 --numjobs=N`` measures);
  N is the number of I/O threads the tier uses (readers + writers);
* kvtier: the ``storage`` tier driven through its contract (``submit_store``/``submit_load``/
  ``poll``), jobs of ``--job-blocks`` blocks, up to ``--jobs-in-flight`` jobs at a time, polled
  like an engine step loop; loads verify every checksum;
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
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvtier.format.record import namespace_fingerprint
from kvtier.tiers.base import TierContext
from kvtier.tiers.storage import StorageTier

MiB = 1 << 20


def _progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# -- raw ---------------------------------------------------------------------------------------
def raw_throughput(directory: str, block: int, threads: int, total: int) -> tuple[float, float]:
    """(write GB/s, read GB/s) of ``threads`` threads doing O_DIRECT I/O on their own files."""
    per = max(1, total // threads // block)
    paths = [os.path.join(directory, f"raw-{i}") for i in range(threads)]

    def run(mode: str) -> float:
        barrier = threading.Barrier(threads + 1)

        def work(i: int) -> None:
            buf = mmap.mmap(-1, block)
            buf.write(os.urandom(block))
            flags = os.O_RDWR | os.O_DIRECT | (os.O_CREAT if mode == "w" else 0)
            fd = os.open(paths[i], flags, 0o644)
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


def main() -> None:
    """Run the storage benchmark and print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/work/bench-storage", help="directory on the disk to measure")
    ap.add_argument("--sizes", default=f"{256 << 10},{2 << 20}", help="block sizes in bytes")
    ap.add_argument("--total-mib", type=int, default=1536, help="data per measurement")
    ap.add_argument("--threads", type=int, default=16, help="tier I/O threads (readers+writers)")
    ap.add_argument("--job-blocks", type=int, default=32, help="blocks per tier job")
    ap.add_argument("--jobs-in-flight", type=int, default=8)
    ap.add_argument("--rebuild-blocks", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement (best kept)")
    ap.add_argument("--json", help="also write results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.dir, exist_ok=True)
    st = os.statvfs(args.dir)
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"disk: {args.dir}, free {st.f_bavail * st.f_frsize / 2**30:.1f} GiB")
    total = args.total_mib * MiB
    rows: list[dict[str, Any]] = []
    for block in [int(x) for x in args.sizes.split(",")]:
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeat):
            _progress(f"{block >> 10} KiB: raw O_DIRECT, {args.threads} threads")
            r = raw_throughput(args.dir, block, args.threads, total)
            _progress(f"{block >> 10} KiB: kvtier storage tier")
            k = kvtier_throughput(args.dir, block, total, args)
            for name, v in (("raw", r), ("kvtier", k)):
                b = best.get(name, (0.0, 0.0))
                best[name] = (max(b[0], v[0]), max(b[1], v[1]))
        raw_w, raw_r = best["raw"]
        for name, (w, rd) in best.items():
            rows.append({"block": block, "system": name, "write_gbps": w, "read_gbps": rd,
                         "write_ratio": w / raw_w, "read_ratio": rd / raw_r})
    print()
    print(f"{'block':>8} {'system':<22} {'write GB/s':>10} {'x raw':>6} {'read GB/s':>10} {'x raw':>6}")
    for r in rows:
        print(f"{r['block'] >> 10:>5}KiB {r['system']:<22} {r['write_gbps']:>10.2f} "
              f"{r['write_ratio']:>6.2f} {r['read_gbps']:>10.2f} {r['read_ratio']:>6.2f}")
    rb = None
    if args.rebuild_blocks:
        _progress(f"index rebuild: {args.rebuild_blocks} blocks")
        rb = rebuild_seconds(args.dir, args.rebuild_blocks, 4096)
        print(f"\nindex rebuild: {args.rebuild_blocks} blocks of 4 KiB in {rb:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "rebuild_seconds": rb}, f, indent=2)


if __name__ == "__main__":
    main()
