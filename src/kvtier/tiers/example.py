"""The ``example`` tier: blocks in a Python dict, copied on one background thread.

It is the reference for tier authors. It shows the whole contract in the smallest honest form:
lookups answered from an index at once, jobs queued to a thread that really copies bytes between
primary slots and the tier's own memory, results handed back through ``poll``, an optional
capacity with eviction by any registered policy (``eviction_policy``, default LRU), and events
for what it stored and dropped. It accepts any extra parameter and reports it in ``stats()``
(handy for checking that config reaches a tier).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kvtier.config import ConfigError, require_str
from kvtier.policies import resolve_policy
from kvtier.policies.base import EvictionPolicy
from kvtier.tiers.base import Completions, SecondaryTier, TierContext, TierEvent, TierJobResult


class ExampleTier(SecondaryTier):
    """In-memory secondary tier (``capacity_bytes``: optional bound; default unbounded)."""

    medium = "EXAMPLE"
    PARAMS = None  # accepts anything; unknown parameters are reported, not rejected

    @classmethod
    def validate_params(cls, params: Mapping[str, Any], label: str) -> dict[str, Any]:
        out = dict(params)
        cap = out.get("capacity_bytes")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0):
            raise ConfigError(f"{label}.capacity_bytes", "a positive integer", cap)
        if "eviction_policy" in out:
            resolve_policy(require_str(out, "eviction_policy", label=f"{label}.eviction_policy"),
                           key=f"{label}.eviction_policy")
        return out

    def __init__(self, ctx: TierContext, capacity_bytes: int | None = None,
                 eviction_policy: str = "lru", **custom: Any) -> None:
        super().__init__(ctx, capacity_bytes=capacity_bytes, eviction_policy=eviction_policy,
                         **custom)
        self.custom_params = custom
        self.capacity_blocks = (
            None if capacity_bytes is None else max(1, capacity_bytes // ctx.block_bytes)
        )
        # Orders the blocks when bounded (None: the dict's own LRU order is used).
        self.policy: EvictionPolicy[bytes] | None = (
            None if self.capacity_blocks is None or eviction_policy == "lru"
            else resolve_policy(eviction_policy)(self.capacity_blocks))
        self._blocks: OrderedDict[bytes, bytes] = OrderedDict()  # key -> bytes, LRU order
        self._lock = threading.Lock()  # guards _blocks between the scheduler and the thread
        self._jobs: queue.Queue[tuple[str, int, list[bytes], np.ndarray] | None] = queue.Queue()
        self._done = Completions()
        self._events: list[TierEvent] = []
        self._in_flight = 0
        self._stats = {"hits": 0, "misses": 0, "bytes_read": 0, "bytes_written": 0,
                       "load_failures": 0, "store_failures": 0, "evictions": 0}
        self._thread = threading.Thread(target=self._run, name=f"kvtier-{self.name}", daemon=True)
        self._thread.start()

    def lookup(self, keys: Sequence[bytes]) -> int | None:
        n = 0
        with self._lock:
            for key in keys:
                if key not in self._blocks:
                    break
                n += 1
        self._stats["hits"] += n
        self._stats["misses"] += 1 if n < len(keys) else 0
        return n

    def submit_load(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        self._in_flight += 1
        self._jobs.put(("load", job_id, list(keys), slots))

    def submit_store(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        self._in_flight += 1
        self._jobs.put(("store", job_id, list(keys), slots))

    def _run(self) -> None:
        primary = self.ctx.primary
        while True:
            item = self._jobs.get()
            if item is None:
                return
            kind, job_id, keys, slots = item
            t0 = time.perf_counter()
            failed: set[bytes] = set()
            moved = 0
            evicted: list[bytes] = []
            stored: list[bytes] = []
            for key, slot in zip(keys, slots):
                if kind == "load":
                    with self._lock:
                        data = self._blocks.get(key)
                        if data is not None:
                            self._blocks.move_to_end(key)
                            if self.policy is not None:
                                self.policy.access(key)
                    if data is None or len(data) != primary.shape[1]:
                        failed.add(key)
                        continue
                    primary[slot] = np.frombuffer(data, dtype=np.uint8)
                else:
                    data = primary[slot].tobytes()
                    with self._lock:
                        policy = self.policy
                        if key not in self._blocks:
                            stored.append(key)
                            if policy is not None:
                                policy.insert(key)
                        elif policy is not None:
                            policy.access(key)
                        self._blocks[key] = data
                        self._blocks.move_to_end(key)
                        while self.capacity_blocks is not None and len(self._blocks) > self.capacity_blocks:
                            if policy is None:
                                old, _ = self._blocks.popitem(last=False)
                            else:
                                victim = policy.evict(key.__ne__)  # not the block just written
                                if victim is None:
                                    break
                                old = victim
                                del self._blocks[old]
                            evicted.append(old)
                moved += len(data)
            self._done.put(TierJobResult(job_id, frozenset(failed), moved, time.perf_counter() - t0))
            with self._lock:
                if stored:
                    self._events.append(TierEvent(stored, removed=False))
                if evicted:
                    self._events.append(TierEvent(evicted, removed=True))
                self._stats["evictions"] += len(evicted)
                key_stat = "bytes_read" if kind == "load" else "bytes_written"
                self._stats[key_stat] += moved
                self._stats["load_failures" if kind == "load" else "store_failures"] += len(failed)

    def poll(self) -> list[TierJobResult]:
        done = self._done.drain()
        self._in_flight -= len(done)
        return done

    def touch(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            if self.policy is not None:
                self.policy.observe(keys)
            for key in keys:
                if key in self._blocks:
                    self._blocks.move_to_end(key)
                    if self.policy is not None:
                        self.policy.access(key)

    def take_events(self) -> list[TierEvent]:
        with self._lock:
            ev, self._events = self._events, []
        return ev

    def has_pending_work(self) -> bool:
        return self._in_flight > 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            used = len(self._blocks)
            st: dict[str, Any] = dict(self._stats)
        st["blocks"] = used
        st["usage_bytes"] = used * self.ctx.block_bytes
        st["capacity_bytes"] = (
            None if self.capacity_blocks is None else self.capacity_blocks * self.ctx.block_bytes
        )
        st["custom_params"] = dict(self.custom_params)
        return st

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=5)
