"""An eviction policy that follows whichever of two policies would hit more here
(``eviction_policy: "adaptive"``).

Two metadata-only shadow caches, each the size of the real one and each ordered by one candidate
policy (``chain`` and ``lru``), replay every lookup the cache sees: the leading run of the
request's blocks each shadow holds is counted as its hits, then the request's blocks are
admitted to it as the real cache admits them. The real cache keeps both candidates' orderings
over its resident blocks and evicts by the one whose shadow has hit more over the recent past:
every ``window`` lookups the leader changes when the other shadow is ahead by more than
``margin``, then both counts are multiplied by ``decay`` (a memory of about ``window / (1 -
decay)`` lookups). ``lru`` leads at the start. Parameters were chosen on the Mooncake trace and
four generated workloads (docs/BENCHMARKS.md): faster switching flaps on the trace, slower
switching follows LRU too late on chat workloads. Where the chain policy's guesses are right
(long one-off prompts, as on the Mooncake trace) it behaves as ``chain``; where they are wrong
(multi-turn chat whose every turn comes back after a pause the cache can outlast) it behaves as
``lru``.

Cost: the shadows hold keys only (two times the capacity, plus the predictor's history), and
each lookup is replayed in both, which triples the policy's work per block.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

from kvtier.policies.base import EvictionPolicy
from kvtier.policies.chain import ChainPolicy
from kvtier.policies.lru import LRUPolicy


class ShadowCache:
    """A cache of keys only, ordered by ``policy``: what the real cache would hold under it."""

    def __init__(self, policy: EvictionPolicy[Hashable]) -> None:
        self.policy = policy
        self.capacity = policy.capacity

    def replay(self, keys: Sequence[Hashable], request: str | None) -> int:
        """One request: returns its leading run of resident keys, then admits all its keys."""
        p = self.policy
        p.observe(keys, request)
        hits = 0
        for k in keys:
            if k not in p:
                break
            hits += 1
        p.access_many(keys)
        new = [k for k in dict.fromkeys(keys) if k not in p][-self.capacity :]
        over = len(p) + len(new) - self.capacity
        if over > 0:
            p.evict_many(over, _always, new)
        p.insert_many(new)
        return hits

    def __len__(self) -> int:
        return len(self.policy)


def _always(key: Hashable) -> bool:
    return True


class AdaptivePolicy(EvictionPolicy[Hashable]):
    """Evicts as ``chain`` or as ``lru``, whichever's shadow hits more (see the module)."""

    name = "adaptive"
    window = 128
    margin = 0.02
    decay = 0.9
    start = 1  # lru leads until chain's shadow is ahead

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.live: list[EvictionPolicy[Hashable]] = [ChainPolicy(capacity), LRUPolicy(capacity)]
        self.shadows = [ShadowCache(ChainPolicy(capacity)), ShadowCache(LRUPolicy(capacity))]
        self.hits = [0.0, 0.0]
        self.leader = self.start
        self._lookups = 0
        self._last: tuple[str | None, Hashable, int] | None = None

    def observe(self, keys: Sequence[Hashable], request: str | None = None) -> None:
        if not keys:
            return
        sig = (request, keys[-1], len(keys))
        if request is not None and sig == self._last:
            return
        self._last = sig
        self.live[0].observe(keys, request)
        for i, sh in enumerate(self.shadows):
            self.hits[i] += sh.replay(keys, request)
        self._lookups += 1
        if self._lookups >= self.window:
            other = 1 - self.leader
            if self.hits[other] > (1.0 + self.margin) * self.hits[self.leader]:
                self.leader = other
            self.hits = [h * self.decay for h in self.hits]
            self._lookups = 0

    def insert(self, key: Hashable) -> None:
        for p in self.live:
            p.insert(key)

    def insert_many(self, keys: Iterable[Hashable]) -> None:
        keys = list(keys)
        for p in self.live:
            p.insert_many(keys)

    def access(self, key: Hashable) -> None:
        for p in self.live:
            p.access(key)

    def access_many(self, keys: Iterable[Hashable]) -> None:
        keys = list(keys)
        for p in self.live:
            p.access_many(keys)

    def remove(self, key: Hashable) -> None:
        for p in self.live:
            p.remove(key)

    def evict(
        self, evictable: Callable[[Hashable], bool], incoming: Hashable | None = None
    ) -> Hashable | None:
        victim = self.live[self.leader].evict(evictable, incoming)
        if victim is not None:
            self.live[1 - self.leader].remove(victim)
        return victim

    def evict_many(
        self, n: int, evictable: Callable[[Hashable], bool], incoming: Sequence[Hashable] | None = None
    ) -> list[Hashable]:
        victims = self.live[self.leader].evict_many(n, evictable, incoming)
        other = self.live[1 - self.leader]
        for v in victims:
            other.remove(v)
        return victims

    def __contains__(self, key: object) -> bool:
        return key in self.live[1]

    def __len__(self) -> int:
        return len(self.live[1])

    def keys(self) -> Iterable[Hashable]:
        return self.live[1].keys()

    def clear(self) -> None:
        for p in self.live:
            p.clear()
        for sh in self.shadows:
            sh.policy.clear()
        self.hits = [0.0, 0.0]
        self._last = None
