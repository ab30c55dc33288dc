"""What every operator command shares: options, the plan of a ``gc``, and result pieces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvtier.ops.progress import Progress
from kvtier.ops.target import Selection

SCHEMA_VERSION = 1


def schema(command: str) -> str:
    """The ``schema`` field of a command's JSON output."""
    return f"kvtier.{command}/{SCHEMA_VERSION}"


def default_threads() -> int:
    """Reader threads for fsck: reads in flight keep a disk busy whatever the core count (the
    checksums take a fraction of a core per GB/s)."""
    return 16


@dataclass
class Options:
    """Flags shared by the commands."""

    selection: Selection = field(default_factory=Selection)
    progress: Progress = field(default_factory=lambda: Progress(False))
    threads: int = field(default_factory=default_threads)
    chunk_bytes: int = 1 << 20  # per read (at least one whole slot)
    shm_prefix: str = "kvtier-"
    timeout: float = 5.0
    password: str | None = None


@dataclass
class GcPlan:
    """What ``kvtier gc`` was asked to remove."""

    drop: bool = False
    older_than_s: int | None = None  # Redis: idle time
    older_than_writes: int | None = None  # storage: blocks written since
    shrink_to: int | None = None  # bytes per namespace
    stale: bool = False
    dry_run: bool = False

    def describe(self) -> list[str]:
        """The actions, as flags."""
        out = []
        if self.drop:
            out.append("drop")
        if self.older_than_s is not None:
            out.append(f"older-than {self.older_than_s}s")
        if self.older_than_writes is not None:
            out.append(f"older-than-writes {self.older_than_writes}")
        if self.shrink_to is not None:
            out.append(f"shrink-to {self.shrink_to}")
        if self.stale:
            out.append("stale")
        return out


def gc_result(target: dict[str, Any], plan: GcPlan, removed: list[dict[str, Any]],
              skipped: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON object ``kvtier gc`` prints."""
    return {
        "schema": schema("gc"),
        "target": target,
        "dry_run": plan.dry_run,
        "actions": plan.describe(),
        "removed": removed,
        "removed_blocks": sum(int(r.get("blocks") or 0) for r in removed),
        "freed_bytes": sum(int(r.get("bytes") or 0) for r in removed),
        "skipped": skipped,
    }
