"""The scheduler's side of a storage tier store job in steady state: ``submit_store`` on a full
tier (every store evicts), a job's slots taken in one pass (``BlockIndex.alloc_many``, what the
tier does) against one pass over the regions a slot (``alloc`` called once a block, how the tier
took them before commit f14e37c), alternating round by round in one process.

The tier is made as ``bench_storage.py`` makes the manager's (at least 16 regions; 4,096 blocks
by default, at 4 KiB so that filling it is quick: a slot's allocation does not depend on the
block's size). Each job's stores are waited for before the next job is submitted, so the time
inside ``submit_store`` is the scheduler thread's own, not a wait for the GIL behind busy I/O
threads. Usage::

    python benchmarks/bench_store_alloc.py --dir /work/bench-storage [--blocks 4096] [--rounds 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from typing import Any

import bench_storage as bs
import numpy as np

WAYS = ("per job", "per block")


def _per_block(batch: Any) -> Any:
    """``alloc_many`` (``batch``) as one ``alloc`` a slot (a batch of one: ``BlockIndex.alloc``),
    each looking through the regions again."""
    def alloc_many(n: int, evicted: list[bytes]) -> list[tuple[int, bool]]:
        out = []
        for _ in range(n):
            got = batch(1, evicted)
            if not got:
                break
            out += got
        return out
    return alloc_many


def _phase(tier: Any, keys: list[bytes], job_blocks: int) -> float:
    """Store ``keys`` in jobs of ``job_blocks``, one job at a time; seconds in ``submit_store``."""
    inside = 0.0
    slots = np.arange(job_blocks, dtype=np.int64)
    for j in range(0, len(keys), job_blocks):
        t0 = time.perf_counter()
        tier.submit_store(j, keys[j : j + job_blocks], slots)
        inside += time.perf_counter() - t0
        done = False
        while not done:
            done = any(r.job_id == j for r in tier.poll())
            if not done:
                time.sleep(0.0002)
    return inside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="directory on the disk to measure")
    ap.add_argument("--blocks", type=int, default=4096)
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    n, job_blocks = args.blocks, bs.JOB_BLOCKS
    path = os.path.join(args.dir, "kvtier-alloc")
    shutil.rmtree(path, ignore_errors=True)
    m = bs.manager_for(path, args.block, n, 16, 8, namespace=f"alloc/{args.block}")
    tier = m.tiers[0]
    index = tier._sh.index
    batch = index.alloc_many
    got: dict[str, list[float]] = {w: [] for w in WAYS}
    try:
        _phase(tier, bs._keys("f", n), job_blocks)  # full: every store from here on evicts
        for rd in range(args.rounds):
            for way in WAYS if rd % 2 == 0 else WAYS[::-1]:
                index.alloc_many = batch if way == "per job" else _per_block(batch)
                secs = _phase(tier, bs._keys(f"{rd}{way}", n), job_blocks)
                got[way].append(secs)
                print(f"round {rd + 1} {way:9s} submit_store {1e3 * secs:6.1f} ms for {n} blocks "
                      f"({1e6 * secs / n:.2f} us a block)", flush=True)
        st = tier.stats()
        if st["store_failures"] or st["evictions"] < args.rounds * len(WAYS) * n:
            raise RuntimeError(f"stores failed or did not evict: {st}")
    finally:
        m.shutdown()
        shutil.rmtree(path, ignore_errors=True)
    ratios = [a / b for a, b in zip(got["per job"], got["per block"])]
    for way in WAYS:
        print(f"{way:9s} median {1e3 * statistics.median(got[way]):.1f} ms")
    print(f"per job / per block, each round: median {statistics.median(ratios):.2f} "
          f"({', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    sys.exit(main())
