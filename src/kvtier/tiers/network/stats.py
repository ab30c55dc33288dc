"""The network tier's counters, shared by the scheduler thread and the I/O threads."""

from __future__ import annotations

import threading

COUNTERS = (
    "hits", "lookup_hits", "misses", "bytes_read", "blocks_written", "bytes_written",
    "load_failures", "store_failures", "corrupt", "evicted_at_load", "oom_errors",
    "round_trips", "lookup_queries", "lookup_keys_queried", "stores_skipped", "touches",
    "redirects",
)


class Counters:
    """Integer counters; ``add`` is thread-safe, ``snapshot`` copies them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    def add(self, **deltas: int) -> None:
        """Add each delta to its counter (one lock for all of them)."""
        with self._lock:
            c = self._c
            for name, d in deltas.items():
                c[name] += d

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter."""
        with self._lock:
            return dict(self._c)
