"""An out-of-tree tier and policy, loaded by tests through ``module_path``."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np

from kvtier import SecondaryTier, TierJobResult
from kvtier.policies.lru import LRUPolicy


class ReverseLRU(LRUPolicy):
    """Evicts the most recently used key first (a deliberately odd policy)."""

    name = "reverse-lru"

    def evict(self, evictable: Callable[[Hashable], bool], incoming: Hashable | None = None):
        for key in reversed(self._order):
            if evictable(key):
                del self._order[key]
                return key
        return None


class DictTier(SecondaryTier):
    """A synchronous in-memory tier: jobs complete at submit and report at the next poll."""

    medium = "DICT"
    PARAMS = {}

    def __init__(self, ctx, **params):
        super().__init__(ctx, **params)
        self.data: dict[bytes, bytes] = {}
        self.done: list[TierJobResult] = []

    def lookup(self, keys: Sequence[bytes]) -> int | None:
        n = 0
        for k in keys:
            if k not in self.data:
                break
            n += 1
        return n

    def submit_load(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        failed = set()
        for k, s in zip(keys, slots):
            if k in self.data:
                self.ctx.primary[s] = np.frombuffer(self.data[k], dtype=np.uint8)
            else:
                failed.add(k)
        self.done.append(TierJobResult(job_id, frozenset(failed)))

    def submit_store(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        for k, s in zip(keys, slots):
            self.data[k] = self.ctx.primary[s].tobytes()
        self.done.append(TierJobResult(job_id))

    def poll(self) -> list[TierJobResult]:
        out, self.done = self.done, []
        return out
