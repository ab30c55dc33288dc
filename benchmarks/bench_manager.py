"""Per-block cost of kvtier's scheduler-side calls, primary tier only (no I/O at all).

    python benchmarks/bench_manager.py [--blocks 8192] [--repeat 5]

Reports microseconds per block for: a prefix lookup over resident blocks, prepare_load +
complete_load, and prepare_store + complete_store with eviction (the primary tier holds a quarter
of what is stored), for each eviction policy; best of ``--repeat`` runs. To compare two versions
of the code, run it under each (``PYTHONPATH=<checkout>/src``) back to back on one machine.
"""

from __future__ import annotations

import argparse
import hashlib
import time

import kvtier


def _keys(n: int) -> list[bytes]:
    return [hashlib.sha256(b"bench-%d" % i).digest() for i in range(n)]


def bench(policy: str, n: int, repeat: int) -> dict[str, float]:
    """Best-of-``repeat`` microseconds per block for each operation."""
    keys = _keys(4 * n)
    ctx = kvtier.ReqContext("bench")
    best = {"lookup": 1e9, "load": 1e9, "store_evict": 1e9}
    for _ in range(repeat):
        spec = kvtier.TieringOffloadingSpec(
            {"cpu_bytes_to_use": n * 4096, "eviction_policy": policy},
            gpu_block_size=16, bytes_per_gpu_block=4096)
        m = spec.get_manager()
        try:
            t0 = time.perf_counter()
            for i in range(0, len(keys), 32):
                out = m.prepare_store(keys[i : i + 32], ctx)
                assert out is not None
                m.complete_store(out.keys_to_store, ctx)
                m.on_schedule_end()
            best["store_evict"] = min(best["store_evict"], (time.perf_counter() - t0) / len(keys))
            resident = keys[-n:]
            t0 = time.perf_counter()
            assert m.lookup(resident, ctx) == n
            best["lookup"] = min(best["lookup"], (time.perf_counter() - t0) / n)
            t0 = time.perf_counter()
            m.prepare_load(resident, ctx)
            m.complete_load(resident, ctx)
            best["load"] = min(best["load"], (time.perf_counter() - t0) / n)
            m.on_schedule_end()
        finally:
            m.shutdown()
    return {k: v * 1e6 for k, v in best.items()}


def main() -> None:
    """Print a table of microseconds per block."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"{'policy':<8} {'lookup':>10} {'load pin+unpin':>15} {'store+evict':>12}   (us per block)")
    for policy in ("lru", "arc", "chain", "adaptive"):
        r = bench(policy, args.blocks, args.repeat)
        print(f"{policy:<8} {r['lookup']:>10.3f} {r['load']:>15.3f} {r['store_evict']:>12.3f}")


if __name__ == "__main__":
    main()
