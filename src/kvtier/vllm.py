"""kvtier behind vLLM's ``OffloadingConnector``: ``KVTierOffloadingSpec`` and its two adapters.

Select it with ``"spec_name": "KVTierOffloadingSpec", "spec_module_path": "kvtier.vllm"`` in
``kv_connector_extra_config``; the other keys are kvtier's (see API.md). Tested with vLLM 0.33.0.

How vLLM's contract maps onto kvtier's:

* Geometry comes from vLLM's ``OffloadingConfig``: the GPU block size is the KV cache group's
  ``tokens_per_block``, an offloaded block is ``blocks_per_chunk`` GPU blocks (vLLM derives it
  from ``block_size`` or ``blocks_per_chunk``), and a primary slot holds that chunk for every
  worker of the engine: ``[rank 0 pages][rank 1 pages]...``. The namespace names the model, the
  KV dtype, the block geometry and the parallel layout, so persistent tiers only share blocks
  between compatible engines.
* The scheduler and its workers find the same shared-memory primary region through an
  ``instance_id`` derived from vLLM's ``engine_id`` (unique per engine and data-parallel rank,
  and the same in the scheduler and in every worker of that engine).
* vLLM asks ``lookup`` one key at a time, in prefix order, and stops at the first MISS. The
  manager adapter answers from a per-request verdict: the first key a request asks about in a
  step runs kvtier's batched lookup over the request's keys from there on (keys are recovered
  in order from the end-token positions vLLM records in ``ReqContext``); every later key of
  that step is answered from the verdict with one dict lookup. A verdict of "ask again" (a
  promotion or tier query in flight) answers RETRY for the first key and MISS after it, which
  defers the request without scanning the rest of its prefix.
* Events: kvtier's medium strings map to vLLM's ``Medium``/``Locality``: ``CPU`` -> CPU/LOCAL,
  ``STORAGE`` -> STORAGE/LOCAL, ``NETWORK`` -> STORAGE/REMOTE (vLLM 0.33 has no network
  medium), any other tier medium -> STORAGE/LOCAL; secondary-tier events carry the medium name
  (lower case) as ``ownership``.
* Worker side: vLLM's canonical KV tensors (``(num_blocks, page_bytes)`` int8) are handed to
  kvtier's ``OffloadingWorker``; loads that start or end inside an offloaded block (a GPU
  prefix-cache hit covering part of it) copy those partial blocks themselves.

Limits: one KV cache group of full attention (no hybrid or sliding-window models), the direct
page layout (``canonical_layout`` off), and all workers of an engine on one host.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
        OffloadingConnectorStats,
    )
    from vllm.v1.kv_offload.base import (
        BlockIDsLoadStoreSpec,
        CanonicalKVCaches,
        GPULoadStoreSpec,
        LoadStoreSpec,
        Locality,
        LookupResult,
        Medium,
        OffloadingCounterMetadata,
        OffloadingEvent,
        OffloadingGaugeMetadata,
        OffloadingManager,
        OffloadingMetricMetadata,
        OffloadingSpec,
        OffloadingWorker,
        OffloadKey,
        PrepareStoreOutput,
        ReqContext,
        RequestOffloadingContext,
        ScheduleEndContext,
        TransferResult,
    )
    from vllm.v1.kv_offload.config import OffloadingConfig
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"kvtier.vllm needs vLLM 0.33.0 (pip install 'kvtier[vllm]'): {_e}"
    ) from _e

import kvtier
from kvtier.config import ConfigError
from kvtier.manager.tiering import TieringManager

log = logging.getLogger("kvtier.vllm")

TESTED_VLLM_VERSIONS = ("0.33.0",)
ALLOW_UNTESTED_ENV = "KVTIER_ALLOW_UNTESTED_VLLM"

# Keys of vLLM's own offloading specs that have no meaning for kvtier: accepted, logged, dropped.
VLLM_ONLY_KEYS = frozenset(
    {
        "tier_poll_interval_s",
        "backpressure",
        "store_threshold",
        "max_tracker_size",
        "sync_load_budget_bytes",
    }
)

_MEDIA: dict[str, tuple[Medium, Locality]] = {
    "CPU": (Medium.CPU, Locality.LOCAL),
    "STORAGE": (Medium.STORAGE, Locality.LOCAL),
    "NETWORK": (Medium.STORAGE, Locality.REMOTE),
}

HIT, MISS, RETRY = LookupResult.HIT, LookupResult.MISS, LookupResult.RETRY

# vLLM's hit sources: storage is a disk; a network or user tier is reported as unspecified.
_SOURCES = {"STORAGE": CacheHitSource.DISK}

METRIC_PREFIX = "vllm:kvtier_"
_COUNTERS = {
    "stored_blocks": "Blocks the engine stored into kvtier's CPU primary tier.",
    "primary_hit_blocks": "Blocks loaded into the engine from kvtier's CPU primary tier.",
    "promoted_blocks": "Blocks promoted from a secondary tier into the primary tier.",
    "promotion_failures": "Promotions that failed (the block became a miss).",
    "cascaded_blocks": "Blocks written from the primary tier to a secondary tier.",
    "cascade_failures": "Writes to a secondary tier that failed or were dropped.",
    "evicted_blocks": "Blocks evicted from the primary tier.",
}
_GAUGES = {
    "primary_usage_perc": "Fraction of kvtier's primary slots in use (0.0 - 1.0).",
}


def check_vllm_version() -> str:
    """The installed vLLM version; raises RuntimeError when kvtier was not tested with it."""
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vllm imported above
        version = "unknown"
    if version not in TESTED_VLLM_VERSIONS and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        raise RuntimeError(
            f"kvtier.vllm: vLLM {version} is not a tested version (tested: "
            f"{', '.join(TESTED_VLLM_VERSIONS)}). Install a tested version "
            f"(pip install 'kvtier[vllm]'), or set {ALLOW_UNTESTED_ENV}=1 to try it anyway."
        )
    return version


def derive_instance_id(config: OffloadingConfig) -> str:
    """The primary region's id: the same in the scheduler and every worker of one engine."""
    p = config.parallel
    raw = f"{config.engine_id}|dp{p.data_parallel_index}"
    return "vllm-" + hashlib.sha256(raw.encode()).hexdigest()[:20]


def derive_namespace(config: OffloadingConfig, block_size: int) -> str:
    """Identity of the KV layout: model, dtype, block geometry and parallel layout."""
    p = config.parallel
    g = config.groups[0]
    return (
        f"{config.model.name}/{config.model.dtype}/tokens{g.tokens_per_block}x"
        f"{block_size // g.tokens_per_block}/kv{config.worker_kv_bytes_per_block}/"
        f"tp{p.tp_size}-pp{p.pp_size}-pcp{p.pcp_size}-dcp{p.dcp_size}-ws{p.world_size}/"
        f"layout-{config.kv_cache_layout or 'default'}"
    )


class KVTierLoadStoreSpec(BlockIDsLoadStoreSpec):
    """kvtier primary slots (``block_ids`` are slot ids)."""

    medium = "CPU"


class _ReqState:
    """Per-request scratch: the request's keys in prefix order and this step's verdict."""

    __slots__ = ("ctx", "keys", "step", "lo", "answers", "sources")

    def __init__(self, ctx: kvtier.ReqContext) -> None:
        self.ctx = ctx
        self.keys: list[bytes] = []  # the request's keys in prefix order
        self.step = -1  # the step of the verdict
        self.lo = 0  # end-token position of the verdict's first key
        # This step's answers: the leading run (HIT) and the key after it (MISS), or RETRY
        # for the first key when kvtier asks to come back; None between steps.
        self.answers: dict[bytes, LookupResult] | None = None
        self.sources: dict[bytes, CacheHitSource] = {}  # keys promoted for this request


class KVTierManager(OffloadingManager):
    """vLLM's ``OffloadingManager`` over kvtier's ``TieringManager``."""

    def __init__(self, manager: TieringManager, tokens_per_chunk: int) -> None:
        self.kv = manager
        self.tokens_per_chunk = tokens_per_chunk
        self._step = 0
        self._last_counters: dict[str, float] = {}
        self._live: list[_ReqState] = []  # states holding this step's answers
        self._fast_lookup = self._make_fast_lookup()
        # vLLM calls ``manager.lookup`` once per key: the instance attribute skips the method.
        self.lookup = self._fast_lookup  # type: ignore[method-assign]

    # -- request lifecycle ---------------------------------------------------------------
    def _state(self, req_context: ReqContext) -> _ReqState:
        st = req_context.get_state(_ReqState)
        if st is None:
            st = _ReqState(
                kvtier.ReqContext(req_context.req_id, req_context.kv_transfer_params)
            )
            req_context.set_state(st)
        return st

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        """Attach kvtier's per-request state."""
        st = self._state(req_context)
        self.kv.on_new_request(st.ctx)
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        """Forward to kvtier."""
        self.kv.on_request_finished(self._state(req_context).ctx)

    # -- lookup ------------------------------------------------------------------------------
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        """One key's answer, from the request's per-step prefix verdict."""
        return self._fast_lookup(key, req_context)

    def _make_fast_lookup(self) -> Any:
        """The per-key answer as a closure (the connector calls it once per key)."""
        slow = self._lookup_slow
        state_type = _ReqState

        def lookup(key: OffloadKey, req_context: ReqContext) -> LookupResult:
            try:  # this step's verdict answers the key: two dict lookups
                return req_context._state[state_type].answers[key]
            except (KeyError, TypeError):
                return slow(key, req_context)

        return lookup

    def _lookup_slow(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        """A key this step's verdict does not list: past the run, or a new verdict."""
        pos = req_context._offload_key_positions.get(key)
        if pos is None or pos % self.tokens_per_chunk:
            return self._lookup_one(key, req_context)
        st = self._state(req_context)
        if st.answers is not None and st.step == self._step and pos >= st.lo:
            return MISS  # after the verdict's first non-HIT key
        self._verdict(st, req_context, pos // self.tokens_per_chunk - 1)
        assert st.answers is not None
        return st.answers.get(key, MISS)

    def _verdict(self, st: _ReqState, req_context: ReqContext, base: int) -> None:
        """Run kvtier's batched lookup over the request's keys from ``base`` on."""
        keys = st.keys
        positions = req_context._offload_key_positions
        tpc = self.tokens_per_chunk
        if len(keys) != len(positions):
            if positions[next(reversed(positions))] == len(positions) * tpc:
                keys[:] = positions  # one group, keys recorded in prefix order
            else:
                keys[:] = [k for p, k in sorted((p, k) for k, p in positions.items())
                           if p % tpc == 0]
        run = self.kv.lookup(keys[base:] if base else keys, st.ctx)
        if run is None:  # defer: RETRY for the first key, MISS after it
            answers = {keys[base]: RETRY}
            self._note_sources(st, keys, base)
        else:
            answers = dict.fromkeys(keys[base : base + run], HIT)
            if base + run < len(keys):
                answers[keys[base + run]] = MISS
        if st.answers is None:
            self._live.append(st)
        st.answers = answers
        st.step = self._step
        st.lo = (base + 1) * tpc  # end-token position of the verdict's first key

    def _note_sources(self, st: _ReqState, keys: list[bytes], base: int) -> None:
        """Remember which tier each of the request's keys is being promoted from."""
        promoting = self.kv._promoting
        if not promoting:
            return
        tiers = self.kv.tiers
        for key in keys[base:]:
            ti = promoting.get(key)
            if ti is not None:
                st.sources[key] = _SOURCES.get(tiers[ti].medium, CacheHitSource.EXTERNAL_UNSPECIFIED)

    def get_load_source(self, key: OffloadKey, req_context: ReqContext) -> CacheHitSource:
        """Where a loaded key came from: the CPU tier, or the tier it was promoted from."""
        st = req_context.get_state(_ReqState)
        if st is None:
            return CacheHitSource.HOST
        return st.sources.get(key, CacheHitSource.HOST)

    def _lookup_one(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        r = self.kv.lookup([key], self._state(req_context).ctx)
        if r is None:
            return LookupResult.RETRY
        return LookupResult.HIT if r else LookupResult.MISS

    # -- loads and stores -------------------------------------------------------------------
    def prepare_load(
        self, keys: Collection[OffloadKey], req_context: ReqContext
    ) -> KVTierLoadStoreSpec:
        """Pin the keys in the primary tier; their slots."""
        spec = self.kv.prepare_load(list(keys), self._state(req_context).ctx)
        return KVTierLoadStoreSpec(spec.block_ids)  # type: ignore[arg-type]

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        """Unpin the keys."""
        self.kv.complete_load(list(keys), self._state(req_context).ctx)

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        """Recency hint."""
        self.kv.touch(list(keys), self._state(req_context).ctx)

    def prepare_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext
    ) -> PrepareStoreOutput | None:
        """Reserve slots for the keys not in the primary tier (None: no room now)."""
        out = self.kv.prepare_store(list(keys), self._state(req_context).ctx)
        if out is None:
            return None
        return PrepareStoreOutput(
            keys_to_store=list(out.keys_to_store),  # type: ignore[arg-type]
            store_spec=KVTierLoadStoreSpec(out.store_spec.block_ids),  # type: ignore[arg-type]
            evicted_keys=list(out.evicted_keys),  # type: ignore[arg-type]
        )

    def complete_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True
    ) -> None:
        """The keys' bytes are in their slots (or the store failed)."""
        self.kv.complete_store(list(keys), self._state(req_context).ctx, success)

    # -- the step and housekeeping ------------------------------------------------------------
    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        """End of a step: verdicts expire; kvtier collects and submits tier jobs."""
        self._step += 1
        self._drop_verdicts()
        self.kv.on_schedule_end()

    def has_pending_work(self) -> bool:
        """Tier jobs in flight."""
        return self.kv.has_pending_work()

    def take_events(self) -> Iterable[OffloadingEvent]:
        """kvtier's events with vLLM's medium and locality."""
        for ev in self.kv.take_events():
            medium, locality = _MEDIA.get(ev.medium, (Medium.STORAGE, Locality.LOCAL))
            owner = None if ev.medium == "CPU" else ev.medium.lower()
            yield OffloadingEvent(
                keys=list(ev.keys),  # type: ignore[arg-type]
                medium=medium,
                removed=ev.removed,
                locality=locality,
                ownership=owner,
            )

    def get_stats(self) -> OffloadingConnectorStats | None:
        """Counter increments since the last call and the primary tier's usage."""
        counters = self.kv.counters
        stats = OffloadingConnectorStats()
        last = self._last_counters
        for name in _COUNTERS:
            delta = counters.get(name, 0) - last.get(name, 0)
            if delta:
                stats.increase_counter(METRIC_PREFIX + name, delta)
                last[name] = counters.get(name, 0)
        primary = self.kv.primary
        usage = len(primary.key_slot) / primary.num_slots if primary.num_slots else 0.0
        if usage != last.get("primary_usage_perc"):
            stats.set_gauge(METRIC_PREFIX + "primary_usage_perc", usage)
            last["primary_usage_perc"] = usage
        return None if stats.is_empty() else stats

    def kvtier_stats(self) -> dict[str, Any]:
        """kvtier's own counters per tier (the dict of ``TieringManager.get_stats``)."""
        return self.kv.get_stats()

    def _drop_verdicts(self) -> None:
        for st in self._live:
            st.answers = None
        self._live.clear()

    def reset_cache(self) -> None:
        """Drop the primary tier (persistent tiers keep their data) and this step's verdicts."""
        self._drop_verdicts()
        self.kv.reset_cache()

    def shutdown(self) -> None:
        """Stop tiers and release the primary region; idempotent."""
        self.kv.shutdown()


class _RankRegion:
    """One worker's share of each primary slot: a (num_slots, page bytes) view of the region."""

    def __init__(self, region: Any, rank: int, world_size: int) -> None:
        self._region = region
        self.block_bytes = region.block_bytes // world_size
        lo = rank * self.block_bytes
        self.array = region.array[:, lo : lo + self.block_bytes]

    def close(self) -> None:
        """Detach from the region."""
        self._region.close()


class KVTierWorker(OffloadingWorker):
    """vLLM's ``OffloadingWorker`` over kvtier's: canonical KV tensors <-> primary slots."""

    def __init__(self, worker: kvtier.OffloadingWorker, blocks_per_chunk: int) -> None:
        self.kv = worker
        self.f = blocks_per_chunk

    def submit_store(
        self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec
    ) -> bool:
        """Engine blocks -> primary slots, asynchronously."""
        assert isinstance(dst_spec, BlockIDsLoadStoreSpec)
        return self._submit(job_id, src_spec, dst_spec.block_ids, store=True)

    def submit_load(
        self,
        job_id: int,
        src_spec: LoadStoreSpec,
        dst_spec: GPULoadStoreSpec,
        expedited: bool = False,
    ) -> bool:
        """Primary slots -> engine blocks, asynchronously."""
        assert isinstance(src_spec, BlockIDsLoadStoreSpec)
        return self._submit(job_id, dst_spec, src_spec.block_ids, store=False)

    def _submit(
        self, job_id: int, gpu_spec: GPULoadStoreSpec, slots: np.ndarray, store: bool
    ) -> bool:
        gpu = np.asarray(gpu_spec.block_ids, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        f = self.f
        skip = int(gpu_spec.block_indices[0]) % f if len(gpu_spec.block_indices) else 0
        whole_gpu, whole_slots = gpu, slots
        if skip or len(gpu) != f * len(slots):
            # Partial offloaded blocks at either end: copy those sub-blocks here, whole ones
            # through kvtier's worker.
            head = (f - skip) % f if skip else 0
            head = min(head, len(gpu))
            n_whole = (len(gpu) - head) // f
            tail = len(gpu) - head - n_whole * f
            parts: list[tuple[int, int, int]] = []  # (gpu block, slot, sub-block index)
            for j in range(head):
                parts.append((int(gpu[j]), int(slots[0]), skip + j))
            first_whole = 1 if head else 0
            whole_gpu = gpu[head : head + n_whole * f]
            whole_slots = slots[first_whole : first_whole + n_whole]
            for j in range(tail):
                parts.append(
                    (int(gpu[head + n_whole * f + j]), int(slots[first_whole + n_whole]), j)
                )
            try:
                self._copy_parts(parts, store)
            except Exception:
                log.exception("transfer %d: partial-block copy failed", job_id)
                return False
        return self.kv.transfer_async(
            job_id,
            kvtier.GPULoadStoreSpec(whole_gpu) if store else kvtier.LoadStoreSpec(whole_slots),
            kvtier.LoadStoreSpec(whole_slots) if store else kvtier.GPULoadStoreSpec(whole_gpu),
        )

    def _copy_parts(self, parts: list[tuple[int, int, int]], store: bool) -> None:
        """Copy single engine blocks to/from one sub-block of a slot (on the job's stream)."""
        if not parts:
            return
        w = self.kv
        layout = w.layout
        f = layout.blocks_per_slot
        stream = None
        if w.is_cuda:
            import torch

            stream = w._store_stream if store else w._load_stream
            stream.wait_stream(torch.cuda.current_stream(w.device))
        ctx: Any
        if stream is not None:
            import torch

            ctx = torch.cuda.stream(stream)
        else:
            import contextlib

            ctx = contextlib.nullcontext()
        with ctx:
            for gid, slot, k in parts:
                for view, off, b in zip(w.views, layout.offsets, layout.per_block):
                    assert k < f
                    host = w.primary[slot, off + k * b : off + (k + 1) * b]
                    if store:
                        host.copy_(view[gid], non_blocking=stream is not None)
                    else:
                        view[gid].copy_(host, non_blocking=stream is not None)

    def get_finished(self) -> list[TransferResult]:
        """Transfers finished since the last call."""
        return [
            TransferResult(r.job_id, r.success, r.transfer_size, r.transfer_time)
            for r in self.kv.get_finished()
        ]

    def wait(self, job_ids: set[int]) -> None:
        """Block until the given transfers are done."""
        self.kv.wait(job_ids)

    def shutdown(self) -> None:
        """Finish in-flight copies and detach."""
        self.kv.shutdown()


class KVTierOffloadingSpec(OffloadingSpec):
    """kvtier as an ``OffloadingSpec`` for vLLM's ``OffloadingConnector``."""

    @classmethod
    def build_metric_definitions(
        cls, extra_config: dict[str, Any]
    ) -> dict[str, OffloadingMetricMetadata]:
        """Prometheus metrics that ``get_stats`` reports."""
        defs: dict[str, OffloadingMetricMetadata] = {
            METRIC_PREFIX + k: OffloadingCounterMetadata(documentation=d)
            for k, d in _COUNTERS.items()
        }
        for k, d in _GAUGES.items():
            defs[METRIC_PREFIX + k] = OffloadingGaugeMetadata(documentation=d)
        return defs

    def __init__(self, config: OffloadingConfig) -> None:
        self.vllm_version = check_vllm_version()
        super().__init__(config)
        if len(config.groups) != 1:
            raise ConfigError(
                "kv_cache_groups",
                "a model with one KV cache group (kvtier does not offload hybrid models; "
                "use vLLM's TieringOffloadingSpec for those)",
                len(config.groups),
            )
        group = config.groups[0]
        if group.sliding_window_size_in_chunks is not None:
            raise ConfigError(
                "kv_cache_groups", "full attention (sliding-window models are not supported)",
                group.sliding_window_size_in_chunks,
            )
        if config.canonical_layout:
            raise ConfigError("canonical_layout", "false (kvtier stores each worker's pages)",
                              True)
        if config.worker_kv_bytes_per_block <= 0:
            raise ConfigError(
                "worker_kv_bytes_per_block",
                "a positive KV size per block (vLLM reported none for this model)",
                config.worker_kv_bytes_per_block,
            )
        self.gpu_block_size = group.tokens_per_block
        self.block_size = self.gpu_block_size * self.blocks_per_chunk
        self.world_size = max(1, config.parallel.world_size)
        self.bytes_per_gpu_block = config.worker_kv_bytes_per_block * self.world_size
        self.namespace = derive_namespace(config, self.block_size)
        self.instance_id = derive_instance_id(config)
        extra = {k: v for k, v in self.extra_config.items() if k not in VLLM_ONLY_KEYS}
        ignored = sorted(set(self.extra_config) & VLLM_ONLY_KEYS)
        if ignored:
            log.info("kvtier: ignoring vLLM-only keys: %s", ", ".join(ignored))
        extra.pop("blocks_per_chunk", None)
        extra["block_size"] = self.block_size
        self.kvtier_spec = kvtier.TieringOffloadingSpec(
            extra,
            gpu_block_size=self.gpu_block_size,
            bytes_per_gpu_block=self.bytes_per_gpu_block,
            namespace=self.namespace,
            instance_id=self.instance_id,
        )
        self._manager: KVTierManager | None = None
        self._worker: KVTierWorker | None = None

    def get_manager(self) -> KVTierManager:
        """The scheduler-side manager (built once)."""
        if self._manager is None:
            self._manager = KVTierManager(self.kvtier_spec.get_manager(), self.block_size)
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> KVTierWorker:
        """The worker for this rank's canonical KV tensors (built once)."""
        if self._worker is None:
            tensors = [t.tensor for t in kv_caches.tensors]
            self._worker = KVTierWorker(self._make_worker(tensors), self.blocks_per_chunk)
        return self._worker

    def _make_worker(self, tensors: Sequence[Any]) -> kvtier.OffloadingWorker:
        if self.world_size == 1:
            return self.kvtier_spec.get_worker(tensors)
        from kvtier.memory.region import BlockRegion

        cfg = self.kvtier_spec.config
        region = BlockRegion(
            self.kvtier_spec.region_name, cfg.num_slots, cfg.block_bytes, owner=False
        )
        try:
            view = _RankRegion(region, self.config.parallel.rank, self.world_size)
            return kvtier.OffloadingWorker(
                tensors, view, self.blocks_per_chunk, self.config.worker_kv_bytes_per_block
            )
        except BaseException:
            region.close()
            raise
