"""Adaptive Replacement Cache (Megiddo & Modha, FAST 2003).

Resident keys live in T1 (seen once recently) or T2 (seen at least twice); B1 and B2 are ghost
lists remembering keys recently evicted from T1 and T2. A miss that hits B1 grows the target size
``p`` of T1, one that hits B2 shrinks it; REPLACE evicts from T1 while it exceeds ``p``, else from
T2.

The cache drives the policy in two calls per admission: ``evict(evictable, incoming=x)`` when it
needs a free entry for ``x`` (the paper's adaptation of ``p``, directory trimming and REPLACE), and
``insert(x)`` once ``x`` is resident. With every key evictable this is exactly the paper's
algorithm; keys that may not be evicted now (pinned, being read) are skipped, and when one list has
no evictable key the other is used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable

from kvtier.policies.base import EvictionPolicy

_NOT_SET = object()


class ARCPolicy(EvictionPolicy[Hashable]):
    """ARC with ghost lists."""

    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.p = 0.0
        self.t1: OrderedDict[Hashable, None] = OrderedDict()
        self.t2: OrderedDict[Hashable, None] = OrderedDict()
        self.b1: OrderedDict[Hashable, None] = OrderedDict()
        self.b2: OrderedDict[Hashable, None] = OrderedDict()
        self._adapted: object = _NOT_SET  # ghost key whose adaptation evict() already did

    # -- the paper's cases -----------------------------------------------------------------
    def _adapt(self, key: Hashable) -> None:
        if key in self.b1:  # Case II
            self.p = min(float(self.capacity), self.p + max(1.0, len(self.b2) / len(self.b1)))
        elif key in self.b2:  # Case III
            self.p = max(0.0, self.p - max(1.0, len(self.b1) / len(self.b2)))

    def _replace(self, incoming: Hashable | None, ok: Callable[[Hashable], bool]) -> Hashable | None:
        t1_first = bool(self.t1) and (
            (incoming is not None and incoming in self.b2 and len(self.t1) == self.p)
            or len(self.t1) > self.p
        )
        order = (self.t1, self.t2) if t1_first else (self.t2, self.t1)
        for lst in order:
            victim = _first(lst, ok)
            if victim is not None:
                del lst[victim]
                (self.b1 if lst is self.t1 else self.b2)[victim] = None
                return victim
        return None

    def evict(
        self, evictable: Callable[[Hashable], bool], incoming: Hashable | None = None
    ) -> Hashable | None:
        c = self.capacity
        if incoming is not None and (incoming in self.b1 or incoming in self.b2):
            self._adapt(incoming)
            self._adapted = incoming
            return self._replace(incoming, evictable)
        if incoming is not None and (incoming in self.t1 or incoming in self.t2):
            return self._replace(incoming, evictable)
        # Case IV: a key in no list.
        l1 = len(self.t1) + len(self.b1)
        if l1 >= c:
            if len(self.t1) < c:
                if self.b1:
                    self.b1.popitem(last=False)
                return self._replace(incoming, evictable)
            victim = _first(self.t1, evictable)  # T1 holds the whole cache: drop its LRU, no ghost
            if victim is not None:
                del self.t1[victim]
                return victim
            return self._replace(incoming, evictable)
        if l1 + len(self.t2) + len(self.b2) >= 2 * c and self.b2:
            self.b2.popitem(last=False)
        return self._replace(incoming, evictable)

    def insert(self, key: Hashable) -> None:
        if key in self.t1 or key in self.t2:
            self.access(key)
            return
        if key in self.b1 or key in self.b2:
            if self._adapted is not key and self._adapted != key:
                self._adapt(key)
            self.b1.pop(key, None)
            self.b2.pop(key, None)
            self._adapted = _NOT_SET
            self.t2[key] = None
            return
        self._adapted = _NOT_SET
        self.t1[key] = None
        self._trim_ghosts()

    def access(self, key: Hashable) -> None:
        if key in self.t1:
            del self.t1[key]
            self.t2[key] = None
        elif key in self.t2:
            self.t2.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self.t1.pop(key, None)
        self.t2.pop(key, None)

    def _trim_ghosts(self) -> None:
        # Keep the directory within the paper's bounds (|L1| <= c, |L1| + |L2| <= 2c) even when
        # entries arrive without a preceding evict() (free entries, external removals).
        c = self.capacity
        while len(self.t1) + len(self.b1) > c and self.b1:
            self.b1.popitem(last=False)
        while len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * c and self.b2:
            self.b2.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self.t1 or key in self.t2

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2)

    def keys(self) -> Iterable[Hashable]:
        return list(self.t1.keys()) + list(self.t2.keys())

    def clear(self) -> None:
        self.p = 0.0
        self._adapted = _NOT_SET
        for d in (self.t1, self.t2, self.b1, self.b2):
            d.clear()


def _first(lst: OrderedDict[Hashable, None], ok: Callable[[Hashable], bool]) -> Hashable | None:
    for k in lst:
        if ok(k):
            return k
    return None
