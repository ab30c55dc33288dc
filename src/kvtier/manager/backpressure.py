"""Backpressure per secondary tier: a slow tier may not pin more than its share of the CPU tier.

Every block cascaded to a tier holds its primary slot until the tier has read it. A tier that falls
behind the store rate would otherwise collect pinned slots until the CPU tier refuses the engine's
stores. Each tier therefore has a bound: its queued and in-flight cascades may pin at most
``max_pinned_share`` of the CPU tier's slots (but never fewer than 64 slots, or all of them in a
smaller CPU tier, so that a fast tier always has a few steps' batches in flight). Blocks past
the bound are not cascaded to that tier (they stay in the tiers above, where they were stored)
and are counted as dropped.

A second, earlier signal is the tier's store latency per byte: a fast EWMA of recent jobs against
the tier's own healthy baseline (a floor that follows faster jobs quickly and slower ones only
slowly). While recent latency is over ``slow_store_factor`` times the baseline, the bound is
halved (not below the 64-slot floor), so a tier that is slowing down sheds load before it reaches
the full bound.

A tier that dropped a block in the last second, or whose latency is high, is *degraded*: reported
in ``get_stats()``, logged when it starts (at most once every 10 s per tier) and when it ends. It
recovers on its own: jobs keep going to it within the bound, and their latency is what lifts the
signal. Loads (promotions) from the tier are never held back. Everything here runs on the
scheduler thread and is O(1) per call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("kvtier.manager")

DEFAULT_MAX_PINNED_SHARE = 0.25
DEFAULT_SLOW_STORE_FACTOR = 8.0
MIN_BOUND_SLOTS = 64  # a few steps' batches: below this a tier could not keep up even when fast
DROP_MEMORY_S = 1.0  # a drop keeps the tier degraded this long
LOG_EVERY_S = 10.0
_FAST = 0.3  # EWMA weight of a new sample in the recent latency
_FLOOR_UP = 0.01  # how fast the baseline follows slower samples
_FLOOR_DOWN = 0.2  # and faster ones (not at once: one lucky job is not the baseline)
_WARMUP_JOBS = 8  # samples before the latency signal counts


class TierBackpressure:
    """The backpressure state of one secondary tier (see the module docstring)."""

    def __init__(self, name: str, num_slots: int, max_pinned_share: float,
                 slow_store_factor: float) -> None:
        self.name = name
        self.floor = min(num_slots, MIN_BOUND_SLOTS)
        self.bound = max(self.floor, int(num_slots * max_pinned_share))
        self.slow_factor = slow_store_factor
        self.pinned = 0
        self.max_pinned_seen = 0
        self.dropped = 0
        self.degraded = False
        self.degraded_events = 0
        self.baseline: float | None = None  # seconds per byte, healthy
        self.recent: float | None = None
        self._samples = 0
        self._last_drop = -1e18
        self._last_log = -1e18
        self._logged = False

    @property
    def slow(self) -> bool:
        """True while recent store latency per byte is far above the healthy baseline."""
        return (self._samples >= _WARMUP_JOBS and self.baseline is not None
                and self.recent is not None and self.recent > self.slow_factor * self.baseline)

    @property
    def limit(self) -> int:
        """Slots the tier's cascades may pin now."""
        return max(self.floor, self.bound // 2) if self.slow else self.bound

    def admit(self, keys: Sequence[bytes]) -> Sequence[bytes]:
        """The leading part of ``keys`` that fits under the limit; counts them as pinned.

        The rest are dropped (counted) and stay only in the tiers above.
        """
        room = self.limit - self.pinned
        n = len(keys)
        if room >= n:
            self.pinned += n
            if self.pinned > self.max_pinned_seen:
                self.max_pinned_seen = self.pinned
            return keys
        take = max(0, room)
        self.pinned += take
        if self.pinned > self.max_pinned_seen:
            self.max_pinned_seen = self.pinned
        self.dropped += n - take
        self._last_drop = time.monotonic()
        return keys[:take]

    def release(self, n: int) -> None:
        """``n`` slots the tier's cascades pinned are released."""
        self.pinned -= n
        if self.pinned < 0:
            raise RuntimeError(f"tier {self.name}: more cascade slots released than pinned")

    def observe(self, seconds: float, nbytes: int) -> None:
        """A store job of ``nbytes`` took ``seconds`` from submission to its end."""
        if nbytes <= 0 or seconds <= 0:
            return
        x = seconds / nbytes
        self._samples += 1
        self.recent = x if self.recent is None else self.recent + _FAST * (x - self.recent)
        if self.baseline is None:
            self.baseline = x
        elif x < self.baseline:
            self.baseline += _FLOOR_DOWN * (x - self.baseline)
        else:
            self.baseline += _FLOOR_UP * (min(x, self.slow_factor * self.baseline) - self.baseline)

    def tick(self, now: float) -> None:
        """Once per step: enter or leave the degraded state; logs at most one pair per 10 s."""
        bad = self.slow or now - self._last_drop < DROP_MEMORY_S
        if bad and not self.degraded:
            self.degraded = True
            self.degraded_events += 1
            if now - self._last_log >= LOG_EVERY_S:
                self._last_log = now
                self._logged = True
                why = (f"store latency {self._ratio():.1f}x its baseline" if self.slow
                       else "its stores fall behind")
                log.warning(
                    "tier %s is degraded (%s): its stores may pin %d CPU slots, blocks past "
                    "that stay in the tiers above (%d dropped so far); loads go on",
                    self.name, why, self.limit, self.dropped)
        elif not bad and self.degraded:
            self.degraded = False
            if self._logged:
                self._logged = False
                log.warning("tier %s has recovered (%d stores dropped so far)", self.name,
                            self.dropped)

    def _ratio(self) -> float:
        if not self.baseline or self.recent is None:
            return 0.0
        return self.recent / self.baseline

    def stats(self) -> dict[str, Any]:
        """What ``get_stats()`` reports for the tier."""
        return {
            "degraded": self.degraded,
            "backpressure_dropped": self.dropped,
            "degraded_events": self.degraded_events,
            "pinned_slots": self.pinned,
            "max_pinned_slots": self.bound,
            "peak_pinned_slots": self.max_pinned_seen,
            "store_latency_ratio": round(self._ratio(), 3),
        }
