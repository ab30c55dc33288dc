"""Manager behaviour an engine relies on: pinning, sharing, failures, non-blocking answers."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from helpers import load_and_check, lookup_until, make_key, settle, store_blocks

import kvtier
from kvtier import TierJobResult
from kvtier.tiers.example import ExampleTier

BLOCK = 4096
SLOTS = 16


def _manager(namespace: str, tiers=None, slots: int = SLOTS, **extra):
    cfg = {"cpu_bytes_to_use": slots * BLOCK,
           "secondary_tiers": tiers if tiers is not None else [{"type": "example"}]}
    cfg.update(extra)
    return kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BLOCK,
                                        namespace=namespace).get_manager()


def test_pinned_blocks_are_never_evicted(namespace: str) -> None:
    m = _manager(namespace, tiers=[])
    try:
        ctx = kvtier.ReqContext("a")
        keys = [make_key(i, namespace) for i in range(SLOTS)]
        store_blocks(m, keys)
        pinned = keys[:4]
        spec = m.prepare_load(pinned, ctx)
        before = {k: int(s) for k, s in zip(pinned, spec.block_ids)}
        more = [make_key(100 + i, namespace) for i in range(SLOTS - 4)]
        store_blocks(m, more)
        assert m.lookup(pinned, ctx) == 4
        assert {k: m.primary.key_slot[k] for k in pinned} == before
        # Every slot is now pinned or holds a block of `more`; asking for more than can be freed
        # fails without evicting anything.
        out = m.prepare_store([make_key(1000 + i, namespace) for i in range(SLOTS - 3)], ctx)
        assert out is None
        assert m.lookup(pinned, ctx) == 4
        m.complete_load(pinned, ctx)
        m.primary.check()
    finally:
        m.shutdown()


def test_prepare_store_skips_resident_and_reports_evictions(namespace: str) -> None:
    m = _manager(namespace, tiers=[])
    try:
        ctx = kvtier.ReqContext("a")
        keys = [make_key(i, namespace) for i in range(SLOTS)]
        store_blocks(m, keys)
        new = [make_key(500, namespace)]
        out = m.prepare_store(keys[:3] + new, ctx)
        assert out is not None
        assert out.keys_to_store == new
        assert len(out.evicted_keys) == 1 and out.evicted_keys[0] not in keys[:3]
        m.complete_store(out.keys_to_store, ctx, success=False)
        assert m.lookup(new, ctx) == 0
        m.primary.check()
    finally:
        m.shutdown()


class SlowTier(ExampleTier):
    """The example tier, with loads held until the test releases them."""

    gate: threading.Event

    def __init__(self, ctx, **params):
        super().__init__(ctx, **params)
        self.gate = threading.Event()
        self.load_jobs: list[int] = []

    def submit_load(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        self.load_jobs.append(len(keys))
        gate = self.gate

        def later() -> None:
            gate.wait(10)
            ExampleTier.submit_load(self, job_id, keys, slots)

        threading.Thread(target=later, daemon=True).start()


def test_requests_share_one_promotion(namespace: str, monkeypatch) -> None:
    kvtier.register_tier("slow-example", SlowTier)
    m = _manager(namespace, tiers=[{"type": "slow-example"}], slots=SLOTS)
    try:
        keys = [make_key(i, namespace) for i in range(2 * SLOTS)]
        store_blocks(m, keys)
        settle(m)
        tier = m.tiers[0]
        want = keys[:6]  # evicted from the primary tier by now
        a, b = kvtier.ReqContext("a"), kvtier.ReqContext("b")
        assert m.lookup(want, a) is None
        assert m.lookup(want, b) is None
        m.on_schedule_end()
        assert m.lookup(want, a) is None
        assert tier.load_jobs == [6], "both requests must share one batched promotion job"
        tier.gate.set()
        assert lookup_until(m, want, b) == 6
        assert lookup_until(m, want, a) == 6
        assert tier.load_jobs == [6]
        m.primary.check()
    finally:
        m.shutdown()


class BrokenTier(ExampleTier):
    """Raises from everything a tier must never raise from."""

    def submit_store(self, job_id, keys, slots):
        raise OSError("disk on fire")

    def submit_load(self, job_id, keys, slots):
        raise OSError("disk on fire")

    def poll(self) -> list[TierJobResult]:
        raise OSError("disk on fire")

    def lookup(self, keys):
        raise OSError("disk on fire")

    def touch(self, keys):
        raise OSError("disk on fire")


def test_a_raising_tier_never_reaches_the_engine(namespace: str) -> None:
    kvtier.register_tier("broken", BrokenTier)
    m = _manager(namespace, tiers=[{"type": "broken"}, {"type": "example"}])
    try:
        keys = [make_key(i, namespace) for i in range(2 * SLOTS)]
        store_blocks(m, keys)
        settle(m)
        stats = m.get_stats()
        assert stats["manager"]["cascade_failures"] >= 2 * SLOTS
        # The healthy tier below still serves everything.
        assert load_and_check(m, keys) == len(keys)
        m.touch(keys, kvtier.ReqContext("t"))
        assert m.get_stats()["manager"]["tier_errors"] > 0
        m.primary.check()
    finally:
        m.shutdown()


class CorruptingTier(ExampleTier):
    """Reports every load as failed (as a tier does for a block that fails verification)."""

    def submit_load(self, job_id, keys, slots):
        self.ctx.primary[slots] = 0xAB
        self._done.put(TierJobResult(job_id, frozenset(keys)))
        self._in_flight += 1


def test_failed_promotion_is_a_miss(namespace: str) -> None:
    kvtier.register_tier("corrupting", CorruptingTier)
    m = _manager(namespace, tiers=[{"type": "corrupting"}])
    try:
        keys = [make_key(i, namespace) for i in range(2 * SLOTS)]
        store_blocks(m, keys)
        settle(m)
        ctx = kvtier.ReqContext("a")
        assert m.lookup(keys[:3], ctx) is None
        settle(m)
        # The failed keys are gone from the primary tier: never loadable.
        assert all(k not in m.primary for k in keys[:3])
        assert m.get_stats()["manager"]["promotion_failures"] == 3
        m.primary.check()
    finally:
        m.shutdown()


def test_lookup_never_blocks_and_has_pending_work(namespace: str) -> None:
    kvtier.register_tier("slow-example", SlowTier)
    m = _manager(namespace, tiers=[{"type": "slow-example"}])
    try:
        keys = [make_key(i, namespace) for i in range(2 * SLOTS)]
        store_blocks(m, keys)
        settle(m)
        ctx = kvtier.ReqContext("a")
        assert m.lookup(keys[:2], ctx) is None
        m.on_schedule_end()
        assert m.has_pending_work()
        for _ in range(5):
            assert m.lookup(keys[:2], ctx) is None  # gate closed: still in flight, no waiting
            m.on_schedule_end()
        m.tiers[0].gate.set()
        assert lookup_until(m, keys[:2], ctx) == 2
    finally:
        m.shutdown()


def test_a_hit_promised_by_lookup_survives_other_stores_in_the_same_step(namespace: str) -> None:
    m = _manager(namespace, tiers=[])
    try:
        a, b = kvtier.ReqContext("a"), kvtier.ReqContext("b")
        keys = [make_key(i, namespace) for i in range(SLOTS)]
        store_blocks(m, keys)
        m.on_schedule_end()
        # The oldest blocks are the LRU victims; request a is told they are loadable ...
        assert m.lookup(keys[:4], a) == 4
        # ... and before its prepare_load, request b stores enough to evict them.
        out = m.prepare_store([make_key(100 + i, namespace) for i in range(6)], b)
        assert out is not None and not set(out.evicted_keys) & set(keys[:4])
        spec = m.prepare_load(keys[:4], a)  # still there: no KeyError
        assert len(spec.block_ids) == 4
        m.complete_load(keys[:4], a)
        m.complete_store(out.keys_to_store, b)
        m.on_schedule_end()
        # The protection ends with the step.
        m.primary.check()
        assert m.primary.evictable == SLOTS
    finally:
        m.shutdown()


def test_promotion_keeps_the_resident_rest_of_the_run(namespace: str) -> None:
    m = _manager(namespace, slots=SLOTS)
    try:
        ctx = kvtier.ReqContext("a")
        run = [make_key(i, namespace) for i in range(12)]
        store_blocks(m, run)
        filler = [make_key(100 + i, namespace) for i in range(SLOTS - 6)]
        store_blocks(m, filler)  # evicts the run's first 6 blocks, keeps its last 6
        settle(m)
        assert m.lookup(run, ctx) is None
        assert all(k in m.primary for k in run[6:]), "promotion evicted the run's resident tail"
        settle(m)
        assert m.lookup(run, ctx) == 12  # one promotion round is enough
        m.primary.check()
    finally:
        m.shutdown()
