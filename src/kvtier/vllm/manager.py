"""Scheduler side: vLLM's ``OffloadingManager`` over kvtier's ``TieringManager``.

vLLM asks ``lookup`` one key at a time, in prefix order, and stops at the first MISS. The adapter
answers from a per-request verdict: the first key a request asks about in a step runs kvtier's
batched lookup over the request's keys from there on (keys are recovered in order from the
end-token positions vLLM records in ``ReqContext``); every later key of that step is answered
from the verdict with one dict lookup. A verdict of "ask again" (a promotion or tier query in
flight) answers RETRY for the first key and MISS after it, which defers the request without
scanning the rest of its prefix.

Hybrid models have several KV cache groups; vLLM's keys end with the group index. A
full-attention group is looked up as above, one verdict per group. A windowed group
(sliding-window, chunked-local or Mamba layers: vLLM only needs the last few chunks before the
hit boundary) is scanned by vLLM from the right, key by key, until it finds a full window; the
adapter answers each key from the primary tier and promotes from secondary tiers only the
first few available keys of each scan (the window vLLM can use, plus slack), so a request
never pulls a whole prefix of a windowed group up from storage.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import kvtier
from kvtier.manager.primary import READY
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


@dataclass(frozen=True)
class GroupGeometry:
    """One offloaded KV cache group as the lookup sees it."""

    group_id: int  # vLLM's group index: the last 4 bytes of the group's keys
    tokens_per_chunk: int  # tokens of one offloaded block of this group
    window_chunks: int | None  # None: full attention; else the chunks vLLM loads at most

    @property
    def promote_limit(self) -> int:
        """Available keys per right-to-left scan worth promoting: the window plus slack."""
        # vLLM may need one chunk more for a partial rightmost chunk, and one for EAGLE.
        return (self.window_chunks or 0) + 2


class _GroupState:
    """One group's lookup state for one request."""

    __slots__ = ("keys", "step", "lo", "last_pos", "streak")

    def __init__(self) -> None:
        self.keys: list[bytes] = []  # the group's keys in prefix order
        self.step = -1  # the step of the verdict (or of the windowed scan)
        self.lo = 0  # end-token position of the verdict's first key
        self.last_pos = 0  # windowed: position of the key asked last this step
        self.streak = 0  # windowed: available keys in a row in this scan


class _ReqState:
    """Per-request scratch: the request's keys in prefix order and this step's verdict."""

    __slots__ = ("ctx", "keys", "step", "lo", "answers", "sources", "groups", "npos")

    def __init__(self, ctx: kvtier.ReqContext, num_groups: int) -> None:
        self.ctx = ctx
        self.keys: list[bytes] = []  # the request's keys in prefix order (one group)
        self.step = -1  # the step of the verdict
        self.lo = 0  # end-token position of the verdict's first key
        # This step's answers: the leading run (HIT) and the key after it (MISS), or RETRY
        # for the first key when kvtier asks to come back; None between steps.
        self.answers: dict[bytes, LookupResult] | None = None
        self.sources: dict[bytes, CacheHitSource] = {}  # keys promoted for this request
        # Several groups: per-group state, and how many key positions they were built from.
        self.groups = [_GroupState() for _ in range(num_groups)] if num_groups > 1 else None
        self.npos = -1


class KVTierManager(OffloadingManager):
    """vLLM's ``OffloadingManager`` over kvtier's ``TieringManager``."""

    def __init__(self, manager: TieringManager, groups: Sequence[GroupGeometry]) -> None:
        if not groups:
            raise ValueError("at least one KV cache group")
        self.kv = manager
        self.groups = tuple(groups)
        self.tokens_per_chunk = groups[0].tokens_per_chunk
        # Several groups, or one windowed group: keys are routed by their group suffix.
        self._multi = len(groups) > 1 or groups[0].window_chunks is not None
        # Groups that chunk tokens alike, at least one of full attention: a request's hit and
        # its promotion are decided for all groups at once (``TieringManager.lookup_groups``).
        self._unit = (len(groups) > 1
                      and len({g.tokens_per_chunk for g in groups}) == 1
                      and any(g.window_chunks is None for g in groups))
        self._group_of = {
            g.group_id.to_bytes(4, "big", signed=False): i for i, g in enumerate(groups)
        }
        self._step = 0
        self._last_counters: dict[str, float] = {}
        self.partial_stores = 0  # stores cut to the longest prefix that fits
        self.cut_store_keys = 0  # keys those cuts left out (vLLM does not offer them again)
        self.refused_stores = 0  # stores answered None: not one chunk fits
        self._live: list[_ReqState] = []  # states holding this step's answers
        self._fast_lookup = self._make_fast_lookup()
        # vLLM calls ``manager.lookup`` once per key: the instance attribute skips the method.
        self.lookup = self._fast_lookup  # type: ignore[method-assign]

    # -- request lifecycle ---------------------------------------------------------------
    def _state(self, req_context: ReqContext) -> _ReqState:
        st = req_context.get_state(_ReqState)
        if st is None:
            st = _ReqState(
                kvtier.ReqContext(req_context.req_id, req_context.kv_transfer_params),
                len(self.groups) if self._multi else 1,
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
        if self._multi:
            return self._lookup_group(key, req_context)
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

    # -- several groups -----------------------------------------------------------------------
    def _lookup_group(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        """A key of a model with several groups (or one windowed group)."""
        gi = self._group_of.get(key[-4:])
        pos = req_context._offload_key_positions.get(key)
        if gi is None or pos is None:
            return self._lookup_one(key, req_context)
        geo = self.groups[gi]
        tpc = geo.tokens_per_chunk
        if pos % tpc:  # a partial-tail key (Mamba "align" boundaries): on its own
            return self._lookup_one(key, req_context)
        st = self._state(req_context)
        assert st.groups is not None
        gst = st.groups[gi]
        if self._unit:
            return self._lookup_unit(st, gi, key, pos, req_context)
        if geo.window_chunks is not None:
            return self._lookup_windowed(st, gst, geo, key, pos)
        if st.answers is not None and gst.step == self._step and pos >= gst.lo:
            return MISS  # after the group's verdict's first non-HIT key
        keys = self._group_keys(st, gi, req_context)
        base = pos // tpc - 1
        if base >= len(keys) or keys[base] != key:
            return self._lookup_one(key, req_context)
        run = self.kv.lookup(keys[base:] if base else keys, st.ctx)
        if run is None:  # defer: RETRY for the first key, MISS after it
            answers = {keys[base]: RETRY}
            self._note_sources(st, keys, base)
        else:
            answers = dict.fromkeys(keys[base : base + run], HIT)
            if base + run < len(keys):
                answers[keys[base + run]] = MISS
        if st.answers is None:
            st.answers = answers
            self._live.append(st)
        else:
            st.answers.update(answers)
        gst.step = self._step
        gst.lo = (base + 1) * tpc
        return answers.get(key, MISS)

    def _lookup_unit(
        self, st: _ReqState, gi: int, key: OffloadKey, pos: int, req_context: ReqContext
    ) -> LookupResult:
        """A key this step's all-groups verdict does not list: a new verdict, or MISS.

        vLLM looks the full-attention groups up first, from the first chunk not on the GPU,
        then the windowed ones from the hit boundary leftwards; the first full-group key asked
        in a step runs ``lookup_groups`` over every group from that chunk on, and the answers
        of every group's keys follow from it: the full groups HIT up to the boundary, the
        windowed groups HIT in the window before it, MISS elsewhere; RETRY for every key
        while the request's promotion is in flight (vLLM then defers the request).
        """
        assert st.groups is not None
        geo = self.groups[gi]
        tpc = geo.tokens_per_chunk
        if st.answers is not None and st.step == self._step:
            return MISS  # the verdict covers this step: past its keys
        if geo.window_chunks is not None:
            return MISS  # a windowed key asked before any full group's: no verdict to use
        keys = self._group_keys(st, gi, req_context)
        base = pos // tpc - 1
        if base >= len(keys) or keys[base] != key:
            return self._lookup_one(key, req_context)
        all_keys = [gs.keys for gs in st.groups]
        n = min(len(k) for k in all_keys)
        windows = [g.window_chunks for g in self.groups]
        r = self.kv.lookup_groups(
            [(k[base:n], w) for k, w in zip(all_keys, windows)], st.ctx)
        answers: dict[bytes, LookupResult] = {}
        for k, w in zip(all_keys, windows):
            if r is None:
                self._note_sources(st, k, base)
                answers.update(dict.fromkeys(k[base:n], RETRY))
                continue
            answers.update(dict.fromkeys(k[base:], MISS))
            if w is None:
                answers.update(dict.fromkeys(k[base:base + r], HIT))
                continue
            # The window before the boundary is resident (and pinned this step); a key left
            # of it that is resident too is a HIT as well, in case vLLM wants one chunk more.
            ready = self.kv.primary.is_ready
            for j in range(base, base + r):
                if j >= base + r - w or ready(k[j]):
                    answers[k[j]] = HIT
        if st.answers is None:
            self._live.append(st)
        st.answers = answers
        st.step = self._step
        return answers.get(key, MISS)

    def _lookup_windowed(
        self, st: _ReqState, gst: _GroupState, geo: GroupGeometry, key: bytes, pos: int
    ) -> LookupResult:
        """One key of a windowed group; vLLM scans these right to left."""
        if gst.step != self._step or pos >= gst.last_pos:  # a new scan begins
            gst.step = self._step
            gst.streak = 0
        gst.last_pos = pos
        kv = self.kv
        if gst.streak >= geo.promote_limit and not kv.primary.is_ready(key):
            return MISS  # a usable window lies to the right: promote nothing more this scan
        run = kv.lookup([key], st.ctx)
        if run is None:
            self._note_sources(st, [key], 0)
            gst.streak += 1
            return RETRY
        if run:
            gst.streak += 1
            return HIT
        if gst.streak < geo.promote_limit:
            gst.streak = 0
        return MISS

    def _group_keys(self, st: _ReqState, gi: int, req_context: ReqContext) -> list[bytes]:
        """Group ``gi``'s keys in prefix order (rebuilt when vLLM recorded new positions)."""
        positions = req_context._offload_key_positions
        assert st.groups is not None
        if st.npos != len(positions):
            per_group: list[list[tuple[int, bytes]]] = [[] for _ in self.groups]
            group_of = self._group_of
            for k, p in positions.items():
                i = group_of.get(k[-4:])
                if i is not None and p % self.groups[i].tokens_per_chunk == 0:
                    per_group[i].append((p, k))
            for gst, items in zip(st.groups, per_group):
                if any(items[j][0] >= items[j + 1][0] for j in range(len(items) - 1)):
                    items.sort()
                gst.keys = [k for _, k in items]
            st.npos = len(positions)
        return st.groups[gi].keys

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
        """Reserve slots for the keys not in the primary tier; when not all fit, a cut of them.

        vLLM retries a refused store at its next step with the chunks computed since added, so
        an all-or-nothing answer under pressure grows the batch until the request ends and
        every chunk of it is lost. When not every key fits, the adapter stores the longest
        prefix that does (see ``_fitting_cut``): what later requests can load. vLLM records
        the keys left out as done and does not offer them again. None: not one chunk fits.
        """
        ctx = self._state(req_context).ctx
        batch: list[bytes] = list(keys)
        out = self.kv.prepare_store(batch, ctx)
        if out is None:
            part = self._fitting_cut(batch, req_context)
            if part:
                out = self.kv.prepare_store(part, ctx)
                if out is not None:
                    self.partial_stores += 1
                    self.cut_store_keys += len(batch) - len(part)
        if out is None:
            self.refused_stores += 1
            return None
        return PrepareStoreOutput(
            keys_to_store=list(out.keys_to_store),  # type: ignore[arg-type]
            store_spec=KVTierLoadStoreSpec(out.store_spec.block_ids),  # type: ignore[arg-type]
            evicted_keys=list(out.evicted_keys),  # type: ignore[arg-type]
        )

    def _fitting_cut(self, keys: list[bytes], req_context: ReqContext) -> list[bytes]:
        """The keys of the longest prefix whose new slots can be had now; [] if none or all.

        The cut is a token position P, the largest for which the keys it keeps fit: every
        full-attention group keeps its keys ending at or before P (the prefix), and every
        windowed group (sliding window, Mamba) only its keys ending in the last window before P
        plus one chunk (what vLLM loads from it for a hit at P; keys past P serve no hit
        without the full groups' keys, and keys further left none that the window at P does
        not serve better). A key costs a slot unless it is already resident and held.
        Returned in the caller's order: vLLM pairs the slots with its engine blocks in that
        order (group after group).
        """
        primary = self.kv.primary
        key_slot, state, ref = primary.key_slot, primary.state, primary.ref
        room = len(primary.free) + primary.evictable
        positions = req_context._offload_key_positions
        group_of = self._group_of if self._multi else None
        groups = self.groups
        # Per group: end-token positions of its keys (all, and the ones that cost a slot).
        pos_all: list[list[int]] = [[] for _ in groups]
        pos_cost: list[list[int]] = [[] for _ in groups]
        fixed_cost = 0  # keys without a known position or group: kept whatever the cut
        for key in keys:
            s = key_slot.get(key)
            costs = s is None or (state[s] == READY and ref[s] == 0)
            gi = 0 if group_of is None else group_of.get(key[-4:])
            pos = positions.get(key)  # type: ignore[call-overload]
            if gi is None or pos is None:
                fixed_cost += costs
                continue
            pos_all[gi].append(pos)
            if costs:
                pos_cost[gi].append(pos)
        spans = [
            None if g.window_chunks is None else (g.window_chunks + 1) * g.tokens_per_chunk
            for g in groups
        ]
        for lst in (*pos_all, *pos_cost):
            lst.sort()

        def kept(lst: list[int], span: int | None, cut: int) -> int:
            hi = bisect_right(lst, cut)
            return hi if span is None else hi - bisect_right(lst, cut - span)

        # A cut is worth storing only where every windowed group offers its whole window (the
        # chunks before the window were freed on the GPU and are not offered again): a cut at
        # a position whose window misses a chunk stores blocks no hit can ever use.
        offered = [set(lst) for lst in pos_all]

        def whole_windows(cut: int) -> bool:
            for g, have in zip(groups, offered):
                w, tpc = g.window_chunks, g.tokens_per_chunk
                if w is not None and any(
                    cut - j * tpc not in have for j in range(w) if cut - j * tpc > 0
                ):
                    return False
            return True

        best = None
        for cut in sorted({p for lst in pos_all for p in lst}, reverse=True):
            if len(groups) > 1 and not whole_windows(cut):
                continue
            cost = fixed_cost + sum(kept(lst, span, cut) for lst, span in zip(pos_cost, spans))
            if cost <= room:
                best = cut
                break
        if best is None:
            return []
        out: list[bytes] = []
        for key in keys:
            gi = 0 if group_of is None else group_of.get(key[-4:])
            pos = positions.get(key)  # type: ignore[call-overload]
            if gi is None or pos is None:
                out.append(key)
                continue
            span = spans[gi]
            if pos <= best and (span is None or pos > best - span):
                out.append(key)
        return out if len(out) < len(keys) else []  # all of it: the batch that did not fit

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
        """kvtier's own counters per tier (``TieringManager.get_stats``) and the adapter's."""
        stats = self.kv.get_stats()
        stats["vllm"] = {
            "partial_stores": self.partial_stores,
            "cut_store_keys": self.cut_store_keys,
            "refused_stores": self.refused_stores,
        }
        return stats

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
