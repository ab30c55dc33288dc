"""What one engine knows about a shared namespace directory, in memory.

* ``slots``: every occupied slot as the region logs say (global slot -> (index key, sequence)),
  for regions this engine owns and for all the others.
* ``own``: blocks in regions this engine owns, least recently used first: the blocks it serves
  and evicts. With an eviction policy (the tier's ``eviction_policy``, other than ``"lru"``),
  ``own`` is an :class:`OwnBlocks` that tells the policy of every change, and the policy picks
  the victims. ``remote``: blocks in everybody else's regions, which it serves but never writes
  (a key may be in both: two engines stored it; ``own`` is asked first).
* ``regions``: the regions this engine owns, with their free slots and writes in flight.
* ``owners``: for every region, the engine that last claimed it and whether it let go since.

Keys are held as index keys (``log.index_key``): the key itself up to 36 bytes, else a form of
its digest. No I/O here: the tier's threads read and write files and update this under ``lock``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvtier.policies.base import EvictionPolicy
from kvtier.tiers.storage import log as ilog
from kvtier.tiers.storage.layout import Geometry
from kvtier.tiers.storage.log import Entry

#: never used slots are handed out this many at a time from one region, then from the next:
#: the blocks stored together lie side by side (one write, one read), while the store chunks in
#: flight spread over the regions instead of queueing for one region's log
STRIPE = 16


class OwnBlocks(OrderedDict[bytes, int]):
    """``own`` (index key -> slot) that keeps an eviction policy told of every change: a new
    key is admitted, a key set again or moved to the end is used, a key deleted is removed."""

    def __init__(self, policy: EvictionPolicy[bytes], items: Iterable[tuple[bytes, int]] = ()) -> None:
        super().__init__()
        self.policy = policy
        for k, v in items:
            self[k] = v

    def __setitem__(self, key: bytes, value: int) -> None:
        new = key not in self
        super().__setitem__(key, value)
        if new:
            self.policy.insert(key)
        else:
            self.policy.access(key)

    def __delitem__(self, key: bytes) -> None:
        super().__delitem__(key)
        self.policy.remove(key)

    def pop(self, key: bytes, *default: int) -> int:  # type: ignore[override]
        """Remove ``key`` (and tell the policy)."""
        if key in self:
            self.policy.remove(key)
        return super().pop(key, *default)

    def popitem(self, last: bool = True) -> tuple[bytes, int]:
        """Remove the last (or first) entry (and tell the policy)."""
        k, v = super().popitem(last)
        self.policy.remove(k)
        return k, v

    def move_to_end(self, key: bytes, last: bool = True) -> None:
        """Reorder as OrderedDict does; moving to the end is a use."""
        super().move_to_end(key, last)
        if last:
            self.policy.access(key)

    def update(self, other: Iterable[tuple[bytes, int]] | dict[bytes, int]) -> None:  # type: ignore[override]
        """Set each entry (a new key is admitted)."""
        items = other.items() if isinstance(other, dict) else other
        for k, v in items:
            self[k] = v

    def clear(self) -> None:
        """Forget everything."""
        super().clear()
        self.policy.clear()


@dataclass
class OwnedRegion:
    """A region this engine holds the lock of."""

    region: int
    slots: int  # slots in the region
    fresh: int  # slots below this were handed out before (their file space exists)
    limit: int  # slots usable now (below ``slots`` after the file system filled up)
    log: ilog.LogWriter
    free: list[int] = field(default_factory=list)  # global slots below ``fresh``, unused
    writing: int = 0  # store chunks in flight into this region
    releasing: bool = False


@dataclass
class Owner:
    """Who last claimed a region, from its log."""

    engine: int
    released: bool = False


class BlockIndex:
    """The in-memory index of one engine; every method expects ``lock`` to be held."""

    def __init__(self, geo: Geometry, engine_id: int,
                 policy: EvictionPolicy[bytes] | None = None) -> None:
        self.geo = geo
        self.engine_id = engine_id
        self.lock = threading.Lock()
        self.slots: dict[int, tuple[bytes, int]] = {}
        self.policy = policy
        self.own: OrderedDict[bytes, int] = OwnBlocks(policy) if policy is not None else OrderedDict()
        self.remote: dict[bytes, int] = {}
        self.copies: dict[bytes, set[int]] = {}  # keys with several remote copies: their slots
        self.regions: dict[int, OwnedRegion] = {}
        self.owners: dict[int, Owner] = {}
        self.writing: dict[bytes, int] = {}  # stores in flight: index key -> slot
        self.pins: dict[int, int] = {}
        self.doomed: set[int] = set()  # invalid own slots still pinned by readers
        self.full_keys: dict[bytes, bytes] = {}  # index key -> key, for long keys known here
        self.events: list[tuple[list[bytes], bool]] = []
        self.remote_hits: dict[tuple[int, bytes], int] = {}  # (slot, index key) -> seq, to log
        self._stripe: OwnedRegion | None = None  # the region new slots are handed out from
        self._stripe_left = 0  # and how many more before the next region's turn

    # -- helpers ---------------------------------------------------------------------------
    def region_of(self, slot: int) -> int:
        """The region of a global slot."""
        return slot // self.geo.slots_per_region

    def has(self, k: bytes) -> bool:
        """True when an index key is served (own or remote)."""
        return k in self.own or k in self.remote

    def where(self, k: bytes) -> int | None:
        """The slot an index key is served from (own first)."""
        s = self.own.get(k)
        return s if s is not None else self.remote.get(k)

    def occupied(self, region: int) -> list[int]:
        """The slots of ``region`` the logs name a record in, in order."""
        base = self.geo.base(region)
        return sorted(set(range(base, base + self.geo.slots_in(region))).intersection(self.slots))

    def real_key(self, k: bytes) -> bytes | None:
        """The key an index key stands for, when known (None for unknown long keys)."""
        if len(k) <= ilog.KEY_INLINE:
            return k
        return self.full_keys.get(k)

    def _event(self, k: bytes, removed: bool) -> None:
        key = self.real_key(k)
        if key is None:
            return
        ev = self.events
        if ev and ev[-1][1] is removed:
            ev[-1][0].append(key)
        else:
            ev.append(([key], removed))

    def _add_remote(self, k: bytes, slot: int) -> None:
        """Serve ``k`` from ``slot`` of another engine's region (remembering any other copy)."""
        cur = self.remote.get(k)
        if cur is not None and cur != slot:
            self.copies.setdefault(k, {cur}).add(slot)
        self.remote[k] = slot

    def _drop_remote(self, k: bytes, slot: int) -> bool:
        """``slot`` no longer holds ``k`` for the others; True when no remote copy is left."""
        copies = self.copies.get(k)
        if copies is not None:
            copies.discard(slot)
            if len(copies) <= 1:
                del self.copies[k]
        if self.remote.get(k) != slot:
            return k not in self.remote
        for other in copies or ():
            if self.slots.get(other, (b"",))[0] == k:
                self.remote[k] = other
                return False
        del self.remote[k]
        return True

    def _forget_remote(self, k: bytes, slot: int) -> None:
        """``slot`` no longer holds ``k``; a removed event when the tier now has it nowhere."""
        had = self.remote.get(k) == slot
        if self._drop_remote(k, slot) and had and k not in self.own:
            self._event(k, True)

    # -- applying other engines' logs ------------------------------------------------------
    def replace_region(self, region: int, entries: Iterable[Entry], *, quiet: bool = False) -> None:
        """``region``'s log was rewritten: make its slots what ``entries`` (the whole new log)
        say, changing (and reporting) only what differs from before."""
        if not self.occupied(region):  # nothing known of it yet: plain application
            self.owners.pop(region, None)
            self.apply(region, entries, quiet=quiet)
            return
        base = self.geo.base(region)
        nslots = self.geo.slots_in(region)
        new: dict[int, tuple[bytes, int]] = {}
        owner: Owner | None = None
        hits: list[Entry] = []
        for e in entries:
            kind, slot, _aux, value, key = e
            if kind == ilog.PUT and slot < nslots:
                new[base + slot] = (key, value)
            elif kind == ilog.DEL:
                new.pop(base + slot, None)
            elif kind == ilog.CLAIM:
                owner = Owner(value)
            elif kind == ilog.RELEASE:
                owner = Owner(value, released=True)
            elif kind == ilog.HIT:
                hits.append(e)
        slots, remote, own = self.slots, self.remote, self.own
        for s in self.occupied(region):
            old = slots[s]
            nv = new.get(s)
            if nv is None or nv[0] != old[0]:
                del slots[s]
                self._forget_remote(old[0], s)
        for s, (key, seq) in new.items():
            prev = slots.get(s)
            slots[s] = (key, seq)
            if prev is None or prev[0] != key:
                if not quiet and key not in remote and key not in own:
                    self._event(key, False)
                self._add_remote(key, s)
        if owner is None:
            self.owners.pop(region, None)
        else:
            self.owners[region] = owner
        if hits:
            self.apply(region, hits)

    def apply(self, region: int, entries: Iterable[Entry], *, quiet: bool = False) -> None:
        """Apply entries read from the log of ``region`` (a region owned by another engine).

        ``quiet`` (the first read at start) produces no events, as a restart does not.
        """
        base = self.geo.base(region)
        nslots = self.geo.slots_in(region)
        slots, remote, own = self.slots, self.remote, self.own
        put, delete = ilog.PUT, ilog.DEL
        for kind, slot, aux, value, key in entries:
            if kind == put:
                if slot >= nslots:
                    continue
                s = base + slot
                old = slots.get(s)
                slots[s] = (key, value)
                if old is not None:
                    if old[0] == key:
                        continue  # a newer sequence for the same record
                    self._forget_remote(old[0], s)
                cur = remote.get(key)
                if cur is None:
                    if not quiet and key not in own:
                        self._event(key, False)
                elif cur != s:
                    self.copies.setdefault(key, {cur}).add(s)
                remote[key] = s  # even when this engine holds a copy: it may evict it
            elif kind == delete:
                s = base + slot
                old = slots.pop(s, None)
                if old is not None:
                    self._forget_remote(old[0], s)
            elif kind == ilog.HIT:
                mine = self.regions.get(aux)
                if mine is not None and slot < mine.slots:
                    s = self.geo.base(aux) + slot
                    if own.get(key) == s:
                        own.move_to_end(key)
            elif kind == ilog.CLAIM:
                self.owners[region] = Owner(value)
            elif kind == ilog.RELEASE:
                self.owners[region] = Owner(value, released=True)

    # -- claiming and releasing regions ----------------------------------------------------
    def claim(self, claims: list[tuple[int, ilog.LogWriter, int]]) -> int:
        """Take over regions (their locks held, their logs read to the end): (region, its new
        log, slots whose file space exists). Their blocks join ``own`` at the least recently used
        end, in write order; returns how many."""
        found: list[tuple[int, bytes, int]] = []
        own, slots, writing, remote, copies = self.own, self.slots, self.writing, self.remote, self.copies
        for region, log, allocated in claims:
            base = self.geo.base(region)
            nslots = self.geo.slots_in(region)
            occ = self.occupied(region)
            fresh = max(min(allocated, nslots), occ[-1] - base + 1 if occ else 0)
            free = set(range(base, base + fresh)).difference(occ)
            for s in occ:
                k, seq = slots[s]
                if k in copies:
                    self._drop_remote(k, s)  # it becomes one of this engine's own
                elif remote.get(k) == s:
                    del remote[k]
                if k in own or k in writing:
                    free.add(s)  # another copy is ours already: this slot can be reused
                    continue
                found.append((seq, k, s))
            free_list = sorted(free, reverse=True)  # lowest slots are handed out first
            self.regions[region] = OwnedRegion(region, nslots, fresh, nslots, log, free_list)
            self.owners[region] = Owner(self.engine_id)
        found.sort()
        seen: set[bytes] = set()
        fresh_own: list[tuple[bytes, int]] = []
        for _seq, k, s in reversed(found):  # a key in two claimed regions: keep its newest copy
            if k in seen:
                self.free_slot(s)
                continue
            seen.add(k)
            fresh_own.append((k, s))
        fresh_own.reverse()
        if len(fresh_own) >= len(own) and self.policy is None:
            merged = OrderedDict(fresh_own)
            merged.update(own)
            self.own = merged
        else:
            for k, s in reversed(fresh_own):
                own[k] = s
                own.move_to_end(k, last=False)
        return len(fresh_own)

    def release(self, region: int) -> int:
        """Give ``region`` up (no write in flight there): its blocks move to ``remote``."""
        r = self.regions.pop(region)
        base = self.geo.base(region)
        moved = 0
        for s in self.occupied(region):
            k = self.slots[s][0]
            if self.own.get(k) == s:
                del self.own[k]
                self._add_remote(k, s)
                moved += 1
        self.doomed.difference_update(range(base, base + r.slots))
        self.owners[region] = Owner(self.engine_id, released=True)
        return moved

    def snapshot(self, region: int) -> list[tuple[int, int, int, int, bytes]]:
        """Entries that describe ``region`` as the logs say now (for a rewritten log)."""
        base = self.geo.base(region)
        out: list[tuple[int, int, int, int, bytes]] = [(ilog.CLAIM, 0, 0, self.engine_id, b"")]
        slots = self.slots
        for s in self.occupied(region):
            k, seq = slots[s]
            out.append((ilog.PUT, s - base, 0, seq, k))
        return out

    # -- allocation ------------------------------------------------------------------------
    def alloc(self, evicted: list[bytes]) -> tuple[int, bool] | None:
        """A slot for a new record: (slot, whether the log still names a record there).

        A free slot, a new one, or the least recently used own block's (evicted into
        ``evicted``). None when every own block is pinned or nothing is owned.
        """
        got = self.alloc_many(1, evicted)
        return got[0] if got else None

    def alloc_many(self, n: int, evicted: list[bytes]) -> list[tuple[int, bool]]:
        """Slots for up to ``n`` new records, as ``n`` calls of :meth:`alloc` in a row hand
        them out (fewer where it would have answered None), each looking through the regions
        once for the whole batch rather than once a slot: a full tier's store evicts, and
        asking every region for a free or a new slot first, once a slot, made ``submit_store``
        (the scheduler's thread) about 1.4 times as long (benchmarks/bench_store_alloc.py)."""
        out: list[tuple[int, bool]] = []
        slots, base = self.slots, self.geo.base
        for r in self.regions.values():  # free slots (those beyond a region's limit dropped)
            if r.releasing or not r.free:
                continue
            free, lo, limit = r.free, base(r.region), r.limit
            while free and len(out) < n:
                s = free.pop()
                if s - lo < limit:
                    out.append((s, s in slots))
            if len(out) == n:
                return out
        while len(out) < n and (fr := self._fresh_region()) is not None:  # never used ones
            fr.fresh += 1
            self._stripe_left -= 1
            s = base(fr.region) + fr.fresh - 1
            out.append((s, s in slots))
        while len(out) < n and (got := self._evict_one(evicted)) is not None:
            out.append(got)
        return out

    def _evict_one(self, evicted: list[bytes]) -> tuple[int, bool] | None:
        """The slot of the least recently used own block that can go (or the policy's
        victim), or None when every own block is pinned or nothing is owned."""
        if self.policy is not None:
            return self._alloc_by_policy(evicted)
        own, pins, regions = self.own, self.pins, self.regions
        spr = self.geo.slots_per_region
        for _ in range(len(own)):
            k, s = next(iter(own.items()))
            reg = regions.get(s // spr)
            if pins.get(s) or reg is None or reg.releasing or s - self.geo.base(reg.region) >= reg.limit:
                own.move_to_end(k)
                continue
            del own[k]
            if k not in self.remote:
                evicted.append(k)
            return s, s in self.slots
        return None

    def _fresh_region(self) -> OwnedRegion | None:
        """The region to hand a never used slot out from: ``STRIPE`` slots from one region,
        then from the next one with room (in region order, round the owned regions)."""
        r = self._stripe
        if (r is not None and self._stripe_left > 0 and not r.releasing and r.fresh < r.limit
                and self.regions.get(r.region) is r):
            return r
        cur = -1 if r is None else r.region
        first: OwnedRegion | None = None  # the lowest region with room
        after: OwnedRegion | None = None  # the lowest one above the current
        for c in self.regions.values():  # one pass, as a full tier asks on every store
            if c.releasing or c.fresh >= c.limit:
                continue
            if first is None or c.region < first.region:
                first = c
            if c.region > cur and (after is None or c.region < after.region):
                after = c
        pick = after or first
        self._stripe, self._stripe_left = pick, STRIPE
        return pick

    def _alloc_by_policy(self, evicted: list[bytes]) -> tuple[int, bool] | None:
        """``alloc``'s last resort when a policy orders ``own``: the victim it picks."""
        assert self.policy is not None
        own, pins, regions = self.own, self.pins, self.regions
        spr = self.geo.slots_per_region

        def ok(k: bytes) -> bool:
            s = own[k]
            reg = regions.get(s // spr)
            return not (pins.get(s) or reg is None or reg.releasing
                        or s - self.geo.base(reg.region) >= reg.limit)

        k = self.policy.evict(ok)
        if k is None:
            return None
        s = own[k]
        del own[k]
        if k not in self.remote:
            evicted.append(k)
        return s, s in self.slots

    def free_slot(self, s: int) -> None:
        """Hand ``s`` back (a failed store, or a slot that held an invalid record)."""
        r = self.regions.get(s // self.geo.slots_per_region)
        if r is not None and s - self.geo.base(r.region) < r.limit:
            r.free.append(s)

    def usable_slots(self) -> int:
        """Slots of owned regions usable now."""
        return sum(r.limit for r in self.regions.values())
