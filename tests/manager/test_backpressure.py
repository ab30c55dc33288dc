"""Backpressure, the promotion deadline and stores before promotions, on a tier whose jobs the test
holds: a stuck tier pins at most its bound, requests stop waiting at the deadline, and a running
request's store takes the slots of promotions that have not started."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
from helpers import block_bytes_for, lookup_until, make_key, settle, store_blocks

import kvtier
from kvtier.manager.backpressure import TierBackpressure, cpu_stall_seconds
from kvtier.tiers.example import ExampleTier

BLOCK = 4096


class GatedTier(ExampleTier):
    """The example tier, with store and load jobs held until the test opens their gate."""

    def __init__(self, ctx, **params):
        super().__init__(ctx, **params)
        self.store_gate = threading.Event()
        self.load_gate = threading.Event()
        self.store_gate.set()
        self.load_gate.set()
        self.threads: list[threading.Thread] = []

    def _later(self, gate: threading.Event, fn, *args) -> None:
        def run() -> None:
            gate.wait(30)
            fn(self, *args)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def submit_store(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        self._later(self.store_gate, ExampleTier.submit_store, job_id, list(keys), slots)

    def submit_load(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        self._later(self.load_gate, ExampleTier.submit_load, job_id, list(keys), slots)


kvtier.register_tier("gated-example", GatedTier)


def _manager(namespace: str, slots: int, tier: dict | None = None, **extra) -> kvtier.TieringManager:
    cfg = {"cpu_bytes_to_use": slots * BLOCK,
           "secondary_tiers": [{"type": "gated-example", **(tier or {})}], **extra}
    return kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BLOCK,
                                        namespace=namespace).get_manager()


def _store(m: kvtier.TieringManager, keys: list[bytes], req: str) -> bool:
    ctx = kvtier.ReqContext(req)
    out = m.prepare_store(keys, ctx)
    if out is None:
        return False
    m.complete_store(out.keys_to_store, ctx)
    m.on_schedule_end()
    return True


def test_a_stuck_tier_pins_at_most_its_share_and_recovers(namespace: str) -> None:
    m = _manager(namespace, 512, {"max_pinned_share": 0.125})
    try:
        tier = m.tiers[0]
        assert isinstance(tier, GatedTier)
        tier.store_gate.clear()
        keys = [make_key(i, namespace) for i in range(192)]
        for i in range(0, 192, 16):
            assert _store(m, keys[i:i + 16], f"r{i}"), "the CPU tier refused a store"
            st = m.get_stats()["tiers"]["gated-example0"]
            assert st["pinned_slots"] <= 64
        st = m.get_stats()["tiers"]["gated-example0"]
        assert st["max_pinned_slots"] == 64 and st["pinned_slots"] == 64
        assert st["backpressure_dropped"] == 128 and st["degraded"]
        assert m.get_stats()["manager"]["backpressure_dropped"] == 128
        # Dropped blocks stay loadable from the CPU tier.
        assert lookup_until(m, keys) == 192

        tier.store_gate.set()
        settle(m)
        deadline = time.monotonic() + 30
        while m.get_stats()["tiers"]["gated-example0"]["degraded"]:
            assert time.monotonic() < deadline, "the tier stayed degraded"
            m.on_schedule_end()
            time.sleep(0.02)
        more = [make_key(1000 + i, namespace) for i in range(16)]
        assert _store(m, more, "after")
        settle(m)
        st = m.get_stats()["tiers"]["gated-example0"]
        assert st["backpressure_dropped"] == 128 and st["pinned_slots"] == 0
        assert tier.lookup(more) == 16
        m.primary.check()
    finally:
        m.shutdown()


def test_latency_signal_halves_the_bound_while_the_tier_is_slow() -> None:
    bp = TierBackpressure("t", 800, 0.25, 8.0)
    small = TierBackpressure("small", 16, 0.25, 8.0)
    assert small.bound == 16  # never below 64 slots, or all of them
    for _ in range(10):
        small.observe(0.001, 1 << 20)
    for _ in range(10):
        small.observe(0.1, 1 << 20)
    assert small.slow and small.limit == 16  # halving stops at that floor
    assert bp.limit == 200
    for _ in range(20):
        bp.observe(0.001, 1 << 20)
    assert not bp.slow
    for _ in range(10):
        bp.observe(0.1, 1 << 20)  # 100x slower per byte
    assert bp.slow and bp.limit == 100
    bp.tick(time.monotonic())
    assert bp.degraded and bp.stats()["store_latency_ratio"] > 8
    for _ in range(20):
        bp.observe(0.001, 1 << 20)
    assert not bp.slow and bp.limit == 200
    bp.tick(time.monotonic())
    assert not bp.degraded


def test_latency_signal_counts_busy_time_not_time_queued() -> None:
    """A burst of 32 store jobs submitted at once, each taking the disk 1 ms: the last ends 32 ms
    after its submission, yet the tier was never slower than 1 ms a job. The same jobs one at a
    time at 20 ms each are a slow medium."""
    bp = TierBackpressure("t", 800, 0.25, 8.0)
    mb = 1 << 20
    t = 100.0
    for _ in range(10):  # healthy, one at a time: the baseline is 1 ms per MiB
        bp.observe(0.001, mb, submitted=t)
        t += 0.01
    for k in range(1, 33):  # the burst: queued behind each other
        bp.observe(0.001 * k, mb, submitted=t)
    assert not bp.slow and bp.stats()["store_latency_ratio"] < 2
    t += 1.0
    for _ in range(4):  # the medium itself slows down: 20 ms per job, one at a time
        bp.observe(0.02, mb, submitted=t)
        t += 0.05
    assert bp.slow and bp.limit == 100
    # A job that ended inside a span already counted (parallel I/O threads) adds nothing.
    samples = bp._samples
    bp.observe(0.001, mb, submitted=t - 0.05)
    assert bp._samples == samples


def test_latency_signal_ignores_jobs_that_waited_for_a_cpu() -> None:
    """Jobs during which tasks waited for a CPU most of the time count only for the slowness
    the wait cannot explain: a machine short of CPUs is not a slow medium, a slow medium on a
    busy machine still is. They never move the baseline. The pinned bound is unaffected."""
    bp = TierBackpressure("t", 800, 0.25, 8.0)
    for _ in range(10):
        bp.observe(0.001, 1 << 20, cpu_wait_share=0.1)
    base = dict(bp.baselines)
    for _ in range(10):  # 5x slower, but 90% of it waiting for a CPU: explained, no sample
        bp.observe(0.005, 1 << 20, cpu_wait_share=0.9)
    assert not bp.slow and bp.stats()["latency_samples_cpu_bound"] == 10
    assert bp._samples == 9 and bp.baselines == base
    for _ in range(6):  # 100x slower at the same CPU wait: at least 10x is the medium's
        bp.observe(0.1, 1 << 20, cpu_wait_share=0.9)
    assert bp.slow and bp.baselines == base
    assert bp.stats()["latency_samples_cpu_bound"] == 16
    for _ in range(20):  # healthy again, CPUs to spare: the signal recovers
        bp.observe(0.001, 1 << 20, cpu_wait_share=0.1)
    assert not bp.slow


def test_cpu_stall_reading_is_cumulative() -> None:
    """Where the kernel has pressure stall information, the reading is seconds that only grow."""
    a = cpu_stall_seconds()
    if a is None:
        pytest.skip("no pressure stall information on this kernel")
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:
        pass
    b = cpu_stall_seconds()
    assert b is not None and b >= a >= 0


@pytest.mark.parametrize("key,value", [
    ("max_pinned_share", 0), ("max_pinned_share", 1.5), ("max_pinned_share", "half"),
    ("slow_store_factor", 1), ("slow_store_factor", True),
])
def test_tier_backpressure_keys_are_checked(key: str, value: object) -> None:
    cfg = {"cpu_bytes_to_use": 16 * BLOCK, "secondary_tiers": [{"type": "example", key: value}]}
    with pytest.raises(kvtier.ConfigError, match=rf"secondary_tiers\[0\]\.{key}"):
        kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BLOCK)


def test_promotion_deadline_is_checked() -> None:
    cfg = {"cpu_bytes_to_use": 16 * BLOCK, "promotion_deadline_seconds": 0}
    with pytest.raises(kvtier.ConfigError, match="promotion_deadline_seconds"):
        kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BLOCK)


def test_a_late_promotion_is_a_miss_and_its_slots_come_back(namespace: str) -> None:
    m = _manager(namespace, 16, {"max_pinned_share": 1.0}, promotion_deadline_seconds=0.2)
    try:
        tier = m.tiers[0]
        assert isinstance(tier, GatedTier)
        keys = [make_key(i, namespace) for i in range(32)]
        store_blocks(m, keys)
        settle(m)
        want = [k for k in keys if k not in m.primary.key_slot][:4]  # only in the tier
        assert m.primary.run_length(want) == 0 and tier.lookup(want) == 4
        tier.load_gate.clear()
        ctx = kvtier.ReqContext("late")
        t0 = time.monotonic()
        assert m.lookup(want, ctx) is None
        m.on_schedule_end()
        answer = lookup_until(m, want, ctx)
        assert answer == 0, "blocks still in flight after the deadline are misses"
        assert time.monotonic() - t0 >= 0.2
        assert m.get_stats()["manager"]["promotion_deadline_misses"] == 4
        assert m.has_pending_work()
        tier.load_gate.set()
        settle(m)
        m.primary.check()
        # The late job finished: its blocks are in the CPU tier, nothing stays pinned.
        assert m.lookup(want, kvtier.ReqContext("next")) == 4
        assert m.primary.evictable == len(m.primary.key_slot)
    finally:
        m.shutdown()


def test_running_stores_take_slots_before_queued_promotions(namespace: str) -> None:
    m = _manager(namespace, 16, {"max_pinned_share": 1.0})
    try:
        keys = [make_key(i, namespace) for i in range(32)]
        store_blocks(m, keys)
        settle(m)
        # A waiting request's promotion takes every slot (queued until the step ends).
        assert m.lookup(keys[:16], kvtier.ReqContext("waiting")) is None
        assert m.primary.can_free(1) is False
        # A running request's store still gets its slots: the queued promotion gives way.
        new = [make_key(100 + i, namespace) for i in range(4)]
        out = m.prepare_store(new, kvtier.ReqContext("running"))
        assert out is not None and out.keys_to_store == new
        assert m.get_stats()["manager"]["promotions_preempted"] == 4
        m.complete_store(out.keys_to_store, kvtier.ReqContext("running"))
        settle(m)
        # The waiting request asks again and gets what was promoted.
        got = lookup_until(m, keys[:16], kvtier.ReqContext("waiting"))
        assert got >= 12
        m.primary.check()
    finally:
        m.shutdown()


def test_a_steady_stream_of_stores_cannot_starve_a_promotion(namespace: str) -> None:
    """Every step a running request stores as many new blocks as the CPU tier holds, and a
    waiting request's promotion needs 4 of those slots. The first store takes the promotion's
    slots; the promotion planned again is not preempted again, so the waiting request gets its
    blocks at the next step, byte for byte, while stores keep coming."""
    m = _manager(namespace, 16, {"max_pinned_share": 1.0}, promotion_deadline_seconds=60)
    try:
        want = [make_key(i, namespace) for i in range(4)]
        store_blocks(m, want)
        settle(m)
        m.reset_cache()  # the waiting request's blocks are now only in the tier
        assert m.primary.run_length(want) == 0 and m.tiers[0].lookup(want) == 4
        waiting = kvtier.ReqContext("waiting")
        got, refused, steps = None, 0, 0
        for step in range(20):
            steps = step + 1
            got = m.lookup(want, waiting)
            if got is not None:
                break
            new = [make_key(1000 + 16 * step + i, namespace) for i in range(16)]
            ctx = kvtier.ReqContext(f"running{step}")
            out = m.prepare_store(new, ctx)
            if out is None:
                refused += 1
            else:
                m.complete_store(out.keys_to_store, ctx)
            settle(m)
        stats = m.get_stats()["manager"]
        assert got == 4, f"the waiting request never got its blocks ({stats})"
        assert steps <= 3
        # The first store still came before the promotion; later ones waited for it, once.
        assert stats["promotions_preempted"] == 4
        assert refused == 1
        spec = m.prepare_load(want, waiting)
        region = m.primary_blocks()
        for key, slot in zip(want, spec.block_ids):
            assert np.array_equal(region[slot], block_bytes_for(key, region.shape[1]))
        m.complete_load(want, waiting)
        m.on_schedule_end()
        # Stores go on as before once the promotion has landed and been loaded.
        assert _store(m, [make_key(5000 + i, namespace) for i in range(16)], "after")
        settle(m)
        m.primary.check()
    finally:
        m.shutdown()


def test_promoted_blocks_wait_one_step_for_their_request(namespace: str) -> None:
    """Blocks that landed at a step end are not evicted by a store before the request that
    waited for them has asked again; after that step they are evictable as usual."""
    m = _manager(namespace, 16, {"max_pinned_share": 1.0}, promotion_deadline_seconds=60)
    try:
        want = [make_key(i, namespace) for i in range(4)]
        store_blocks(m, want)
        settle(m)
        m.reset_cache()
        waiting = kvtier.ReqContext("waiting")
        assert m.lookup(want, waiting) is None
        deadline = time.monotonic() + 20
        while m.primary.run_length(want) < 4:  # step ends until one collects the promotion
            assert time.monotonic() < deadline, "the promotion did not finish"
            m.on_schedule_end()
            time.sleep(0.002)
        # A running request's store in the next step wants the whole CPU tier: it gets the
        # other 12 slots only.
        new = [make_key(100 + i, namespace) for i in range(16)]
        assert m.prepare_store(new, kvtier.ReqContext("running")) is None
        assert m.lookup(want, waiting) == 4
        m.on_schedule_end()
        m.on_schedule_end()
        assert m.primary.evictable == len(m.primary.key_slot) == 4
        assert not m.has_pending_work()
        assert _store(m, new, "running")  # now the promoted blocks can be evicted
        settle(m)
        m.primary.check()
    finally:
        m.shutdown()


def test_a_store_job_far_past_its_expected_time_halves_the_bound_before_it_ends() -> None:
    """The oldest store job in flight, once past twice the factor times its expected time, makes
    the tier stalled (slow, bound halved) without waiting for it to end; time the CPUs were
    short is taken off its age; the state ends with the job."""
    bp = TierBackpressure("t", 800, 0.25, 8.0)
    mb = 1 << 20
    t = 0.0
    for _ in range(10):  # healthy: 1 ms per MiB, jobs one after another
        bp.observe(0.001, mb, submitted=t)
        t += 0.01
    bp.tick(t)
    assert not bp.slow and bp.limit == 200
    bp.job_started(1, t, mb, 0.0)
    bp.tick(t + 0.010, 0.0)  # 10x its expected time: could be a hiccup
    assert not bp.stalled and bp.limit == 200
    bp.tick(t + 0.020, 0.0)  # 20x: stalled, the bound is halved while it lasts
    assert bp.stalled and bp.slow and bp.limit == 100 and bp.degraded
    assert bp.stats()["stalled_steps"] == 1
    bp.job_ended(1)
    bp.tick(t + 0.021, 0.0)
    assert not bp.stalled and bp.limit == 200
    # The same age while tasks waited for a CPU 95% of the time: 1 ms of it is the tier's.
    bp.job_started(2, t + 0.03, mb, 5.0)
    bp.tick(t + 0.05, 5.0 + 0.019)
    assert not bp.stalled
    bp.job_ended(2)
    bp.job_ended(3)  # unknown ids are ignored
    # Before the warm-up's samples, no job is stalled.
    fresh = TierBackpressure("u", 800, 0.25, 8.0)
    fresh.observe(0.001, mb)
    fresh.job_started(1, 0.0, mb, None)
    fresh.tick(10.0)
    assert not fresh.stalled
