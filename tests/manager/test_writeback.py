"""Write policies: write-through and write-back to a secondary tier, and failing writes.

The write-back guarantee: a block the manager acknowledged (``complete_store``) is in the CPU
tier or in the tier below whenever an engine may ask for it, even when the tier's write fails
part way through a job.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import block_bytes_for, load_and_check, make_key, settle, store_blocks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvtier
from kvtier.tiers.base import TierJobResult
from kvtier.tiers.example import ExampleTier

BLOCK = 4096
SLOTS = 8


class FailingTier(ExampleTier):
    """The example tier whose store jobs can be made to fail after ``ok_before_fail`` blocks:
    the blocks before are written, the rest are not (a device that errors mid-job)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.fail_after: int | None = None
        self.failed_writes = 0
        self._flock = threading.Lock()
        self._split: dict = {}

    def submit_store(self, job_id, keys, slots) -> None:
        with self._flock:
            cut = self.fail_after
        if cut is None or cut >= len(keys):
            super().submit_store(job_id, keys, slots)
            return
        keys = list(keys)
        ok, bad = keys[:cut], keys[cut:]
        self.failed_writes += len(bad)
        if ok:
            inner = -job_id  # the written part runs as its own job; its result is folded in
            self._split[inner] = (job_id, frozenset(bad))
            super().submit_store(inner, ok, slots[:cut])
        else:
            self._in_flight += 1
            self._done.put(TierJobResult(job_id, frozenset(bad)))

    def poll(self):
        out = []
        for r in super().poll():
            if r.job_id in self._split:
                job_id, bad = self._split.pop(r.job_id)
                r = TierJobResult(job_id, r.failed_keys | bad, r.bytes_moved, r.seconds)
            out.append(r)
        return out


def _manager(namespace: str, write_policy: str, *, tier_blocks: int | None = None,
             failing: bool = False):
    tier: dict = {"type": "FailingTier", "module_path": __name__} if failing else {
        "type": "example"}
    tier["write_policy"] = write_policy
    if tier_blocks is not None:
        tier["capacity_bytes"] = tier_blocks * BLOCK
    cfg = {"cpu_bytes_to_use": SLOTS * BLOCK, "secondary_tiers": [tier]}
    return kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BLOCK,
                                        namespace=namespace).get_manager()


def _tier_blocks(m) -> int:
    return int(m.get_stats()["tiers"][m.tiers[0].name]["blocks"])


def test_write_back_writes_only_what_the_cpu_tier_evicts(namespace: str) -> None:
    m = _manager(namespace, "back")
    try:
        keys = [make_key(i, namespace) for i in range(20)]
        store_blocks(m, keys[:SLOTS])
        settle(m)
        assert _tier_blocks(m) == 0, "nothing is written while the CPU tier holds every block"
        store_blocks(m, keys[SLOTS:])
        settle(m)
        assert _tier_blocks(m) == 20 - SLOTS
        assert m.get_stats()["manager"]["written_back_blocks"] == 20 - SLOTS
        assert load_and_check(m, keys) == 20
        m.primary.check()
    finally:
        m.shutdown()


def test_write_back_writes_less_than_write_through(namespace: str) -> None:
    written = {}
    for wp in ("through", "back"):
        m = _manager(f"{namespace}/{wp}", wp)
        try:
            keys = [make_key(i, namespace) for i in range(24)]
            store_blocks(m, keys)
            settle(m)
            written[wp] = m.get_stats()["tiers"][m.tiers[0].name]["bytes_written"]
            assert load_and_check(m, keys) == 24
        finally:
            m.shutdown()
    assert written["through"] == 24 * BLOCK
    assert written["back"] == (24 - SLOTS) * BLOCK, "the CPU tier's own blocks are not written"


def test_a_promoted_block_is_not_written_again(namespace: str) -> None:
    m = _manager(namespace, "back")
    try:
        keys = [make_key(i, namespace) for i in range(16)]
        store_blocks(m, keys)
        settle(m)
        before = m.get_stats()["tiers"][m.tiers[0].name]["bytes_written"]
        assert load_and_check(m, keys[:4]) == 4  # promoted from the tier
        store_blocks(m, [make_key(i, namespace) for i in range(100, 100 + SLOTS)])
        settle(m)
        after = m.get_stats()["tiers"][m.tiers[0].name]["bytes_written"]
        assert after - before == SLOTS * BLOCK, "the promoted blocks were already in the tier"
    finally:
        m.shutdown()


def test_evicted_block_stays_readable_until_its_write_finishes(namespace: str) -> None:
    m = _manager(namespace, "back")
    try:
        keys = [make_key(i, namespace) for i in range(SLOTS + 2)]
        store_blocks(m, keys[:SLOTS])
        ctx = kvtier.ReqContext("late")
        out = m.prepare_store(keys[SLOTS:], ctx)
        # Both victims are owed to the tier: they keep their slots until written.
        assert out is None
        assert len(m.primary.retained) == 2
        for k in m.primary.retained:
            assert m.lookup([k], ctx) == 1, "a block waiting for its write is still a hit"
        settle(m)
        assert not m.primary.retained
        assert m.prepare_store(keys[SLOTS:], ctx) is not None
        m.primary.check()
    finally:
        m.shutdown()


def test_write_back_never_loses_a_block_when_the_tier_fails_mid_write(namespace: str) -> None:
    m = _manager(namespace, "back", failing=True)
    tier = m.tiers[0]
    try:
        keys = [make_key(i, namespace) for i in range(SLOTS + 6)]
        store_blocks(m, keys[:SLOTS])
        tier.fail_after = 1  # every write job: the first block lands, the rest fail
        ctx = kvtier.ReqContext("w")
        for _ in range(3):
            m.prepare_store(keys[SLOTS:], ctx)
            settle(m)
        assert tier.failed_writes > 0
        # Every acknowledged block is still somewhere it can be loaded from, bytes intact.
        assert load_and_check(m, keys[:SLOTS]) == SLOTS
        assert m.get_stats()["manager"]["writeback_failures"] == tier.failed_writes
        m.primary.check()
        tier.fail_after = None  # the device recovers: the owed blocks are written on eviction
        store_blocks(m, keys[SLOTS:])
        settle(m)
        assert load_and_check(m, keys) == len(keys)
        m.primary.check()
    finally:
        m.shutdown()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["store", "load", "fail", "heal"]),
                              st.lists(st.integers(0, 23), min_size=1, max_size=6)),
                    min_size=1, max_size=25))
def test_acknowledged_blocks_stay_loadable_under_failing_writes(namespace: str, ops) -> None:
    m = _manager(namespace, "back", failing=True)
    tier = m.tiers[0]
    acked: set[bytes] = set()
    region = m.primary_blocks()
    try:
        for op, ids in ops:
            keys = list(dict.fromkeys(make_key(i, namespace) for i in ids))
            if op == "fail":
                tier.fail_after = ids[0] % 3
            elif op == "heal":
                tier.fail_after = None
            elif op == "store":
                out = m.prepare_store(keys, kvtier.ReqContext("s"))
                if out is not None:
                    for key, slot in zip(out.keys_to_store, out.store_spec.block_ids):
                        region[slot] = block_bytes_for(key, region.shape[1])
                    m.complete_store(out.keys_to_store, kvtier.ReqContext("s"))
                    acked.update(out.keys_to_store)
            else:
                load_and_check(m, keys)
            m.on_schedule_end()
            m.primary.check()
        settle(m)
        m.primary.check()
        lost = [k for k in acked if load_and_check(m, [k]) != 1]
        assert not lost, f"{len(lost)} acknowledged blocks could no longer be loaded"
    finally:
        m.shutdown()


def test_write_policy_is_validated() -> None:
    with pytest.raises(kvtier.ConfigError, match=r"secondary_tiers\[0\]\.write_policy"):
        kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20, "secondary_tiers": [
            {"type": "example", "write_policy": "sometimes"}]})


def test_region_bytes_are_the_stored_ones_after_write_back(namespace: str) -> None:
    m = _manager(namespace, "back", tier_blocks=64)
    try:
        keys = [make_key(i, namespace) for i in range(40)]
        store_blocks(m, keys)
        settle(m)
        region = m.primary_blocks()
        ctx = kvtier.ReqContext("r")
        for k in keys[::5]:
            assert m.lookup([k], ctx) in (0, 1, None)
        settle(m)
        assert load_and_check(m, keys) == 40
        assert np.all(region.shape == (SLOTS, BLOCK))
    finally:
        m.shutdown()


class EvenOnly(kvtier.CascadePolicy):
    """A custom cascade policy: only blocks whose key starts with an even byte go down."""

    def select(self, keys, tier_index, tier):
        return [k for k in keys if k[0] % 2 == 0]


@pytest.mark.parametrize("write_policy", ["through", "back"])
def test_custom_cascade_policies_keep_working_with_either_write_policy(
        namespace: str, write_policy: str) -> None:
    cfg = {"cpu_bytes_to_use": SLOTS * BLOCK, "cascade_policy": "EvenOnly",
           "cascade_policy_module_path": __name__,
           "secondary_tiers": [{"type": "example", "write_policy": write_policy}]}
    m = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BLOCK,
                                     namespace=namespace).get_manager()
    try:
        keys = [make_key(i, namespace) for i in range(32)]
        store_blocks(m, keys)
        settle(m)
        tier = m.tiers[0]
        in_tier = {k for k in keys if tier.lookup([k]) == 1}
        assert in_tier, "the selected blocks reached the tier"
        assert all(k[0] % 2 == 0 for k in in_tier), "only what the cascade policy selected"
        evicted_even = {k for k in keys if k[0] % 2 == 0 and not m.primary.is_ready(k)}
        assert evicted_even <= in_tier
    finally:
        m.shutdown()


def test_first_tier_cascade_with_write_back_on_both_tiers(namespace: str) -> None:
    cfg = {"cpu_bytes_to_use": SLOTS * BLOCK, "cascade_policy": "first", "secondary_tiers": [
        {"type": "example", "write_policy": "back"}, {"type": "example", "write_policy": "back"}]}
    m = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BLOCK,
                                     namespace=namespace).get_manager()
    try:
        keys = [make_key(i, namespace) for i in range(24)]
        store_blocks(m, keys)
        settle(m)
        tiers = m.get_stats()["tiers"]
        assert tiers["example0"]["blocks"] == 24 - SLOTS and tiers["example1"]["blocks"] == 0
        assert load_and_check(m, keys) == 24
    finally:
        m.shutdown()


class DownTier(ExampleTier):
    """The example tier with a switch for ``available`` (a medium that is down)."""

    up = True

    @property
    def available(self) -> bool:
        return self.up


def test_a_tier_that_is_down_never_makes_the_engine_wait(namespace: str) -> None:
    cfg = {"cpu_bytes_to_use": SLOTS * BLOCK, "secondary_tiers": [
        {"type": "DownTier", "module_path": __name__, "write_policy": "back"}]}
    m = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BLOCK,
                                     namespace=namespace).get_manager()
    try:
        keys = [make_key(i, namespace) for i in range(30)]
        store_blocks(m, keys[:SLOTS])
        m.tiers[0].up = False
        store_blocks(m, keys[SLOTS:20])  # completes: the victims are let go unwritten
        settle(m)
        c = m.get_stats()["manager"]
        assert c["writeback_skipped_blocks"] == 20 - SLOTS and c["written_back_blocks"] == 0
        assert _tier_blocks(m) == 0
        m.tiers[0].up = True
        store_blocks(m, keys[20:])
        settle(m)
        assert m.get_stats()["manager"]["written_back_blocks"] == 10
        assert load_and_check(m, keys[12:]) == 18  # the 10 written and the 8 resident
        m.primary.check()
    finally:
        m.shutdown()


class GatedTier(ExampleTier):
    """The example tier whose store jobs wait until ``gate`` is set (a stalled device)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.gate = threading.Event()

    def submit_store(self, job_id, keys, slots) -> None:
        self._in_flight += 1
        keys, slots = list(keys), slots.copy()

        def later() -> None:
            self.gate.wait(30)
            self._in_flight -= 1
            ExampleTier.submit_store(self, job_id, keys, slots)

        threading.Thread(target=later, daemon=True).start()


def test_a_stalled_write_back_tier_pins_at_most_its_share(namespace: str) -> None:
    slots = 256
    cfg = {"cpu_bytes_to_use": slots * BLOCK, "secondary_tiers": [
        {"type": "GatedTier", "module_path": __name__, "write_policy": "back",
         "max_pinned_share": 0.25}]}
    m = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BLOCK,
                                     namespace=namespace).get_manager()
    tier = m.tiers[0]
    try:
        keys = [make_key(i, namespace) for i in range(slots + 160)]
        store_blocks(m, keys[:slots])
        # The tier takes no write now: 64 victims (a quarter of 256) wait for it, the others
        # are let go, and the engine's stores go on.
        store_blocks(m, keys[slots:])
        st = m.get_stats()
        assert len(m.primary.retained) <= 64
        assert st["tiers"][tier.name]["pinned_slots"] <= 64
        assert st["manager"]["backpressure_dropped"] > 0
        assert all(m.primary.is_ready(k) for k in keys[-8:])
        tier.gate.set()
        settle(m)
        assert not m.primary.retained
        assert m.get_stats()["manager"]["written_back_blocks"] == len(
            [k for k in keys if tier.lookup([k]) == 1])
        m.primary.check()
    finally:
        tier.gate.set()
        m.shutdown()
