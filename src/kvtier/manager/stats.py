"""What the tiering manager reports in ``get_stats()``: its counters, the CPU tier, each tier."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.manager.tiering import TieringManager

log = logging.getLogger("kvtier.manager")

PRIMARY_MEDIUM = "CPU"


def manager_stats(m: TieringManager) -> dict[str, Any]:
    """``{"manager": counters and averages, "tiers": {name: stats}}`` (the CPU tier first)."""
    p = m.primary
    c = dict(m.counters)
    promoted = c["promoted_blocks"] + c["promotion_failures"]
    c["promotion_latency_steps_avg"] = c["promotion_steps_total"] / promoted if promoted else 0.0
    c["promotion_latency_s_avg"] = c["promotion_seconds_total"] / promoted if promoted else 0.0
    bb = int(m._region.shape[1]) if m._region.ndim == 2 else 0
    tiers: dict[str, Any] = {
        PRIMARY_MEDIUM: {
            "medium": PRIMARY_MEDIUM,
            "num_slots": p.num_slots,
            "used_slots": len(p.key_slot),
            "free_slots": len(p.free),
            "usage_bytes": len(p.key_slot) * bb,
            "capacity_bytes": p.num_slots * bb,
            "policy": p.policy.name,
            "hits": c["primary_hit_blocks"],
            "misses": c["lookup_miss_blocks"],
            "failures": c["store_alloc_failures"] + c["promotion_failures"],
            "evictions": c["evicted_blocks"],
            "bytes_written": (c["stored_blocks"] + c["promoted_blocks"]) * bb,
            "bytes_read": c["loads_prepared_blocks"] * bb,
        }
    }
    for tier, bp in zip(m.tiers, m._pressure):
        st = {"medium": tier.medium, "available": tier.available}
        try:
            st.update(tier.stats())
        except Exception:
            log.exception("tier %s raised from stats", tier.name)
        st.update(bp.stats())
        tiers[tier.name] = st
    return {"manager": c, "tiers": tiers}
