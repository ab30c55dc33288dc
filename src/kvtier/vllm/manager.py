"""Scheduler side: vLLM's ``OffloadingManager`` over kvtier's ``TieringManager``.

vLLM asks ``lookup`` one key at a time, in prefix order, and stops at the first MISS. The adapter
answers from a per-request verdict: the first key a request asks about in a step runs kvtier's
batched lookup over the request's keys from there on (keys are recovered in order from the
end-token positions vLLM records in ``ReqContext``); every later key of that step is answered
from the verdict with one dict lookup. A verdict of "ask again" (a promotion or tier query in
flight) answers RETRY for the first key and MISS after it, which defers the request without
scanning the rest of its prefix.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import kvtier
from kvtier.manager.tiering import TieringManager
from kvtier.vllm._base import (
    HIT,
    MISS,
    RETRY,
    CacheHitSource,
    KVTierLoadStoreSpec,
    LookupResult,
    OffloadingConnectorStats,
    OffloadingEvent,
    OffloadingManager,
    OffloadKey,
    PrepareStoreOutput,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
)
from kvtier.vllm.events import hit_source, stats_since, to_vllm_events


class _ReqState:
    """Per-request scratch: the request's keys in prefix order and this step's verdict."""

    __slots__ = ("ctx", "keys", "step", "lo", "answers", "sources")

    def __init__(self, ctx: kvtier.ReqContext) -> None:
        self.ctx = ctx
        self.keys: list[bytes] = []  # the request's keys in prefix order
        self.step = -1  # the step of the verdict
        self.lo = 0  # end-token position of the verdict's first key
        # This step's answers: the leading run (HIT) and the key after it (MISS), or RETRY
        # for the first key when kvtier asks to come back; None between steps.
        self.answers: dict[bytes, LookupResult] | None = None
        self.sources: dict[bytes, CacheHitSource] = {}  # keys promoted for this request


class KVTierManager(OffloadingManager):
    """vLLM's ``OffloadingManager`` over kvtier's ``TieringManager``."""

    def __init__(self, manager: TieringManager, tokens_per_chunk: int) -> None:
        self.kv = manager
        self.tokens_per_chunk = tokens_per_chunk
        self._step = 0
        self._last_counters: dict[str, float] = {}
        self._live: list[_ReqState] = []  # states holding this step's answers
        self._fast_lookup = self._make_fast_lookup()
        # vLLM calls ``manager.lookup`` once per key: the instance attribute skips the method.
        self.lookup = self._fast_lookup  # type: ignore[method-assign]

    # -- request lifecycle ---------------------------------------------------------------
    def _state(self, req_context: ReqContext) -> _ReqState:
        st = req_context.get_state(_ReqState)
        if st is None:
            st = _ReqState(
                kvtier.ReqContext(req_context.req_id, req_context.kv_transfer_params)
            )
            req_context.set_state(st)
        return st

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        """Attach kvtier's per-request state."""
        st = self._state(req_context)
        self.kv.on_new_request(st.ctx)
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        """Forward to kvtier."""
        self.kv.on_request_finished(self._state(req_context).ctx)

    # -- lookup ------------------------------------------------------------------------------
    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        """One key's answer, from the request's per-step prefix verdict."""
        return self._fast_lookup(key, req_context)

    def _make_fast_lookup(self) -> Any:
        """The per-key answer as a closure (the connector calls it once per key)."""
        slow = self._lookup_slow
        state_type = _ReqState

        def lookup(key: OffloadKey, req_context: ReqContext) -> LookupResult:
            try:  # this step's verdict answers the key: two dict lookups
                return req_context._state[state_type].answers[key]
            except (KeyError, TypeError):
                return slow(key, req_context)

        return lookup

    def _lookup_slow(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        """A key this step's verdict does not list: past the run, or a new verdict."""
        pos = req_context._offload_key_positions.get(key)
        if pos is None or pos % self.tokens_per_chunk:
            return self._lookup_one(key, req_context)
        st = self._state(req_context)
        if st.answers is not None and st.step == self._step and pos >= st.lo:
            return MISS  # after the verdict's first non-HIT key
        self._verdict(st, req_context, pos // self.tokens_per_chunk - 1)
        assert st.answers is not None
        return st.answers.get(key, MISS)

    def _verdict(self, st: _ReqState, req_context: ReqContext, base: int) -> None:
        """Run kvtier's batched lookup over the request's keys from ``base`` on."""
        keys = st.keys
        positions = req_context._offload_key_positions
        tpc = self.tokens_per_chunk
        if len(keys) != len(positions):
            if positions[next(reversed(positions))] == len(positions) * tpc:
                keys[:] = positions  # one group, keys recorded in prefix order
            else:
                keys[:] = [k for p, k in sorted((p, k) for k, p in positions.items())
                           if p % tpc == 0]
        run = self.kv.lookup(keys[base:] if base else keys, st.ctx)
        if run is None:  # defer: RETRY for the first key, MISS after it
            answers = {keys[base]: RETRY}
            self._note_sources(st, keys, base)
        else:
            answers = dict.fromkeys(keys[base : base + run], HIT)
            if base + run < len(keys):
                answers[keys[base + run]] = MISS
        if st.answers is None:
            self._live.append(st)
        st.answers = answers
        st.step = self._step
        st.lo = (base + 1) * tpc  # end-token position of the verdict's first key

    def _note_sources(self, st: _ReqState, keys: list[bytes], base: int) -> None:
        """Remember which tier each of the request's keys is being promoted from."""
        promoting = self.kv._promoting
        if not promoting:
            return
        tiers = self.kv.tiers
        for key in keys[base:]:
            ti = promoting.get(key)
            if ti is not None:
                st.sources[key] = hit_source(tiers[ti].medium)

    def get_load_source(self, key: OffloadKey, req_context: ReqContext) -> CacheHitSource:
        """Where a loaded key came from: the CPU tier, or the tier it was promoted from."""
        st = req_context.get_state(_ReqState)
        if st is None:
            return CacheHitSource.HOST
        return st.sources.get(key, CacheHitSource.HOST)

    def _lookup_one(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        r = self.kv.lookup([key], self._state(req_context).ctx)
        if r is None:
            return LookupResult.RETRY
        return LookupResult.HIT if r else LookupResult.MISS

    # -- loads and stores -------------------------------------------------------------------
    def prepare_load(
        self, keys: Collection[OffloadKey], req_context: ReqContext
    ) -> KVTierLoadStoreSpec:
        """Pin the keys in the primary tier; their slots."""
        spec = self.kv.prepare_load(list(keys), self._state(req_context).ctx)
        return KVTierLoadStoreSpec(spec.block_ids)  # type: ignore[arg-type]

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        """Unpin the keys."""
        self.kv.complete_load(list(keys), self._state(req_context).ctx)

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        """Recency hint."""
        self.kv.touch(list(keys), self._state(req_context).ctx)

    def prepare_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext
    ) -> PrepareStoreOutput | None:
        """Reserve slots for the keys not in the primary tier (None: no room now)."""
        out = self.kv.prepare_store(list(keys), self._state(req_context).ctx)
        if out is None:
            return None
        return PrepareStoreOutput(
            keys_to_store=list(out.keys_to_store),  # type: ignore[arg-type]
            store_spec=KVTierLoadStoreSpec(out.store_spec.block_ids),  # type: ignore[arg-type]
            evicted_keys=list(out.evicted_keys),  # type: ignore[arg-type]
        )

    def complete_store(
        self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True
    ) -> None:
        """The keys' bytes are in their slots (or the store failed)."""
        self.kv.complete_store(list(keys), self._state(req_context).ctx, success)

    # -- the step and housekeeping ------------------------------------------------------------
    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        """End of a step: verdicts expire; kvtier collects and submits tier jobs."""
        self._step += 1
        self._drop_verdicts()
        self.kv.on_schedule_end()

    def has_pending_work(self) -> bool:
        """Tier jobs in flight."""
        return self.kv.has_pending_work()

    def take_events(self) -> Iterable[OffloadingEvent]:
        """kvtier's events with vLLM's medium and locality."""
        return to_vllm_events(self.kv.take_events())

    def get_stats(self) -> OffloadingConnectorStats | None:
        """Counter increments since the last call and the primary tier's usage."""
        primary = self.kv.primary
        usage = len(primary.key_slot) / primary.num_slots if primary.num_slots else 0.0
        return stats_since(self.kv.counters, self._last_counters, usage)

    def kvtier_stats(self) -> dict[str, Any]:
        """kvtier's own counters per tier (the dict of ``TieringManager.get_stats``)."""
        return self.kv.get_stats()

    def _drop_verdicts(self) -> None:
        for st in self._live:
            st.answers = None
        self._live.clear()

    def reset_cache(self) -> None:
        """Drop the primary tier (persistent tiers keep their data) and this step's verdicts."""
        self._drop_verdicts()
        self.kv.reset_cache()

    def shutdown(self) -> None:
        """Stop tiers and release the primary region; idempotent."""
        self.kv.shutdown()
