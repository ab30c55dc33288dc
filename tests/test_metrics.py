"""The Prometheus collector exports what get_stats() says."""

from __future__ import annotations

from helpers import make_key, settle, store_blocks
from prometheus_client import CollectorRegistry, generate_latest

import kvtier
from kvtier.metrics import KVTierCollector


def test_collector_exports_tier_counters(namespace: str) -> None:
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": 8 * 4096, "secondary_tiers": [{"type": "example"}]},
        gpu_block_size=16, bytes_per_gpu_block=4096, namespace=namespace)
    m = spec.get_manager()
    try:
        store_blocks(m, [make_key(i, namespace) for i in range(12)])
        settle(m)
        reg = CollectorRegistry()
        reg.register(KVTierCollector(m, instance="engine-0"))
        text = generate_latest(reg).decode()
        written = 'kvtier_tier_bytes_written_total{instance="engine-0",medium="EXAMPLE",tier="example0"}'
        assert f"{written} 49152.0" in text
        assert 'kvtier_manager_stored_blocks_total{instance="engine-0"} 12.0' in text
        assert 'kvtier_tier_num_slots{instance="engine-0",medium="CPU",tier="CPU"} 8.0' in text
    finally:
        m.shutdown()
