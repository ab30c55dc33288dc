"""Storage tier loads through the manager, paired with raw reads in time: one process, one tier,
load phases alternating round by round.

``bench_storage.py`` measures each system in a run of its own (fill, timed stores, timed loads),
about 20 s apart, and a 1 GiB load phase lasts about half a second: on a disk whose speed drifts
within minutes, two ways of loading compare well only when their phases are next to each other.
Here the tier is filled and stored once (steady state, as in ``bench_storage.py``), then each
round runs, in alternating order, a 1 GiB raw read (16 threads of O_DIRECT ``preadv``, each over
its own contiguous part of one preallocated file, every block into its own memory: the control
of ``bench_storage.py``) and the manager's loads (``reset_cache``, then ``lookup`` each step until
every request's blocks are promoted back, 8 requests of 32 blocks in flight) read each way:

* ``pump``: by the native read threads (the load pump; the default where the native record I/O
  is built);
* ``threads``: by the tier's Python I/O threads, one native call a chunk.

Per phase: GB/s, CPU seconds per GiB (the whole process), and from ``/proc/diskstats`` the
disk's reads in flight on average, its time per read and its mean request size. At the end each
way's median and its per-round ratio to the raw read of the same round.

``--stores`` pairs the stores instead: each round a 1 GiB raw write (the control's writes: the
same threads, file and memory) and 1 GiB of the manager's steady-state stores (new blocks in
requests of 32, ``prepare_store``/``complete_store``; the tier is full, so every store evicts),
in alternating order; the disk's figures are then its writes'.

``--gil-busy`` runs a Python thread that keeps the GIL busy (a loop of bytecode, as an engine's
scheduler loop in the same process can) through the manager's phases (not the raw ones, which
stay the disk's measure). Usage::

    python benchmarks/bench_storage_loads.py --dir /work/bench-storage [--block 262144] [--rounds 8]
    python benchmarks/bench_storage_loads.py --dir /work/bench-storage --stores [--block 2097152]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time

import bench_storage as bs

LOAD_WAYS = ("raw", "pump", "threads")
STORE_WAYS = ("raw", "manager")
THREADS, JOBS_IN_FLIGHT = 16, 8  # as bench_storage.py runs the manager by default


def disk_counters(device: str) -> tuple[float, list[int]]:
    """(now, the device's /proc/diskstats counters from reads completed on)."""
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if fields[2] == device:
                return time.perf_counter(), [int(x) for x in fields[3:14]]
    raise SystemExit(f"no device {device} in /proc/diskstats")


def disk_delta(a: tuple[float, list[int]], b: tuple[float, list[int]], writes: bool = False
               ) -> dict[str, float]:
    """Reads (``writes``: writes) in flight on average, ms per request and KiB per request
    between two counter readings."""
    ms = (b[0] - a[0]) * 1e3
    first = 4 if writes else 0  # the writes' counters follow the reads' four
    done, sectors, busy_ms = (b[1][first + i] - a[1][first + i] for i in (0, 2, 3))
    return {"in_flight": busy_ms / ms, "ms_per_io": busy_ms / max(1, done),
            "kib_per_io": sectors / 2 / max(1, done)}


def _keep_gil_busy(busy: threading.Event) -> None:
    """Run bytecode whenever ``busy`` is set (the GIL is then wanted all the time)."""
    x = 0
    while True:
        busy.wait()
        while busy.is_set():
            for _ in range(1000):
                x += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="directory on the disk to measure")
    ap.add_argument("--block", type=int, default=256 << 10)
    ap.add_argument("--total", type=int, default=1 << 30, help="bytes a phase reads")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--device", default="vda", help="the disk's name in /proc/diskstats")
    ap.add_argument("--cpu-bytes", type=int, default=0,
                    help="the CPU tier's size (default: the larger of a phase's bytes and four times "
                         "the blocks of the requests in flight, as bench_storage.py sizes it)")
    ap.add_argument("--stores", action="store_true",
                    help="pair raw writes with the manager's stores instead of the loads")
    ap.add_argument("--gil-busy", action="store_true",
                    help="a Python thread keeps the GIL busy through the manager's phases")
    args = ap.parse_args()
    ways = STORE_WAYS if args.stores else LOAD_WAYS
    block, n = args.block, args.total // args.block
    busy = threading.Event()
    if args.gil_busy:
        threading.Thread(target=_keep_gil_busy, args=(busy,), daemon=True).start()
    path = os.path.join(args.dir, "kvtier-loads")
    shutil.rmtree(path, ignore_errors=True)
    m = bs.manager_for(path, block, n, THREADS, JOBS_IN_FLIGHT, cpu_bytes=args.cpu_bytes,
                       namespace=f"loads/{block}")
    keys = bs._keys("s", n)
    pool = m.tiers[0]._io
    raw = None
    got: dict[str, list[float]] = {w: [] for w in ways}
    try:
        bs._manager_store(m, bs._keys("f", n))  # the slab files exist and the tier is full
        bs._manager_store(m, keys)  # every block stored evicted one
        raw = bs.RawFile(args.dir, block, THREADS, args.total)
        for rd in range(args.rounds):
            for way in ways if rd % 2 == 0 else ways[::-1]:
                bs.settle(args.settle)
                d0 = disk_counters(args.device)
                if way == "raw":
                    gbps, cpu = raw._run("w" if args.stores else "r", False, True), raw.cpu
                elif args.stores:
                    fresh = bs._keys(f"s{rd}", n)  # new blocks: every one evicts an old one
                    busy.set()
                    t0, c0 = time.perf_counter(), time.process_time()
                    try:
                        bs._manager_store(m, fresh)
                    finally:
                        busy.clear()
                    secs, cpu_s = time.perf_counter() - t0, time.process_time() - c0
                    gbps, cpu = n * block / secs / 1e9, cpu_s / (n * block / 2**30)
                else:
                    pool.pump_enabled = way == "pump"
                    m.reset_cache()
                    busy.set()
                    try:
                        secs, cpu_s, _waits, _sched = bs.manager_load(m, keys, JOBS_IN_FLIGHT)
                    finally:
                        busy.clear()
                    gbps, cpu = n * block / secs / 1e9, cpu_s / (n * block / 2**30)
                d = disk_delta(d0, disk_counters(args.device), args.stores)
                got[way].append(gbps)
                io = "write" if args.stores else "read"
                print(f"round {rd + 1} {way:8s} {gbps:5.2f} GB/s  cpu {cpu:.2f} s/GiB  in flight "
                      f"{d['in_flight']:5.2f}  {d['ms_per_io']:5.2f} ms/{io}  "
                      f"{d['kib_per_io']:6.1f} KiB/{io}", flush=True)
        stats = m.get_stats()
        st = stats["tiers"][m.tiers[0].name]
        if (st["corrupt"] or st["load_failures"] or st["store_failures"]
                or stats["manager"].get("backpressure_dropped", 0)):
            raise RuntimeError(f"loads or stores failed: {stats}")
    finally:
        m.shutdown()
        shutil.rmtree(path, ignore_errors=True)
        if raw is not None:
            raw.close()
    for way in ways:
        ratios = [x / r for x, r in zip(got[way], got["raw"])]
        print(f"{way:8s} median {statistics.median(got[way]):.2f} GB/s, x raw of its round: median "
              f"{statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    sys.exit(main())
