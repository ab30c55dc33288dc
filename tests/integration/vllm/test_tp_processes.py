"""Two tensor-parallel ranks in their own processes behind vLLM's real scheduler.

The scheduler (with the connector's scheduler half and kvtier's manager, which owns the
primary region) runs here; each rank is a ``spawn``ed process with the connector's worker half
and its own KV tensors (half the KV heads), copying its share of every slot. Each rank writes
bytes of its own (salted by rank) and checks every computed token of its share before every
step, so a rank that loaded another rank's share, or stale bytes, is caught. Then one rank is
killed while its transfers are in flight: the scheduler side keeps answering, the other rank
and the manager shut down without waiting on it, and no process, thread or shared-memory
region is left.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from pathlib import Path
from typing import Any

from real_engine import RealEngine
from test_real_scheduler import again_reversed, bytes_per_block, workload
from tp_workers import SpawnedWorkers
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.config import (
    build_offloading_config,
)

from kvtier.vllm import derive_instance_id


def kvtier_threads() -> list[str]:
    """Names of kvtier's threads alive in this process."""
    return [t.name for t in threading.enumerate() if t.name.startswith("kvtier")]


def test_two_ranks_in_spawned_processes_then_one_killed(tmp_path: Path) -> None:
    world = 2
    per_rank = bytes_per_block("full") // world
    extra = {"spec_name": "KVTierOffloadingSpec", "spec_module_path": "kvtier.vllm",
             "cpu_bytes_to_use": 40 * per_rank * world,
             "secondary_tiers": [{"type": "storage", "path": str(tmp_path / "storage"),
                                  "capacity_bytes": 1 << 26}]}
    threads_before = set(kvtier_threads())
    e = RealEngine(tmp_path, extra, num_gpu_blocks=24, max_batched_tokens=64, world_size=world)
    spec = e.connector.connector_scheduler.manager
    offload_cfg = build_offloading_config(e.vllm_config, e.scheduler.kv_cache_config)
    region = Path("/dev/shm") / f"kvtier-{derive_instance_id(offload_cfg)}"
    workers = SpawnedWorkers(e.vllm_config, e.worker_kv_cache_config, world, e.connector)
    e.runner = workers
    try:
        assert region.exists()
        jobs = workload(6, 24)
        e.run(jobs)
        e.run(again_reversed(e, jobs))
        assert len(e.finished) == 2 * len(jobs)
        assert workers.wrong_tokens == 0, workers.wrong_examples
        assert all(n > 1000 for n in workers.checked)
        assert e.hit_sources["host"] > 0 and e.hit_sources["disk"] > 0
        stats = spec.kvtier_stats()["manager"]
        assert stats["stored_blocks"] > 0 and stats["primary_hit_blocks"] > 0

        # Kill rank 1 while the step it was handed has transfers in flight.
        for j in jobs[:8]:
            e.add(j.tokens, 2)
        killed = False
        for _ in range(200):
            out = e.scheduler.schedule()
            meta = out.kv_connector_metadata
            if meta.load_jobs or meta.store_jobs:
                workers.send(out, e.prompts)
                os.kill(workers.procs[1].pid, signal.SIGKILL)
                workers.procs[1].join(30)
                killed = True
                break
            e._update(out, workers.execute(out, e.prompts))
        assert killed and not workers.procs[1].is_alive()
        # The scheduler side still serves: it schedules, and kvtier answers and stores.
        e.scheduler.finish_requests(None, _aborted())
        for _ in range(3):
            e.scheduler.schedule()
        key = b"\x07" * 36
        ctx = _ctx("after-kill")
        assert spec.prepare_store([key], ctx) is not None
        spec.complete_store([key], ctx)
        ctx.set_offload_key_position(key, 16)
        assert spec.lookup(key, ctx).name == "HIT"
    finally:
        workers.close()
        e.close()
    assert not mp.active_children()
    assert not region.exists(), "the primary region was left in /dev/shm"
    assert workers.leftover_threads == [[]]  # rank 0 stopped every kvtier thread
    assert set(kvtier_threads()) <= threads_before


def _aborted() -> Any:
    from vllm.v1.request import RequestStatus

    return RequestStatus.FINISHED_ABORTED


def _ctx(req_id: str) -> Any:
    from vllm.v1.kv_offload.base import ReqContext

    return ReqContext(req_id=req_id)
