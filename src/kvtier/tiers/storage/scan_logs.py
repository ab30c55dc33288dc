"""Region logs as tools read them: which record each slot of a region-layout directory holds.

Read from the start of every ``log-NNNNN`` file with the tier's own reader, never written. A
region whose slab file exists but whose log cannot be read is listed apart: tools judge it by its
record headers, as an engine claiming it would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kvtier.tiers.storage import log as ilog
from kvtier.tiers.storage.scan import LOG_NAME, Lane


@dataclass
class Logged:
    """What a region-layout directory's logs say its slots hold."""

    slots: dict[int, tuple[bytes, int]] = field(default_factory=dict)  # slot -> (index key, seq)
    without_log: set[int] = field(default_factory=set)  # regions with a slab file but no log

    def region_of(self, lane: Lane, slot: int) -> int:
        """The region a global slot lies in."""
        assert lane.pool is not None
        return slot // lane.pool.slots_per_region


def read_logs(lane: Lane) -> Logged:
    """Read every region log of a region-layout directory from its start (never writes)."""
    assert lane.pool is not None
    out = Logged()
    spr = lane.pool.slots_per_region
    have = set()
    for path in lane.logs:
        m = LOG_NAME.match(os.path.basename(path))
        assert m is not None
        region = int(m.group(1))
        if region >= lane.pool.regions:
            continue
        got = ilog.LogTail(path).read()
        if got is None:
            continue
        have.add(region)
        base = region * spr
        nslots = lane.pool.slots_in(region)
        for kind, slot, _aux, value, key in got[1]:
            if kind == ilog.PUT and slot < nslots:
                out.slots[base + slot] = (key, value)
            elif kind == ilog.DEL:
                out.slots.pop(base + slot, None)
    out.without_log = {s.index for s in lane.slabs if s.index not in have and s.size > 0}
    return out


def index_key(key: bytes) -> bytes:
    """The form a log gives a key (itself, or its digest form for long keys)."""
    return ilog.index_key(key)
