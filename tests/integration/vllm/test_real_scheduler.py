"""kvtier under vLLM 0.33's real ``Scheduler`` and ``AsyncScheduler`` (see ``real_engine.py``).

Every request's KV is checked token by token, in every layer, before every step: whatever the
scheduler calls computed must hold exactly the bytes the stand-in model wrote for it, whether
this engine computed it, loaded it from kvtier's CPU tier, or got it from a block promoted from
storage or Redis. The CPU tier is smaller than the working set and the GPU pool small enough to
evict prefix-cache blocks and preempt requests, so blocks take every path.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from real_engine import Job, RealEngine
from trace_workload import trace_jobs
from vllm.v1.request import RequestStatus
from vllm_layouts import BLOCK, HEAD_SIZE, HEADS, LAYOUTS

PAGE = 2 * BLOCK * HEADS * HEAD_SIZE * 2  # one attention layer's page of one block (fp16 K+V)


def bytes_per_block(layout: str) -> int:
    """KV bytes of one engine block id (all aliased layer positions)."""
    specs = LAYOUTS[layout]()
    groups = {"full": 1, "full+swa": 2, "gemma3": 6, "mamba": 4}[layout]
    return PAGE * (len(specs) // groups)


def extra(layout: str, cpu_blocks: int, tiers: list[dict[str, Any]]) -> dict[str, Any]:
    """kv_connector_extra_config for kvtier with ``cpu_blocks`` primary slots."""
    return {"spec_name": "KVTierOffloadingSpec", "spec_module_path": "kvtier.vllm",
            "cpu_bytes_to_use": cpu_blocks * bytes_per_block(layout),
            "secondary_tiers": tiers}


def workload(seed: int, n: int, prefixes: int = 12) -> list[Job]:
    """Requests sharing system prompts of 4-8 blocks, each with its own tail, arriving in turn.

    The prompts are used in turn, so together they are more than the CPU tier holds.
    """
    rng = random.Random(seed)
    systems = [[rng.randrange(32000) for _ in range(BLOCK * rng.randrange(4, 9))]
               for _ in range(prefixes)]
    return [Job(systems[i % prefixes] + [rng.randrange(32000)
                                         for _ in range(rng.randrange(5, 40))],
                max_tokens=3, arrive_step=i)
            for i in range(n)]


def again_reversed(engine: RealEngine, jobs: list[Job]) -> list[Job]:
    """The same prompts, newest first: the recent ones are in the CPU tier, older in storage."""
    return [Job(j.tokens, 2, engine.steps + i) for i, j in enumerate(reversed(jobs))]


class Observed:
    """What happened along the way (from the scheduler's outputs each step)."""

    def __init__(self, engine: RealEngine) -> None:
        self.preempted = 0
        self.chunked = 0
        self.finished_with_stores = 0
        engine.on_step.append(self.see)

    def see(self, engine: RealEngine, out: Any) -> None:
        """Called with each step's SchedulerOutput before the runner executes it."""
        self.preempted += len(out.preempted_req_ids or ())
        for nr in out.scheduled_new_reqs:
            n = out.num_scheduled_tokens[nr.req_id]
            if nr.num_computed_tokens + n < len(nr.prompt_token_ids or ()):
                self.chunked += 1
        cs = engine.connector.connector_scheduler
        for req_id in out.finished_req_ids:
            st = cs._req_status.get(req_id)
            if st is not None and any(cs._jobs[j].is_store for j in st.transfer_jobs):
                self.finished_with_stores += 1


@pytest.fixture
def made(tmp_path: Path) -> Iterator[list[RealEngine]]:
    """Engines a test builds; closed after it."""
    engines: list[RealEngine] = []
    yield engines
    for e in engines:
        e.close()


def check_clean(engine: RealEngine) -> None:
    """After settling: every pin released, the slot table consistent."""
    engine.settle()
    primary = engine.manager.kv.primary
    primary.check()
    assert not any(primary.ref), "a primary slot is still pinned"
    assert not engine.connector.connector_scheduler._jobs


# (layout, GPU blocks, sync loads). A hybrid pool this tight needs vLLM's synchronous loads:
# with asynchronous ones vLLM 0.33's scheduler can stall (see test_hybrid_tight_pool_stall).
POOLS = [("full", 20, False), ("full+swa", 40, False), ("full+swa", 26, True)]


@pytest.mark.parametrize(("layout", "gpu_blocks", "sync_loads"), POOLS,
                         ids=[f"{p[0]}-{p[1]}blocks{'-sync' if p[2] else ''}" for p in POOLS])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["Scheduler", "AsyncScheduler"])
def test_every_request_right_from_cpu_and_storage(
    layout: str, gpu_blocks: int, sync_loads: bool, async_scheduling: bool, tmp_path: Path,
    made: list[RealEngine],
) -> None:
    tiers = [{"type": "storage", "path": str(tmp_path / "storage"), "capacity_bytes": 1 << 26}]
    ex = extra(layout, 48, tiers)
    if sync_loads:  # vLLM's own key: loads up to this many bytes a step complete in the step
        ex["sync_load_budget_bytes"] = 1 << 30
    e = RealEngine(tmp_path, ex, layout=layout, async_scheduling=async_scheduling,
                   num_gpu_blocks=gpu_blocks, max_batched_tokens=64)
    made.append(e)
    seen = Observed(e)
    run_then_reversed(e)
    assert e.runner.checked_tokens > 10_000
    # Tokens loaded, by where kvtier says they came from (vLLM's hit sources).
    assert e.hit_sources["host"] > 0, "nothing was served from blocks resident in the CPU tier"
    assert e.hit_sources["disk"] > 0, "nothing was served from blocks promoted from storage"
    assert e.manager.kvtier_stats()["tiers"]["storage0"]["hits"] > 0
    assert sum(1 for n in e.hit_tokens.values() if n) > 10
    assert seen.chunked > 0
    if gpu_blocks < 40:  # the 40-block hybrid pool holds every running request: no preemption
        assert seen.preempted > 0
    check_clean(e)


def run_then_reversed(e: RealEngine) -> None:
    """36 requests over 12 system prompts (16 tokens decoded each: decodes need blocks), then
    the same prompts newest first; every request finishes and every token is right."""
    jobs = [Job(j.tokens, 16, j.arrive_step) for j in workload(1, 36)]
    e.run(jobs)
    e.settle()
    # vLLM's own prefix cache is emptied: the newest prompts, asked first, come through the
    # connector from the CPU tier instead of (depending on timing) the GPU pool.
    assert e.scheduler.reset_prefix_cache()
    e.run(again_reversed(e, jobs))
    assert len(e.finished) == 2 * len(jobs)
    assert e.runner.wrong_tokens == 0, e.runner.wrong


def test_promotions_complete_under_a_tiny_cpu_tier(tmp_path: Path, made: list[RealEngine]) -> None:
    """A hybrid model over a CPU tier half the size of the test above: running requests' stores
    want every slot, yet waiting requests' promotions from storage still land and serve tokens
    (a promotion is preempted by stores at most once, and its blocks wait a step for their
    request), and every token stays right."""
    tiers = [{"type": "storage", "path": str(tmp_path / "storage"), "capacity_bytes": 1 << 26}]
    e = RealEngine(tmp_path, extra("full+swa", 24, tiers), layout="full+swa", num_gpu_blocks=40,
                   max_batched_tokens=64)
    made.append(e)
    run_then_reversed(e)
    stats = e.manager.kvtier_stats()
    assert stats["manager"]["promotions_preempted"] > 0, "stores never needed promotions' slots"
    assert stats["tiers"]["storage0"]["hits"] > 0
    assert e.hit_sources["disk"] > 0, "no promoted block served a request"
    check_clean(e)

@pytest.mark.parametrize("layout", ["full", "full+swa"])
def test_stores_under_a_cpu_tier_smaller_than_one_request(
    layout: str, tmp_path: Path, made: list[RealEngine]
) -> None:
    """A CPU tier smaller than the store of one 64-token prefill chunk (4 chunks per group):
    stores are cut to a prefix (with its window, for the hybrid), and every token stays right
    while the same prompts come back."""
    cpu_blocks = 3 if layout == "full" else 6
    e = RealEngine(tmp_path, extra(layout, cpu_blocks, []), layout=layout, num_gpu_blocks=40,
                   max_batched_tokens=64)
    made.append(e)
    jobs = workload(6, 16, prefixes=4)
    e.run(jobs)
    e.settle()
    assert e.manager.kvtier_stats()["vllm"]["partial_stores"] > 0
    e.run([Job(j.tokens, 2, e.steps + 4 * i) for i, j in enumerate(jobs)])
    assert len(e.finished) == 2 * len(jobs)
    assert e.runner.wrong_tokens == 0, e.runner.wrong
    check_clean(e)


def test_abort_while_load_in_flight(tmp_path: Path, made: list[RealEngine]) -> None:
    """A request aborted after its load was issued: freed once the load lands, nothing leaks."""
    e = RealEngine(tmp_path, extra("full", 256, []), num_gpu_blocks=20)
    made.append(e)
    jobs = workload(2, 24)
    e.run(jobs)
    e.settle()
    aborted: list[str] = []

    def abort_loading(engine: RealEngine, out: Any) -> None:
        meta = out.kv_connector_metadata
        for job in meta.load_jobs.values():
            if len(aborted) < 3:
                engine.scheduler.finish_requests(job.req_id, RequestStatus.FINISHED_ABORTED)
                aborted.append(job.req_id)

    e.on_step.append(abort_loading)
    e.run(again_reversed(e, jobs))
    assert len(aborted) == 3
    assert all(r not in e.finished for r in aborted)  # aborted, never completed
    e.on_step.clear()
    e.run([Job(j.tokens, 2, e.steps) for j in jobs])  # the same prompts load fine afterwards
    assert e.runner.wrong_tokens == 0, e.runner.wrong
    assert sum(1 for n in e.hit_tokens.values() if n) >= len(jobs)
    check_clean(e)


def test_finishing_while_stores_in_flight(tmp_path: Path, made: list[RealEngine]) -> None:
    """Requests that finish with store jobs still running: the stores land and serve later."""
    e = RealEngine(tmp_path, extra("full", 256, []), num_gpu_blocks=20)
    made.append(e)
    seen = Observed(e)
    jobs = [Job(j.tokens, max_tokens=1, arrive_step=j.arrive_step) for j in workload(3, 24)]
    e.run(jobs)
    assert seen.finished_with_stores > 0
    e.settle()
    before = e.manager.kvtier_stats()["manager"]["primary_hit_blocks"]
    e.run(again_reversed(e, jobs))
    assert e.manager.kvtier_stats()["manager"]["primary_hit_blocks"] > before
    assert e.runner.wrong_tokens == 0, e.runner.wrong
    check_clean(e)


@pytest.mark.redis
def test_loads_from_the_network_tier(tmp_path: Path, made: list[RealEngine],
                                     redis_server: Any) -> None:
    """Blocks evicted from the CPU tier come back from Redis, byte for byte."""
    tiers = [{"type": "network", "url": redis_server.url, "key_prefix": f"rs-{tmp_path.name}:"}]
    e = RealEngine(tmp_path, extra("full+swa", 40, tiers), layout="full+swa",
                   num_gpu_blocks=48, max_batched_tokens=64)
    made.append(e)
    jobs = workload(4, 40)
    e.run(jobs)
    e.settle()
    e.run([Job(j.tokens, 2, e.steps + i) for i, j in enumerate(jobs)])
    assert e.runner.wrong_tokens == 0, e.runner.wrong
    assert e.manager.kvtier_stats()["tiers"]["network0"]["hits"] > 0
    check_clean(e)


@pytest.mark.parametrize("layout", ["gemma3", "mamba"])
def test_more_hybrid_layouts(layout: str, tmp_path: Path, made: list[RealEngine]) -> None:
    """Six groups (Gemma 3's 5:1 sliding/full) and Mamba "align" groups with an attention one."""
    tiers = [{"type": "storage", "path": str(tmp_path / "storage"), "capacity_bytes": 1 << 26}]
    e = RealEngine(tmp_path, extra(layout, 64, tiers), layout=layout, num_gpu_blocks=96,
                   max_batched_tokens=64)
    made.append(e)
    jobs = workload(5, 30, prefixes=8)
    e.run(jobs)
    e.settle()
    e.run([Job(j.tokens, 2, e.steps + i) for i, j in enumerate(jobs)])
    assert len(e.finished) == 2 * len(jobs)
    assert e.runner.wrong_tokens == 0, e.runner.wrong
    assert sum(1 for n in e.hit_tokens.values() if n) > 5
    check_clean(e)


def test_a_hybrid_loads_from_storage_under_a_small_cpu_tier(
    tmp_path: Path, made: list[RealEngine]
) -> None:
    """The shared trace's first 200 requests (prompts sharing leading parts of each other, as in
    the trace) on a hybrid model behind a CPU tier of 40 blocks, far less than the working set.
    A hit needs the sliding-window group's whole window at the boundary as well as the full
    group's prefix: stores are cut only where the window is whole, and a request's promotion
    brings every group's blocks together, so tokens are loaded from blocks promoted from
    storage. Tier jobs finish before each step and no promotion deadline passes, so the run
    barely depends on timing: 1823-2207 tokens from storage in five runs, against 287-480
    before those rules (and 0 when tier jobs finished at their own pace, as in
    ``benchmarks/bench_vllm_real.py``)."""
    tiers = [{"type": "storage", "path": str(tmp_path / "storage"), "capacity_bytes": 1 << 28}]
    ex = {**extra("full+swa", 40, tiers), "promotion_deadline_seconds": 600}
    e = RealEngine(tmp_path, ex, layout="full+swa", num_gpu_blocks=96,
                   max_batched_tokens=256, max_model_len=512, sync_tiers=True)
    made.append(e)
    jobs = trace_jobs(200, 24)
    e.run(jobs, max_seconds=300)
    assert len(e.finished) == len(jobs)
    assert e.runner.wrong_tokens == 0, e.runner.wrong
    stats = e.manager.kvtier_stats()["manager"]
    assert e.hit_sources["disk"] >= 1000, f"{e.hit_sources['disk']} tokens from storage ({stats})"
    check_clean(e)
