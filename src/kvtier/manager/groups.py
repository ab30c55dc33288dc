"""Lookups over several KV groups at once: a hybrid request's hit, and its promotion, as one unit.

A hybrid model (full-attention and sliding-window groups, gpt-oss's shape) can use a hit of
``r`` chunks only when every full group holds its chunks ``[0, r)`` and every windowed group its
last ``window`` chunks before ``r``. Promoting the groups one by one (each group's lookup on its
own) lands some groups' blocks without the others', or lands them in different steps; on a CPU
tier that stores keep full, the first group's blocks are evicted before the second's are in,
and the promotion serves nothing.

``lookup_groups`` therefore answers with the longest ``r`` for which every group's needed blocks
are in the CPU tier, and when that is not the longest ``r`` the tiers below can serve, it plans
the promotion of every missing needed block of every group together:

- planned together: the target ``r`` is the longest whose needed blocks are all available
  (resident, in flight or held by a secondary tier) and whose missing ones fit in the CPU tier
  at once, next to the needed blocks already resident (which stay guarded);
- admitted together: their slots are allocated in one call, all or none, and join the tiers'
  batches in the same step;
- pinned together: the needed blocks already resident are pinned until every promoted block of
  the unit has landed, then held one more schedule pass with the landed ones, so that the
  request's next lookup finds all of them;
- never preempted in part: a store that takes a unit's slots takes the whole unit (once; the
  unit planned again for that request is not preempted again, as for single promotions).

Mixed into :class:`kvtier.manager.tiering.TieringManager`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvtier.manager.primary import READY, PrimaryTier
from kvtier.tiers.base import SecondaryTier

_READY = -1  # resident and loadable
_FLIGHT = -2  # being promoted


@dataclass
class _Unit:
    """One request's promotion across groups: the keys promoted and the resident pins."""

    keys: list[bytes]
    pins: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


class GroupLookupMixin:
    """The manager's multi-group lookup (the attributes below are the manager's)."""

    primary: PrimaryTier
    tiers: list[SecondaryTier]
    counters: dict[str, float]
    _promoting: dict[bytes, int]
    _promised: list[tuple[Sequence[bytes], int]]
    _promote_batches: list[Any]
    _preempted_once: dict[bytes, None]
    _waiting_since: dict[str, float]
    _deadline: float
    _units: list[_Unit]
    _unit_of: dict[bytes, _Unit]
    _wb: Any

    if TYPE_CHECKING:
        def _collect(self) -> None: ...
        def _tier_raised(self, tier: SecondaryTier, what: str) -> None: ...
        def _evicted(self, keys: list[bytes]) -> None: ...
        def _retainer(self) -> Any: ...
        def _wait_for_writebacks(self) -> bool: ...
        def _start_writebacks(self) -> None: ...
        def _protect_promises(self) -> None: ...
        def _hold_landed(self, slots: list[int]) -> None: ...
        def _past_deadline(self, req_id: str, keys: Sequence[bytes], r: int) -> int | None: ...

    def lookup_groups(
        self, groups: Sequence[tuple[Sequence[bytes], int | None]], ctx: Any
    ) -> int | None:
        """The longest hit, in chunks, that every group can serve from the CPU tier now.

        ``groups``: per group, its keys from the same first chunk on (chunk ``i`` of every group
        covers the same tokens) and its window in chunks (None: full attention). A hit of ``r``
        needs every full group's keys ``[0, r)`` and every windowed group's keys
        ``[max(0, r - window), r)`` READY. None: ask again (the request's promotion, planned as
        one unit across groups, is in flight). See the module docstring.
        """
        c = self.counters
        c["lookups"] += 1
        if not groups:
            return 0
        n = min(len(k) for k, _ in groups)
        c["lookup_keys"] += n * len(groups)
        promoting = self._promoting
        if promoting and any(k in promoting for keys, _ in groups for k in keys[:n]):
            self._collect()  # a promotion may have finished since the step began
        codes: dict[bytes, int | None] = {}
        limit = n
        for keys, window in groups:
            if window is None:
                limit = min(limit, self._available_run(keys, n, codes))
        windows = [(keys, window) for keys, window in groups if window is not None]
        full = [keys for keys, window in groups if window is None]

        def needed(r: int) -> list[bytes]:
            out: list[bytes] = []
            for keys in full:
                out.extend(keys[:r])
            for keys, window in windows:
                out.extend(keys[max(0, r - window):r])  # type: ignore[operator]
            return out

        def window_codes_ok(r: int) -> bool:
            for keys, window in windows:
                for key in keys[max(0, r - window):r]:  # type: ignore[operator]
                    if key not in codes:
                        codes[key] = self._available_one(key)
                    if codes[key] is None:
                        return False
            return True

        primary = self.primary
        key_slot, ref = primary.key_slot, primary.ref
        room = len(primary.free) + primary.evictable

        def cost_of(key: bytes) -> int:
            """Slots a needed, available key takes: one to promote into, or one guarded."""
            code = codes[key]
            if code == _READY:
                return int(ref[key_slot[key]] == 0)  # guarding it takes it out of the evictable
            return 1 if code is not None and code >= 0 else 0

        prefix = [0] * (limit + 1)  # the full groups' cost of chunks [0, r), O(1) per chunk
        for j in range(limit):
            prefix[j + 1] = prefix[j] + sum(cost_of(keys[j]) for keys in full)
        target = 0
        longest = 0  # the longest hit the tiers hold, room or not
        for r in range(limit, 0, -1):
            if not window_codes_ok(r):
                continue
            cost = prefix[r] + sum(cost_of(k) for keys, window in windows
                                   for k in keys[max(0, r - window):r])  # type: ignore[operator]
            longest = longest or r
            if cost > room:
                continue
            target = r
            break
        if longest > target:  # the longer hit needs slots held now: wait for them a while
            since = self._waiting_since.setdefault(ctx.req_id, time.monotonic())
            if time.monotonic() - since < self._deadline:
                return None
        if target == 0:
            self._waiting_since.pop(ctx.req_id, None)
            c["lookup_miss_blocks"] += n
            return 0
        need_keys = list(dict.fromkeys(needed(target)))
        plan = [(code, k) for k in need_keys if (code := codes[k]) is not None and code >= 0]
        if plan and not self._start_unit(need_keys, plan):
            plan = []  # nothing could be allocated: answer with what is resident
        flight = bool(plan) or any(codes[k] == _FLIGHT for k in need_keys)
        if flight:
            since = self._waiting_since.setdefault(ctx.req_id, time.monotonic())
            if time.monotonic() - since < self._deadline:
                return None
            self.counters["promotion_deadline_misses"] += 1
        # Every needed block resident, or the deadline passed: the longest r that is loadable.
        r = min([target] + [primary.run_length(keys[:target]) for keys in full])
        while r and not all(primary.is_ready(k) for keys, window in windows
                            for k in keys[max(0, r - window):r]):  # type: ignore[operator]
            r -= 1
        self._waiting_since.pop(ctx.req_id, None)
        if r:
            self._promised.append((needed(r), len(needed(r))))
        c["lookup_miss_blocks"] += n - r
        return r

    def _available_run(self, keys: Sequence[bytes], n: int, codes: dict[bytes, int | None]) -> int:
        """How many of ``keys[:n]`` are available from the start: resident, in flight or held
        by a secondary tier (recorded in ``codes``: READY, FLIGHT or the tier index)."""
        primary = self.primary
        key_slot, state = primary.key_slot, primary.state
        promoting = self._promoting
        pos = 0
        while pos < n:
            key = keys[pos]
            s = key_slot.get(key)
            if s is not None:
                if key in promoting:
                    codes[key] = _FLIGHT
                elif state[s] == READY:
                    codes[key] = _READY
                else:
                    return pos  # an engine store in flight: not loadable yet
                pos += 1
                continue
            best, best_tier = 0, -1
            rest = keys[pos:n]
            for ti, tier in enumerate(self.tiers):
                try:
                    m = tier.lookup(rest)
                except Exception:
                    self._tier_raised(tier, "lookup")
                    m = 0
                if m is not None and m > best:
                    best, best_tier = m, ti
            if best == 0:
                return pos
            for i in range(pos, pos + best):
                k = keys[i]
                if k in key_slot:
                    break  # the next loop turn classifies it
                codes[k] = best_tier
                pos += 1
        return pos

    def _available_one(self, key: bytes) -> int | None:
        """One key: READY, FLIGHT, the index of a secondary tier that holds it, or None."""
        primary = self.primary
        s = primary.key_slot.get(key)
        if s is not None:
            if key in self._promoting:
                return _FLIGHT
            return _READY if primary.state[s] == READY else None
        for ti, tier in enumerate(self.tiers):
            try:
                m = tier.lookup([key])
            except Exception:
                self._tier_raised(tier, "lookup")
                m = 0
            if m:
                return ti
        return None

    def _start_unit(self, need: list[bytes], plan: list[tuple[int, bytes]]) -> bool:
        """Allocate every planned key's slot at once (all or none) and queue them per tier;
        pin the needed keys already resident until the unit has landed."""
        primary = self.primary
        if self._promised and len(primary.free) < len(plan):
            self._protect_promises()
        key_slot, state = primary.key_slot, primary.state
        pins = [key_slot[k] for k in need
                if k in key_slot and state[key_slot[k]] == READY and k not in self._promoting]
        for s in pins:
            primary.incref(s)
        try:
            result = primary.allocate([k for _, k in plan], self._retainer(),
                                      self._wb is None or self._wait_for_writebacks())
        finally:
            self._start_writebacks()
        if result is None:
            for s in pins:
                primary.decref(s)
            self.counters["promotion_alloc_failures"] += len(plan)
            return False
        slots, evicted = result
        self._evicted(evicted)
        unit = _Unit([k for _, k in plan], pins)
        for (ti, key), slot in zip(plan, slots):
            self._promoting[key] = ti
            b = self._promote_batches[ti]
            b.keys.append(key)
            b.slots.append(slot)
            self._unit_of[key] = unit
        self._units.append(unit)
        self.counters["promotions_started"] += len(plan)
        self.counters["unit_promotions"] += 1
        return True

    def _settle_units(self, everything: bool = False) -> None:
        """At the step end: a unit whose promoted keys have all landed (or failed) hands its
        pins to the one-pass hold of landed blocks; ``everything``: release all pins now."""
        if not self._units:
            return
        promoting = self._promoting
        keep: list[_Unit] = []
        for unit in self._units:
            if not everything and any(k in promoting for k in unit.keys):
                keep.append(unit)
                continue
            for k in unit.keys:
                if self._unit_of.get(k) is unit:
                    del self._unit_of[k]
            if everything:
                for s in unit.pins:
                    self.primary.decref(s)
            else:
                self._hold_landed(unit.pins)
        self._units = keep

    def _preempt_unit(self, unit: _Unit) -> int:
        """Take a whole unit's promotions not yet submitted back (a store needs the slots)."""
        gone = set(unit.keys)
        released = 0
        for b in self._promote_batches:
            if not gone.intersection(b.keys):
                continue
            keep_keys: list[bytes] = []
            keep_slots: list[int] = []
            for key, slot in zip(b.keys, b.slots):
                if key in gone:
                    self._promoting.pop(key, None)
                    self.primary.release(key)
                    self._preempted_once[key] = None
                    released += 1
                else:
                    keep_keys.append(key)
                    keep_slots.append(slot)
            b.keys[:] = keep_keys
            b.slots[:] = keep_slots
        for k in unit.keys:
            if self._unit_of.get(k) is unit:
                del self._unit_of[k]
        for s in unit.pins:
            self.primary.decref(s)
        unit.pins = []
        unit.keys = []
        self._units = [u for u in self._units if u is not unit]
        return released
