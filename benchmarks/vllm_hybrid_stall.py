"""vLLM 0.33's scheduler stalling a hybrid model on a tight GPU pool, with kvtier or vLLM's spec.

Replays the real-scheduler test's workload (36 requests sharing 12 system prompts, then the
same prompts newest first) through vLLM 0.33's real ``Scheduler`` and ``OffloadingConnector``
for a full + sliding-window model (gpt-oss's shape) on a pool of 26 GPU blocks, with a CPU tier
of 48 blocks and a storage tier behind it: kvtier (``--spec kvtier``; both connector halves,
every token checked) or vLLM's own ``TieringOffloadingSpec`` with its ``fs`` tier (``--spec
vllm``; its worker needs CUDA, so transfer jobs are acknowledged without copying and only the
scheduler is observed). A run that takes no step for ``--idle-steps`` steps in a row has
stalled; the script then prints, for every request holding GPU blocks, what vLLM 0.33 reserves
for it (``Scheduler._request_remaining_blocks``) against what its next chunk needs.

The stall: two requests admitted with asynchronous loads each hold part of the pool; vLLM
admitted the second after reserving the first one's remaining blocks, but for a sliding-window
group that reservation counts the window the finished request keeps, not the window plus the
new chunk that the next prefill step allocates before it frees the blocks that slid out. With
nothing running, waiting requests are never preempted, so neither can take its next step.
``--sync-loads`` sets vLLM's ``sync_load_budget_bytes``: a load then completes within the step
that schedules its request, which runs (and can be preempted) like any other.

Usage: python benchmarks/vllm_hybrid_stall.py --spec vllm --seed 3 [--sync-loads]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "vllm"))
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

from real_engine import Job, RealEngine  # noqa: E402
from test_real_scheduler import bytes_per_block, extra, workload  # noqa: E402


def run(e: RealEngine, jobs: list[Job], idle_steps: int) -> bool:
    """Step until every job finished (True) or nothing was scheduled ``idle_steps`` times."""
    pending = sorted(jobs, key=lambda j: j.arrive_step)
    i = idle = 0
    while i < len(pending) or e.busy():
        while i < len(pending) and pending[i].arrive_step <= e.steps:
            e.add(pending[i].tokens, pending[i].max_tokens)
            i += 1
        if e.step():
            idle = 0
        else:
            idle += 1
            time.sleep(0.001)  # a model step's time: tier jobs run meanwhile
            if idle >= idle_steps:
                return False
    return True


def holders(e: RealEngine) -> list[str]:
    """Requests holding GPU blocks: status, tokens, blocks per group, reservation vs need."""
    s: Any = e.scheduler
    kvm = s.kv_cache_manager
    lines = [f"running {len(s.running)}, free GPU blocks {kvm.block_pool.get_num_free_blocks()}"]
    for r in s.requests.values():
        if not r.num_computed_tokens:
            continue
        blocks = kvm.coordinator.get_blocks(r.request_id)
        held = [sum(1 for b in g if not b.is_null) for g in blocks]
        nxt = min(r.num_tokens, r.num_computed_tokens + e.vllm_config.scheduler_config
                  .max_num_batched_tokens)
        need = kvm.coordinator.get_num_blocks_to_allocate(
            request_id=r.request_id, num_tokens=nxt,
            new_computed_blocks=kvm.empty_kv_cache_blocks.blocks, num_encoder_tokens=0,
            total_computed_tokens=r.num_computed_tokens,
            num_local_computed_tokens=r.num_computed_tokens, num_tokens_main_model=nxt)
        lines.append(f"{r.request_id} {r.status.name}: {r.num_computed_tokens} of {r.num_tokens}"
                     f" tokens, blocks held per group {held}, vLLM's reservation "
                     f"{s._request_remaining_blocks(r)}, next chunk needs {need}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", choices=["kvtier", "vllm"], default="vllm")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--gpu-blocks", type=int, default=26)
    ap.add_argument("--sync-loads", action="store_true")
    ap.add_argument("--idle-steps", type=int, default=5000)
    args = ap.parse_args()
    layout = "full+swa"
    root = Path(tempfile.mkdtemp(prefix="kvtier-stall-"))
    if args.spec == "kvtier":
        ex = extra(layout, 48, [{"type": "storage", "path": str(root / "storage"),
                                 "capacity_bytes": 1 << 26}])
    else:
        ex = {"spec_name": "TieringOffloadingSpec",
              "cpu_bytes_to_use": 48 * bytes_per_block(layout),
              "secondary_tiers": [{"type": "fs", "root_dir": str(root / "fs")}]}
    if args.sync_loads:
        ex["sync_load_budget_bytes"] = 1 << 30
    e = RealEngine(root, ex, layout=layout, num_gpu_blocks=args.gpu_blocks,
                   max_batched_tokens=64, worker_half=args.spec == "kvtier")
    try:
        jobs = [Job(j.tokens, 16, j.arrive_step) for j in workload(args.seed, 36)]
        ok = run(e, jobs, args.idle_steps)
        if ok:
            e.settle()
            again = [Job(j.tokens, 2, e.steps + i) for i, j in enumerate(reversed(jobs))]
            ok = run(e, again, args.idle_steps)
        print(f"spec {args.spec}, seed {args.seed}, {args.gpu_blocks} GPU blocks, "
              f"{'sync' if args.sync_loads else 'async'} loads: "
              f"{'finished' if ok else 'STALLED'} after {e.steps} steps, "
              f"{len(e.finished)} of {2 * len(jobs)} requests done, "
              f"wrong tokens {e.runner.wrong_tokens}")
        if not ok:
            print("\n".join(holders(e)))
    finally:
        e.close()


if __name__ == "__main__":
    main()
