"""A reuse predictor over prefix chains, shared by admission and eviction policies.

It reads every request's blocks in prefix order (the request's end last) and remembers, for
each block, in how many requests it has been seen and how far from its request's end it was the
last time. A block seen in a single request so far, among the last ``tail_blocks`` blocks of
that request, is predicted *cold*: it is that request's own suffix (a question, a fresh turn of
a conversation), which on the Mooncake trace is referenced again 17-40% of the time, against
45% for other first sightings and 73-85% for blocks seen before. A block seen again (a
conversation that continued, a shared document) is no longer cold.

Memory is bounded: the ``history`` most recently seen keys (about 60 bytes each).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


class ReusePredictor:
    """Sightings and distance-to-end per recently seen key; ``cold(key)`` is the prediction."""

    def __init__(self, history: int = 1 << 16, tail_blocks: int = 32) -> None:
        if history <= 0 or tail_blocks < 0:
            raise ValueError("history must be positive and tail_blocks non-negative")
        self.history = history
        self.tail_blocks = tail_blocks
        self.seen: OrderedDict[Hashable, tuple[int, int]] = OrderedDict()
        self._last: tuple[str | None, Hashable, int] | None = None

    def observe(self, keys: Sequence[Hashable], request: str | None = None) -> bool:
        """Request ``request`` references ``keys``; False (nothing learned) when it is the same
        request asking again with the same keys (a lookup that answered None is repeated)."""
        if not keys:
            return False
        sig = (request, keys[-1], len(keys))
        if request is not None and sig == self._last:
            return False
        self._last = sig
        seen = self.seen
        n = len(keys)
        for i, k in enumerate(keys):
            prev = seen.pop(k, None)
            seen[k] = ((prev[0] + 1) if prev else 1, n - 1 - i)
        while len(seen) > self.history:
            seen.popitem(last=False)
        return True

    def cold(self, key: Hashable) -> bool:
        """True for a block seen once, near the end of its request (unknown keys: False)."""
        info = self.seen.get(key)
        return info is not None and info[0] == 1 and info[1] < self.tail_blocks

    def clear(self) -> None:
        """Forget everything."""
        self.seen.clear()
        self._last = None
