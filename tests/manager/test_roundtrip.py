"""Blocks round-trip intact through the CPU primary tier and a secondary tier, via the API only."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import block_bytes_for, load_and_check, lookup_until, make_key, settle, store_blocks

import kvtier

BLOCK = 4096
SLOTS = 32


def _spec(policy: str, namespace: str, **extra) -> kvtier.TieringOffloadingSpec:
    cfg = {
        "cpu_bytes_to_use": SLOTS * BLOCK,
        "block_size": 16,
        "eviction_policy": policy,
        "secondary_tiers": [{"type": "example", "custom_param": 67}],
    }
    cfg.update(extra)
    return kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BLOCK,
                                        namespace=namespace)


@pytest.mark.parametrize("policy", ["lru", "arc"])
def test_three_times_primary_round_trip(policy: str, namespace: str) -> None:
    manager = _spec(policy, namespace).get_manager()
    try:
        keys = [make_key(i, namespace) for i in range(3 * SLOTS)]
        store_blocks(manager, keys)
        settle(manager)
        assert len(manager.primary) <= SLOTS
        assert load_and_check(manager, keys) == len(keys)
        stats = manager.get_stats()
        assert stats["manager"]["promoted_blocks"] >= 2 * SLOTS
        assert stats["tiers"]["example0"]["bytes_written"] == 3 * SLOTS * BLOCK
        assert stats["tiers"]["example0"]["custom_params"] == {"custom_param": 67}
    finally:
        manager.shutdown()


@pytest.mark.parametrize("policy", ["lru", "arc"])
def test_prefix_lookup_promotes_whole_run(policy: str, namespace: str) -> None:
    manager = _spec(policy, namespace).get_manager()
    try:
        keys = [make_key(i, namespace) for i in range(3 * SLOTS)]
        store_blocks(manager, keys)
        settle(manager)
        ctx = kvtier.ReqContext("r1")
        first = keys[:SLOTS - 4]  # fits the primary tier with room to spare
        assert manager.lookup(first, ctx) is None  # most were evicted: promotion in flight
        assert lookup_until(manager, first, ctx) == len(first)
        spec = manager.prepare_load(first, ctx)
        region = manager.primary_blocks()
        for key, slot in zip(first, spec.block_ids):
            np.testing.assert_array_equal(region[slot], block_bytes_for(key, BLOCK))
        manager.complete_load(first, ctx)
        missing = [make_key(10_000 + i, namespace) for i in range(3)]
        assert lookup_until(manager, first + missing, ctx) == len(first)
    finally:
        manager.shutdown()


def test_run_longer_than_primary_ends_as_miss(namespace: str) -> None:
    manager = _spec("lru", namespace).get_manager()
    try:
        keys = [make_key(i, namespace) for i in range(3 * SLOTS)]
        store_blocks(manager, keys)
        settle(manager)
        r = lookup_until(manager, keys, kvtier.ReqContext("big"))
        assert 0 < r <= SLOTS  # the primary cannot hold the whole prefix at once
        manager.primary.check()
    finally:
        manager.shutdown()


def test_events_report_cpu_and_tier_media(namespace: str) -> None:
    manager = _spec("lru", namespace).get_manager()
    try:
        keys = [make_key(i, namespace) for i in range(SLOTS + 8)]
        store_blocks(manager, keys)
        settle(manager)
        events = list(manager.take_events())
        stored_cpu = {k for e in events if e.medium == "CPU" and not e.removed for k in e.keys}
        removed_cpu = {k for e in events if e.medium == "CPU" and e.removed for k in e.keys}
        stored_tier = {k for e in events if e.medium == "EXAMPLE" and not e.removed for k in e.keys}
        assert stored_cpu == set(keys)
        assert len(removed_cpu) == 8
        assert stored_tier == set(keys)
        assert list(manager.take_events()) == []
    finally:
        manager.shutdown()


def test_reset_cache_keeps_secondary(namespace: str) -> None:
    manager = _spec("lru", namespace).get_manager()
    try:
        keys = [make_key(i, namespace) for i in range(8)]
        store_blocks(manager, keys)
        settle(manager)
        manager.reset_cache()
        assert len(manager.primary) == 0
        assert manager.lookup(keys, kvtier.ReqContext("x")) is None  # promoted again
        assert load_and_check(manager, keys) == len(keys)
        manager.primary.check()
    finally:
        manager.shutdown()


def test_primary_only_no_tiers(namespace: str) -> None:
    spec = kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": SLOTS * BLOCK}, gpu_block_size=16,
                                        bytes_per_gpu_block=BLOCK, namespace=namespace)
    manager = spec.get_manager()
    try:
        keys = [make_key(i, namespace) for i in range(2 * SLOTS)]
        store_blocks(manager, keys)
        assert manager.lookup(keys, kvtier.ReqContext("a")) == 0  # the oldest were evicted
        assert manager.lookup(keys[SLOTS:], kvtier.ReqContext("a")) == SLOTS
        assert not manager.has_pending_work()
        blocks = manager.primary_blocks()
        assert blocks.dtype == np.uint8 and blocks.shape == (SLOTS, BLOCK) and blocks.flags.writeable
    finally:
        manager.shutdown()
