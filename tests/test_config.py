"""Bad configs raise ConfigError naming the key, before anything is allocated."""

from __future__ import annotations

import os

import pytest

import kvtier


def _shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("kvtier-")}


GOOD = {"cpu_bytes_to_use": 1 << 20, "block_size": 16, "eviction_policy": "lru",
        "secondary_tiers": [{"type": "example", "custom_param": 67}]}


@pytest.mark.parametrize(
    "patch,key",
    [
        ({"cpu_bytes_to_use": None}, "cpu_bytes_to_use"),
        ({"cpu_bytes_to_use": 0}, "cpu_bytes_to_use"),
        ({"cpu_bytes_to_use": -5}, "cpu_bytes_to_use"),
        ({"cpu_bytes_to_use": "1GB"}, "cpu_bytes_to_use"),
        ({"cpu_bytes_to_use": 1 << 60}, "cpu_bytes_to_use"),
        ({"cpu_bytes_to_use": 100}, "cpu_bytes_to_use"),  # smaller than one block
        ({"eviction_policy": "fifo2"}, "eviction_policy"),
        ({"secondary_tiers": {"type": "example"}}, "secondary_tiers"),
        ({"secondary_tiers": [{"type": "nosuchtier"}]}, "secondary_tiers[0].type"),
        ({"secondary_tiers": [{"custom": 1}]}, "secondary_tiers[0].type"),
        ({"secondary_tiers": ["example"]}, "secondary_tiers[0]"),
        ({"block_size": 24}, "block_size"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": -16}, "block_size"),
        ({"evicton_policy": "lru"}, "evicton_policy"),
        ({"secondary_tiers": [{"type": "example", "capacity_bytes": -1}]},
         "secondary_tiers[0].capacity_bytes"),
        ({"cache_policy_module_path": "no.such.module", "eviction_policy": "X"},
         "cache_policy_module_path"),
        ({"secondary_tiers": [{"type": "Nope", "module_path": "no.such.mod"}]},
         "secondary_tiers[0].module_path"),
    ],
)
def test_bad_config_names_key(patch: dict, key: str) -> None:
    cfg = dict(GOOD)
    for k, v in patch.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    before = _shm_segments()
    with pytest.raises(kvtier.ConfigError) as ei:
        kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=4096)
    assert ei.value.key == key
    assert key in str(ei.value)
    assert "expected" in str(ei.value)
    assert _shm_segments() == before, "nothing may be allocated for an invalid config"


def test_config_error_is_value_error() -> None:
    assert issubclass(kvtier.ConfigError, ValueError)


@pytest.mark.parametrize("arg,value", [("gpu_block_size", 0), ("bytes_per_gpu_block", -1)])
def test_bad_geometry(arg: str, value: int) -> None:
    kwargs = {"gpu_block_size": 16, "bytes_per_gpu_block": 4096, arg: value}
    with pytest.raises(kvtier.ConfigError, match=arg):
        kvtier.TieringOffloadingSpec(GOOD, **kwargs)


def test_vllm_keys_accepted_and_geometry() -> None:
    cfg = dict(GOOD, spec_name="KVTierOffloadingSpec", spec_module_path="kvtier.vllm",
               offload_prompt_only=True, block_size=64, sync_load_budget_bytes=1 << 20,
               tier_poll_interval_s=0.01, self_describing_kv_events=False)
    spec = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=4096)
    assert spec.block_bytes == 4 * 4096
    assert spec.num_slots == (1 << 20) // (4 * 4096)


def test_example_tier_reports_custom_params(namespace: str) -> None:
    spec = kvtier.TieringOffloadingSpec(GOOD, gpu_block_size=16, bytes_per_gpu_block=4096,
                                        namespace=namespace)
    m = spec.get_manager()
    try:
        stats = m.get_stats()["tiers"]["example0"]
        assert stats["custom_params"] == {"custom_param": 67}
    finally:
        m.shutdown()
        m.shutdown()  # idempotent


def test_out_of_tree_tier_and_policy_by_module_path(namespace: str) -> None:
    cfg = {
        "cpu_bytes_to_use": 1 << 20,
        "eviction_policy": "ReverseLRU",
        "cache_policy_module_path": "plugin_example",
        "secondary_tiers": [{"type": "DictTier", "module_path": "plugin_example"}],
    }
    spec = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=4096,
                                        namespace=namespace)
    m = spec.get_manager()
    try:
        assert type(m.primary.policy).__name__ == "ReverseLRU"
        assert type(m.tiers[0]).__name__ == "DictTier"
    finally:
        m.shutdown()


def test_out_of_tree_wrong_class(namespace: str) -> None:
    with pytest.raises(kvtier.ConfigError, match=r"secondary_tiers\[0\].type"):
        kvtier.TieringOffloadingSpec(
            {"cpu_bytes_to_use": 1 << 20,
             "secondary_tiers": [{"type": "ReverseLRU", "module_path": "plugin_example"}]},
            gpu_block_size=16, bytes_per_gpu_block=4096)
