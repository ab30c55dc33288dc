"""The storage tier's ``eviction_policy``: capacity holds, blocks round-trip, pinned ones stay."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import load_and_check, make_key, settle, store_blocks

import kvtier
from kvtier.tiers.storage import StorageTier
from kvtier.tiers.storage.index import OwnBlocks

BB = 64 << 10


def _manager(path: Path, namespace: str, policy: str, blocks: int):
    cap = StorageTier.capacity_for(blocks, BB, 1 << 20)
    cfg = {"cpu_bytes_to_use": 4 * BB, "secondary_tiers": [
        {"type": "storage", "path": str(path), "capacity_bytes": cap, "slab_bytes": 1 << 20,
         "n_read_threads": 1, "n_write_threads": 1, "eviction_policy": policy}]}
    return kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BB,
                                        namespace=namespace).get_manager()


@pytest.mark.parametrize("policy", ["arc", "chain", "adaptive"])
def test_storage_tier_evicts_by_its_policy_within_capacity(tmp_path: Path, namespace: str,
                                                          policy: str) -> None:
    m = _manager(tmp_path, namespace, policy, 10)
    try:
        keys = [make_key(i, namespace) for i in range(40)]
        for i in range(0, 40, 4):
            store_blocks(m, keys[i : i + 4])
            settle(m)
            st = m.get_stats()["tiers"]["storage0"]
            assert st["blocks"] <= st["max_blocks"] == 10
        index = m.tiers[0]._sh.index
        assert isinstance(index.own, OwnBlocks)
        assert set(index.policy.keys()) == set(index.own), "the policy orders exactly own"
        found = [k for k in keys if m.tiers[0].lookup([k]) == 1]
        assert 0 < len(found) <= 10
        m.reset_cache()
        assert load_and_check(m, found) == len(found)
        assert m.get_stats()["tiers"]["storage0"]["evictions"] >= 30
    finally:
        m.shutdown()


def test_unknown_storage_eviction_policy(tmp_path: Path) -> None:
    with pytest.raises(kvtier.ConfigError, match=r"secondary_tiers\[0\]\.eviction_policy"):
        kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20, "secondary_tiers": [
            {"type": "storage", "path": str(tmp_path), "capacity_bytes": 1 << 30,
             "eviction_policy": "random"}]})
