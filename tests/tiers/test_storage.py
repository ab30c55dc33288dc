"""The storage tier on real files: config, round trips, restarts, namespaces, capacity, events."""

from __future__ import annotations

import itertools
import mmap
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from helpers import block_bytes_for, load_and_check, lookup_until, make_key, settle, store_blocks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvtier
from kvtier.format.record import namespace_fingerprint
from kvtier.tiers.base import TierContext, TierJobResult
from kvtier.tiers.storage import FsTier, StorageTier

BB = 64 << 10  # block bytes used by most tests
_ids = itertools.count(1)


def make_spec(path: Path, namespace: str, *, slots: int = 16, bb: int = BB, **tier: object
              ) -> kvtier.TieringOffloadingSpec:
    """A spec with a CPU primary of ``slots`` blocks and one storage tier under ``path``."""
    params = {"type": "storage", "path": str(path), "capacity_bytes": 64 << 20, **tier}
    cfg = {"cpu_bytes_to_use": slots * bb, "secondary_tiers": [params]}
    return kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=bb,
                                        namespace=namespace)


def tier_ctx(namespace: str, slots: int = 8, bb: int = BB) -> TierContext:
    """A TierContext over page-aligned memory, like the manager's region."""
    buf = mmap.mmap(-1, slots * bb)
    primary = np.frombuffer(buf, dtype=np.uint8).reshape(slots, bb)
    return TierContext(namespace, namespace_fingerprint(namespace), bb, primary, "storage0")


def run_jobs(tier: StorageTier, kind: str, jobs: Sequence[tuple[Sequence[bytes], Sequence[int]]],
             timeout: float = 20.0) -> list[TierJobResult]:
    """Submit ``jobs`` (keys, slots) all at once and poll until every one finishes; their
    results in the same order."""
    submit = tier.submit_store if kind == "store" else tier.submit_load
    ids = [next(_ids) for _ in jobs]
    for jid, (keys, slots) in zip(ids, jobs):
        submit(jid, list(keys), np.asarray(slots, dtype=np.int64))
    got: dict[int, TierJobResult] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(ids):
        for res in tier.poll():
            got[res.job_id] = res
        if len(got) < len(ids):
            assert time.monotonic() < deadline, "tier job did not finish"
            time.sleep(0.001)
    return [got[jid] for jid in ids]


def run_job(tier: StorageTier, kind: str, keys: Sequence[bytes], slots: Sequence[int],
            timeout: float = 20.0) -> TierJobResult:
    """Submit one job and poll until it finishes."""
    return run_jobs(tier, kind, [(keys, slots)], timeout)[0]


def open_small_tier(path: Path, ctx: TierContext, blocks: int) -> StorageTier:
    """A storage tier under ``path`` holding ``blocks`` blocks of ``ctx``'s size, one read and
    one write thread."""
    return StorageTier(ctx, path=str(path),
                       capacity_bytes=StorageTier.capacity_for(blocks, ctx.block_bytes),
                       n_read_threads=1, n_write_threads=1)


def dir_bytes(path: Path) -> int:
    """Bytes the files under ``path`` occupy: the larger of their sizes and their allocated blocks."""
    total = 0
    for p in path.rglob("*"):
        if p.is_file():
            st_ = p.stat()
            total += max(st_.st_size, st_.st_blocks * 512)
    return total


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"capacity_bytes": 1 << 20}, "path"),
        ({"path": "/tmp/x"}, "capacity_bytes"),
        ({"path": "/tmp/x", "capacity_bytes": 0}, "capacity_bytes"),
        ({"path": "/tmp/x", "capacity_bytes": "1G"}, "capacity_bytes"),
        ({"path": "/tmp/x", "capacity_bytes": 1 << 20, "direct_io": "maybe"}, "direct_io"),
        ({"path": "/tmp/x", "capacity_bytes": 1 << 20, "fsync": "sometimes"}, "fsync"),
        ({"path": "/tmp/x", "capacity_bytes": 1 << 20, "native_io": "yes"}, "native_io"),
        ({"path": "/tmp/x", "capacity_bytes": 1 << 20, "n_read_threads": 0}, "n_read_threads"),
        ({"path": "/tmp/x", "capacity_bytes": 1 << 20, "bogus": 1}, "bogus"),
        ({"path": "/tmp/x", "root_dir": "/tmp/y", "capacity_bytes": 1 << 20}, "root_dir"),
    ],
)
def test_bad_parameters_name_the_key(tmp_path: Path, params: dict, key: str) -> None:
    cfg = {"cpu_bytes_to_use": 1 << 20, "secondary_tiers": [{"type": "storage", **params}]}
    with pytest.raises(kvtier.ConfigError, match=rf"secondary_tiers\[0\]\.{key}"):
        kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BB)


def test_vllm_fs_config_works_unchanged(tmp_path: Path) -> None:
    """vLLM's fs tier keys are accepted; capacity defaults to 90% of the free space."""
    cfg = {"cpu_bytes_to_use": 8 * BB, "secondary_tiers": [
        {"type": "fs", "root_dir": str(tmp_path / "kv"), "n_read_threads": 2, "n_write_threads": 3,
         "enable_kv_events": True}]}
    spec = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BB)
    m = spec.get_manager()
    try:
        tier = m.tiers[0]
        assert isinstance(tier, FsTier)
        assert (tier.n_read_threads, tier.n_write_threads) == (2, 3)
        st_ = os.statvfs(tmp_path)
        free = st_.f_bavail * st_.f_frsize
        cap = m.get_stats()["tiers"]["fs0"]["capacity_bytes"]
        assert 0.8 * free < cap <= 0.9 * free + (64 << 20)
        keys = [make_key(i, "fs") for i in range(12)]
        store_blocks(m, keys)
        settle(m)
        assert m.get_stats()["tiers"]["fs0"]["blocks"] == 12
    finally:
        m.shutdown()


def test_storage_accepts_root_dir_alias(tmp_path: Path, namespace: str) -> None:
    cfg = {"cpu_bytes_to_use": 8 * BB, "secondary_tiers": [
        {"type": "storage", "root_dir": str(tmp_path / "alias"), "capacity_bytes": 1 << 20}]}
    m = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BB).get_manager()
    try:
        assert m.get_stats()["tiers"]["storage0"]["path"].startswith(str(tmp_path / "alias"))
    finally:
        m.shutdown()


def test_direct_io_true_rejects_unaligned_blocks(tmp_path: Path) -> None:
    cfg = {"cpu_bytes_to_use": 8 * 3000, "secondary_tiers": [
        {"type": "storage", "path": str(tmp_path), "capacity_bytes": 1 << 20, "direct_io": True}]}
    spec = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=3000)
    with pytest.raises(kvtier.ConfigError, match="direct_io"):
        spec.get_manager()


# -- round trips and restarts ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bb", "direct_io", "fsync"),
    [(BB, "auto", "none"), (BB, False, "batch"), (3000, "auto", "always")],
)
def test_round_trip_three_times_primary_capacity(
    tmp_path: Path, namespace: str, bb: int, direct_io: object, fsync: str
) -> None:
    spec = make_spec(tmp_path, namespace, bb=bb, direct_io=direct_io, fsync=fsync)
    m = spec.get_manager()
    try:
        keys = [make_key(i, namespace) for i in range(3 * spec.num_slots)]
        store_blocks(m, keys)
        settle(m)
        st_ = m.get_stats()["tiers"]["storage0"]
        assert st_["blocks"] == len(keys)
        assert st_["direct_io"] is (bb % 4096 == 0 and direct_io == "auto")
        assert load_and_check(m, keys) == len(keys)
        st_ = m.get_stats()["tiers"]["storage0"]
        # the primary holds 16 blocks: at least the other 32 came back from storage, verified
        assert st_["hits"] >= 2 * spec.num_slots
        assert st_["corrupt"] == 0 and st_["load_failures"] == 0
    finally:
        m.shutdown()


def test_restart_serves_old_blocks_and_other_namespace_sees_none(tmp_path: Path) -> None:
    keys = [make_key(i, "restart") for i in range(40)]
    m = make_spec(tmp_path, "model-a").get_manager()
    store_blocks(m, keys)
    settle(m)
    m.shutdown()

    m = make_spec(tmp_path, "model-b").get_manager()
    try:
        assert m.tiers[0].lookup(keys) == 0
        assert lookup_until(m, keys) == 0
        store_blocks(m, [make_key(i, "b") for i in range(5)])  # b's data lives beside a's
        settle(m)
    finally:
        m.shutdown()

    spec = make_spec(tmp_path, "model-a")
    m = spec.get_manager()
    try:
        tier = m.tiers[0]
        st_ = m.get_stats()["tiers"]["storage0"]
        assert st_["blocks"] == 40 and st_["index_rebuild_seconds"] > 0
        assert tier.lookup(keys) == 40  # known at once, no second round
        assert load_and_check(m, keys) == 40
    finally:
        m.shutdown()


def test_same_block_geometry_is_part_of_the_namespace(tmp_path: Path) -> None:
    """A different block size under the same namespace name never reads the old records."""
    keys = [make_key(i, "geo") for i in range(6)]
    m = make_spec(tmp_path, "same").get_manager()
    store_blocks(m, keys)
    settle(m)
    m.shutdown()
    m = make_spec(tmp_path, "same", bb=2 * BB).get_manager()
    try:
        assert m.tiers[0].lookup(keys) == 0
    finally:
        m.shutdown()


def test_lookup_answers_leading_run_at_once(tmp_path: Path, namespace: str) -> None:
    tier = StorageTier(tier_ctx(namespace), path=str(tmp_path), capacity_bytes=8 << 20)
    try:
        keys = [make_key(i) for i in range(6)]
        prim = tier.ctx.primary
        for i, k in enumerate(keys[:4]):
            prim[i] = block_bytes_for(k, BB)
        assert tier.lookup(keys) == 0
        assert run_job(tier, "store", [keys[0], keys[1], keys[3]], [0, 1, 3]).success
        assert tier.lookup(keys) == 2
        assert tier.lookup(keys[3:]) == 1
        res = run_job(tier, "load", [keys[0], keys[2]], [5, 6])
        assert res.failed_keys == {keys[2]}
        assert np.array_equal(prim[5], block_bytes_for(keys[0], BB))
    finally:
        tier.shutdown()


# -- capacity ----------------------------------------------------------------------------------
def test_capacity_holds_under_five_times_the_workload(tmp_path: Path, namespace: str) -> None:
    capacity = StorageTier.capacity_for(20, BB, 1 << 20)  # 20 slots, their logs, metadata
    spec = make_spec(tmp_path, namespace, capacity_bytes=capacity, n_read_threads=2,
                     n_write_threads=2, slab_bytes=1 << 20)
    m = spec.get_manager()
    try:
        max_blocks = m.get_stats()["tiers"]["storage0"]["max_blocks"]
        assert max_blocks == 20
        keys = [make_key(i, namespace) for i in range(5 * max_blocks)]
        for i in range(0, len(keys), 10):
            store_blocks(m, keys[i : i + 10])
            settle(m)
            st_ = m.get_stats()["tiers"]["storage0"]
            assert st_["usage_bytes"] <= capacity
            assert dir_bytes(tmp_path) <= capacity
        st_ = m.get_stats()["tiers"]["storage0"]
        assert st_["evictions"] >= len(keys) - max_blocks
        assert st_["blocks"] <= max_blocks
        events = [e for e in m.take_events() if e.medium == "STORAGE"]
        stored = {k for e in events if not e.removed for k in e.keys}
        removed = {k for e in events if e.removed for k in e.keys}
        assert stored == set(keys) and len(removed) == st_["evictions"]
        # LRU: the newest blocks survive and come back intact, the oldest are gone
        m.reset_cache()
        assert m.tiers[0].lookup(keys[-max_blocks + 2 :]) == max_blocks - 2
        assert m.tiers[0].lookup(keys[:1]) == 0
        assert load_and_check(m, keys[-8:]) == 8
    finally:
        m.shutdown()


def test_restart_with_smaller_capacity_shrinks_to_fit(tmp_path: Path, namespace: str) -> None:
    keys = [make_key(i, namespace) for i in range(30)]
    m = make_spec(tmp_path, namespace, slab_bytes=1 << 20).get_manager()
    store_blocks(m, keys)
    settle(m)
    m.shutdown()
    capacity = StorageTier.capacity_for(10, BB, 1 << 20)
    m = make_spec(tmp_path, namespace, capacity_bytes=capacity, slab_bytes=1 << 20,
                  n_read_threads=1, n_write_threads=1).get_manager()
    try:
        st_ = m.get_stats()["tiers"]["storage0"]
        assert st_["max_blocks"] == 10 and 0 < st_["blocks"] <= 10
        assert dir_bytes(tmp_path) <= capacity
        found = [k for k in keys if m.tiers[0].lookup([k]) == 1]
        m.reset_cache()
        assert load_and_check(m, found) == len(found)
    finally:
        m.shutdown()


_op: st.SearchStrategy[tuple[str, list[int]]] = st.one_of(
    st.tuples(st.just("store"), st.lists(st.integers(0, 11), min_size=1, max_size=5, unique=True)),
    st.tuples(st.just("load"), st.lists(st.integers(0, 11), min_size=1, max_size=5, unique=True)),
    st.tuples(st.just("touch"), st.lists(st.integers(0, 11), min_size=1, max_size=3, unique=True)),
    st.tuples(st.just("restart"), st.just([])),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=1, max_size=14))
def test_index_and_capacity_invariants(tmp_path_factory: pytest.TempPathFactory,
                                       ops: list[tuple[str, list[int]]]) -> None:
    """Against an LRU model: same contents, capacity never exceeded, every load exact."""
    bb = 8192
    path = tmp_path_factory.mktemp("inv")
    ctx = tier_ctx("inv", slots=8, bb=bb)
    capacity = StorageTier.capacity_for(5, bb, 1 << 20)  # 5 blocks and their metadata
    keys = [make_key(i, "inv") for i in range(12)]

    def open_tier() -> StorageTier:
        return StorageTier(ctx, path=str(path), capacity_bytes=capacity, n_read_threads=1,
                           n_write_threads=1, slab_bytes=1 << 20)

    tier = open_tier()
    model: list[int] = []  # LRU order, oldest first
    wseq: dict[int, int] = {}  # when each block's record was last written (restart order)
    tseq: dict[int, int] = {}  # the tier's sequence number in each block's record
    clock = itertools.count()
    try:
        assert tier.stats()["max_blocks"] == 5
        for kind, idx in ops:
            if kind == "store":
                for j, i in enumerate(idx):
                    ctx.primary[j] = block_bytes_for(keys[i], bb)
                seq = tier.stats()["next_seq"]
                assert run_job(tier, "store", [keys[i] for i in idx], list(range(len(idx)))).success
                # present blocks are refreshed at once, before the job takes any slot; new ones
                # then take a slot in order (evicting the LRU block when full) and become
                # visible, newest, when their records are written
                present = [i for i in idx if i in model]
                for i in present:
                    model.remove(i)
                    model.append(i)
                writing: list[int] = []
                for i in idx:
                    if i not in present:
                        if len(model) + len(writing) >= 5:
                            model.pop(0)
                        writing.append(i)
                        wseq[i] = next(clock)
                        tseq[i] = seq
                        seq += 1
                model.extend(writing)
                assert tier.stats()["next_seq"] == seq
            elif kind == "load":
                seq = tier.stats()["next_seq"]
                res = run_job(tier, "load", [keys[i] for i in idx], list(range(len(idx))))
                assert res.failed_keys == {keys[i] for i in idx if i not in model}
                for j, i in enumerate(idx):
                    if i in model:
                        assert np.array_equal(ctx.primary[j], block_bytes_for(keys[i], bb))
                        model.remove(i)
                        model.append(i)
                        if tseq[i] + tier.refresh_window <= seq:  # an old block's load is persisted
                            wseq[i] = next(clock)
                            tseq[i] = seq
                            seq += 1
                assert tier.stats()["next_seq"] == seq
            elif kind == "touch":
                tier.touch([keys[i] for i in idx])
                for i in idx:
                    if i in model:
                        model.remove(i)
                        model.append(i)
            else:
                tier.shutdown()
                tier = open_tier()
                model.sort(key=wseq.__getitem__)  # recency after a restart: last write or load
            st_ = tier.stats()
            assert st_["usage_bytes"] <= capacity and dir_bytes(path) <= capacity
            assert st_["corrupt"] == 0
            assert {k for k in keys if tier.lookup([k])} == {keys[i] for i in model}
    finally:
        tier.shutdown()


def test_stores_run_on_the_write_threads_only(tmp_path: Path, namespace: str) -> None:
    """With blocks smaller than a store run, read threads take loads only (the load pump's
    thread takes them instead where the native record I/O is built); stores (and so their
    number in flight) stay on the write threads, however many store chunks wait."""
    import threading

    ctx = tier_ctx(namespace, slots=32)
    tier = StorageTier(ctx, path=str(tmp_path), capacity_bytes=StorageTier.capacity_for(64, BB),
                       n_read_threads=3, n_write_threads=1)
    ran: dict[str, set[str]] = {"store": set(), "load": set()}
    io = tier._io
    for kind, method in (("store", "_run_store"), ("load", "_start_load")):
        inner = getattr(io, method)

        def wrapped(*a: object, _inner: object = inner, _kind: str = kind) -> object:
            ran[_kind].add(threading.current_thread().name)
            return _inner(*a)  # type: ignore[operator]

        setattr(io, method, wrapped)
    try:
        keys = [make_key(i) for i in range(32)]
        for i, k in enumerate(keys):
            ctx.primary[i] = block_bytes_for(k, BB)
        jobs = [(keys[j : j + 2], [j, j + 1]) for j in range(0, 32, 2)]
        for kind in ("store", "load"):  # 16 jobs of 2 blocks at once: many chunks wait
            assert all(res.success for res in run_jobs(tier, kind, jobs))
        for i, k in enumerate(keys):
            assert np.array_equal(ctx.primary[i], block_bytes_for(k, BB))
        readers = {f"kvtier-{tier.name}-io{i}" for i in range(3)}
        assert ran["store"] == {f"kvtier-{tier.name}-io3"}
        if tier._sh.store.fast is not None:  # type: ignore[union-attr]
            assert ran["load"] == {f"kvtier-{tier.name}-loads"}
        else:
            assert ran["load"] & readers
    finally:
        tier.shutdown()


def test_read_threads_store_only_blocks_written_one_record_a_call(tmp_path: Path) -> None:
    from kvtier.tiers.storage.io import MERGE_BYTES

    for bb, expected in ((MERGE_BYTES // 2, False), (MERGE_BYTES, True)):
        ctx = tier_ctx(f"rs{bb}", slots=2, bb=bb)
        tier = StorageTier(ctx, path=str(tmp_path / str(bb)),
                           capacity_bytes=StorageTier.capacity_for(4, bb))
        try:
            assert tier._io.readers_store is expected
            key = make_key(1, f"rs{bb}")
            ctx.primary[0] = block_bytes_for(key, bb)
            assert run_job(tier, "store", [key], [0]).success
            assert run_job(tier, "load", [key], [1]).success
            assert np.array_equal(ctx.primary[1], block_bytes_for(key, bb))
        finally:
            tier.shutdown()


def test_concurrent_loads_and_stores_under_eviction(tmp_path: Path) -> None:
    """Many overlapping jobs while evicting: a load in flight keeps its slot; bytes always exact."""
    bb = 8192
    ctx = tier_ctx("stress", slots=64, bb=bb)
    cap = StorageTier.capacity_for(6, bb, 1 << 20)  # 6 blocks: every store job evicts most of it
    tier = StorageTier(ctx, path=str(tmp_path), capacity_bytes=cap,
                       n_read_threads=2, n_write_threads=2, slab_bytes=1 << 20)
    rng = np.random.default_rng(7)
    keys = [make_key(i, "stress") for i in range(40)]
    free_slots = list(range(64))
    jobs: dict[int, tuple[str, list[bytes], list[int]]] = {}
    checked = 0
    try:
        for _step in range(300):
            # a load of present blocks, then at once a store of absent ones that must evict
            present = [k for k in keys if tier.lookup([k])]
            absent = [k for k in keys if k not in present]
            for kind, pool, n in (("load", present, 3), ("store", absent, 5)):
                if len(jobs) >= 8 or len(free_slots) < n or not pool:
                    continue
                pick = [pool[i] for i in rng.choice(len(pool), min(n, len(pool)), replace=False)]
                slots = [free_slots.pop() for _ in pick]
                for k, s in zip(pick, slots):
                    ctx.primary[s] = block_bytes_for(k, bb) if kind == "store" else 0
                jid = next(_ids)
                submit = tier.submit_store if kind == "store" else tier.submit_load
                submit(jid, pick, np.asarray(slots, dtype=np.int64))
                jobs[jid] = (kind, pick, slots)
            for res in tier.poll():
                kind, pick, slots = jobs.pop(res.job_id)
                if kind == "load":
                    for k, s in zip(pick, slots):
                        if k not in res.failed_keys:
                            assert np.array_equal(ctx.primary[s], block_bytes_for(k, bb))
                            checked += 1
                free_slots.extend(slots)
            time.sleep(0.0005)
        deadline = time.monotonic() + 20
        while jobs and time.monotonic() < deadline:
            for res in tier.poll():
                jobs.pop(res.job_id)
            time.sleep(0.001)
        st_ = tier.stats()
        assert not jobs and checked > 50
        assert st_["corrupt"] == 0 and st_["evictions"] > 0
        assert st_["blocks"] <= 6 and dir_bytes(tmp_path) <= cap
    finally:
        tier.shutdown()
