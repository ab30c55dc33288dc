"""``kvtier fsck`` read throughput against the disk's raw O_DIRECT read throughput, same run.

It fills a storage tier (``StorageTier``, driven by its contract: ``submit_store``/``poll``) with
``--gib`` of records (checksummed headers in the slab files of its namespace directory), shuts it
down and syncs it to disk, then alternates, ``--repeat`` times:

* raw: the same slab files read with O_DIRECT ``preadv`` into aligned buffers and nothing else,
  under several thread counts and chunk sizes (``--raw-configs``, which include fsck's own);
* fsck: ``kvtier fsck`` of the tier (the command's own code, default options: chunked O_DIRECT
  reads on several threads, every record's header and xxh3-64 payload checksum verified).

Each round runs fsck and every raw reader once, in an order rotated from round to round (the
disk's speed drifts within minutes; whatever runs late in a round must not always be the same).
The baseline is the raw configuration with the highest median: the disk's raw read throughput as
the best of these readers gets it. The ratio is fsck's median over that baseline; each round's
fsck over that round's best raw reader gives the range. Usage::

    python benchmarks/bench_fsck.py --dir /work/bench-ops --sizes 262144,2097152 --gib 2
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import resource
import shutil
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np

GiB = 1 << 30


def _progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def write_tier(root: str, block: int, total: int) -> str:
    """A storage tier at ``root`` holding ``total`` bytes of records of ``block`` bytes, stored
    through the tier's contract (``submit_store``/``poll``), the tier shut down and everything
    synced to disk; the path of its namespace directory."""
    from kvtier.format.record import namespace_fingerprint, namespace_key
    from kvtier.tiers.base import TierContext
    from kvtier.tiers.storage import StorageTier
    from kvtier.tiers.storage.layout import slot_size_for

    ns = f"bench/fsck/{block}"
    fp = namespace_fingerprint(namespace_key(ns, block))
    shutil.rmtree(os.path.join(root, fp.hex()), ignore_errors=True)
    # the primary slots the stores copy from: at most 128 MiB of them, 4 jobs in flight
    slots = max(4, min(128, (128 << 20) // block))
    job = slots // 4
    buf = mmap.mmap(-1, slots * block)
    primary = np.frombuffer(buf, dtype=np.uint8).reshape(slots, block)
    primary[:] = np.random.default_rng(block).integers(0, 256, (slots, block), dtype=np.uint8)
    ctx = TierContext(ns, fp, block, primary, "storage0")
    wanted = max(1, total // slot_size_for(block))
    tier = StorageTier(ctx, path=root, capacity_bytes=StorageTier.capacity_for(wanted, block))
    try:
        st = tier.stats()
        if not st["available"]:
            raise RuntimeError(f"storage tier at {root} did not open: {st.get('error')}")
        # every slot of the directory gets a record: an allocated slot never written would be
        # read from no disk at all
        n = int(st["max_blocks"])
        keys = [i.to_bytes(8, "little") * 4 for i in range(n)]
        jobs = [keys[i : i + job] for i in range(0, n, job)]
        pending: set[int] = set()
        failed = 0
        j = 0
        while j < len(jobs) or pending:
            while j < len(jobs) and len(pending) < slots // job:
                tier.submit_store(j + 1, jobs[j], (np.arange(len(jobs[j])) + j * job) % slots)
                pending.add(j + 1)
                j += 1
            for res in tier.poll():
                pending.discard(res.job_id)
                failed += len(res.failed_keys)
            time.sleep(0.0002)
        st = tier.stats()
        if failed or st["blocks"] != n or st["store_failures"] or st["evictions"]:
            raise RuntimeError(f"storage tier: {failed} keys failed to store, stats {st}")
        directory = tier.directory
    finally:
        tier.shutdown()
    os.sync()
    return directory


def raw_read(paths: list[str], threads: int, chunk: int) -> float:
    """GB/s of ``threads`` threads reading ``paths`` in ``chunk``-byte O_DIRECT reads."""
    work = []
    for p in paths:
        size = os.path.getsize(p)
        work += [(p, off) for off in range(0, size, chunk)]
    lock = threading.Lock()
    nxt = [0]
    done = [0]

    def run() -> None:
        buf = mmap.mmap(-1, chunk)
        fds: dict[str, int] = {}
        got = 0
        try:
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= len(work):
                    break
                p, off = work[i]
                fd = fds.get(p)
                if fd is None:
                    fd = fds[p] = os.open(p, os.O_RDONLY | os.O_DIRECT)
                got += os.preadv(fd, [buf], off)
        finally:
            for fd in fds.values():
                os.close(fd)
            buf.close()
        with lock:
            done[0] += got

    ts = [threading.Thread(target=run) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return done[0] / (time.perf_counter() - t0) / 1e9


def cpu_seconds() -> float:
    """User plus system CPU time of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_fsck(root: str) -> dict[str, Any]:
    """``kvtier fsck`` of the tier with the command's defaults."""
    from kvtier.ops.common import Options
    from kvtier.ops.storage import StorageOps

    r = StorageOps(root, None, Options()).fsck(repair=False)
    assert r["records_bad"] == 0 and r["records_checked"] > 0, r
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="directory on the disk to measure")
    ap.add_argument("--sizes", default="262144,2097152", help="block sizes in bytes")
    ap.add_argument("--gib", type=float, default=2.0, help="GiB of records per block size")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--raw-configs", default="4x8M,8x8M,16x1M,16x4M",
                    help="raw reader configurations, THREADSxCHUNK")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the tier's files")
    args = ap.parse_args()
    configs = []
    for c in args.raw_configs.split(","):
        t, ch = c.lower().split("x")
        mult = 1 << 20 if ch.endswith("m") else 1 << 10 if ch.endswith("k") else 1
        configs.append((int(t), int(ch.rstrip("mk")) * mult))
    from kvtier.ops.common import default_threads

    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "dir": args.dir, "gib": args.gib, "fsck_threads": default_threads(), "sizes": {},
    }
    os.makedirs(args.dir, exist_ok=True)
    for size in (int(s) for s in args.sizes.split(",")):
        root = os.path.join(args.dir, f"fsck-{size}")
        os.makedirs(root, exist_ok=True)
        _progress(f"writing {args.gib} GiB of {size}-byte records")
        lane = write_tier(root, size, int(args.gib * GiB))
        slabs = sorted(os.path.join(lane, f) for f in os.listdir(lane) if f.startswith("slab-"))
        runs = []
        names = [f"{t}x{c >> 20 or c >> 10}{'M' if c >= 1 << 20 else 'K'}" for t, c in configs]
        steps = ["fsck", *range(len(configs))]
        for rep in range(args.repeat):
            # each round runs fsck and every raw reader once, in an order rotated every round, so
            # that none always runs first or last (this disk's speed drifts within a round)
            order = steps[rep % len(steps):] + steps[: rep % len(steps)]
            raw: dict[str, float] = {}
            raw_cpu = 0.0
            for step in order:
                c0 = cpu_seconds()
                if step == "fsck":
                    r = run_fsck(root)
                    fsck_cpu = cpu_seconds() - c0
                else:
                    t, c = configs[int(step)]
                    raw[names[int(step)]] = raw_read(slabs, t, c)
                    raw_cpu = max(raw_cpu, cpu_seconds() - c0)
            best = max(raw.values())
            gbs = r["read_bytes_per_s"] / 1e9
            gib = r["bytes_read"] / GiB
            runs.append({"order": [s if s == "fsck" else names[int(s)] for s in order],
                         "raw": raw, "raw_best": best, "fsck": gbs, "ratio": gbs / best,
                         "records": r["records_checked"], "bytes": r["bytes_read"],
                         "fsck_cpu_s_per_gib": fsck_cpu / gib, "raw_cpu_s_per_gib": raw_cpu / gib,
                         "loadavg": os.getloadavg()[0]})
            _progress(f"{size}: round {rep + 1}: raw best {best:.2f} GB/s, fsck {gbs:.2f} GB/s, "
                      f"ratio {gbs / best:.2f}")
        medians = {k: statistics.median(x["raw"][k] for x in runs) for k in runs[0]["raw"]}
        base_cfg = max(medians, key=lambda k: medians[k])
        fsck_med = statistics.median(x["fsck"] for x in runs)
        results["sizes"][str(size)] = {
            "runs": runs,
            "raw_medians": medians,
            "baseline": base_cfg,
            "median_raw_best": medians[base_cfg],
            "median_fsck": fsck_med,
            "median_ratio": fsck_med / medians[base_cfg],
            "min_ratio": min(x["ratio"] for x in runs),
            "max_ratio": max(x["ratio"] for x in runs),
            "fsck_cpu_s_per_gib": statistics.median(x["fsck_cpu_s_per_gib"] for x in runs),
            "raw_cpu_s_per_gib": statistics.median(x["raw_cpu_s_per_gib"] for x in runs),
            "loadavg": statistics.median(x["loadavg"] for x in runs),
        }
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{'block':>9} {'raw (best config)':>22} {'fsck GB/s':>10} {'fsck/raw':>9} "
          f"{'per-run':>12} {'CPU s/GiB fsck, raw':>20} {'load':>5}")
    for size, s in results["sizes"].items():
        raw = f"{s['median_raw_best']:.2f} ({s['baseline']})"
        cpu = f"{s['fsck_cpu_s_per_gib']:.2f}, {s['raw_cpu_s_per_gib']:.2f}"
        print(f"{int(size) >> 10:>7}Ki {raw:>22} {s['median_fsck']:>10.2f} "
              f"{s['median_ratio']:>9.2f} {s['min_ratio']:>5.2f}-{s['max_ratio']:.2f} "
              f"{cpu:>20} {s['loadavg']:>5.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
