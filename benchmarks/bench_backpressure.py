"""A storage tier on a disk the kernel throttles, with and without backpressure.

``python benchmarks/bench_backpressure.py [--iops 50] [--requests 120]``

A CPU tier of 256 slots (64 KiB blocks) over a storage tier and an in-memory tier; the storage
tier's disk is an ext4 loop device limited to ``--iops`` writes a second (cgroup). An engine loop
stores 16 new blocks per request, one request per step, paced at ten times what the disk takes.
Run once with ``max_pinned_share: 1.0`` (the bound is the whole CPU tier: no backpressure, the
baseline) and once with the default 0.25, in the same run. Reports blocks the CPU tier refused,
the slow tier's peak pinned slots, blocks dropped from it, and what the in-memory tier got.
Needs root, ``losetup``, ``mkfs.ext4`` and a cgroup I/O controller.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import kvtier
from kvtier.bench.faults import ThrottledDisk, throttle_unavailable

BB = 64 << 10
SLOTS = 256
PER_REQ = 16


def _key(i: int, salt: str) -> bytes:
    return f"{salt}-{i}".encode().ljust(32, b".")


def run(share: float, iops: int, requests: int) -> dict[str, float]:
    """One configuration on a fresh throttled disk."""
    with ThrottledDisk(256 << 20) as disk:
        cfg = {"cpu_bytes_to_use": SLOTS * BB, "secondary_tiers": [
            {"type": "storage", "path": str(disk.path), "capacity_bytes": 200 << 20,
             "direct_io": True, "n_read_threads": 2, "n_write_threads": 2,
             "max_pinned_share": share},
            {"type": "example"}]}
        m = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BB,
                                         namespace=f"bp-{share}-{time.time()}").get_manager()
        try:
            disk.set_iops(iops)
            step = PER_REQ / (10 * iops)
            region = m.primary_blocks()
            refused = peak = 0
            stored: list[list[bytes]] = []
            t_start = time.monotonic()
            for r in range(requests):
                t0 = time.monotonic()
                keys = [_key(r * PER_REQ + j, str(share)) for j in range(PER_REQ)]
                ctx = kvtier.ReqContext(f"r{r}")
                out = m.prepare_store(keys, ctx)
                if out is None:
                    refused += PER_REQ
                else:
                    for key, slot in zip(out.keys_to_store, out.store_spec.block_ids):
                        region[slot] = np.frombuffer(key * (BB // 32), dtype=np.uint8)
                    m.complete_store(out.keys_to_store, ctx)
                    stored.append(keys)
                m.on_schedule_end()
                peak = max(peak, m.get_stats()["tiers"]["storage0"]["pinned_slots"])
                time.sleep(max(0.0, step - (time.monotonic() - t0)))
            seconds = time.monotonic() - t_start
            st = m.get_stats()["tiers"]["storage0"]
            example = m.tiers[1]
            in_memory = sum(example.lookup(k) or 0 for k in stored)
            disk.set_iops(None)
            return {"share": share, "blocks": requests * PER_REQ, "refused": refused,
                    "peak_pinned": peak, "bound": st["max_pinned_slots"],
                    "dropped": st["backpressure_dropped"], "in_memory_tier": in_memory,
                    "store_rate": requests * PER_REQ / seconds}
        finally:
            m.shutdown()


def main() -> int:
    """Run both configurations and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iops", type=int, default=50)
    ap.add_argument("--requests", type=int, default=120)
    args = ap.parse_args()
    why = throttle_unavailable()
    if why is not None:
        print(f"cannot throttle a disk here: {why}", file=sys.stderr)
        return 2
    rows = [run(1.0, args.iops, args.requests), run(0.25, args.iops, args.requests)]
    print(f"disk limited to {args.iops} writes/s; engine stores {rows[0]['store_rate']:.0f} "
          f"and {rows[1]['store_rate']:.0f} blocks/s")
    print(f"{'max_pinned_share':>17}{'blocks':>8}{'refused':>9}{'refused %':>10}{'peak pinned':>12}"
          f"{'bound':>7}{'dropped':>9}{'in-memory tier':>15}")
    for r in rows:
        print(f"{r['share']:>17}{r['blocks']:>8}{r['refused']:>9}{r['refused'] / r['blocks']:>10.1%}"
              f"{r['peak_pinned']:>12}{r['bound']:>7}{r['dropped']:>9}{r['in_memory_tier']:>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
