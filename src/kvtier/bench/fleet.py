"""Several engines at once: a workload split across N engines that share a storage directory.

Requests go to the engines round-robin (request ``i`` to engine ``i mod N``), as a load balancer
that knows nothing of prefixes would send them. Each engine is a full :class:`EngineSim` with its
own KV pool and its own kvtier manager (its own CPU tier); the engines step in simulated-time
order, one step of the engine that is furthest behind at a time, so a block one engine stored
exists before a later request of another engine asks for it. Every ``sync_s`` of simulated time
each engine's storage tier runs a sync pass (the tier's own timer is switched off here), so the
delay until one engine finds another's blocks is the configured one in simulated time, whatever
the speed of the replay.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from kvtier.bench.engine import EngineOptions, EngineSim, RunCounters
from kvtier.bench.offload import Offload
from kvtier.bench.workload import Workload


def split(workload: Workload, n: int) -> list[Workload]:
    """``workload`` dealt round-robin to ``n`` engines, each keeping arrival order."""
    return [
        Workload(f"{workload.name}[{i}/{n}]", workload.block_tokens, workload.requests[i::n],
                 dict(workload.params))
        for i in range(n)
    ]


def merge_counters(parts: list[RunCounters]) -> RunCounters:
    """One set of counters for all engines (sums; simulated time is the longest)."""
    out = RunCounters()
    for f in fields(RunCounters):
        vals = [getattr(p, f.name) for p in parts]
        if isinstance(vals[0], dict):
            merged: dict[str, Any] = {}
            for v in vals:
                for k, x in v.items():
                    merged[k] = merged.get(k, 0) + x
            setattr(out, f.name, merged)
        elif f.name == "sim_s":
            out.sim_s = max(vals)
        else:
            setattr(out, f.name, sum(vals))
    return out


def merge_stats(parts: list[dict[str, Any]], *, shared: bool) -> dict[str, Any]:
    """``get_stats()`` of all engines as one: bytes summed per tier; a shared tier's capacity
    and usage once (they are the directory's), private tiers' capacities summed."""
    tiers: dict[str, dict[str, Any]] = {}
    for st in parts:
        for name, t in (st.get("tiers") or {}).items():
            d = tiers.setdefault(name, {"medium": t.get("medium", name), "bytes_read": 0,
                                        "bytes_written": 0})
            d["bytes_read"] += int(t.get("bytes_read", 0) or 0)
            d["bytes_written"] += int(t.get("bytes_written", 0) or 0)
            for k in ("capacity_bytes", "usage_bytes"):
                if t.get(k) is None:
                    continue
                d[k] = max(d.get(k, 0), int(t[k])) if shared and name != "CPU" else d.get(k, 0) + int(t[k])
    managers = [st.get("manager", {}) for st in parts]
    manager: dict[str, Any] = {}
    for k in ("promotion_latency_steps_avg", "promotion_latency_s_avg"):
        vals = [float(m.get(k, 0.0) or 0.0) for m in managers]
        manager[k] = sum(vals) / len(vals) if vals else 0.0
    return {"manager": manager, "tiers": tiers, "engines": parts}


def _sync_all(offloads: list[Offload]) -> None:
    for off in offloads:
        for tier in getattr(getattr(off, "manager", None), "tiers", ()):
            fn = getattr(tier, "sync_now", None)
            if fn is not None:
                fn()


class FleetSim:
    """N engines replaying their shares of a workload in simulated-time order."""

    def __init__(
        self, workloads: list[Workload], offloads: list[Offload], opts: EngineOptions, *,
        sync_s: float, progress: Callable[[int], None] | None = None,
    ) -> None:
        self.sims = [EngineSim(wl, off, copy.copy(opts)) for wl, off in zip(workloads, offloads)]
        self.offloads = offloads
        self.sync_s = sync_s
        self.progress = progress
        self.stats: dict[str, Any] = {}
        self.per_engine: list[RunCounters] = []

    def run(self, *, shared: bool) -> RunCounters:
        """Replay every engine's requests; returns the counters of all engines together."""
        t0 = time.perf_counter()
        sims = self.sims
        done = [0] * len(sims)
        for i, sim in enumerate(sims):
            def report(n: int, i: int = i) -> None:
                done[i] = n
                if self.progress is not None:
                    self.progress(sum(done))

            sim.progress = report
        started: list[EngineSim] = []
        try:
            for sim in sims:
                sim.start()
                started.append(sim)
            now = [0.0] * len(sims)
            active = set(range(len(sims)))
            next_sync = self.sync_s
            while active:
                i = min(active, key=now.__getitem__)
                t = sims[i].advance()
                if t is None:
                    active.discard(i)
                    continue
                now[i] = t
                low = min((now[j] for j in active), default=float("inf"))
                while low >= next_sync and active:
                    _sync_all(self.offloads)
                    next_sync += self.sync_s
            self.stats = merge_stats([s.off.stats() for s in sims], shared=shared)
        finally:
            for sim in started:
                sim.off.shutdown()
        self.per_engine = [s.c for s in sims]
        c = merge_counters(self.per_engine)
        c.wall_s = time.perf_counter() - t0
        return c
