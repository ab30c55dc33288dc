"""What the scheduler thread knows about which keys the server holds.

Three structures, touched by the scheduler thread only: keys known to be on the server (an LRU
dict of key -> when that was last seen), keys known to be absent (a FIFO dict of key -> until
when that answer is trusted), and keys a query is asking about now. The I/O threads never touch
them: they append what they learn to an update queue that :meth:`PresenceCache.apply` folds in.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

# Kinds of update the I/O threads send: the keys are on the server / are not / nobody knows.
PRESENT, ABSENT, UNKNOWN = "present", "absent", "unknown"


class PresenceCache:
    """Presence and absence of keys on the server, as last learnt (scheduler thread only)."""

    def __init__(self, negative_ttl: float, limit: int) -> None:
        self.negative_ttl = float(negative_ttl)
        self.limit = int(limit)
        self.present: dict[bytes, float] = {}  # key -> when it was last known present (LRU)
        self.negative: dict[bytes, float] = {}  # key -> until when 'absent' is trusted (FIFO)
        self.inflight: set[bytes] = set()  # keys a query is asking about now
        self.updates: deque[tuple[str, list[bytes]]] = deque()  # filled by the I/O threads

    def leading_run(self, keys: Sequence[bytes]) -> tuple[int, list[bytes] | None]:
        """(n, ask): the leading run of ``keys`` known present, and the keys to query.

        ``ask`` is None when the run is final (it ends at a key trusted absent, or covers every
        key); otherwise the caller answers None and queries ``ask`` (which may be empty when
        every unknown key is already being asked about). Keys in ``ask`` are marked in flight.
        """
        present = self.present
        n, nk = 0, len(keys)
        while n < nk and keys[n] in present:
            n += 1
        if n < nk:
            now = time.monotonic()
            neg = self.negative
            until = neg.get(keys[n])
            if until is None or until <= now:
                ask: list[bytes] = []
                inflight = self.inflight
                for k in keys[n:]:
                    if k in present:
                        continue
                    until = neg.get(k)
                    if until is not None and until > now:
                        break
                    if k not in inflight:
                        ask.append(k)
                if ask:
                    inflight.update(ask)
                return n, ask
        for k in keys[:n]:  # refresh LRU order of what was asked about
            present[k] = present.pop(k)
        return n, None

    def recently_present(self, key: bytes, since: float) -> bool:
        """True when ``key`` was confirmed on the server at or after ``since`` (monotonic)."""
        return self.present.get(key, -1.0) >= since

    def forget(self) -> None:
        """Drop everything known (the server went away and may come back empty)."""
        self.present.clear()
        self.negative.clear()

    def apply(self) -> None:
        """Fold the I/O threads' updates into the caches and trim them to their limits."""
        upd = self.updates
        if not upd:
            return
        now = time.monotonic()
        present, neg, inflight = self.present, self.negative, self.inflight
        until = now + self.negative_ttl
        while upd:
            kind, keys = upd.popleft()
            if kind == PRESENT:
                for k in keys:
                    neg.pop(k, None)
                    present.pop(k, None)
                    present[k] = now
            elif kind == ABSENT:
                for k in keys:
                    present.pop(k, None)
                    neg.pop(k, None)
                    neg[k] = until
            if inflight:
                inflight.difference_update(keys)
        limit = self.limit
        while len(present) > limit:  # least recently used first
            del present[next(iter(present))]
        while neg:  # insertion order is expiry order: drop from the front
            k = next(iter(neg))
            if neg[k] > now and len(neg) <= limit:
                break
            del neg[k]
