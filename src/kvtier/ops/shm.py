"""Operator commands on this host's primary-tier regions (``/dev/shm/kvtier-*``)."""

from __future__ import annotations

import time
from typing import Any

from kvtier.memory.scan import SHM_DIR, Region, list_regions, remove_region
from kvtier.ops.common import GcPlan, Options, gc_result, schema
from kvtier.ops.units import UsageError

STALE_REASON = "no live process maps it or holds it open: its engine is gone"


def region_json(r: Region) -> dict[str, Any]:
    """One region as the commands report it."""
    return {"name": r.name, "path": r.path, "size_bytes": r.size, "bytes": r.allocated,
            "state": r.state, "users": r.users, "age_s": max(0, int(time.time() - r.mtime))}


def stale_regions(prefix: str) -> list[dict[str, Any]]:
    """Stale regions as ``stale`` entries of ``inspect``."""
    return [{"kind": "shm_region", "path": r.path, "bytes": r.allocated, "reason": STALE_REASON}
            for r in list_regions(prefix) if r.state == "stale"]


def remove_stale(prefix: str, dry_run: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Remove stale regions: (removed, skipped) entries of ``gc``."""
    removed: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for r in list_regions(prefix):
        if r.state != "stale":
            continue
        entry = {"kind": "shm_region", "id": r.name, "path": r.path, "blocks": 0,
                 "bytes": r.allocated}
        if dry_run or remove_region(r):
            removed.append(entry)
        else:
            skipped.append({"id": r.name, "reason": "in use again, or already gone"})
    return removed, skipped


class ShmOps:
    """``inspect``, ``du`` and ``gc --stale`` of ``/dev/shm``."""

    def __init__(self, path: str, opts: Options) -> None:
        self.path = path
        self.opts = opts

    def target_json(self) -> dict[str, Any]:
        """The ``target`` field."""
        return {"kind": "shm", "path": self.path, "prefix": self.opts.shm_prefix}

    def _regions(self) -> list[Region]:
        return list_regions(self.opts.shm_prefix, SHM_DIR)

    def inspect(self) -> dict[str, Any]:
        """Every region, who uses it, and the stale ones."""
        regions = [region_json(r) for r in self._regions()]
        return {
            "schema": schema("inspect"), "target": self.target_json(), "medium": {},
            "namespaces": [], "regions": regions, "engines": [],
            "stale": [{"kind": "shm_region", "path": r["path"], "bytes": r["bytes"],
                       "reason": STALE_REASON} for r in regions if r["state"] == "stale"],
            "totals": {"namespaces": 0, "blocks": 0, "bytes": sum(r["bytes"] for r in regions)},
        }

    def du(self) -> dict[str, Any]:
        """Bytes each region holds."""
        regions = [region_json(r) for r in self._regions()]
        return {"schema": schema("du"), "target": self.target_json(), "namespaces": [],
                "regions": regions, "total_blocks": 0,
                "total_bytes": sum(r["bytes"] for r in regions)}

    def fsck(self, repair: bool) -> dict[str, Any]:
        """Regions hold no records to check."""
        raise UsageError("fsck checks storage tiers and Redis servers; /dev/shm holds no records "
                         "(use 'kvtier inspect /dev/shm' or 'kvtier gc /dev/shm --stale')")

    def gc(self, plan: GcPlan) -> dict[str, Any]:
        """``--stale`` only: remove regions of dead engines."""
        if plan.drop or plan.older_than_s is not None or plan.older_than_writes is not None \
                or plan.shrink_to is not None:
            raise UsageError("/dev/shm: only --stale applies (regions of engines that are gone)")
        removed, skipped = remove_stale(self.opts.shm_prefix, plan.dry_run)
        return gc_result(self.target_json(), plan, removed, skipped)

    def close(self) -> None:
        """Nothing to release."""
