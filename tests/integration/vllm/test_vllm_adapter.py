"""kvtier behind vLLM 0.33's OffloadingConnector, driven by vLLM's own scheduler-side code.

The connector's ``OffloadingConnectorScheduler`` and ``OffloadingConnectorWorker`` are real;
the engine loop around them is the CPU stand-in in ``vllm_engine.py`` (see its docstring), which
lets these tests place single calls precisely and run vLLM's own spec side by side. The same
adapter under vLLM's real ``Scheduler``/``AsyncScheduler`` and ``register_kv_caches`` is tested
in ``test_real_scheduler.py`` and ``test_tp_processes.py``. What does not run here:

* vLLM's own ``TieringOffloadingSpec`` worker: ``CPUOffloadingWorker`` asserts CUDA tensors, so
  the parity runs compare scheduler-side behaviour only (jobs are acknowledged unexecuted).
* CUDA copies: ``benchmarks/cuda_check.py`` checks them on a GPU machine.

The same scenarios run against vLLM's ``TieringOffloadingSpec`` where behaviour is meant to
match. Known differences are asserted explicitly: steps until a block held only by a
secondary tier is loadable, and the medium reported for the example tier's events.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from vllm.v1.kv_offload.base import (
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    CanonicalKVCacheTensor,
    GPULoadStoreSpec,
    LookupResult,
    Medium,
    ReqContext,
    make_offload_key,
)
from vllm.v1.kv_offload.factory import OffloadingSpecFactory
from vllm.v1.metrics.cache_hit_source import CacheHitSource
from vllm_engine import (
    BYTES_PER_BLOCK,
    PAGE,
    TOKENS_PER_BLOCK,
    Engine,
    expected_block,
    kvtier_extra,
    offloading_config,
    vllm_extra,
)

import kvtier
import kvtier.vllm as kv_vllm

KINDS = ["kvtier", "vllm"]

API_JSON = """{"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
 "kv_connector_extra_config": {"spec_name": "KVTierOffloadingSpec", "spec_module_path": "kvtier.vllm",
   "cpu_bytes_to_use": 10737418240, "block_size": 16, "eviction_policy": "lru",
   "secondary_tiers": [{"type": "storage", "path": "/mnt/nvme/kvtier"}]}}"""


def extra_for(kind: str, **over: Any) -> dict[str, Any]:
    """The same kvtier-compatible keys for either spec."""
    return kvtier_extra(**over) if kind == "kvtier" else vllm_extra(**over)


def prompt(seed: int, blocks: int, extra_tokens: int = 3) -> list[int]:
    """A prompt of ``blocks`` full blocks plus a few tokens (the last block is never loaded)."""
    base = 1000 + seed * 100_000
    return list(range(base, base + blocks * TOKENS_PER_BLOCK + extra_tokens))


def assert_loaded_bytes(engine: Engine, run: Any) -> None:
    """Every block a load put into the engine KV tensors holds what was stored for it."""
    assert run.loaded_blocks, "nothing was loaded"
    for j, block_id in enumerate(run.loaded_blocks):
        got = engine.block_bytes(block_id)
        want = expected_block(run.request.block_hashes[j])
        assert np.array_equal(got, want), f"block {j} (GPU block {block_id}) differs"


# -- loading the spec ----------------------------------------------------------------------


def test_factory_loads_spec_from_the_documented_json(tmp_path: Any) -> None:
    cfg_json = json.loads(API_JSON)
    extra = cfg_json["kv_connector_extra_config"]
    extra["cpu_bytes_to_use"] = 64 * BYTES_PER_BLOCK  # the documented 10 GiB, scaled down
    extra["secondary_tiers"][0]["path"] = str(tmp_path / "kvtier")
    extra["secondary_tiers"][0]["capacity_bytes"] = 1 << 24
    assert OffloadingSpecFactory.get_spec_cls(extra) is kv_vllm.KVTierOffloadingSpec
    spec: Any = OffloadingSpecFactory.create_spec(offloading_config(extra, engine_id="engine-a"))
    assert type(spec).__name__ == "KVTierOffloadingSpec"
    assert spec.gpu_block_size == TOKENS_PER_BLOCK and spec.block_size == 16
    assert spec.kvtier_spec.block_bytes == BYTES_PER_BLOCK
    assert spec.kvtier_spec.num_slots == 64
    assert spec.namespace.startswith("test/tiny-llama/float16/tokens16x1/")
    assert "tp1-pp1" in spec.namespace
    # Scheduler and workers derive the same region id from the same vLLM config.
    again: Any = OffloadingSpecFactory.create_spec(offloading_config(extra, engine_id="engine-a"))
    other: Any = OffloadingSpecFactory.create_spec(offloading_config(extra, engine_id="engine-b"))
    assert again.instance_id == spec.instance_id != other.instance_id
    assert pickle.loads(pickle.dumps(spec.kvtier_spec)).instance_id == spec.instance_id
    manager = spec.get_manager()
    try:
        assert [t.medium for t in manager.kv.tiers] == ["STORAGE"]
    finally:
        manager.shutdown()


@pytest.mark.parametrize("blocks_per_chunk,block_size", [(2, None), (None, 64)])
def test_chunk_size_from_blocks_per_chunk_or_block_size(
    blocks_per_chunk: int | None, block_size: int | None
) -> None:
    f = blocks_per_chunk or block_size // TOKENS_PER_BLOCK  # type: ignore[operator]
    extra = kvtier_extra(cpu_bytes_to_use=8 * f * BYTES_PER_BLOCK)
    if blocks_per_chunk:
        extra["blocks_per_chunk"] = blocks_per_chunk
    spec = kv_vllm.KVTierOffloadingSpec(offloading_config(extra, blocks_per_chunk=f))
    assert spec.block_size == f * TOKENS_PER_BLOCK
    assert spec.kvtier_spec.block_bytes == f * BYTES_PER_BLOCK
    assert spec.kvtier_spec.num_slots == 8
    assert f"tokens16x{f}" in spec.namespace


def test_untested_vllm_version_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_vllm.importlib.metadata, "version", lambda name: "0.34.1")
    monkeypatch.delenv(kv_vllm.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"vLLM 0\.34\.1 is not a tested version.*0\.33\.0"):
        kv_vllm.KVTierOffloadingSpec(offloading_config(kvtier_extra(cpu_bytes_to_use=1 << 20)))
    monkeypatch.setenv(kv_vllm.ALLOW_UNTESTED_ENV, "1")
    kv_vllm.KVTierOffloadingSpec(offloading_config(kvtier_extra(cpu_bytes_to_use=1 << 20)))


def test_bad_config_names_the_key() -> None:
    with pytest.raises(kvtier.ConfigError, match="cpu_bytes_to_use"):
        kv_vllm.KVTierOffloadingSpec(offloading_config(kvtier_extra()))
    with pytest.raises(kvtier.ConfigError, match="secondary_tiers"):
        kv_vllm.KVTierOffloadingSpec(offloading_config(
            kvtier_extra(cpu_bytes_to_use=1 << 20, secondary_tiers=[{"type": "tape"}])))
    cfg = offloading_config(kvtier_extra(cpu_bytes_to_use=1 << 20))
    with pytest.raises(kvtier.ConfigError, match="canonical_layout"):
        kv_vllm.KVTierOffloadingSpec(dataclasses.replace(cfg, canonical_layout=True))


def test_hybrid_groups_get_their_own_geometry_in_the_namespace() -> None:
    """Two KV cache groups build; the namespace names each group, one group's is unchanged."""
    extra = kvtier_extra(cpu_bytes_to_use=1 << 20)
    one = kv_vllm.KVTierOffloadingSpec(offloading_config(extra))
    assert "groups-" not in one.namespace  # blocks stored before hybrid support stay valid
    cfg = offloading_config(extra, num_groups=2)
    full, window = cfg.groups
    windowed = dataclasses.replace(window, sliding_window_size_in_chunks=4)
    spec = kv_vllm.KVTierOffloadingSpec(dataclasses.replace(cfg, groups=(full, windowed)))
    assert spec.namespace.startswith(one.namespace + "/groups-")
    assert "g0-t16-full-2L" in spec.namespace and "g1-t16-win4-2L" in spec.namespace
    other = kv_vllm.KVTierOffloadingSpec(dataclasses.replace(
        cfg, groups=(full, dataclasses.replace(window, sliding_window_size_in_chunks=8))))
    assert other.namespace != spec.namespace


# -- requests through the real connector scheduler ------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("blocks_per_chunk", [1, 2])
def test_store_then_hit_in_cpu(kind: str, blocks_per_chunk: int, engines: list[Engine]) -> None:
    f = blocks_per_chunk
    e = Engine(extra_for(kind, cpu_bytes_to_use=64 * f * BYTES_PER_BLOCK), blocks_per_chunk=f)
    engines.append(e)
    first = e.run(prompt(1, 8))
    assert first.lookups == [0]  # nothing offloaded yet: a miss, not a deferral
    e.settle()
    second = e.run(prompt(1, 8) + [7] * 40)  # same prefix, longer prompt
    assert second.hit_tokens == 8 * TOKENS_PER_BLOCK
    assert second.lookups == [8 * TOKENS_PER_BLOCK]  # a CPU hit is answered at once
    e.settle()
    if kind == "kvtier":
        assert_loaded_bytes(e, second)
        assert e.manager.kv.primary.check() is None
        assert all(r == 0 for r in e.manager.kv.primary.ref)  # loads and stores unpinned
    stored = sum(len(ev.block_hashes) for ev in e.events
                 if type(ev).__name__ == "BlockStored" and ev.medium == Medium.CPU.value)
    full_chunks = len(second.request.prompt_token_ids or []) // (TOKENS_PER_BLOCK * f)
    assert stored == full_chunks  # each offloaded block announced once, on the CPU medium


@pytest.mark.parametrize("kind", KINDS)
def test_unrelated_prompt_misses(kind: str, engines: list[Engine]) -> None:
    e = Engine(extra_for(kind, cpu_bytes_to_use=64 * BYTES_PER_BLOCK))
    engines.append(e)
    e.run(prompt(1, 6))
    e.settle()
    run = e.run(prompt(2, 6))
    assert run.lookups == [0] and run.hit_tokens == 0
    e.settle()


@pytest.mark.parametrize("kind", KINDS)
def test_eviction_without_secondary_tier_is_a_miss(kind: str, engines: list[Engine]) -> None:
    e = Engine(extra_for(kind, cpu_bytes_to_use=8 * BYTES_PER_BLOCK))
    engines.append(e)
    e.run(prompt(1, 6))
    e.settle()
    e.run(prompt(2, 8))  # fills the 8 slots: prompt 1's blocks go
    e.settle()
    again = e.run(prompt(1, 6))
    assert again.hit_tokens == 0
    removed = [ev for ev in e.events if type(ev).__name__ == "BlockRemoved"]
    assert removed and all(ev.medium == Medium.CPU.value for ev in removed)
    e.settle()  # the miss was recomputed and stored again
    recent = e.run(prompt(1, 6))
    assert recent.hit_tokens == 6 * TOKENS_PER_BLOCK
    e.settle()


def _secondary(kind: str, tier: str, tmp_path: Any) -> list[dict[str, Any]]:
    if tier == "example":
        return [{"type": "example"}]
    if tier == "fs":  # vLLM's own file-system tier config, unchanged for both specs
        return [{"type": "fs", "root_dir": str(tmp_path / f"{kind}-fs")}]
    return [{"type": "storage", "path": str(tmp_path / "kvtier-fs"), "capacity_bytes": 1 << 24}]


@pytest.mark.parametrize(
    "kind,tier",
    [("kvtier", "example"), ("vllm", "example"), ("kvtier", "fs"), ("vllm", "fs"),
     ("kvtier", "storage")],
)
def test_secondary_hit_promotes(kind: str, tier: str, tmp_path: Any,
                                engines: list[Engine]) -> None:
    """A prefix evicted from the CPU tier comes back from the secondary tier.

    Known difference (asserted): the number of steps until the hit. vLLM's manager answers
    RETRY while it looks up, HIT_PENDING while it promotes, then HIT; kvtier starts the
    promotion on the first lookup and serves it once the tier job is done.
    """
    e = Engine(extra_for(kind, cpu_bytes_to_use=8 * BYTES_PER_BLOCK,
                         secondary_tiers=_secondary(kind, tier, tmp_path)))
    engines.append(e)
    e.run(prompt(1, 6))
    e.settle()
    e.run(prompt(2, 8))  # evicts all of prompt 1 from the 8 CPU slots
    e.settle()
    run = e.run(prompt(1, 6))
    assert run.hit_tokens == 6 * TOKENS_PER_BLOCK
    assert run.lookups[-1] == 6 * TOKENS_PER_BLOCK and None in run.lookups
    steps = len(run.lookups) - 1  # deferred steps before the hit
    sources = e.sched.get_external_cache_hit_sources(run.request, run.hit_tokens)
    if kind == "kvtier":  # vLLM's own manager reports its example tier as host memory
        want = CacheHitSource.DISK if tier != "example" else CacheHitSource.EXTERNAL_UNSPECIFIED
        assert sources == {want: 6 * TOKENS_PER_BLOCK}, sources
    elif tier == "fs":
        assert sources == {CacheHitSource.DISK: 6 * TOKENS_PER_BLOCK}, sources
    print(f"{kind}/{tier}: deferred steps before the secondary hit: {steps} {run.lookups}")
    e.settle()
    if kind == "kvtier":
        assert_loaded_bytes(e, run)
        assert e.manager.kv.counters["promoted_blocks"] >= 6
        # The promotion starts at the first lookup; one deferred step when the tier job
        # finishes within a model step (the benchmark reports the exact count).
        assert 1 <= steps <= 3
    elif tier == "example":
        assert steps == 1  # HIT_PENDING while promoting, then HIT
    else:
        assert steps >= 2  # RETRY while the file system is asked, HIT_PENDING, then HIT
    media = {ev.medium for ev in e.events if type(ev).__name__ == "BlockStored"}
    assert Medium.CPU.value in media
    if kind == "kvtier" and tier != "example":
        assert Medium.STORAGE.value in media


@pytest.mark.parametrize("kind", KINDS)
def test_finished_requests_leave_nothing_pinned(kind: str, engines: list[Engine]) -> None:
    e = Engine(extra_for(kind, cpu_bytes_to_use=32 * BYTES_PER_BLOCK,
                         secondary_tiers=[{"type": "example"}]))
    engines.append(e)
    for i in range(4):
        e.run(prompt(i, 4))
    e.run(prompt(0, 4) + [9] * 20)
    e.settle()
    assert not e.sched._jobs and not e.manager.has_pending_work()
    assert not e.sched._req_status  # every request finished and was forgotten
    if kind == "kvtier":
        assert all(r == 0 for r in e.manager.kv.primary.ref)
        stats = e.sched.get_stats()
        assert stats is not None and not stats.is_empty()


# -- the adapter's own contract -------------------------------------------------------------


def _adapter(engines: list[Engine], **extra: Any) -> Engine:
    e = Engine(kvtier_extra(cpu_bytes_to_use=32 * BYTES_PER_BLOCK, **extra))
    engines.append(e)
    return e


def test_lookup_answers_from_one_batched_lookup_per_step(engines: list[Engine]) -> None:
    e = _adapter(engines)
    e.run(prompt(1, 10))
    e.settle()
    manager = e.manager
    keys = [make_offload_key(h, 0) for h in e.new_request(prompt(1, 10)).block_hashes]
    ctx = ReqContext(req_id="probe")
    manager.on_new_request(ctx)
    for i, k in enumerate(keys):
        ctx.set_offload_key_position(k, (i + 1) * TOKENS_PER_BLOCK)
    missing = make_offload_key(b"\x01" * 32, 0)
    ctx.set_offload_key_position(missing, (len(keys) + 1) * TOKENS_PER_BLOCK)
    before = manager.kv.counters["lookups"]
    answers = [manager.lookup(k, ctx) for k in keys + [missing]]
    assert answers == [LookupResult.HIT] * 10 + [LookupResult.MISS]
    assert manager.kv.counters["lookups"] == before + 1  # one batched lookup for 11 keys
    answers = [manager.lookup(k, ctx) for k in keys[4:]]  # vLLM starts after its GPU hits
    assert answers == [LookupResult.HIT] * 6
    manager.on_schedule_end(kv_vllm.ScheduleEndContext((), ()))
    assert manager.lookup(keys[0], ctx) is LookupResult.HIT
    assert manager.kv.counters["lookups"] == before + 2  # a new step, a new verdict


def test_partial_chunk_loads_copy_exact_sub_blocks(engines: list[Engine]) -> None:
    """Loads that start inside an offloaded block (GPU prefix hit) copy only its tail."""
    f = 4
    e = Engine(kvtier_extra(cpu_bytes_to_use=8 * f * BYTES_PER_BLOCK), blocks_per_chunk=f)
    engines.append(e)
    assert e.worker is not None
    worker: Any = e.worker.worker
    region = e.manager.kv.primary_blocks()
    slots = [3, 5, 6]
    rng = np.random.default_rng(7)
    region[slots] = rng.integers(0, 256, (len(slots), region.shape[1]), dtype=np.uint8)
    gpu_ids = [40, 41, 42, 50, 51, 52, 53, 60, 61]  # skip 1 sub-block, then 3 + 4 + 2
    spec = GPULoadStoreSpec(gpu_ids, group_sizes=[len(gpu_ids)], block_indices=[4 * 7 + 1])
    assert worker.submit_load(11, kv_vllm.KVTierLoadStoreSpec(slots), spec)
    worker.wait({11})
    assert [r.job_id for r in worker.get_finished()] == [11]
    for n, gid in enumerate(gpu_ids):
        logical = n + 1
        slot, sub = slots[logical // f], logical % f
        row = region[slot]
        for layer, t in enumerate(e.kv):
            off = layer * f * PAGE + sub * PAGE
            assert np.array_equal(t[gid].numpy().view(np.uint8), row[off : off + PAGE])
    # Untouched GPU blocks stay untouched.
    assert not torch.any(e.kv[0][39]) and not torch.any(e.kv[0][43])


def test_events_map_media(engines: list[Engine], tmp_path: Any) -> None:
    e = _adapter(engines)
    events = list(e.manager.take_events())
    assert events == []
    kv = e.manager.kv
    key = b"k" * 36
    kv._events.append(kvtier.OffloadingEvent([key], "NETWORK", False))
    kv._events.append(kvtier.OffloadingEvent([key], "STORAGE", True))
    kv._events.append(kvtier.OffloadingEvent([key], "CPU", False))
    kv._events.append(kvtier.OffloadingEvent([key], "OBJECT", True))
    got = [(ev.medium, ev.locality, ev.removed, ev.ownership) for ev in e.manager.take_events()]
    assert got == [
        (Medium.STORAGE, kv_vllm.Locality.REMOTE, False, "network"),
        (Medium.STORAGE, kv_vllm.Locality.LOCAL, True, "storage"),
        (Medium.CPU, kv_vllm.Locality.LOCAL, False, None),
        (Medium.STORAGE, kv_vllm.Locality.REMOTE, True, "object"),
    ]


def test_tensor_parallel_ranks_share_one_slot() -> None:
    """Two TP ranks (one engine) attach one region; each fills its own share of a slot.

    As in vLLM, the workers register their KV caches before the scheduler builds its manager.
    """
    extra = kvtier_extra(cpu_bytes_to_use=16 * 2 * BYTES_PER_BLOCK)
    specs: list[Any] = [
        kv_vllm.KVTierOffloadingSpec(
            offloading_config(extra, engine_id="engine-tp", rank=r, world_size=2))
        for r in range(2)
    ]
    assert specs[0].instance_id == specs[1].instance_id
    assert "tp2" in specs[0].namespace
    scheduler_spec = kv_vllm.KVTierOffloadingSpec(
        offloading_config(extra, engine_id="engine-tp", rank=0, world_size=2))
    workers: list[Any] = []
    kvs: list[list[torch.Tensor]] = []
    manager = None
    try:
        for spec in specs:
            kv = [torch.randint(-128, 128, (32, PAGE), dtype=torch.int8) for _ in range(2)]
            kvs.append(kv)
            workers.append(spec.get_worker(CanonicalKVCaches(
                tensors=[CanonicalKVCacheTensor(t, PAGE) for t in kv],
                group_data_refs=[[CanonicalKVCacheRef(0, PAGE), CanonicalKVCacheRef(1, PAGE)]],
            )))
        manager = scheduler_spec.get_manager()  # owns (and at shutdown unlinks) the region
        region = manager.kv.primary_blocks()
        assert region.shape[1] == 2 * BYTES_PER_BLOCK
        gpu = GPULoadStoreSpec([3, 9], group_sizes=[2], block_indices=[0])
        for r, w in enumerate(workers):
            assert w.submit_store(r + 1, gpu, kv_vllm.KVTierLoadStoreSpec([7, 2]))
            w.wait({r + 1})
        for slot, block in ((7, 3), (2, 9)):
            for r in range(2):
                share = region[slot, r * BYTES_PER_BLOCK : (r + 1) * BYTES_PER_BLOCK]
                want = np.concatenate([t[block].numpy().view(np.uint8) for t in kvs[r]])
                assert np.array_equal(share, want), (slot, r)
        for r, w in enumerate(workers):
            dst = GPULoadStoreSpec([20, 21], group_sizes=[2], block_indices=[0])
            assert w.submit_load(10 + r, kv_vllm.KVTierLoadStoreSpec([7, 2]), dst)
            w.wait({10 + r})
            for t in kvs[r]:
                assert torch.equal(t[20], t[3]) and torch.equal(t[21], t[9])
    finally:
        for w in workers:
            w.shutdown()
        if manager is not None:
            manager.shutdown()


def test_stats_reach_vllm_prometheus_metrics(engines: list[Engine]) -> None:
    """get_stats payloads pass vLLM's own Prometheus observer under the declared names."""
    from prometheus_client import REGISTRY, Counter, Gauge, Histogram
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
        OffloadPromMetrics,
    )

    e = Engine(kvtier_extra(cpu_bytes_to_use=8 * BYTES_PER_BLOCK,
                            secondary_tiers=[{"type": "example"}]))
    engines.append(e)
    types: Any = {Gauge: Gauge, Counter: Counter, Histogram: Histogram}
    prom = OffloadPromMetrics(e.vllm_config, types, ["engine"], {0: ["0"]})
    e.run(prompt(1, 6))
    e.settle()
    e.run(prompt(2, 8))
    e.settle()
    e.run(prompt(1, 6))
    e.settle()
    stats = e.sched.get_stats()
    assert stats is not None
    prom.observe(stats.data, 0)

    def sample(name: str) -> float:
        value = REGISTRY.get_sample_value(name, {"engine": "0"})
        assert value is not None, name
        return value

    assert sample("vllm:kvtier_stored_blocks_total") == 14  # prompt 1 came back promoted
    assert sample("vllm:kvtier_promoted_blocks_total") >= 6
    assert sample("vllm:kvtier_evicted_blocks_total") >= 12
    assert 0.0 < sample("vllm:kvtier_primary_usage_perc") <= 1.0


def test_store_under_pressure_keeps_the_leading_chunks() -> None:
    """When not every new chunk fits, the leading ones are stored instead of none."""
    spec = kv_vllm.KVTierOffloadingSpec(offloading_config(
        kvtier_extra(cpu_bytes_to_use=8 * BYTES_PER_BLOCK)))
    manager = spec.get_manager()
    try:
        ctx = ReqContext(req_id="a")
        manager.on_new_request(ctx)
        held = [make_offload_key(bytes([i]) * 32, 0) for i in range(5)]
        out = manager.prepare_store(held, ctx)
        assert out is not None and len(out.keys_to_store) == 5
        manager.complete_store(held, ctx)
        manager.prepare_load(held, ctx)  # pinned by a load in flight: not evictable
        keys = [make_offload_key(bytes([100 + i]) * 32, 0) for i in range(6)]
        for i, k in enumerate(keys):
            ctx.set_offload_key_position(k, (i + 1) * TOKENS_PER_BLOCK)
        out = manager.prepare_store(list(reversed(keys)), ctx)
        assert out is not None
        # The 3 free slots go to the leading chunks, listed in the order vLLM gave them (it pairs
        # slots with its engine blocks in that order).
        assert out.keys_to_store == list(reversed(keys[:3]))
        assert manager.partial_stores == 1
        # Every slot held (5 by the load, 3 being written): not one chunk fits, None.
        assert manager.prepare_store([make_offload_key(b"\xee" * 32, 0)], ctx) is None
        manager.complete_store(out.keys_to_store, ctx)
        manager.complete_load(held, ctx)
    finally:
        manager.shutdown()


def _hybrid_with_six_free_slots(window_chunks: int) -> tuple[Any, ReqContext, list[Any]]:
    """A manager for a full + windowed pair of groups (a window of ``window_chunks``) with an
    8-slot CPU tier, 2 slots of it pinned by a load in flight (``held``): 6 slots left."""
    cfg = offloading_config(kvtier_extra(cpu_bytes_to_use=8 * BYTES_PER_BLOCK), num_groups=2)
    full, window = cfg.groups
    cfg = dataclasses.replace(cfg, groups=(
        full, dataclasses.replace(window, sliding_window_size_in_chunks=window_chunks)))
    manager = kv_vllm.KVTierOffloadingSpec(cfg).get_manager()
    ctx = ReqContext(req_id="a")
    manager.on_new_request(ctx)
    held = [make_offload_key(bytes([i]) * 32, 0) for i in range(2)]
    assert manager.prepare_store(held, ctx) is not None
    manager.complete_store(held, ctx)
    manager.prepare_load(held, ctx)
    return manager, ctx, held


def test_hybrid_store_under_pressure_keeps_a_prefix_with_its_window() -> None:
    """A hybrid's cut: the full group's leading chunks and the windowed group's last window."""
    manager, ctx, held = _hybrid_with_six_free_slots(window_chunks=1)
    try:
        # Six chunks of each group, listed as vLLM lists them: group 0's, then group 1's.
        keys = [[make_offload_key(bytes([100 + 16 * g + i]) * 32, g) for i in range(6)]
                for g in range(2)]
        for g in range(2):
            for i, k in enumerate(keys[g]):
                ctx.set_offload_key_position(k, (i + 1) * TOKENS_PER_BLOCK)
        out = manager.prepare_store(keys[0] + keys[1], ctx)
        assert out is not None
        # The longest prefix that fits in 6 slots: 4 full chunks and the window chunk (plus
        # one) before the cut at chunk 4, in vLLM's order, group after group.
        assert out.keys_to_store == keys[0][:4] + keys[1][2:4]
        assert manager.partial_stores == 1 and manager.cut_store_keys == 6
        # Every slot held (2 by the load, 6 being written): not one chunk fits, None (counted).
        assert manager.prepare_store([make_offload_key(b"\xee" * 32, 0)], ctx) is None
        assert manager.refused_stores == 1
        manager.complete_store(out.keys_to_store, ctx)
        manager.complete_load(held, ctx)
    finally:
        manager.shutdown()


def test_hybrid_cut_is_the_largest_position_with_a_whole_window_that_fits() -> None:
    """The cut: the largest P, at or below the offered end, where the windowed group offers its
    whole window and the kept keys fit; a P with a holed window is skipped even when cheaper."""
    manager, ctx, held = _hybrid_with_six_free_slots(window_chunks=2)
    try:
        # The full group offers chunks 1-6; the windowed group (window of 2 chunks) chunks 2,
        # 3 and 5 (chunk 4 was freed on the GPU before it was offered: vLLM never offers it).
        full_keys = [make_offload_key(bytes([100 + i]) * 32, 0) for i in range(6)]
        win_keys = [make_offload_key(bytes([200 + c]) * 32, 1) for c in (2, 3, 5)]
        for i, k in enumerate(full_keys):
            ctx.set_offload_key_position(k, (i + 1) * TOKENS_PER_BLOCK)
        for c, k in zip((2, 3, 5), win_keys):
            ctx.set_offload_key_position(k, c * TOKENS_PER_BLOCK)
        out = manager.prepare_store(full_keys + win_keys, ctx)
        assert out is not None
        # Cuts at chunks 6 and 5 keep 7 keys (> 6 slots); the cut at chunk 4 keeps 6 (full
        # 1-4, window 2-3), which fit, but its window misses chunk 4: skipped. The cut at
        # chunk 3 has its whole window (chunks 2-3) and fits: full 1-3 and window 2-3.
        assert out.keys_to_store == full_keys[:3] + win_keys[:2]
        assert manager.partial_stores == 1 and manager.cut_store_keys == 4
        assert manager.refused_stores == 0
        manager.complete_store(out.keys_to_store, ctx)
        manager.complete_load(held, ctx)
    finally:
        manager.shutdown()
