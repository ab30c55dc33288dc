"""What an ``object`` tier knows about its bucket prefix, kept on the scheduler thread.

The index answers lookups without a request: keys known present (this instance stored or loaded
them, a ``HEAD`` found them, or a listing of the prefix showed them), keys known absent for a
while (a ``HEAD`` said so, or a complete listing did not show them), and keys being asked about
now. It also does the capacity accounting: the bytes of every object it knows, plus the bytes
of uploads in flight, and the choice of what to evict (the least recently used here; objects
known only from a listing count as older than any this instance used, oldest write first).

Only the scheduler thread touches it; the tier's threads hand their findings over as updates.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from kvtier.format.record import FIXED_HEADER_SIZE


class PresenceIndex:
    """Keys in the bucket prefix as far as this instance knows (see the module docstring)."""

    def __init__(self, block_bytes: int, *, capacity_bytes: int | None, ttl_seconds: float | None,
                 negative_seconds: float, max_keys: int) -> None:
        self.block_bytes = block_bytes
        self.capacity = capacity_bytes
        self.ttl = ttl_seconds
        self.negative_seconds = negative_seconds
        self.max_keys = max_keys
        self.present: OrderedDict[bytes, float] = OrderedDict()  # key -> mtime (epoch s), LRU first
        self.negative: dict[bytes, float] = {}  # key -> monotonic time 'absent' expires (FIFO)
        self.inflight: set[bytes] = set()  # keys a HEAD is asking about now
        self.usage = 0  # bytes of the objects in ``present``
        self.reserved = 0  # bytes of uploads in flight
        self.listed_at: float | None = None  # monotonic start of the last complete listing
        self._sweep: tuple[float, frozenset[bytes], Iterator[bytes]] | None = None

    def record_bytes(self, key: bytes) -> int:
        """Size of the object that holds ``key``'s record."""
        return FIXED_HEADER_SIZE + len(key) + self.block_bytes

    # -- questions -------------------------------------------------------------------------
    def has(self, key: bytes, wall: float) -> bool:
        """True when ``key`` is known present (and, with a TTL, not expired)."""
        mtime = self.present.get(key)
        if mtime is None:
            return False
        return self.ttl is None or wall - mtime < self.ttl

    def run_length(self, keys: Sequence[bytes]) -> int:
        """Length of the leading run of ``keys`` known present."""
        present = self.present
        n, nk = 0, len(keys)
        if self.ttl is None:
            while n < nk and keys[n] in present:
                n += 1
            return n
        wall = time.time()
        while n < nk and self.has(keys[n], wall):
            n += 1
        return n

    def known_absent(self, key: bytes, now: float) -> bool:
        """True when ``key`` is known absent (a recent HEAD or complete listing)."""
        until = self.negative.get(key)
        if until is not None and until > now:
            return True
        listed = self.listed_at
        return listed is not None and now < listed + self.negative_seconds and key not in self.present

    # -- changes ---------------------------------------------------------------------------
    def add(self, key: bytes, mtime: float) -> None:
        """``key`` is present and was just used: most recent."""
        self.negative.pop(key, None)
        old = self.present.pop(key, None)
        if old is None:
            self.usage += self.record_bytes(key)
        self.present[key] = mtime

    def add_listed(self, entries: Sequence[tuple[bytes, float]]) -> int:
        """Keys a listing showed; those new here go to the old end, oldest write first."""
        present = self.present
        added = 0
        for key, mtime in sorted(entries, key=lambda e: e[1], reverse=True):
            if key in present:
                continue
            if self.ttl is not None and time.time() - mtime >= self.ttl:
                continue
            self.negative.pop(key, None)
            present[key] = mtime
            present.move_to_end(key, last=False)
            self.usage += self.record_bytes(key)
            added += 1
        return added

    def remove(self, key: bytes) -> bool:
        """Forget ``key`` as present; True if it was."""
        if self.present.pop(key, None) is None:
            return False
        self.usage -= self.record_bytes(key)
        return True

    def absent(self, key: bytes, now: float) -> bool:
        """``key`` is known absent until ``now + negative_seconds``; True if it was present."""
        was = self.remove(key)
        neg = self.negative
        neg.pop(key, None)
        neg[key] = now + self.negative_seconds
        return was

    def touch(self, keys: Sequence[bytes]) -> None:
        """Make the present ones among ``keys`` most recent."""
        present = self.present
        for k in keys:
            if k in present:
                present.move_to_end(k)

    def listing_complete(self, started_mono: float, started_wall: float,
                         listed: frozenset[bytes] | None) -> None:
        """A listing that began at the given times saw every object; ``listed`` are their keys.

        Keys this index holds from before the listing began that it did not show were deleted
        elsewhere (another instance's eviction, a lifecycle rule): they are forgotten a chunk at
        a time by :meth:`sweep`.
        """
        self.listed_at = started_mono
        if listed is not None:
            self._sweep = (started_wall, listed, iter(list(self.present)))

    def sweep(self, budget: int = 4096) -> list[bytes]:
        """Forget up to ``budget`` keys' worth of stale entries; returns the keys forgotten."""
        if self._sweep is None:
            return []
        started, listed, it = self._sweep
        gone: list[bytes] = []
        present = self.present
        for _ in range(budget):
            key = next(it, None)
            if key is None:
                self._sweep = None
                break
            mtime = present.get(key)
            if mtime is not None and mtime < started and key not in listed:
                self.remove(key)
                gone.append(key)
        return gone

    def over_capacity(self) -> list[bytes]:
        """Evict (least recent first) until usage and reservations fit the capacity."""
        cap = self.capacity
        if cap is None:
            return []
        out: list[bytes] = []
        present = self.present
        while present and self.usage + self.reserved > cap:
            key, _ = present.popitem(last=False)
            self.usage -= self.record_bytes(key)
            out.append(key)
        return out

    def make_room(self, need: int) -> tuple[bool, list[bytes]]:
        """Reserve ``need`` bytes for uploads, evicting as needed: (reserved?, evicted keys)."""
        cap = self.capacity
        if cap is None:
            self.reserved += need
            return True, []
        if need + self.reserved > cap:
            return False, []
        evicted: list[bytes] = []
        present = self.present
        while present and self.usage + self.reserved + need > cap:
            key, _ = present.popitem(last=False)
            self.usage -= self.record_bytes(key)
            evicted.append(key)
        self.reserved += need
        return True, evicted

    def release(self, nbytes: int) -> None:
        """Uploads of ``nbytes`` finished (their keys were added if they succeeded)."""
        self.reserved -= nbytes

    def trim(self, now: float) -> None:
        """Keep the index within ``max_keys`` (without a capacity) and drop old negatives."""
        if self.capacity is None:
            present = self.present
            while len(present) > self.max_keys:
                key, _ = present.popitem(last=False)
                self.usage -= self.record_bytes(key)
        neg = self.negative
        while neg:
            k = next(iter(neg))
            if neg[k] > now and len(neg) <= self.max_keys:
                break
            del neg[k]
