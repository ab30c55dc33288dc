"""The CPU primary tier's slot table: which key lives in which slot, in what state, pinned by whom.

Per-slot state lives in plain Python lists (fast scalar access from the scheduler thread); the
key -> slot map is a dict. Every operation is O(1) per block except eviction's skipping of
unevictable keys. ``evictable`` counts READY, unreferenced slots so that "can n slots be freed?"
is answered without scanning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvtier.policies.base import EvictionPolicy

FREE = 0
WRITING = 1  # reserved; bytes being written by the engine (store) or a tier (promotion)
READY = 2  # loadable


class PrimaryTier:
    """Slot allocation, reference counts and eviction for the primary region."""

    def __init__(self, num_slots: int, policy: EvictionPolicy) -> None:
        self.num_slots = num_slots
        self.policy = policy
        self.key_slot: dict[bytes, int] = {}
        self.slot_key: list[bytes | None] = [None] * num_slots
        self.state: list[int] = [FREE] * num_slots
        self.ref: list[int] = [0] * num_slots
        self.free: list[int] = list(range(num_slots - 1, -1, -1))
        self.evictable = 0
        # Victims kept READY (and pinned once) until a lower tier has their bytes (write-back);
        # the policy has forgotten them. key -> lower-tier writes still in flight.
        self.retained: dict[bytes, int] = {}
        self.unreported: list[bytes] = []  # evicted by an allocation that then failed

    # -- queries ---------------------------------------------------------------------------
    def run_length(self, keys: Sequence[bytes], start: int = 0) -> int:
        """Number of READY keys in ``keys`` from ``start`` on, up to the first that is not."""
        get = self.key_slot.get
        state = self.state
        i = start
        for i in range(start, len(keys)):  # noqa: B007
            s = get(keys[i])
            if s is None or state[s] != READY:
                return i - start
        return len(keys) - start

    def is_ready(self, key: bytes) -> bool:
        """True when ``key`` is loadable now."""
        s = self.key_slot.get(key)
        return s is not None and self.state[s] == READY

    def __contains__(self, key: object) -> bool:
        return key in self.key_slot

    def __len__(self) -> int:
        return len(self.key_slot)

    def can_free(self, n: int) -> bool:
        """Whether ``n`` slots can be had now (free or by eviction)."""
        return len(self.free) + self.evictable >= n

    # -- references ------------------------------------------------------------------------
    def incref(self, slot: int) -> None:
        """Pin a slot (a load, a cascade, or a guard during allocation)."""
        if self.ref[slot] == 0 and self.state[slot] == READY:
            self.evictable -= 1
        self.ref[slot] += 1

    def decref(self, slot: int) -> None:
        """Release one pin."""
        r = self.ref[slot] - 1
        if r < 0:
            raise RuntimeError(f"slot {slot} released more often than pinned")
        self.ref[slot] = r
        if r == 0 and self.state[slot] == READY:
            self.evictable += 1

    # -- allocation ------------------------------------------------------------------------
    def _evictable_key(self, key: bytes) -> bool:
        s = self.key_slot[key]
        return self.ref[s] == 0 and self.state[s] == READY

    def allocate(
        self, keys: Sequence[bytes], retain: Callable[[bytes], bool] | None = None,
        wait: bool = True,
    ) -> tuple[list[int], list[bytes]] | None:
        """Reserve one WRITING slot per key (held by one reference), evicting as needed.

        Returns (slots, evicted keys), or None when not enough slots can be freed now. The keys
        must not be in the table. ``retain`` (write-back): a victim it is true for keeps its
        slot, READY and pinned once, and joins ``retained`` (the caller writes it to a lower
        tier and then calls :meth:`finish_retained`); more victims are taken in its place, as
        many as victims waiting for their writes do not make up for (with ``wait`` false, only
        those retained by this call count: the writes in flight are not expected soon). None
        changes nothing unless victims were retained.
        """
        n = len(keys)
        free = self.free
        need = n - len(free)
        if need > self.evictable:
            return None
        key_slot = self.key_slot
        evicted: list[bytes] = []
        if need > 0:
            slot_key, ref = self.slot_key, self.ref
            retained = self.retained
            freed = 0
            base = 0 if wait else len(retained)
            # Victims waiting for their writes will free their slots: take no more.
            while freed + len(retained) - base < need:
                # Keys take free slots first; the ones after them are what evictions make room for.
                want = need - freed - len(retained) + base
                start = len(free)
                victims = self.policy.evict_many(want, self._evictable_key, keys[start:start + want])
                if not victims:
                    break
                for victim in victims:
                    s = key_slot[victim]
                    self.evictable -= 1
                    if retain is not None and retain(victim):
                        ref[s] = 1
                        retained[victim] = 0
                        continue
                    del key_slot[victim]
                    slot_key[s] = None
                    self.state[s] = FREE  # free even if this allocation ends up failing
                    free.append(s)
                    evicted.append(victim)
                    freed += 1
            if freed < need:
                if retain is None:  # cannot happen while the evictable count is right
                    raise RuntimeError("eviction policy found too few victims")
                self.unreported.extend(evicted)
                return None
        slots = free[-n:] if n else []
        del free[len(free) - n :]
        slots.reverse()
        slot_key, state, ref = self.slot_key, self.state, self.ref
        for key, s in zip(keys, slots):
            key_slot[key] = s
            slot_key[s] = key
            state[s] = WRITING
            ref[s] = 1
        return slots, evicted

    def readmit(self, key: bytes) -> None:
        """A retained key stays: it rejoins the policy (as newly admitted) and loses its pin."""
        if self.retained.pop(key, None) is None:
            return
        self.policy.insert(key)
        self.decref(self.key_slot[key])

    def finish_retained(self, key: bytes) -> bool:
        """A retained key's lower-tier writes are done: free its slot, or readmit it when a
        reader still holds it. True when the slot was freed."""
        if key not in self.retained:
            return False
        s = self.key_slot[key]
        if self.ref[s] > 1:
            self.readmit(key)
            return False
        del self.retained[key]
        del self.key_slot[key]
        self.slot_key[s] = None
        self.state[s] = FREE
        self.ref[s] = 0
        self.free.append(s)
        return True

    def mark_ready_many(self, keys: Sequence[bytes], *, hold: bool = False) -> None:
        """WRITING keys whose bytes are in place: release each writer's reference, admit them.

        One policy call for the batch, in order. ``hold`` keeps the writers' references (the
        keys are loadable but not evictable until each is released with ``decref``).
        """
        key_slot, state, ref = self.key_slot, self.state, self.ref
        released = 0
        for key in keys:
            s = key_slot[key]
            state[s] = READY
            if hold:
                continue
            r = ref[s] - 1
            ref[s] = r
            if r == 0:
                released += 1
        self.evictable += released
        self.policy.insert_many(keys)

    def pin_many(self, keys: Sequence[bytes]) -> list[int]:
        """Pin READY keys (one reference each); their slots, in order.

        Raises KeyError, with nothing pinned, when a key is not READY.
        """
        get = self.key_slot.get
        state, ref = self.state, self.ref
        slots: list[int] = []
        newly_pinned = 0
        for key in keys:
            s = get(key)
            if s is None or state[s] != READY:
                self.unpin_many(keys[: len(slots)])
                raise KeyError(f"block {key!r} is not ready in the primary tier")
            if ref[s] == 0:
                newly_pinned += 1
            ref[s] += 1
            slots.append(s)
        self.evictable -= newly_pinned  # READY slots that just became referenced
        return slots

    def unpin_many(self, keys: Sequence[bytes]) -> None:
        """Drop one reference from each key's slot (unknown or unreferenced keys are skipped)."""
        get = self.key_slot.get
        state, ref = self.state, self.ref
        released = 0
        for key in keys:
            s = get(key)
            if s is None or ref[s] == 0:
                continue
            ref[s] -= 1
            if ref[s] == 0 and state[s] == READY:
                released += 1
        self.evictable += released

    def release(self, key: bytes) -> int:
        """Drop a WRITING key whose write failed; its slot becomes free."""
        s = self.key_slot.pop(key)
        self.slot_key[s] = None
        self.state[s] = FREE
        self.ref[s] = 0
        self.free.append(s)
        return s

    def drop(self, key: bytes) -> bool:
        """Remove a READY, unreferenced key (reset, invalidation). False if it is in use."""
        s = self.key_slot.get(key)
        if s is None or self.state[s] != READY or self.ref[s] != 0:
            return False
        del self.key_slot[key]
        self.policy.remove(key)
        self.slot_key[s] = None
        self.state[s] = FREE
        self.evictable -= 1
        self.free.append(s)
        return True

    def check(self) -> None:
        """Verify the table's invariants (tests and debugging); raises AssertionError."""
        free = set(self.free)
        assert len(free) == len(self.free), "a slot is free twice"
        used = set(self.key_slot.values())
        assert len(used) == len(self.key_slot), "two keys share a slot"
        assert not (free & used), "a slot is both free and used"
        assert len(free) + len(used) == self.num_slots, "a slot is lost"
        ev = 0
        for key, s in self.key_slot.items():
            assert self.slot_key[s] == key
            assert self.state[s] in (WRITING, READY)
            assert self.ref[s] >= 0
            if key in self.retained:
                assert self.state[s] == READY and self.ref[s] >= 1, "a retained key is not pinned"
                assert key not in self.policy, "a retained key is still in the policy"
            elif self.state[s] == READY:
                assert key in self.policy, "a READY key is unknown to the policy"
                if self.ref[s] == 0:
                    ev += 1
        for s in free:
            assert self.state[s] == FREE and self.ref[s] == 0 and self.slot_key[s] is None
        assert ev == self.evictable, f"evictable count {self.evictable} != {ev}"
        assert len(self.policy) == sum(1 for s in used if self.state[s] == READY) - len(
            self.retained)
