"""Prefix-chain-aware segmented LRU (``eviction_policy: "chain"``).

Built for prefix-chained keys, where a block is worth something only while its whole prefix is
cached (a lookup's hit run stops at the first missing block):

- **Leaf first.** Blocks admitted or used together (one request's blocks, in prefix order) are
  ordered deepest first, so the request's last blocks leave before its prefix, never the prefix
  before the blocks that depend on it.
- **Probation and protection.** A block seen for the first time enters a probation segment
  (``probation`` share of the capacity, FIFO); a hit while there, or a re-admission soon after
  being evicted from there (a bounded ghost list of ``ghost`` times the capacity remembers such
  keys, metadata only), moves it to the protected LRU segment. The one-off suffixes of long
  prompts thus cycle through probation instead of flushing the blocks that are reused.
- **Predicted reuse.** The reuse predictor (:class:`kvtier.policies.reuse.ReusePredictor`,
  fed every lookup's keys through :meth:`observe`) calls a block cold when it has been seen in
  one request only, among that request's last ``tail_blocks`` blocks; a cold block enters
  probation at its eviction end, so it is the first to go. A block seen in a second request
  (the conversation went on, the document was asked about again) is no longer cold.
- **Orphans.** With leaf-first order a prefix block rarely leaves before the blocks below it;
  demoting blocks whose predecessor left changed nothing measurable on the Mooncake trace, so
  it is not done.

Parameters were chosen on the Mooncake trace and the bench's synthetic workloads (see
docs/BENCHMARKS.md); on a workload where every block is used exactly once more soon after its
first use (no reuse beyond that) it loses to plain LRU, as probation is then too small.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence

from kvtier.policies.base import EvictionPolicy
from kvtier.policies.reuse import ReusePredictor


class ChainPolicy(EvictionPolicy[Hashable]):
    """Leaf-first segmented LRU with a ghost list (see the module docstring)."""

    name = "chain"
    probation = 0.2
    ghost = 1.0
    tail_blocks = 32

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.predictor = ReusePredictor(max(8 * capacity, 1 << 16), self.tail_blocks)
        self.prob: OrderedDict[Hashable, None] = OrderedDict()
        self.main: OrderedDict[Hashable, None] = OrderedDict()
        self.ghosts: OrderedDict[Hashable, None] = OrderedDict()
        self.ghost_limit = max(1, int(self.ghost * capacity))
        self.prob_target = max(1, int(self.probation * capacity))

    def insert(self, key: Hashable) -> None:
        if key in self.prob or key in self.main:
            self.access(key)
            return
        if self.ghosts.pop(key, _MISSING) is not _MISSING:
            self.main[key] = None
        else:
            self.prob[key] = None
            if self.predictor.cold(key):
                self.prob.move_to_end(key, last=False)

    def observe(self, keys: Sequence[Hashable], request: str | None = None) -> None:
        self.predictor.observe(keys, request)

    def insert_many(self, keys: Iterable[Hashable]) -> None:
        for k in reversed(list(keys)):
            self.insert(k)

    def access(self, key: Hashable) -> None:
        if key in self.prob:
            del self.prob[key]
            self.main[key] = None
        elif key in self.main:
            self.main.move_to_end(key)

    def access_many(self, keys: Iterable[Hashable]) -> None:
        for k in reversed(list(keys)):
            self.access(k)

    def remove(self, key: Hashable) -> None:
        self.prob.pop(key, None)
        self.main.pop(key, None)

    def evict(
        self, evictable: Callable[[Hashable], bool], incoming: Hashable | None = None
    ) -> Hashable | None:
        first = self.prob if (self.prob and len(self.prob) > self.prob_target) or not self.main \
            else self.main
        for seg in (first, self.main if first is self.prob else self.prob):
            for k in seg:
                if evictable(k):
                    del seg[k]
                    if seg is self.prob:
                        self.ghosts[k] = None
                        if len(self.ghosts) > self.ghost_limit:
                            self.ghosts.popitem(last=False)
                    return k
        return None

    def evict_many(
        self, n: int, evictable: Callable[[Hashable], bool], incoming: Sequence[Hashable] | None = None
    ) -> list[Hashable]:
        out: list[Hashable] = []
        for _ in range(n):
            k = self.evict(evictable)
            if k is None:
                break
            out.append(k)
        return out

    def __contains__(self, key: object) -> bool:
        return key in self.prob or key in self.main

    def __len__(self) -> int:
        return len(self.prob) + len(self.main)

    def keys(self) -> Iterable[Hashable]:
        return list(self.prob) + list(self.main)

    def clear(self) -> None:
        self.predictor.clear()
        self.prob.clear()
        self.main.clear()
        self.ghosts.clear()


_MISSING = object()
