"""Cascade policies: which tiers receive stored blocks, and write-back of promoted blocks."""

from __future__ import annotations

import pytest
from helpers import load_and_check, make_key, settle, store_blocks

import kvtier

BLOCK = 4096


def _manager(namespace: str, cascade: str, tier0_cap_blocks: int | None = None):
    t0: dict = {"type": "example"}
    if tier0_cap_blocks is not None:
        t0["capacity_bytes"] = tier0_cap_blocks * BLOCK
    cfg = {"cpu_bytes_to_use": 8 * BLOCK, "cascade_policy": cascade,
           "secondary_tiers": [t0, {"type": "example"}]}
    return kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BLOCK,
                                        namespace=namespace).get_manager()


def test_write_through_reaches_every_tier(namespace: str) -> None:
    m = _manager(namespace, "all")
    try:
        keys = [make_key(i, namespace) for i in range(20)]
        store_blocks(m, keys)
        settle(m)
        tiers = m.get_stats()["tiers"]
        assert tiers["example0"]["blocks"] == 20 and tiers["example1"]["blocks"] == 20
    finally:
        m.shutdown()


def test_first_tier_only(namespace: str) -> None:
    m = _manager(namespace, "first")
    try:
        keys = [make_key(i, namespace) for i in range(20)]
        store_blocks(m, keys)
        settle(m)
        tiers = m.get_stats()["tiers"]
        assert tiers["example0"]["blocks"] == 20 and tiers["example1"]["blocks"] == 0
        assert load_and_check(m, keys) == 20
    finally:
        m.shutdown()


def test_promotion_from_a_lower_tier_writes_back_to_the_upper_one(namespace: str) -> None:
    m = _manager(namespace, "all", tier0_cap_blocks=10)
    try:
        keys = [make_key(i, namespace) for i in range(30)]
        store_blocks(m, keys)
        settle(m)
        # The small upper tier kept only the last 10; the first blocks come from the lower tier.
        assert load_and_check(m, keys[:5]) == 5
        settle(m)
        assert m.tiers[0].lookup(keys[:5]) == 5, "promoted blocks are written back to the upper tier"
    finally:
        m.shutdown()


def test_unknown_cascade_policy() -> None:
    with pytest.raises(kvtier.ConfigError, match="cascade_policy"):
        kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20, "cascade_policy": "never"})
