"""Least recently used."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence

from kvtier.policies.base import EvictionPolicy


class LRUPolicy(EvictionPolicy[Hashable]):
    """Evicts the least recently inserted or accessed evictable key."""

    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def insert_many(self, keys: Iterable[Hashable]) -> None:
        order = self._order
        move = order.move_to_end
        for key in keys:
            order[key] = None
            move(key)

    def evict_many(
        self, n: int, evictable: Callable[[Hashable], bool], incoming: Sequence[Hashable] | None = None
    ) -> list[Hashable]:
        out: list[Hashable] = []
        if n <= 0:
            return out
        for key in self._order:
            if evictable(key):
                out.append(key)
                if len(out) == n:
                    break
        order = self._order
        for key in out:
            del order[key]
        return out

    def access(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def access_many(self, keys: Iterable[Hashable]) -> None:
        order = self._order
        move = order.move_to_end
        for k in keys:
            if k in order:
                move(k)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def evict(
        self, evictable: Callable[[Hashable], bool], incoming: Hashable | None = None
    ) -> Hashable | None:
        for key in self._order:
            if evictable(key):
                del self._order[key]
                return key
        return None

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def keys(self) -> Iterable[Hashable]:
        return self._order.keys()

    def clear(self) -> None:
        self._order.clear()
