"""Write policies per secondary tier: when a block the CPU tier holds is written to a tier below.

``through``: when the block becomes resident in the CPU tier (stored by the engine, or promoted
from a tier further down). ``back``: when the CPU tier evicts it. An evicted block that a
write-back tier still needs is *retained*: it keeps its primary slot, READY (so lookups still
find it and loads still read it) and pinned, until every such tier has finished writing it;
only then is the slot freed. A failed write returns the block to the CPU tier (still owed to
that tier), so a block the manager acknowledged is never in no tier while an engine may ask for
it. While a tier is down (``available`` is false when its batch is due) its victims are let go
unwritten and counted, as write-through stores to a down tier are: the engine never waits on a
tier that cannot take writes. Victims waiting for a tier count against its backpressure bound
(``max_pinned_share``; past it they go unwritten), and an allocation stops waiting for them once
a write-back job has been in flight for ``WRITEBACK_WAIT_S``, so a stalled tier never stalls the
engine's stores. The manager moves blocks through primary slots only, so for every tier "the
tier above" is the CPU tier.

The cascade policy still decides *which* tiers a block goes to; the write policy decides *when*;
a tier's admission policy (``kvtier.policies.admission``) decides, at that moment, whether the
block is worth the write at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.manager.backpressure import TierBackpressure
    from kvtier.manager.cascade import CascadePolicy
    from kvtier.manager.primary import PrimaryTier
    from kvtier.policies.admission import AdmissionPolicy
    from kvtier.tiers.base import SecondaryTier

@dataclass
class WriteBackState:
    """Which resident blocks each write-back tier is still owed, and which victims wait."""

    back_mask: int  # bit ti set: tier ti writes back
    owed: dict[bytes, int] = field(default_factory=dict)  # key -> bits of tiers still owed it
    waiting: dict[bytes, int] = field(default_factory=dict)  # retained key -> writes in flight
    retiring: list[bytes] = field(default_factory=list)  # retained since the last drain

    def owe(self, keys: Sequence[bytes], bit: int) -> None:
        """``keys`` (resident in the CPU tier) must reach the tier of ``bit`` before eviction."""
        owed = self.owed
        for k in keys:
            owed[k] = owed.get(k, 0) | bit

    def settle(self, key: bytes, bit: int) -> None:
        """The tier of ``bit`` has ``key`` now (or declined it)."""
        b = self.owed.get(key)
        if b is None:
            return
        b &= ~bit
        if b:
            self.owed[key] = b
        else:
            del self.owed[key]

    def forget(self, key: bytes) -> None:
        """``key`` left the CPU tier without being written (reset)."""
        self.owed.pop(key, None)
        self.waiting.pop(key, None)


class WriteBackMixin:
    """The manager's write-back steps (mixed into :class:`TieringManager`, which provides the
    attributes named below)."""

    primary: PrimaryTier
    tiers: list[SecondaryTier]
    counters: dict[str, float]
    cascade_policy: CascadePolicy
    admissions: list[AdmissionPolicy | None]
    write_policies: list[str]
    _wb: WriteBackState | None
    _writeback_batches: list[Any]
    _retry_lookup: bool
    _jobs: dict[int, Any]
    #: how long allocations wait for a write-back job before taking more victims instead
    WRITEBACK_WAIT_S = 0.05
    _pressure: list[TierBackpressure]

    def _evicted(self, keys: list[bytes]) -> None: ...  # provided by the manager

    if TYPE_CHECKING:
        def _block_bytes(self) -> int: ...  # provided by the manager

    def _submit(self, kind: str, ti: int, tier: SecondaryTier, batch: Any) -> None: ...

    def _init_writeback(self, write_policies: Sequence[str] | None,
                        admissions: Sequence[AdmissionPolicy | None] | None,
                        batch: Callable[[], Any]) -> None:
        """Set up per-tier write policies, admission policies and write-back batches."""
        n = len(self.tiers)
        self._writeback_batches = [batch() for _ in range(n)]
        self.write_policies = list(write_policies or ["through"] * n)
        self.admissions = list(admissions or [None] * n)
        mask = sum(1 << i for i, wp in enumerate(self.write_policies) if wp == "back")
        self._wb = WriteBackState(mask) if mask else None
        self._retry_lookup = False

    def _submit_writebacks(self, ti: int, tier: SecondaryTier, batch: Callable[[], Any]) -> None:
        """End of step: hand tier ``ti`` the victims it is owed, or let them go if it is down."""
        wb = self._writeback_batches[ti]
        if not wb.keys:
            return
        self._writeback_batches[ti] = batch()
        if tier.available:
            self._submit("writeback", ti, tier, wb)
        else:  # a tier that is down takes no writes: let the victims go
            self._writeback_done(ti, wb.keys, frozenset(), skipped=True)

    def _admit(self, ti: int, keys: Sequence[bytes]) -> Sequence[bytes]:
        """The keys tier ``ti``'s admission policy finds worth writing."""
        adm = self.admissions[ti]
        if adm is None or not keys:
            return keys
        out = [k for k in keys if adm.admit(k)]
        self.counters["admission_declined_blocks"] += len(keys) - len(out)
        return out

    def _wait_for_writebacks(self) -> bool:
        """Whether an allocation may count on the victims waiting for their writes: not once a
        write-back job has been in flight for ``WRITEBACK_WAIT_S`` (the tier is behind; more
        victims are taken, and past the tier's backpressure bound they go unwritten)."""
        now = time.monotonic()
        for job in self._jobs.values():
            if job.kind == "writeback" and now - job.submitted > self.WRITEBACK_WAIT_S:
                return False
        return True

    def _retainer(self) -> Callable[[bytes], bool] | None:
        """The eviction callback for one allocation: keep a victim while a write-back tier
        (whose admission policy wants it, and whose backpressure bound has room) is owed it."""
        wb = self._wb
        if wb is None:
            return None
        owed, retiring, pressure = wb.owed, wb.retiring, self._pressure

        def retain(key: bytes) -> bool:
            bits = owed.pop(key, 0)
            if not bits:
                return False
            for ti in range(len(self.tiers)):
                if not bits & (1 << ti):
                    continue
                if not self._admit(ti, [key]):
                    bits &= ~(1 << ti)
                elif not pressure[ti].admit([key]):  # the tier is behind: let it go
                    bits &= ~(1 << ti)
                    self.counters["backpressure_dropped"] += 1
            if not bits:
                return False
            owed[key] = bits
            retiring.append(key)
            return True

        return retain

    def _start_writebacks(self) -> None:
        """Report what the last allocation evicted; queue the victims it retained for the
        write-back tiers owed them (written at the end of the step)."""
        primary = self.primary
        if primary.unreported:
            gone, primary.unreported = primary.unreported, []
            self._evicted(gone)
        wb = self._wb
        if wb is None or not wb.retiring:
            return
        key_slot = primary.key_slot
        retiring, wb.retiring = wb.retiring, []
        for key in retiring:
            owed = wb.owed.get(key, 0)
            n = 0
            for ti in range(len(self.tiers)):
                if owed & (1 << ti):
                    b = self._writeback_batches[ti]
                    b.keys.append(key)
                    b.slots.append(key_slot[key])
                    n += 1
            wb.waiting[key] = n

    def _retired(self, key: bytes) -> None:
        """A retained key's writes are all done: free its slot unless it is owed or in use."""
        wb = self._wb
        assert wb is not None
        wb.waiting.pop(key, None)
        if wb.owed.get(key):  # a write failed: the block stays in the CPU tier, still owed
            self.primary.readmit(key)
        elif self.primary.finish_retained(key):
            self._evicted([key])

    def _writeback_done(self, tier_index: int, keys: list[bytes], failed: frozenset[bytes],
                        *, skipped: bool = False, seconds: float = 0.0,
                        submitted: float | None = None,
                        cpu_wait: float | None = None) -> None:
        """A write-back job ended: settle what was written, give back what was not. ``skipped``:
        the tier was down when the job was due; its blocks are let go unwritten (the engine
        never waits on a tier that cannot take writes, as a write-through store to a down tier
        is dropped too)."""
        wb = self._wb
        assert wb is not None
        bit = 1 << tier_index
        bp = self._pressure[tier_index]
        bp.release(len(keys))
        if skipped:
            self.counters["writeback_skipped_blocks"] += len(keys)
        elif not failed and seconds > 0:
            bb = self._block_bytes()
            bp.observe(seconds, len(keys) * bb, submitted, cpu_wait)
        for key in keys:
            if skipped or key not in failed:
                wb.settle(key, bit)
            left = wb.waiting.get(key, 1) - 1
            if left > 0:
                wb.waiting[key] = left
            else:
                self._retired(key)
        if not skipped:
            self.counters["written_back_blocks"] += len(keys) - len(failed)
            self.counters["writeback_failures"] += len(failed)

    def _owe_again(self, tier: SecondaryTier, keys: Sequence[bytes]) -> None:
        """A write-back tier dropped blocks the CPU tier still holds: owe them to it again."""
        wb = self._wb
        if wb is None:
            return
        ti = self.tiers.index(tier)
        if not wb.back_mask & (1 << ti):
            return
        primary = self.primary
        resident = [k for k in keys if primary.is_ready(k) and k not in primary.retained]
        if resident:
            wb.owe(self.cascade_policy.select(resident, ti, tier), 1 << ti)
