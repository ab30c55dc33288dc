"""kvtier's events and counters in vLLM's terms: media, hit sources, Prometheus metrics."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import kvtier
from kvtier.vllm._base import (
    CacheHitSource,
    Locality,
    Medium,
    OffloadingConnectorStats,
    OffloadingCounterMetadata,
    OffloadingEvent,
    OffloadingGaugeMetadata,
    OffloadingMetricMetadata,
)

# kvtier's medium strings -> vLLM's (Medium, Locality). vLLM 0.33 has no network or object
# medium: both are shared storage that other hosts read, so STORAGE with REMOTE locality.
MEDIA: dict[str, tuple[Medium, Locality]] = {
    "CPU": (Medium.CPU, Locality.LOCAL),
    "STORAGE": (Medium.STORAGE, Locality.LOCAL),
    "NETWORK": (Medium.STORAGE, Locality.REMOTE),
    "OBJECT": (Medium.STORAGE, Locality.REMOTE),
}

# vLLM's hit sources: storage is a disk; a network or user tier is reported as unspecified.
SOURCES = {"STORAGE": CacheHitSource.DISK}

METRIC_PREFIX = "vllm:kvtier_"
COUNTERS = {
    "stored_blocks": "Blocks the engine stored into kvtier's CPU primary tier.",
    "primary_hit_blocks": "Blocks loaded into the engine from kvtier's CPU primary tier.",
    "promoted_blocks": "Blocks promoted from a secondary tier into the primary tier.",
    "promotion_failures": "Promotions that failed (the block became a miss).",
    "cascaded_blocks": "Blocks written from the primary tier to a secondary tier.",
    "cascade_failures": "Writes to a secondary tier that failed or were dropped.",
    "evicted_blocks": "Blocks evicted from the primary tier.",
}
GAUGES = {
    "primary_usage_perc": "Fraction of kvtier's primary slots in use (0.0 - 1.0).",
}


def metric_definitions() -> dict[str, OffloadingMetricMetadata]:
    """The Prometheus metrics ``stats_since`` reports, by vLLM metric name."""
    defs: dict[str, OffloadingMetricMetadata] = {
        METRIC_PREFIX + k: OffloadingCounterMetadata(documentation=d) for k, d in COUNTERS.items()
    }
    for k, d in GAUGES.items():
        defs[METRIC_PREFIX + k] = OffloadingGaugeMetadata(documentation=d)
    return defs


def hit_source(medium: str) -> CacheHitSource:
    """vLLM's hit source for blocks promoted from a tier of this medium."""
    return SOURCES.get(medium, CacheHitSource.EXTERNAL_UNSPECIFIED)


def to_vllm_events(events: Iterable[kvtier.OffloadingEvent]) -> Iterable[OffloadingEvent]:
    """kvtier's events with vLLM's medium and locality (tier events carry their medium name)."""
    for ev in events:
        medium, locality = MEDIA.get(ev.medium, (Medium.STORAGE, Locality.LOCAL))
        owner = None if ev.medium == "CPU" else ev.medium.lower()
        yield OffloadingEvent(
            keys=list(ev.keys),  # type: ignore[arg-type]
            medium=medium,
            removed=ev.removed,
            locality=locality,
            ownership=owner,
        )


def stats_since(
    counters: Mapping[str, float], last: dict[str, float], usage: float
) -> OffloadingConnectorStats | None:
    """Counter increments since ``last`` (updated in place) and the usage gauge when it moved."""
    stats = OffloadingConnectorStats()
    for name in COUNTERS:
        value = counters.get(name, 0)
        delta = value - last.get(name, 0)
        if delta:
            stats.increase_counter(METRIC_PREFIX + name, delta)
            last[name] = value
    if usage != last.get("primary_usage_perc"):
        stats.set_gauge(METRIC_PREFIX + "primary_usage_perc", usage)
        last["primary_usage_perc"] = usage
    return None if stats.is_empty() else stats


