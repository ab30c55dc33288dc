"""vLLM 0.33's real ``Scheduler`` / ``AsyncScheduler`` and both halves of its real
``OffloadingConnector`` around kvtier, with a stand-in model runner that checks every token.

What is real: the ``VllmConfig`` and vLLM's KV cache planning and allocation for a tiny model
(``vllm_layouts.py``), the scheduler with its KV cache manager, prefix cache, chunked prefill and
preemption, the connector's scheduler half (created by the scheduler) and its worker half
(``register_kv_caches`` on the engine's KV views), and kvtier behind them.

What stands in: the model runner (``stand_in_runner.py``), which writes and checks every token's
bytes in every layer and drives the connector's worker half in the model runner's order. The
engine loop here follows ``EngineCore.step`` or, with ``async_scheduling``,
``step_with_batch_queue`` (two batches in flight). ``engine_diagnose.py`` says what an engine
that did not finish waits for.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

from engine_diagnose import diagnose
from stand_in_runner import StandInRunner
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
    OffloadingConnector,
)
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager
from vllm_layouts import HEADS, LAYOUTS, make_vllm_config, model_dir, plan_kv_cache

init_none_hash(sha256)


@dataclass
class Job:
    """One request of a workload."""

    tokens: list[int]
    max_tokens: int = 4
    arrive_step: int = 0


class RealEngine:
    """vLLM's scheduler, the real connector halves, kvtier, and the stand-in runner."""

    def __init__(self, root: Path, extra: dict[str, Any] | None, *, layout: str = "full",
                 async_scheduling: bool = False, num_gpu_blocks: int = 256,
                 max_num_seqs: int = 8, max_batched_tokens: int = 128,
                 world_size: int = 1, max_model_len: int = 256,
                 worker_half: bool = True, sync_tiers: bool = False) -> None:
        self.layout = layout
        # Before each step, wait until every kvtier tier job has finished and been collected, and
        # within each step until the worker half's copies have: promotions, write-throughs and
        # the copies to and from the engine land at the same step in every run (deterministic).
        self.sync_tiers = sync_tiers
        self.vllm_config = make_vllm_config(
            model_dir(root), extra or {}, layout=layout, async_scheduling=async_scheduling,
            max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens,
            world_size=world_size, max_model_len=max_model_len)
        if extra is None:
            self.vllm_config.kv_transfer_config = None
        specs = LAYOUTS[layout]()
        if world_size > 1:  # each tensor-parallel rank holds its share of the KV heads
            specs = {n: replace(sp, num_kv_heads=HEADS // world_size)  # type: ignore[call-arg]
                     for n, sp in specs.items()}
        worker_cfg, sched_cfg, block_size, hash_block_size = plan_kv_cache(
            self.vllm_config, specs, num_gpu_blocks)
        cls = AsyncScheduler if async_scheduling else Scheduler
        self.scheduler = cls(
            vllm_config=self.vllm_config, kv_cache_config=sched_cfg,
            structured_output_manager=StructuredOutputManager(self.vllm_config),
            block_size=block_size, hash_block_size=hash_block_size, log_stats=True,
        )
        self.connector: Any = self.scheduler.connector
        if self.connector is not None:  # observe the tokens each request gets from kvtier
            matched = self.connector.get_num_new_matched_tokens

            def observe(request: Request, *args: Any, **kwargs: Any) -> Any:
                n, is_async = matched(request, *args, **kwargs)
                if n:
                    rid = request.request_id
                    self.hit_tokens[rid] = max(self.hit_tokens.get(rid, 0), n)
                return n, is_async

            self.connector.get_num_new_matched_tokens = observe
            sources = self.connector.get_external_cache_hit_sources

            def observe_sources(request: Request, n: int) -> Any:
                got = sources(request, n)
                for source, tokens in got.items():
                    self.hit_sources[str(source.value)] += tokens
                return got

            self.connector.get_external_cache_hit_sources = observe_sources
        self.worker_kv_cache_config = worker_cfg
        self.worker_connector: OffloadingConnector | None = None
        self.runner: Any = None  # set by the caller when the workers live elsewhere
        if world_size == 1:
            if extra is not None and worker_half:
                self.worker_connector = OffloadingConnector(
                    self.vllm_config, KVConnectorRole.WORKER, worker_cfg)
            self.runner = StandInRunner(self.vllm_config, worker_cfg, self.worker_connector,
                                        acknowledge=extra is not None and not worker_half,
                                        sync_transfers=sync_tiers and self.worker_connector is not None)
        self.hasher = get_request_block_hasher(hash_block_size, sha256)
        self.async_scheduling = async_scheduling
        self.prompts: dict[str, list[int]] = {}
        self.finished: dict[str, RequestStatus] = {}
        self.hit_tokens: dict[str, int] = {}
        self.hit_sources: Counter[str] = Counter()  # tokens loaded, by vLLM's hit source
        self.steps = 0
        self._ids = 0
        self._queue: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()
        self.on_step: list[Callable[[RealEngine, SchedulerOutput], None]] = []
        self.schedule_seconds = 0.0

    @property
    def manager(self) -> Any:
        """The connector's offloading manager (kvtier's adapter)."""
        return self.connector.connector_scheduler.manager

    def add(self, tokens: list[int], max_tokens: int = 4) -> str:
        """Add a request; its id."""
        self._ids += 1
        req_id = f"r{self._ids}"
        req = Request(request_id=req_id, prompt_token_ids=list(tokens),
                      sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                      pooling_params=None, block_hasher=self.hasher)
        self.prompts[req_id] = list(tokens)
        self.scheduler.add_request(req)
        return req_id

    def _update(self, out: SchedulerOutput, result: ModelRunnerOutput) -> None:
        outputs = self.scheduler.update_from_output(out, result)
        for eco in outputs.values():
            for o in eco.outputs:
                if o.finish_reason is not None:
                    self.finished[o.request_id] = RequestStatus.FINISHED_LENGTH_CAPPED

    def step(self) -> bool:
        """One engine step (with async scheduling: keep two batches in flight).

        True when the step scheduled tokens.
        """
        import time

        self.steps += 1
        if self.sync_tiers and self.connector is not None:
            self._wait_for_tiers()
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        self.schedule_seconds += time.perf_counter() - t0
        for hook in self.on_step:
            hook(self, out)
        result = self.runner.execute(out, self.prompts)
        if not self.async_scheduling:
            self._update(out, result)
            return out.total_num_scheduled_tokens > 0
        self._queue.appendleft((out, result))
        if len(self._queue) >= 2:
            self._update(*self._queue.pop())
        if out.total_num_scheduled_tokens == 0:  # nothing new in flight: take every result
            while self._queue:
                self._update(*self._queue.pop())
        return out.total_num_scheduled_tokens > 0

    def _wait_for_tiers(self, max_seconds: float = 30.0) -> None:
        import time

        kv = self.manager.kv
        deadline = time.monotonic() + max_seconds
        while kv._jobs:
            kv._collect()
            if not kv._jobs:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"tier jobs did not finish\n{self.diagnose()}")
            time.sleep(0.0005)

    def busy(self) -> bool:
        """Requests or connector work remain."""
        return bool(self._queue) or self.scheduler.has_requests()

    def run(self, jobs: Sequence[Job], max_seconds: float = 100.0) -> None:
        """Feed the jobs at their arrival steps and step until everything is done.

        A step that schedules nothing (requests wait for kvtier's tiers) yields the CPU for a
        millisecond, as a model step would take time; ``max_seconds`` bounds the whole run.
        """
        import time

        pending = sorted(jobs, key=lambda j: j.arrive_step)
        i = 0
        deadline = time.monotonic() + max_seconds
        while i < len(pending) or self.busy():
            while i < len(pending) and pending[i].arrive_step <= self.steps:
                self.add(pending[i].tokens, pending[i].max_tokens)
                i += 1
            if not self.step():
                time.sleep(0.001)
            if time.monotonic() > deadline:
                raise AssertionError(f"not done after {max_seconds} s\n{self.diagnose()}")

        """What the unfinished requests wait for (for a failing test's message)."""
        return diagnose(self)

    def settle(self, max_seconds: float = 120.0) -> None:
        """Step until the connector and kvtier have nothing in flight."""
        import time

        deadline = time.monotonic() + max_seconds
        while self.busy() or (self.connector is not None and self.manager.has_pending_work()):
            self.step()
            time.sleep(0.001)
            if time.monotonic() > deadline:
                raise AssertionError(f"kvtier did not settle\n{self.diagnose()}")

    def close(self) -> None:
        """Shut both connector halves down."""
        if self.worker_connector is not None:
            self.worker_connector.shutdown()
        if self.connector is not None:
            self.connector.shutdown()
