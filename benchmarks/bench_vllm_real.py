"""kvtier under vLLM 0.33's real Scheduler: scheduler time per step, and stores refused and why.

Drives the real ``Scheduler`` (or ``AsyncScheduler``) with both halves of the real
``OffloadingConnector`` and the stand-in model runner of ``tests/integration/vllm/stand_in_runner.py``
(every token is still checked), on the shared Mooncake trace (each ``hash_ids`` entry becomes
one 16-token block of tokens derived from the id, so prefixes are shared exactly as in the
trace) or on the built-in synthetic workload, for a full-attention model and a hybrid one
(full + sliding-window layers, gpt-oss's shape). Each configuration is replayed with kvtier and
with no connector at all, in the same run; reported per step: time inside ``schedule()`` plus
``update_from_output()``, and the ratio.

Every ``prepare_store`` that returns None (vLLM logs "cannot store chunks") is classified from
kvtier's slot table at that moment: how many slots the store needed, how many were free or
evictable, and what held the others: engine stores in flight (WRITING), promotions in flight,
blocks pinned by in-flight loads, by this step's protected lookup hits, or by cascades to the
secondary tiers.

Usage: python benchmarks/bench_vllm_real.py [--requests 300] [--cpu-blocks 40] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "vllm"))
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import real_engine as rt  # noqa: E402
import vllm_layouts as layouts  # noqa: E402
from trace_workload import trace_jobs  # noqa: E402


class StoreRefusals:
    """Classifies each prepare_store that returns None from the slot table at that moment."""

    def __init__(self, engine: rt.RealEngine) -> None:
        self.kv = engine.manager.kv
        self.count = 0
        self.needed: list[int] = []
        self.holders: Counter[str] = Counter()
        self.running_store = 0
        self.engine = engine
        original = self.kv.prepare_store

        def observed(keys: Any, ctx: Any) -> Any:
            out = original(keys, ctx)
            if out is None:
                self._classify(keys, ctx)
            return out

        self.kv.prepare_store = observed
        self.outright = 0  # refused by the adapter too (None to vLLM: "cannot store chunks")
        adapter = engine.manager
        wrapped = adapter.prepare_store

        def final(keys: Any, ctx: Any) -> Any:
            out = wrapped(keys, ctx)
            if out is None:
                self.outright += 1
            return out

        adapter.prepare_store = final

    def _classify(self, keys: Any, ctx: Any) -> None:
        from kvtier.manager.primary import READY, WRITING

        kv = self.kv
        p = kv.primary
        self.count += 1
        self.needed.append(sum(1 for k in keys if k not in p.key_slot))
        req = self.engine.scheduler.requests.get(ctx.req_id)
        if req is not None and not req.is_finished():
            self.running_store += 1
        cascade: Counter[int] = Counter()
        for b in kv._cascade_batches:
            cascade.update(b.slots)
        for job in kv._jobs.values():
            if job.kind == "cascade":
                cascade.update(job.slots)
        promise = Counter(kv._promise_pins)
        h: Counter[str] = Counter()
        h["free"] += len(p.free)
        for key, s in p.key_slot.items():
            if p.state[s] == WRITING:
                h["promotion in flight" if key in kv._promoting else "engine store in flight"] += 1
            elif p.state[s] == READY:
                if p.ref[s] == 0:
                    h["evictable"] += 1
                elif cascade[s]:
                    h["cascade to a tier"] += 1
                elif promise[s]:
                    h["this step's lookup hits"] += 1
                else:
                    h["load in flight"] += 1
        total = sum(h.values())
        for k, v in h.items():
            self.holders[k] += v / total  # share of the slots, summed over refusals


def replay(layout: str, jobs: list[rt.Job], cpu_blocks: int | None, gpu_blocks: int,
           async_scheduling: bool, root: Path) -> dict[str, Any]:
    """One replay; scheduler seconds per step and (with kvtier) the refusals."""
    extra = None
    if cpu_blocks is not None:
        page = 2 * layouts.BLOCK * layouts.HEADS * layouts.HEAD_SIZE * 2
        per_block = page * (2 if layout == "full" else 2)
        extra = {"spec_name": "KVTierOffloadingSpec", "spec_module_path": "kvtier.vllm",
                 "cpu_bytes_to_use": cpu_blocks * per_block,
                 "secondary_tiers": [{"type": "storage", "path": str(root / "storage"),
                                      "capacity_bytes": 1 << 28}]}
    e = rt.RealEngine(root, extra, layout=layout, async_scheduling=async_scheduling,
                      num_gpu_blocks=gpu_blocks, max_batched_tokens=256,
                      max_model_len=512)
    refusals = StoreRefusals(e) if extra is not None else None
    step_s: list[float] = []
    update = e.scheduler.update_from_output
    schedule = e.scheduler.schedule

    def timed_schedule(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = schedule(*a, **k)
        step_s.append(time.perf_counter() - t0)
        return out

    def timed_update(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = update(*a, **k)
        step_s[-1] += time.perf_counter() - t0
        return out

    e.scheduler.schedule = timed_schedule  # type: ignore[method-assign]
    e.scheduler.update_from_output = timed_update  # type: ignore[method-assign]
    t0 = time.perf_counter()
    e.run(jobs, max_seconds=900)
    if extra is not None:
        e.settle()
    wall = time.perf_counter() - t0
    res: dict[str, Any] = {
        "steps": len(step_s), "finished": len(e.finished), "wall_s": wall,
        "sched_us_per_step_median": statistics.median(step_s) * 1e6,
        "sched_us_per_step_mean": statistics.fmean(step_s) * 1e6,
        "wrong_tokens": e.runner.wrong_tokens, "checked_tokens": e.runner.checked_tokens,
        "hit_tokens_by_source": dict(e.hit_sources),
    }
    if refusals is not None:
        st = e.manager.kvtier_stats()
        res["refused_stores"] = refusals.outright
        res["first_attempts_refused"] = refusals.count
        res["partial_stores"] = e.manager.partial_stores
        res["refused_while_running"] = refusals.running_store
        res["refused_needed_slots_median"] = (
            statistics.median(refusals.needed) if refusals.needed else 0)
        res["slot_holders_at_refusal"] = {
            k: round(v / refusals.count, 3) for k, v in refusals.holders.items()
        } if refusals.count else {}
        res["kvtier"] = {k: st["manager"][k] for k in (
            "stored_blocks", "primary_hit_blocks", "promotions_started", "promotions_preempted",
            "promoted_blocks", "promotion_alloc_failures", "store_alloc_failures",
            "evicted_blocks")}
    e.close()
    return res


def main() -> None:
    """Run the replays and print a table (and write JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--max-blocks", type=int, default=24, help="blocks kept per trace request")
    ap.add_argument("--cpu-blocks", type=int, default=40)
    ap.add_argument("--gpu-blocks", type=int, default=96)
    ap.add_argument("--layouts", default="full,full+swa")
    ap.add_argument("--async-scheduling", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    jobs = trace_jobs(args.requests, args.max_blocks)
    results: list[dict[str, Any]] = []
    for layout in args.layouts.split(","):
        for rep in range(args.repeat):
            for kind, cpu in (("none", None), ("kvtier", args.cpu_blocks)):
                with tempfile.TemporaryDirectory() as d:
                    r = replay(layout, jobs, cpu, args.gpu_blocks, args.async_scheduling, Path(d))
                r.update(layout=layout, kind=kind, repeat=rep)
                results.append(r)
                print(json.dumps(r), flush=True)
    print("\n| layout | run | steps | sched us/step (median) | x none | refused stores"
          " (while running) | wrong tokens |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        base = next(b for b in results if b["layout"] == r["layout"] and b["kind"] == "none"
                    and b["repeat"] == r["repeat"])
        ratio = r["sched_us_per_step_median"] / base["sched_us_per_step_median"]
        refused = (f"{r['refused_stores']} ({r['refused_while_running']})"
                   if "refused_stores" in r else "-")
        print(f"| {r['layout']} | {r['kind']} | {r['steps']} | "
              f"{r['sched_us_per_step_median']:.0f} | {ratio:.2f} | {refused} | "
              f"{r['wrong_tokens']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                   "python": platform.python_version()},
                       "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
