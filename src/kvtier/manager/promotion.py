"""Promotions: how ``lookup`` finds a request's blocks in the secondary tiers and gives them slots.

A lookup that runs past the CPU tier asks each tier for the longest run it holds; the keys to
promote get primary slots in prefix order (as many as fit, guarding the resident part of the
request's run) and join one batch per tier, submitted when the step ends. A request waits (lookup
answers None) at most ``promotion_deadline_seconds``; after that what is loadable now is its answer.

Running requests' stores come before promotions, once: a store that finds no room takes the slots
of promotions not yet submitted, as few as it needs, from the end of the batches (the tail of a
prefix is worth least). A key whose promotion was taken that way is remembered; when a lookup
plans it again, that promotion can no longer be preempted, and a store that would need its slot
is refused instead (``prepare_store`` answers None, as for any full CPU tier). So a steady
stream of stores into a CPU tier too small for both delays a waiting request's promotion by at
most one step, instead of starving it until the deadline turns it into a miss. The memory of
preempted keys is dropped when the key's promotion is submitted and bounded in size (oldest
forgotten first).

A promotion's blocks, once in their slots, stay pinned until one whole schedule pass has seen
them (released at the step end after the one that collected them, or after the next one when
they landed mid-step), so that the request that waited for them finds them at its next lookup
instead of losing them to a store or another request's promotion in between. A request that no
longer wants them holds them for that one step only. Mixed into
:class:`kvtier.manager.tiering.TieringManager`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvtier.manager.primary import READY, PrimaryTier
from kvtier.tiers.base import SecondaryTier


class PromotionMixin:
    """The manager's promotion steps (the attributes below are the manager's)."""

    primary: PrimaryTier
    tiers: list[SecondaryTier]
    counters: dict[str, float]
    _promoting: dict[bytes, int]
    _promised: list[tuple[Sequence[bytes], int]]
    _promise_pins: list[int]
    _waiting_since: dict[str, float]
    _deadline: float
    _retry_lookup: bool
    _promote_batches: list[Any]
    _preempted_once: dict[bytes, None]  # keys whose promotion a store took once (ordered)
    _preempted_memory: int
    _landed: list[tuple[int, list[int]]]
    _ending: bool
    _step: int
    _wb: Any
    _unit_of: dict[bytes, Any]

    if TYPE_CHECKING:
        def _preempt_unit(self, unit: Any) -> int: ...
        def _tier_raised(self, tier: SecondaryTier, what: str) -> None: ...
        def _evicted(self, keys: list[bytes]) -> None: ...
        def _retainer(self) -> Any: ...
        def _wait_for_writebacks(self) -> bool: ...
        def _start_writebacks(self) -> None: ...

    def _past_deadline(self, req_id: str, keys: Sequence[bytes], r: int) -> int | None:
        """None while the request has waited less than the promotion deadline; after it, the
        run that is loadable now (the blocks still in flight are misses; their jobs go on)."""
        now = time.monotonic()
        waiting = self._waiting_since
        if len(waiting) > 4096 and req_id not in waiting:
            # Requests dropped by an engine that never said they finished: forget old waits.
            for rid in [r for r, t in waiting.items() if now - t > 60 + 10 * self._deadline]:
                del waiting[rid]
        since = waiting.setdefault(req_id, now)
        if now - since < self._deadline:
            return None
        q = r + self.primary.run_length(keys, r)
        self.counters["promotion_deadline_misses"] += len(keys) - q
        return q

    def _protect_promises(self) -> None:
        """Pin, until the step ends, every block ``lookup`` answered as loadable this step.

        The engine calls ``prepare_load`` for a hit later in the same step; a store or promotion
        for another request in between must not evict it. Recording a promise costs O(1) per
        lookup; the pins are taken only when something is about to be evicted.
        """
        primary = self.primary
        get = primary.key_slot.get
        state = primary.state
        pins = self._promise_pins
        for keys, r in self._promised:
            for i in range(r):
                s = get(keys[i])
                if s is not None and state[s] == READY:
                    primary.incref(s)
                    pins.append(s)
        self._promised.clear()

    def _release_promises(self) -> None:
        decref = self.primary.decref
        for s in self._promise_pins:
            decref(s)
        self._promise_pins.clear()
        self._promised.clear()

    def _lookup_secondary(self, keys: Sequence[bytes], r: int) -> int | None:
        primary = self.primary
        promoting = self._promoting
        n = len(keys)
        pos = r
        pending = False
        plan: list[tuple[int, bytes]] = []  # (tier index, key) to promote, in prefix order
        while pos < n:
            key = keys[pos]
            if key in promoting:  # (never READY) checked first: a request waiting on its
                pending = True  # promotion asks again every step
                pos += 1
                continue
            q = primary.run_length(keys, pos)
            if q:
                pos += q
                continue
            if key in primary.key_slot:  # WRITING by an engine store: not loadable yet
                break
            rest = keys[pos:]
            best, best_tier = 0, -1
            for ti, tier in enumerate(self.tiers):
                try:
                    m = tier.lookup(rest)  # a tier that is down answers 0 (and may re-probe)
                except Exception:
                    self._tier_raised(tier, "lookup")
                    m = 0
                if m is None:
                    pending = True
                elif m > best:
                    best, best_tier = m, ti
            if best == 0:
                break
            for key in rest[:best]:
                if key not in primary.key_slot:
                    plan.append((best_tier, key))
                elif key in promoting:
                    pending = True
            pos += best
        if plan:
            self._retry_lookup = False
            started = self._start_promotions(keys[:pos], plan)
            if started == 0 and not pending and not self._retry_lookup:
                # Nothing could be given a slot: the run ends at the first key to promote.
                return _index_from(keys, plan[0][1], r)
            return None
        if pending:
            return None
        return primary.run_length(keys) if pos > r else r

    def _start_promotions(self, keys: Sequence[bytes], plan: list[tuple[int, bytes]]) -> int:
        """Give slots to as many planned keys as fit (in prefix order); queue them per tier.

        The blocks of the request's run that are resident stay guarded while slots are found, as
        far as the run can fit in the primary tier at once, so a promotion never evicts the part
        of the prefix it extends; resident blocks past that point are fair game.
        """
        primary = self.primary
        if self._promised and len(primary.free) < len(plan):
            self._protect_promises()
        key_slot = primary.key_slot
        state, ref = primary.state, primary.ref
        planned = {k for _, k in plan}
        budget = len(primary.free) + primary.evictable
        guard: list[int] = []
        take = 0
        for key in keys:
            if key in planned:
                if budget == 0:
                    break
                budget -= 1
                take += 1
                continue
            s = key_slot.get(key)
            if s is not None and state[s] == READY and ref[s] == 0:
                if budget == 0:
                    break
                budget -= 1  # guarding it takes it out of what can be evicted
                guard.append(s)
        if take < len(plan):
            self.counters["promotion_alloc_failures"] += len(plan) - take
        if take == 0:
            return 0
        plan = plan[:take]
        for s in guard:
            primary.incref(s)
        try:
            result = primary.allocate([k for _, k in plan], self._retainer(),
                                      self._wb is None or self._wait_for_writebacks())
        finally:
            for s in guard:
                primary.decref(s)
            self._start_writebacks()
        if result is None:  # write-back victims keep their slots until written: ask again
            self._retry_lookup = True
            return 0
        slots, evicted = result
        self._evicted(evicted)
        for (ti, key), slot in zip(plan, slots):
            self._promoting[key] = ti
            b = self._promote_batches[ti]
            b.keys.append(key)
            b.slots.append(slot)
        self.counters["promotions_started"] += take
        return take

    def _preempt_promotions(self, need: int) -> bool:
        """Give a running request's store the slots of promotions not yet submitted.

        Stores come first: the engine has those blocks now, while a waiting request whose
        promotion is cancelled asks again and finds a miss or a fresh promotion. That fresh
        promotion is not preempted again (see the module docstring). True when anything was
        released and ``need`` slots can now be had.
        """
        primary = self.primary
        if primary.can_free(need) or not any(b.keys for b in self._promote_batches):
            return False
        once = self._preempted_once
        released = 0
        for b in self._promote_batches:
            i = len(b.keys)
            while i and not primary.can_free(need):
                i -= 1
                key = b.keys[i]
                if key in once:
                    continue  # preempted before: this promotion keeps its slot
                unit = self._unit_of.get(key)
                if unit is not None:  # a multi-group promotion goes whole, or not at all
                    if not any(k in once for k in unit.keys):
                        released += self._preempt_unit(unit)
                        i = min(i, len(b.keys))
                    continue
                del b.keys[i]
                del b.slots[i]
                self._promoting.pop(key, None)
                primary.release(key)
                once[key] = None
                released += 1
        while len(once) > self._preempted_memory:
            del once[next(iter(once))]  # requests that never asked again
        self.counters["promotions_preempted"] += released
        return released > 0 and primary.can_free(need)

    def _hold_landed(self, slots: list[int]) -> None:
        """Promoted ``slots`` (one reference each, held) stay pinned until a schedule pass
        has seen them (see the module docstring)."""
        if slots:
            self._landed.append((self._step + (0 if self._ending else 1), slots))

    def _release_landed(self, everything: bool = False) -> None:
        """At the step end: release the promoted slots every schedule pass since has seen
        (``everything``: all of them, as ``reset_cache`` does)."""
        landed = self._landed
        if not landed:
            return
        decref = self.primary.decref
        step = 1 << 62 if everything else self._step
        keep = [(s, slots) for s, slots in landed if s >= step]
        for s, slots in landed:
            if s < step:
                for slot in slots:
                    decref(slot)
        self._landed = keep

    def _promotions_submitted(self, keys: Sequence[bytes]) -> None:
        """``keys`` went to their tier: no longer preemptible, so nothing to remember."""
        once = self._preempted_once
        if once:
            for key in keys:
                once.pop(key, None)

def _index_from(keys: Sequence[bytes], key: bytes, start: int) -> int:
    for i in range(start, len(keys)):
        if keys[i] == key:
            return i
    return len(keys)
