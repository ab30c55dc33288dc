"""The eviction policy contract shared by the primary tier and tiers that evict.

A policy only orders keys; it never owns memory. The cache tells it about admissions, hits and
removals, and asks it for a victim, passing a predicate that says which keys may be evicted now
(a pinned block, or one being read by a cascade, may not).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class EvictionPolicy(ABC, Generic[K]):
    """Orders the resident keys of a cache of ``capacity`` entries."""

    name: str = "base"

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity

    @abstractmethod
    def insert(self, key: K) -> None:
        """``key`` was admitted (after a miss)."""

    @abstractmethod
    def access(self, key: K) -> None:
        """``key`` (resident) was used again."""

    @abstractmethod
    def remove(self, key: K) -> None:
        """``key`` left the cache for a reason other than eviction (no-op if unknown)."""

    @abstractmethod
    def evict(self, evictable: Callable[[K], bool], incoming: K | None = None) -> K | None:
        """Choose, forget and return a victim for which ``evictable`` is true; None if none.

        ``incoming`` is the key the freed entry is for, when known (ARC uses it).
        """

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def observe(self, keys: Sequence[K], request: str | None = None) -> None:
        """Request ``request`` looks up ``keys`` (prefix order, its end last), resident or not;
        on every lookup, again when a lookup is repeated. For policies that read request
        structure; the default ignores it."""
        return None

    def insert_many(self, keys: Iterable[K]) -> None:
        """``insert`` for each key, in order."""
        for k in keys:
            self.insert(k)

    def evict_many(
        self, n: int, evictable: Callable[[K], bool], incoming: Sequence[K] | None = None
    ) -> list[K]:
        """Up to ``n`` victims, as ``n`` calls of ``evict`` (``incoming[i]`` for the i-th)."""
        out: list[K] = []
        for i in range(n):
            nxt = incoming[i] if incoming is not None and i < len(incoming) else None
            victim = self.evict(evictable, nxt)
            if victim is None:
                break
            out.append(victim)
        return out

    def access_many(self, keys: Iterable[K]) -> None:
        """``access`` for each resident key, in order."""
        for k in keys:
            if k in self:
                self.access(k)

    def clear(self) -> None:
        """Forget everything (resident keys and history)."""
        for k in list(self.keys()):
            self.remove(k)

    @abstractmethod
    def keys(self) -> Iterable[K]:
        """Resident keys, in no promised order."""
