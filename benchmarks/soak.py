"""Soak kvtier under faults: ``python benchmarks/soak.py SECONDS [--json FILE]``.

Replays a steady workload through CPU, storage and network (Redis) tiers for SECONDS while it
injects faults on a schedule (see ``kvtier.bench.soak``), then prints what it saw. Needs
``redis-server`` on PATH; the throttled-disk phase needs root, ``losetup`` and a cgroup I/O
controller (without them the phase runs without its fault and the report says so). Exits 1 when a
wrong block was served or an exception escaped the manager.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from kvtier.bench.soak import Soak


def main() -> int:
    """Run the soak and print its report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seconds", type=float, help="how long to run (split evenly over the phases)")
    ap.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    report = Soak(args.seconds, seed=args.seed, progress=progress).run()
    print(f"soak: {report['seconds']:.0f} s, {report['requests']} requests, "
          f"throttle: {report['throttle']}")
    print(f"{'phase':<20}{'requests':>9}{'hit rate':>9}{'refused':>8}{'max call':>10}"
          f"{'its CPU':>9}{'>10ms':>7}{'max GC':>8}{'RSS MiB':>8}  notes")
    for p in report["phases"]:
        print(f"{p['phase']:<20}{p['requests']:>9}{p['hit_rate']:>9.1%}"
              f"{p['blocks_refused']:>8}{p['max_call_ms']:>8.1f}ms{p['slowest_call_cpu_ms']:>7.1f}ms"
              f"{p['calls_over_10ms']:>7}{p['max_gc_pause_ms']:>6.1f}ms{p['rss_mib']:>8.1f}  "
              f"{p['slowest_call']}; {'; '.join(p['notes'])}")
    lat, rss = report["call_latency_ms"], report["rss_mib"]
    print(f"wrong blocks served: {report['wrong_blocks']}; exceptions escaped: "
          f"{report['exceptions_escaped']}; blocks refused by the CPU tier: "
          f"{report['blocks_refused']}")
    print(f"scheduler calls: max {lat['max']:.2f} ms ({lat['slowest_call']}), "
          f"p99 {lat['p99']:.3f} ms")
    print(f"RSS: {rss['after_warmup']:.1f} MiB after warm-up, peak {rss['peak']:.1f}, final "
          f"{rss['final']:.1f} ({rss['growth_after_warmup']:+.1%})")
    for k in ("fds", "threads", "shm_entries"):
        print(f"{k}: start {report[k]['start']}, end {report[k]['end']}")
    print(f"descriptors left open: {report['fds']['left_open'] or 'none'}")
    print(f"primary region left in /dev/shm: {report['shm_entries']['region_left_behind']}")
    if report["first_exception"]:
        print(report["first_exception"], file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 1 if report["wrong_blocks"] or report["exceptions_escaped"] else 0


if __name__ == "__main__":
    sys.exit(main())
