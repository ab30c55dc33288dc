"""Prometheus metrics: a collector that reads ``manager.get_stats()`` at scrape time.

Nothing is counted twice and nothing runs on the scheduler path: the manager keeps plain
counters, and this collector turns them into metric families when Prometheus scrapes.

    from prometheus_client import REGISTRY, start_http_server
    from kvtier.metrics import KVTierCollector
    REGISTRY.register(KVTierCollector(manager))
    start_http_server(9400)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Tier stats that only grow (exported as counters); every other number is a gauge.
_COUNTERS = {
    "hits", "misses", "bytes_read", "bytes_written", "load_failures", "store_failures",
    "corrupt", "evictions", "round_trips", "down_events",
}


class KVTierCollector(Collector):
    """Exports manager-level and per-tier numbers with a ``tier`` and ``medium`` label."""

    def __init__(self, manager: Any, instance: str = "") -> None:
        self.manager = manager
        self.instance = instance

    def collect(self) -> Iterator[Metric]:
        """Build the metric families from one ``get_stats()`` snapshot."""
        stats = self.manager.get_stats()
        for name, value in sorted(stats.get("manager", {}).items()):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            fam: GaugeMetricFamily | CounterMetricFamily
            if name.endswith("_avg"):
                fam = GaugeMetricFamily(f"kvtier_{name}", f"kvtier manager {name}",
                                                labels=["instance"])
            else:
                fam = CounterMetricFamily(f"kvtier_manager_{name}", f"kvtier manager {name}",
                                          labels=["instance"])
            fam.add_metric([self.instance], float(value))
            yield fam
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for tier, tstats in sorted(stats.get("tiers", {}).items()):
            medium = str(tstats.get("medium", ""))
            for name, value in sorted(tstats.items()):
                if isinstance(value, bool):
                    value = int(value)
                if not isinstance(value, (int, float)):
                    continue
                tfam = families.get(name)
                if tfam is None:
                    cls = CounterMetricFamily if name in _COUNTERS else GaugeMetricFamily
                    tfam = cls(f"kvtier_tier_{name}", f"kvtier tier {name}",
                               labels=["instance", "tier", "medium"])
                    families[name] = tfam
                tfam.add_metric([self.instance, tier, medium], float(value))
        yield from families.values()
