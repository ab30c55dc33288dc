"""An engine simulator that drives an offloading manager and worker exactly as an engine does.

The engine owns a KV pool of torch tensors (CUDA when present, CPU otherwise) with its own prefix
cache, and runs a step loop. Requests arrive by timestamp; a step admits, in arrival order, what
it can. For each admitted request:

1. the engine's prefix cache gives a leading run of blocks already in the pool;
2. the offloading manager is asked for the rest (``lookup``; ``None`` means "ask again after the
   next ``on_schedule_end``": the request waits at the head of the queue, nothing behind it is
   admitted before it, so the replay never reorders requests);
3. the hit blocks are loaded (``prepare_load`` -> worker ``transfer_async`` -> ``get_finished`` ->
   ``complete_load``), and every loaded block is checked against the bytes its key implies;
4. the remainder is "prefilled": bytes derived from each block's key are written into its engine
   blocks;
5. the blocks are stored (``touch``, ``prepare_store`` -> worker ``transfer_async`` ->
   ``complete_store``), and the request finishes; its blocks go to the engine's prefix cache.

``on_schedule_end`` is called once per step. With ``concurrency=1`` (the default) a request's
blocks are stored before the next request's lookup, which is what the reference replay assumes.

The pool's unit is one offloaded block (``block_tokens // gpu_block_tokens`` engine blocks), and
its prefix cache is an LRU over those units.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from kvtier.bench.offload import Offload
from kvtier.bench.workload import Request, Workload, full_block_count, tokens_in_prefix
from kvtier.types import GPULoadStoreSpec, ReqContext

_MIX = np.uint64(0x9E3779B97F4A7C15)


class BenchError(RuntimeError):
    """The replay could not go on (a manager that never answers, a pool too small, ...)."""


@dataclass
class EngineOptions:
    """Geometry and behaviour of the simulated engine."""

    block_tokens: int = 512
    gpu_block_tokens: int = 16
    bytes_per_block: int = 4096  # bytes of one offloaded block (all layers)
    layers: int = 2
    prefix_cache: bool = True
    gpu_blocks: int | None = None  # pool size in offloaded-block units (None: sized for the load)
    full_blocks_only: bool = False
    concurrency: int = 1
    device: str = "auto"
    step_base_s: float = 0.002  # simulated step time: fixed part
    step_token_s: float = 1e-5  # simulated step time: per prefilled token
    stall_s: float = 60.0  # a request waiting this long (wall) on lookup is an error

    @property
    def blocks_per_unit(self) -> int:
        """Engine blocks per offloaded block."""
        return self.block_tokens // self.gpu_block_tokens

    @property
    def bytes_per_gpu_block(self) -> int:
        """Bytes of one engine block, all layers."""
        return self.bytes_per_block // self.blocks_per_unit

    def validate(self) -> None:
        """Raise ValueError naming the option that is out of range."""
        if self.gpu_block_tokens <= 0 or self.block_tokens <= 0:
            raise ValueError("--block-tokens and --gpu-block-tokens must be positive")
        if self.block_tokens % self.gpu_block_tokens:
            raise ValueError(
                f"--block-tokens ({self.block_tokens}) must be a multiple of "
                f"--gpu-block-tokens ({self.gpu_block_tokens})"
            )
        unit = 8 * self.layers * self.blocks_per_unit
        if self.bytes_per_block <= 0 or self.bytes_per_block % unit:
            raise ValueError(
                f"--bytes-per-block ({self.bytes_per_block}) must be a positive multiple of "
                f"{unit} (8 bytes x {self.layers} layers x {self.blocks_per_unit} engine blocks)"
            )
        if self.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")


def block_payload(keys: Sequence[bytes], blocks_per_unit: int, words: int) -> np.ndarray:
    """Expected engine-block contents for ``keys``: (len(keys) * blocks_per_unit, words) uint64.

    Derived from each key's xxh64 digest, so every block (and every engine block within it)
    has its own content and a block put in the wrong place is caught.
    """
    bases = np.fromiter((xxhash.xxh64_intdigest(k) for k in keys), dtype=np.uint64, count=len(keys))
    idx = np.arange(blocks_per_unit * words, dtype=np.uint64).reshape(blocks_per_unit, words) * _MIX
    return (bases[:, None, None] ^ idx[None]).reshape(len(keys) * blocks_per_unit, words)


# -- the engine's own KV pool ---------------------------------------------------------------------
class EnginePool:
    """The engine's KV tensors in units of offloaded blocks, with an LRU prefix cache."""

    def __init__(self, units: int, opts: EngineOptions, device: Any) -> None:
        import torch

        f = opts.blocks_per_unit
        per_layer = opts.bytes_per_gpu_block // opts.layers
        # bf16 tensors, as an engine's; the worker sees them as bytes.
        self.tensors = [
            torch.zeros((units * f, per_layer // 2), dtype=torch.bfloat16, device=device)
            for _ in range(opts.layers)
        ]
        self.byte_views = [t.view(torch.uint8) for t in self.tensors]
        self.units = units
        self.f = f
        self.per_layer = per_layer
        self.words = opts.bytes_per_gpu_block // 8
        self.prefix_cache = opts.prefix_cache
        self.free: list[int] = list(range(units - 1, -1, -1))
        self.key_unit: dict[bytes, int] = {}
        self.unit_key: list[bytes | None] = [None] * units
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached units nobody uses, LRU first
        self.ref = [0] * units
        self.device = device
        self._torch = torch

    def match(self, keys: Sequence[bytes]) -> int:
        """Leading run of ``keys`` cached in the pool."""
        if not self.prefix_cache:
            return 0
        n = 0
        for k in keys:
            if k not in self.key_unit:
                break
            n += 1
        return n

    def acquire(self, keys: Sequence[bytes], cached: int, total: int) -> list[int] | None:
        """Units for a request: its first ``cached`` keys' cached units, then fresh ones, ``total``
        in all. None (nothing changed) when the pool cannot give that many now."""
        fresh = total - cached
        hit_units = [self.key_unit[k] for k in keys[:cached]]
        idle_hits = sum(1 for u in hit_units if self.ref[u] == 0)
        reclaimable = len(self.free) + len(self.lru) - idle_hits
        if reclaimable < fresh:
            return None
        for u in hit_units:
            if self.ref[u] == 0:
                self.lru.pop(u, None)
            self.ref[u] += 1
        out = list(hit_units)
        for _ in range(fresh):
            if self.free:
                u = self.free.pop()
            else:
                u, _ = self.lru.popitem(last=False)
                old = self.unit_key[u]
                if old is not None:
                    del self.key_unit[old]
                    self.unit_key[u] = None
            self.ref[u] = 1
            out.append(u)
        return out

    def release(self, units: Sequence[int], keys: Sequence[bytes]) -> None:
        """A request is done: cache its units under ``keys`` (same order) or free them."""
        for i, u in enumerate(units):
            key = keys[i] if i < len(keys) else None
            if self.prefix_cache and key is not None and self.unit_key[u] is None:
                if key not in self.key_unit:
                    self.key_unit[key] = u
                    self.unit_key[u] = key
            self.ref[u] -= 1
            if self.ref[u] == 0:
                if self.unit_key[u] is not None:
                    self.lru[u] = None
                else:
                    self.free.append(u)

    def engine_ids(self, units: Sequence[int]) -> np.ndarray:
        """Engine block ids of some units, in order."""
        u = np.asarray(units, dtype=np.int64)
        return (u[:, None] * self.f + np.arange(self.f, dtype=np.int64)[None]).reshape(-1)

    def write(self, units: Sequence[int], keys: Sequence[bytes]) -> None:
        """"Prefill": write each key's bytes into its unit."""
        if not units:
            return
        data = block_payload(keys, self.f, self.words).view(np.uint8)
        idx = self._torch.from_numpy(self.engine_ids(units)).to(self.device)
        for layer, view in enumerate(self.byte_views):
            part = np.ascontiguousarray(data[:, layer * self.per_layer : (layer + 1) * self.per_layer])
            view.index_copy_(0, idx, self._torch.from_numpy(part).to(self.device))

    def check(self, units: Sequence[int], keys: Sequence[bytes]) -> int:
        """Number of units whose bytes are not what their key implies."""
        if not units:
            return 0
        torch = self._torch
        want = block_payload(keys, self.f, self.words).view(np.uint8)
        idx = torch.from_numpy(self.engine_ids(units)).to(self.device)
        bad = np.zeros(len(units), dtype=bool)
        for layer, view in enumerate(self.byte_views):
            got = view.index_select(0, idx).cpu().numpy()
            part = want[:, layer * self.per_layer : (layer + 1) * self.per_layer]
            rows_bad = (got != part).any(axis=1).reshape(len(units), self.f).any(axis=1)
            bad |= rows_bad
        return int(bad.sum())


# -- one request's life -----------------------------------------------------------------------
@dataclass
class _Run:
    req: Request
    ctx: ReqContext
    keys: list[bytes]  # the blocks the engine caches and offloads (prefix order)
    engine_hit: int = 0
    tier_hit: int = 0
    units: list[int] = field(default_factory=list)
    first_try_step: int = -1
    first_cpu_run: int = 0
    none_answers: int = 0
    wait_since: float = 0.0
    load_job: int | None = None
    store_jobs: dict[int, list[bytes]] = field(default_factory=dict)
    store_todo: list[bytes] = field(default_factory=list)
    stored_ok: bool = True


@dataclass
class RunCounters:
    """What one replay measured."""

    requests: int = 0
    block_refs: int = 0
    input_tokens: int = 0
    engine_hit_blocks: int = 0
    engine_hit_tokens: int = 0
    tier_hit_blocks: dict[str, int] = field(default_factory=dict)
    tier_hit_tokens: dict[str, int] = field(default_factory=dict)
    loaded_blocks: int = 0
    wrong_blocks: int = 0
    prefill_tokens: int = 0
    stored_blocks: int = 0
    store_retries: int = 0
    lookup_none: int = 0
    waited_requests: int = 0
    wait_steps_total: int = 0
    wait_seconds_total: float = 0.0
    steps: int = 0
    manager_calls: int = 0
    manager_seconds: float = 0.0
    lookup_blocks: int = 0
    wall_s: float = 0.0
    sim_s: float = 0.0
    transfer_failures: int = 0


class EngineSim:
    """Replays a workload through one :class:`Offload` (see the module docstring)."""

    def __init__(
        self, workload: Workload, offload: Offload, opts: EngineOptions,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        opts.validate()
        if workload.block_tokens != opts.block_tokens:
            raise ValueError(
                f"the workload has {workload.block_tokens}-token blocks, "
                f"the engine {opts.block_tokens}"
            )
        self.wl = workload
        self.off = offload
        self.opts = opts
        self.progress = progress
        self.c = RunCounters()
        self._job_ids = itertools.count(1)
        self._shadow: dict[str, set[bytes]] = {}

    # -- timing wrapper around manager calls ----------------------------------------------------
    def _m(self, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.c.manager_seconds += time.perf_counter() - t0
            self.c.manager_calls += 1

    def _device(self) -> Any:
        import torch

        d = self.opts.device
        if d == "auto":
            d = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(d)

    def _pool_units(self) -> int:
        if self.opts.gpu_blocks is not None:
            return self.opts.gpu_blocks
        biggest = max(len(r.hash_ids) for r in self.wl.requests)
        return max(64, 2 * biggest * self.opts.concurrency)

    # -- the replay -----------------------------------------------------------------------------
    def run(self) -> RunCounters:
        """Replay every request; returns the counters."""
        self.start()
        try:
            while self.advance() is not None:
                pass
            self.stats = self.off.stats()
        finally:
            self.off.shutdown()
        return self.c

    def start(self) -> None:
        """Build the engine's KV pool and attach the offload (before ``advance``)."""
        opts = self.opts
        biggest = max(len(r.hash_ids) for r in self.wl.requests)
        units = self._pool_units()
        if units < biggest:
            raise BenchError(
                f"--gpu-blocks {units} is smaller than the largest request ({biggest} blocks)"
            )
        pool = EnginePool(units, opts, self._device())
        self.pool = pool
        self.off.attach(pool.tensors, opts)
        self._stepper = self._steps(pool)

    def advance(self) -> float | None:
        """Run one engine step; the simulated time after it, or None when the replay is done."""
        return next(self._stepper, None)

    def _steps(self, pool: EnginePool) -> Iterator[float]:
        opts = self.opts
        c = self.c
        queue = deque(self.wl.requests)
        running: dict[str, _Run] = {}
        jobs: dict[int, tuple[str, _Run]] = {}
        sim = 0.0
        t_start = time.perf_counter()
        head: _Run | None = None
        done = 0
        while queue or running or head is not None:
            c.steps += 1
            step_tokens = 0
            progressed = False
            # 1. finished copies
            for job_id, ok in self.off.finished():
                kind, run = jobs.pop(job_id)
                progressed = True
                if not ok:
                    c.transfer_failures += 1
                if kind == "load":
                    step_tokens += self._after_load(run, pool, ok)
                    self._track_store_jobs(run, jobs)
                else:
                    keys = run.store_jobs.pop(job_id)
                    self._m(self.off.complete_store, keys, run.ctx, ok)
                    if ok:
                        c.stored_blocks += len(keys)
                done += self._maybe_finish(run, pool, running)
            # 2. stores that could not get slots last step
            for run in list(running.values()):
                if run.store_todo and run.load_job is None:
                    before = len(run.store_jobs)
                    self._store(run, pool)
                    self._track_store_jobs(run, jobs)
                    if len(run.store_jobs) > before or not run.store_todo:
                        progressed = True
                    done += self._maybe_finish(run, pool, running)
            # 3. admission, in arrival order
            if not running and queue and head is None and queue[0].arrival_s > sim:
                sim = queue[0].arrival_s  # idle engine: jump to the next arrival
            while len(running) < opts.concurrency and (head is not None or queue):
                if head is None:
                    if queue[0].arrival_s > sim:
                        break
                    req = queue.popleft()
                    head = self._new_run(req)
                run = head
                admitted, tokens = self._admit(run, pool)
                if not admitted:
                    break
                progressed = True
                head = None
                running[run.req.req_id] = run
                step_tokens += tokens
                if run.load_job is not None:
                    jobs[run.load_job] = ("load", run)
                self._track_store_jobs(run, jobs)
                done += self._maybe_finish(run, pool, running)
            # 4. end of the step
            self._m(self.off.end_step)
            self._drain_events()
            sim += opts.step_base_s + opts.step_token_s * step_tokens
            if self.progress is not None:
                self.progress(done)
            if not progressed:
                self._idle(jobs, head)
            c.wall_s = time.perf_counter() - t_start
            c.sim_s = sim
            yield sim

    def _idle(self, jobs: dict[int, tuple[str, _Run]], head: _Run | None) -> None:
        """Nothing moved this step: wait for a copy, or give tier threads a moment."""
        if head is not None and head.none_answers and (
            time.perf_counter() - head.wait_since > self.opts.stall_s
        ):
            raise BenchError(
                f"request {head.req.req_id}: lookup answered None for "
                f"{self.opts.stall_s:.0f} s ({head.none_answers} steps); the manager never "
                "finished its promotion"
            )
        if jobs and not (head is not None and head.none_answers):
            self.off.wait([next(iter(jobs))])
        else:
            time.sleep(0.0002)

    def _new_run(self, req: Request) -> _Run:
        bt = self.opts.block_tokens
        n = full_block_count(req, bt) if self.opts.full_blocks_only else len(req.keys)
        run = _Run(req, ReqContext(req.req_id), req.keys[:n])
        c = self.c
        c.requests += 1
        c.block_refs += len(req.keys)
        c.input_tokens += req.input_length
        self._m(self.off.new_request, run.ctx)
        return run

    def _admit(self, run: _Run, pool: EnginePool) -> tuple[bool, int]:
        """Try to schedule ``run`` now; returns (admitted, tokens prefilled this step)."""
        c = self.c
        keys = run.keys
        e = pool.match(keys)
        rest = keys[e:]
        first = run.first_try_step < 0
        if first:
            run.first_try_step = c.steps
            self._drain_events()
            cpu = self._shadow.get("CPU")
            n = 0
            if cpu:
                for k in rest:
                    if k not in cpu:
                        break
                    n += 1
            run.first_cpu_run = n
        if rest:
            c.lookup_blocks += len(rest)
            r = self._m(self.off.lookup, rest, run.ctx)
            if r is None:
                c.lookup_none += 1
                if run.none_answers == 0:
                    run.wait_since = time.perf_counter()
                run.none_answers += 1
                return False, 0
        else:
            r = 0
        units = pool.acquire(keys, e, len(run.req.keys))
        if units is None:
            if not self.opts.concurrency > 1:
                raise BenchError("the engine pool cannot hold one request (--gpu-blocks)")
            return False, 0
        if run.none_answers:
            c.waited_requests += 1
            c.wait_steps_total += c.steps - run.first_try_step
            c.wait_seconds_total += time.perf_counter() - run.wait_since
        run.units = units
        run.engine_hit = e
        run.tier_hit = r
        self._count_hits(run)
        if r:
            hit_keys = keys[e : e + r]
            spec = self._m(self.off.prepare_load, hit_keys, run.ctx)
            job = next(self._job_ids)
            dst = GPULoadStoreSpec(pool.engine_ids(units[e : e + r]))
            if not self.off.transfer(job, spec, dst):
                self._m(self.off.complete_load, hit_keys, run.ctx)
                self.c.transfer_failures += 1
                run.tier_hit = 0
                return True, self._prefill(run, pool)
            run.load_job = job
            return True, 0
        return True, self._prefill(run, pool)

    def _count_hits(self, run: _Run) -> None:
        c = self.c
        bt = self.opts.block_tokens
        req = run.req
        e, r = run.engine_hit, run.tier_hit
        c.engine_hit_blocks += e
        c.engine_hit_tokens += tokens_in_prefix(req, e, bt)
        if not r:
            return
        cpu = min(run.first_cpu_run, r)
        by_tier: dict[str, int] = {}
        if cpu:
            by_tier["CPU"] = cpu
        for k in run.keys[e + cpu : e + r]:
            medium = "CPU"
            for m in self.off.media:
                if m != "CPU" and k in self._shadow.get(m, ()):
                    medium = m
                    break
            by_tier[medium] = by_tier.get(medium, 0) + 1
        pos = e
        for m, n in by_tier.items():
            c.tier_hit_blocks[m] = c.tier_hit_blocks.get(m, 0) + n
            tok = tokens_in_prefix(req, pos + n, bt) - tokens_in_prefix(req, pos, bt)
            c.tier_hit_tokens[m] = c.tier_hit_tokens.get(m, 0) + tok
            pos += n

    def _after_load(self, run: _Run, pool: EnginePool, ok: bool) -> int:
        e, r = run.engine_hit, run.tier_hit
        keys = run.keys[e : e + r]
        if ok:
            self.c.loaded_blocks += r
            self.c.wrong_blocks += pool.check(run.units[e : e + r], keys)
        self._m(self.off.complete_load, keys, run.ctx)
        run.load_job = None
        if not ok:  # recompute what could not be loaded
            run.tier_hit = 0
        return self._prefill(run, pool)

    def _prefill(self, run: _Run, pool: EnginePool) -> int:
        """Write the computed blocks, then start storing; returns the tokens computed."""
        req = run.req
        done = run.engine_hit + run.tier_hit
        all_keys = req.keys
        pool.write(run.units[done:], all_keys[done:])
        computed = req.input_length - tokens_in_prefix(req, done, self.opts.block_tokens)
        self.c.prefill_tokens += computed
        if run.keys and self.off.stores:
            self._m(self.off.touch, run.keys, run.ctx)
            run.store_todo = list(run.keys)
            self._store(run, pool)
        return computed

    def _store(self, run: _Run, pool: EnginePool) -> None:
        """Offer the request's blocks to the manager; copy the ones it wants into slots."""
        if not run.store_todo:
            return
        chunk = max(1, getattr(self.off, "num_slots", len(run.store_todo)) // 2)
        while run.store_todo:
            part = run.store_todo[:chunk]
            out = self._m(self.off.prepare_store, part, run.ctx)
            if out is None:
                self.c.store_retries += 1
                return
            run.store_todo = run.store_todo[len(part) :]
            if not out.keys_to_store:
                continue
            index = {k: i for i, k in enumerate(run.req.keys)}
            units = [run.units[index[k]] for k in out.keys_to_store]
            job = next(self._job_ids)
            src = GPULoadStoreSpec(pool.engine_ids(units))
            if self.off.transfer(job, src, out.store_spec):
                run.store_jobs[job] = list(out.keys_to_store)
            else:
                self.c.transfer_failures += 1
                self._m(self.off.complete_store, out.keys_to_store, run.ctx, False)

    def _track_store_jobs(self, run: _Run, jobs: dict[int, tuple[str, _Run]]) -> None:
        for job in run.store_jobs:
            jobs.setdefault(job, ("store", run))

    def _maybe_finish(self, run: _Run, pool: EnginePool, running: dict[str, _Run]) -> int:
        """Finish ``run`` if nothing of it is in flight; returns 1 if it finished now."""
        if run.load_job is not None or run.store_jobs or run.store_todo:
            return 0
        if running.pop(run.req.req_id, None) is None:
            return 0
        pool.release(run.units, run.keys)
        self._m(self.off.request_finished, run.ctx)
        return 1

    def _drain_events(self) -> None:
        shadow = self._shadow
        for medium, keys, removed in self._m(self.off.take_events):
            s = shadow.setdefault(medium, set())
            if removed:
                s.difference_update(keys)
            else:
                s.update(keys)
