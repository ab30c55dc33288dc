"""``lookup_groups``: a hybrid request's hit and its promotion across every KV group at once.

A hit of r chunks needs every full-attention group's chunks [0, r) and every windowed group's
last ``window`` chunks before r. The manager answers with the longest such r the CPU tier
holds, promotes every group's missing blocks for it as one unit (never blocks a hit could not
use), and a store that needs the unit's slots takes the whole unit or none of it.
"""

from __future__ import annotations

import numpy as np
from helpers import block_bytes_for, make_key, settle, store_blocks

import kvtier

BLOCK = 4096
WINDOW = 3


def _manager(namespace: str, slots: int) -> kvtier.TieringManager:
    cfg = {"cpu_bytes_to_use": slots * BLOCK, "promotion_deadline_seconds": 60,
           "secondary_tiers": [{"type": "example", "max_pinned_share": 1.0}]}
    return kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BLOCK,
                                        namespace=namespace).get_manager()


def _groups(namespace: str, n: int) -> tuple[list[bytes], list[bytes]]:
    full = [make_key(i, namespace + "full") for i in range(n)]
    swa = [make_key(i, namespace + "swa") for i in range(n)]
    return full, swa


def _in_storage_only(m: kvtier.TieringManager, keys: list[bytes]) -> None:
    store_blocks(m, keys)
    settle(m)
    m.reset_cache()  # only the tier holds them now
    assert m.primary.run_length(keys[:1]) == 0


def _answer(m: kvtier.TieringManager, full: list[bytes], swa: list[bytes], req: str) -> int:
    ctx = kvtier.ReqContext(req)
    for _ in range(2000):
        r = m.lookup_groups([(full, None), (swa, WINDOW)], ctx)
        if r is not None:
            return r
        m.on_schedule_end()
        settle(m)
    raise AssertionError("lookup_groups kept answering None")


def test_the_hit_is_where_every_group_has_its_blocks(namespace: str) -> None:
    """The full group is in the tier for 8 chunks, the windowed group only around chunks 2-4
    and 7: the longest hit every group can serve is 5 chunks, and only its blocks (full 0-4,
    windowed 2-4) are promoted; full 5-7 and windowed 7 stay where they are."""
    m = _manager(namespace, 32)
    try:
        full, swa = _groups(namespace, 8)
        _in_storage_only(m, full + [swa[2], swa[3], swa[4], swa[7]])
        ctx = kvtier.ReqContext("r")
        assert m.lookup_groups([(full, None), (swa, WINDOW)], ctx) is None  # promoting
        assert m.get_stats()["manager"]["promotions_started"] == 8
        assert _answer(m, full, swa, "r") == 5
        assert m.primary.run_length(full) == 5
        assert all(m.primary.is_ready(k) for k in swa[2:5])
        assert not any(k in m.primary for k in (full[5], full[6], full[7], swa[7]))
        region = m.primary_blocks()
        for key in full[:5] + swa[2:5]:
            slot = m.primary.key_slot[key]
            assert np.array_equal(region[slot], block_bytes_for(key, region.shape[1]))
    finally:
        m.shutdown()


def test_no_window_anywhere_is_a_miss_and_promotes_nothing(namespace: str) -> None:
    """Full-attention blocks alone serve no hit: without a whole window of the windowed group
    at any boundary, the answer is 0 and not one block is promoted (before, the full group's
    blocks were promoted and evicted unused)."""
    m = _manager(namespace, 32)
    try:
        full, swa = _groups(namespace, 8)
        _in_storage_only(m, full + [swa[1], swa[4], swa[7]])
        assert m.lookup_groups([(full, None), (swa, WINDOW)], kvtier.ReqContext("r")) == 0
        assert m.get_stats()["manager"]["promotions_started"] == 0
    finally:
        m.shutdown()


def test_the_answer_waits_for_every_group(namespace: str) -> None:
    """Full blocks resident, the window in the tier only: no hit is answered until the window
    has landed too, and the resident full blocks stay pinned (not evictable) while it is
    promoted and the step after it lands."""
    m = _manager(namespace, 16)
    try:
        full, swa = _groups(namespace, 6)
        _in_storage_only(m, swa[3:6])
        store_blocks(m, full)
        settle(m)
        ctx = kvtier.ReqContext("r")
        assert m.lookup_groups([(full, None), (swa, WINDOW)], ctx) is None
        ref, slot = m.primary.ref, m.primary.key_slot
        assert all(ref[slot[k]] > 0 for k in full), "resident blocks of the unit not pinned"
        assert m.primary.evictable == 0
        assert _answer(m, full, swa, "r") == 6
    finally:
        m.shutdown()


def test_a_store_takes_the_whole_unit_once(namespace: str) -> None:
    """A running request's store that needs the slots of a planned unit takes all of its
    blocks (none stay half-promoted); planned again, the unit is not preempted again and the
    waiting request gets every group's blocks."""
    m = _manager(namespace, 12)
    try:
        full, swa = _groups(namespace, 4)
        _in_storage_only(m, full + swa[1:4])
        waiting = kvtier.ReqContext("waiting")
        assert m.lookup_groups([(full, None), (swa, WINDOW)], waiting) is None
        unit = full + swa[1:4]
        assert all(k in m.primary for k in unit)
        running = kvtier.ReqContext("running")
        out = m.prepare_store([make_key(200 + i, namespace) for i in range(8)], running)
        assert out is not None  # 5 free slots were not enough: the unit gave its 7
        assert not any(k in m.primary for k in unit), "a unit was preempted in part"
        assert m.get_stats()["manager"]["promotions_preempted"] == 7
        m.complete_store(out.keys_to_store, running)
        settle(m)
        assert m.lookup_groups([(full, None), (swa, WINDOW)], waiting) is None  # again
        out = m.prepare_store([make_key(300 + i, namespace) for i in range(12)], running)
        assert out is None  # the unit keeps its slots this time
        assert _answer(m, full, swa, "waiting") == 4
        assert m.get_stats()["manager"]["promotions_preempted"] == 7
    finally:
        m.shutdown()
