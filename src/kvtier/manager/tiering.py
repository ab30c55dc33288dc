"""The tiering manager: the CPU primary tier as gateway, secondary tiers below it.

Storing: the engine writes blocks into primary slots (``prepare_store``/``complete_store``); the
manager then cascades them to the secondary tiers the cascade policy names, one batched job per
tier per step, holding each slot until every tier has read it.

Loading: ``lookup`` finds the leading run in the primary tier; keys after it that a secondary tier
holds get primary slots and are promoted, one batched job per tier per step. Requests that need
the same blocks share one promotion. While a promotion is in flight ``lookup`` answers None;
keys that a tier reports loaded before its job ends (``poll_loaded``) are loadable at once, so a
request whose blocks are all in waits for no one else's. The promotion steps live in
``promotion.py``, the write-back steps in ``writeback.py`` (both mixed in here).

Nothing here blocks: tiers do their I/O on their own threads and report through ``poll``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.manager.backpressure import (
    DEFAULT_MAX_PINNED_SHARE,
    DEFAULT_SLOW_STORE_FACTOR,
    TierBackpressure,
    cpu_stall_seconds,
)
from kvtier.manager.base import OffloadingManager
from kvtier.manager.cascade import CascadePolicy
from kvtier.manager.groups import GroupLookupMixin, _Unit
from kvtier.manager.primary import READY, PrimaryTier
from kvtier.manager.promotion import PromotionMixin
from kvtier.manager.stats import PRIMARY_MEDIUM, manager_stats
from kvtier.manager.writeback import WriteBackMixin
from kvtier.policies.admission import AdmissionPolicy
from kvtier.tiers.base import SecondaryTier, TierJobResult
from kvtier.types import LoadStoreSpec, OffloadingEvent, PrepareStoreOutput, ReqContext

log = logging.getLogger("kvtier.manager")



@dataclass
class _Job:
    kind: str  # "promote", "cascade" (write-through) or "writeback"
    tier: int
    keys: list[bytes]
    slots: list[int]
    submitted: float = field(default_factory=time.monotonic)
    step: int = 0
    ready: set[bytes] = field(default_factory=set)  # promoted keys reported before the job ended
    stall: float | None = None  # CPU stall seconds when a store job was submitted


@dataclass
class _Batch:
    keys: list[bytes] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)


class TieringManager(WriteBackMixin, GroupLookupMixin, PromotionMixin, OffloadingManager):
    """A CPU primary tier plus any number of secondary tiers, in lookup order."""

    def __init__(
        self,
        primary: PrimaryTier,
        region: np.ndarray,
        tiers: Sequence[SecondaryTier],
        cascade_policy: CascadePolicy,
        *,
        on_shutdown: Any = None,
        backpressure: Sequence[TierBackpressure] | None = None,
        promotion_deadline_s: float = 0.5,
        write_policies: Sequence[str] | None = None,
        admissions: Sequence[AdmissionPolicy | None] | None = None,
    ) -> None:
        """``write_policies[i]`` is tier i's ``"through"`` (default) or ``"back"``;
        ``admissions[i]`` filters what is written to tier i (None: everything)."""
        self.primary = primary
        self._region = region
        self.tiers = list(tiers)
        self.cascade_policy = cascade_policy
        self._on_shutdown = on_shutdown
        self._job_ids = itertools.count(1)
        self._jobs: dict[int, _Job] = {}
        self._promoting: dict[bytes, int] = {}  # key -> tier index it is promoted from
        self._promote_batches = [_Batch() for _ in self.tiers]
        self._preempted_once: dict[bytes, None] = {}
        self._preempted_memory = max(1024, 4 * primary.num_slots)
        self._landed: list[tuple[int, list[int]]] = []  # (release step, held promoted slots)
        self._units: list[_Unit] = []  # multi-group promotions in flight (groups.py)
        self._unit_of: dict[bytes, _Unit] = {}
        self._ending = False  # inside on_schedule_end
        self._cascade_batches = [_Batch() for _ in self.tiers]
        self._init_writeback(write_policies, admissions, _Batch)
        self._events: list[OffloadingEvent] = []
        self._step = 0
        self._closed = False
        self._raised: set[tuple[str, str]] = set()
        self._promised: list[tuple[Sequence[bytes], int]] = []  # this step's lookup answers
        self._promise_pins: list[int] = []
        self._pressure = list(backpressure) if backpressure is not None else [
            TierBackpressure(t.name, primary.num_slots, DEFAULT_MAX_PINNED_SHARE,
                             DEFAULT_SLOW_STORE_FACTOR) for t in self.tiers]
        self._deadline = promotion_deadline_s
        self._waiting_since: dict[str, float] = {}  # req_id -> first None answer of this wait
        self.counters: dict[str, float] = {
            "tier_errors": 0,
            "lookup_miss_blocks": 0,
            "lookups": 0,
            "lookup_keys": 0,
            "primary_hit_blocks": 0,
            "promotions_started": 0,
            "promoted_blocks": 0,
            "promotion_failures": 0,
            "promotion_alloc_failures": 0,
            "promotion_steps_total": 0,
            "promotion_seconds_total": 0.0,
            "cascaded_blocks": 0,
            "cascade_failures": 0,
            "backpressure_dropped": 0,
            "promotion_deadline_misses": 0,
            "promotions_preempted": 0,
            "unit_promotions": 0,
            "stored_blocks": 0,
            "store_alloc_failures": 0,
            "evicted_blocks": 0,
            "loads_prepared_blocks": 0,
            "written_back_blocks": 0,
            "writeback_failures": 0,
            "admission_declined_blocks": 0,
            "writeback_skipped_blocks": 0,
        }

    # -- lookup and promotion --------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes], ctx: ReqContext) -> int | None:
        c = self.counters
        c["lookups"] += 1
        n = len(keys)
        c["lookup_keys"] += n
        primary = self.primary
        primary.policy.observe(keys, ctx.req_id)
        r = primary.run_length(keys)
        for adm in self.admissions:
            if adm is not None:
                adm.observe(keys, ctx.req_id, r)
        if r < n and keys[r] in self._promoting:
            self._collect()  # a promotion may have finished since the step began
            r += primary.run_length(keys, r)
        if r < n and self.tiers and (keys[r] not in primary.key_slot or keys[r] in self._promoting):
            answer = self._lookup_secondary(keys, r)
            if answer is None:
                answer = self._past_deadline(ctx.req_id, keys, r)
                if answer is None:
                    return None
            r = answer
        if self._waiting_since:
            self._waiting_since.pop(ctx.req_id, None)
        if r:
            self._promised.append((keys, r))
        self.counters["lookup_miss_blocks"] += n - r
        return r

    # -- loads -----------------------------------------------------------------------------
    def prepare_load(self, keys: Sequence[bytes], ctx: ReqContext) -> LoadStoreSpec:
        primary = self.primary
        try:
            slots = primary.pin_many(keys)
        except KeyError as e:
            raise KeyError(f"prepare_load: {e.args[0]}") from None
        primary.policy.access_many(keys)
        self.counters["loads_prepared_blocks"] += len(keys)
        self.counters["primary_hit_blocks"] += len(keys)
        return LoadStoreSpec(np.fromiter(slots, dtype=np.int64, count=len(slots)))

    def complete_load(self, keys: Sequence[bytes], ctx: ReqContext) -> None:
        self.primary.unpin_many(keys)

    def touch(self, keys: Sequence[bytes], ctx: ReqContext) -> None:
        self.primary.policy.access_many(keys)
        for tier in self.tiers:
            try:
                tier.touch(keys)
            except Exception:
                self._tier_raised(tier, "touch")

    def _tier_raised(self, tier: SecondaryTier, what: str) -> None:
        """A tier broke its contract by raising: log it once per tier and method, count it."""
        self.counters["tier_errors"] += 1
        if (tier.name, what) not in self._raised:
            self._raised.add((tier.name, what))
            log.exception("tier %s raised from %s (logged once; counted in tier_errors)", tier.name, what)

    # -- stores ----------------------------------------------------------------------------
    def prepare_store(self, keys: Sequence[bytes], ctx: ReqContext) -> PrepareStoreOutput | None:
        primary = self.primary
        key_slot = primary.key_slot
        new_keys: list[bytes] = []
        guarded: list[int] = []
        seen: set[bytes] = set()
        for key in keys:
            s = key_slot.get(key)
            if s is None:
                if key not in seen:
                    seen.add(key)
                    new_keys.append(key)
            elif primary.state[s] == READY:
                primary.incref(s)  # keep the batch's resident blocks while making room
                guarded.append(s)
        if new_keys and self._promised and len(primary.free) < len(new_keys):
            self._protect_promises()
        try:
            wait = self._wb is None or self._wait_for_writebacks()
            result = primary.allocate(new_keys, self._retainer(), wait) if new_keys else ([], [])
            if result is None and self._preempt_promotions(len(new_keys)):
                result = primary.allocate(new_keys, self._retainer(), wait)
        finally:
            for s in guarded:
                primary.decref(s)
            self._start_writebacks()
        if result is None:
            self.counters["store_alloc_failures"] += 1
            return None
        slots, evicted = result
        self._evicted(evicted)
        return PrepareStoreOutput(
            keys_to_store=new_keys,
            store_spec=LoadStoreSpec(np.asarray(slots, dtype=np.int64)),
            evicted_keys=evicted,
        )

    def complete_store(
        self, keys: Sequence[bytes], ctx: ReqContext, success: bool = True
    ) -> None:
        primary = self.primary
        key_slot = primary.key_slot
        done: list[bytes] = []
        state, promoting = primary.state, self._promoting
        for key in keys:
            s = key_slot.get(key)
            if s is None or state[s] == READY or key in promoting:
                continue
            if success:
                state[s] = READY  # a key listed twice is admitted once
                done.append(key)
            else:
                primary.release(key)
        if done:
            primary.mark_ready_many(done)
            self.counters["stored_blocks"] += len(done)
            self._events.append(OffloadingEvent(done, PRIMARY_MEDIUM, False))
            self._queue_cascade(done, source_tier=None)

    def _queue_cascade(self, keys: list[bytes], source_tier: int | None) -> None:
        """Hand freshly resident keys to the tiers the cascade policy picks (slots pinned)."""
        if not self.tiers:
            return
        primary = self.primary
        key_slot = primary.key_slot
        for ti in range(len(self.tiers)):
            if source_tier is not None and ti >= source_tier:
                break  # a promoted block is already in its tier and those below it
            tier = self.tiers[ti]
            chosen = self.cascade_policy.select(keys, ti, tier)
            if not chosen:
                continue
            if self._wb is not None and self.write_policies[ti] == "back":
                self._wb.owe(chosen, 1 << ti)  # written when the CPU tier evicts them
                continue
            chosen = self._admit(ti, chosen)
            n = len(chosen)
            chosen = self._pressure[ti].admit(chosen)
            if len(chosen) < n:
                self.counters["backpressure_dropped"] += n - len(chosen)
            if not chosen:
                continue
            b = self._cascade_batches[ti]
            for key in chosen:
                s = key_slot[key]
                primary.incref(s)
                b.keys.append(key)
                b.slots.append(s)

    # -- the step --------------------------------------------------------------------------
    def on_schedule_end(self) -> None:
        self._step += 1
        self._release_promises()
        self._release_landed()
        self._ending = True
        try:
            self._collect()
            self._settle_units()
        finally:
            self._ending = False
        now = time.monotonic()
        # The CPU stall reading is only needed to age a store job in flight.
        stall_now = (cpu_stall_seconds() if any(bp.stores_in_flight for bp in self._pressure)
                     else None)
        for bp in self._pressure:
            bp.tick(now, stall_now)
        for ti, tier in enumerate(self.tiers):
            pb = self._promote_batches[ti]
            if pb.keys:
                self._promotions_submitted(pb.keys)
                self._submit("promote", ti, tier, pb)
                self._promote_batches[ti] = _Batch()
            cb = self._cascade_batches[ti]
            if cb.keys:
                if tier.available:
                    self._submit("cascade", ti, tier, cb)
                else:
                    self.counters["cascade_failures"] += len(cb.keys)
                    self._release_cascade(ti, cb.slots)
                self._cascade_batches[ti] = _Batch()
            self._submit_writebacks(ti, tier, _Batch)

    def _submit(self, kind: str, ti: int, tier: SecondaryTier, batch: _Batch) -> None:
        job_id = next(self._job_ids)
        job = _Job(kind, ti, batch.keys, batch.slots, step=self._step,
                   stall=None if kind == "promote" else cpu_stall_seconds())
        self._jobs[job_id] = job
        if kind != "promote":
            self._pressure[ti].job_started(job_id, job.submitted,
                                           len(batch.keys) * self._block_bytes(), job.stall)
        slots = np.asarray(batch.slots, dtype=np.int64)
        try:
            if kind == "promote":
                tier.submit_load(job_id, batch.keys, slots)
            else:
                tier.submit_store(job_id, batch.keys, slots)
        except Exception:  # a tier must not raise, but if it does the engine goes on
            self._tier_raised(tier, f"submit_{kind}")
            self._finish(TierJobResult(job_id, frozenset(batch.keys)))

    def _collect(self) -> None:
        for tier in self.tiers:
            try:
                progress = tier.poll_loaded()
                results = tier.poll()
            except Exception:
                self._tier_raised(tier, "poll")
                continue
            for job_id, keys in progress:
                self._promoted_early(job_id, keys)
            for res in results:
                self._finish(res)
            try:
                events = tier.take_events()
            except Exception:
                self._tier_raised(tier, "take_events")
                continue
            for ev in events:
                if ev.keys:
                    self._events.append(OffloadingEvent(list(ev.keys), tier.medium, ev.removed))
                    if ev.removed:
                        self._owe_again(tier, ev.keys)

    def _finish(self, res: TierJobResult) -> None:
        job = self._jobs.pop(res.job_id, None)
        if job is None:
            return
        if job.kind != "promote":
            self._pressure[job.tier].job_ended(res.job_id)
        failed = res.failed_keys
        if job.kind == "writeback":
            took = res.seconds if res.seconds > 0 else time.monotonic() - job.submitted
            self._writeback_done(job.tier, job.keys, failed, seconds=took,
                                 submitted=job.submitted, cpu_wait=_cpu_wait_share(job))
            return
        if job.kind == "cascade":
            self._release_cascade(job.tier, job.slots)
            if not failed:
                bb = self._block_bytes()
                took = res.seconds if res.seconds > 0 else time.monotonic() - job.submitted
                self._pressure[job.tier].observe(took, len(job.keys) * bb, job.submitted,
                                                 _cpu_wait_share(job))
            ok = len(job.keys) - len(failed)
            self.counters["cascaded_blocks"] += ok
            self.counters["cascade_failures"] += len(failed)
            return
        primary = self.primary
        loaded: list[bytes] = []
        ready = job.ready
        for key in job.keys:
            if key in ready:
                continue
            self._promoting.pop(key, None)
            if key in failed:
                primary.release(key)
            else:
                loaded.append(key)
        self._promoted(job, loaded, hold=True)
        key_slot = primary.key_slot
        # Loadable since they landed (``ready``: reported before the job ended): kept until a
        # schedule pass has seen them, then evictable.
        self._hold_landed([key_slot[k] for k in itertools.chain(loaded, ready)])
        c = self.counters
        c["promotion_failures"] += len(failed)
        c["promotion_steps_total"] += (self._step - job.step) * len(failed)
        c["promotion_seconds_total"] += (time.monotonic() - job.submitted) * len(failed)

    def _promoted_early(self, job_id: int, keys: list[bytes]) -> None:
        """Keys of a promotion still in flight that its tier has loaded and verified already."""
        job = self._jobs.get(job_id)
        if job is None or job.kind != "promote":
            return
        loaded = [k for k in keys if k not in job.ready and self._promoting.pop(k, None) is not None]
        job.ready.update(loaded)
        self._promoted(job, loaded, hold=True)

    def _promoted(self, job: _Job, loaded: list[bytes], hold: bool = False) -> None:
        """Promoted keys whose bytes are in their slots: loadable from now on (``hold``: not
        evictable before their job ends, so that a request's leading blocks, loadable early, are
        not evicted while the rest of its promotion runs)."""
        if not loaded:
            return
        self.primary.mark_ready_many(loaded, hold=hold)
        c = self.counters
        c["promoted_blocks"] += len(loaded)
        c["promotion_steps_total"] += (self._step - job.step) * len(loaded)
        c["promotion_seconds_total"] += (time.monotonic() - job.submitted) * len(loaded)
        self._events.append(OffloadingEvent(loaded, PRIMARY_MEDIUM, False))
        self._queue_cascade(loaded, source_tier=job.tier)

    def _release_cascade(self, ti: int, slots: list[int]) -> None:
        decref = self.primary.decref
        for s in slots:
            decref(s)
        self._pressure[ti].release(len(slots))

    def _evicted(self, keys: list[bytes]) -> None:
        if keys:
            self.counters["evicted_blocks"] += len(keys)
            self._events.append(OffloadingEvent(list(keys), PRIMARY_MEDIUM, True))

    def on_request_finished(self, ctx: ReqContext) -> None:
        self._waiting_since.pop(ctx.req_id, None)

    # -- housekeeping ----------------------------------------------------------------------
    def has_pending_work(self) -> bool:
        if self._jobs or self._landed or self._units:
            return True
        if any(b.keys for b in self._promote_batches) or any(b.keys for b in self._cascade_batches):
            return True
        if any(b.keys for b in self._writeback_batches):
            return True
        return any(t.has_pending_work() for t in self.tiers)

    def take_events(self) -> Iterable[OffloadingEvent]:
        ev, self._events = self._events, []
        return ev

    def get_stats(self) -> dict[str, Any]:
        return manager_stats(self)

    def reset_cache(self) -> None:
        self._release_promises()
        self._settle_units(everything=True)
        self._release_landed(everything=True)
        primary = self.primary
        dropped = [k for k in list(primary.key_slot) if primary.drop(k)]
        if self._wb is not None:
            for k in dropped:
                self._wb.forget(k)
        if dropped:
            self._events.append(OffloadingEvent(dropped, PRIMARY_MEDIUM, True))

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for tier in self.tiers:
            try:
                tier.shutdown()
            except Exception:
                log.exception("tier %s raised from shutdown", tier.name)
        self._jobs.clear()
        self._region = np.empty((0, 0), dtype=np.uint8)
        if self._on_shutdown is not None:
            self._on_shutdown()

    def primary_blocks(self) -> np.ndarray:
        return self._region

    def _block_bytes(self) -> int:
        """Bytes of one CPU-tier block (0 once the region is let go at shutdown)."""
        return int(self._region.shape[1]) if self._region.ndim == 2 else 0


def _cpu_wait_share(job: _Job) -> float | None:
    """The share of a store job's time (submission to now) during which tasks waited for a CPU."""
    if job.stall is None:
        return None
    now = cpu_stall_seconds()
    wall = time.monotonic() - job.submitted
    if now is None or wall <= 0:
        return None
    return (now - job.stall) / wall
