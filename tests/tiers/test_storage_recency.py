"""Storage tier recency: a touch protects a block from eviction, and a load renews the recency
of the old blocks it reads (logged by a housekeeping task, one append a region), so that after a
restart they count among the most recent; renewals of rewritten slots are dropped, and those
still pending at shutdown are logged."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from helpers import block_bytes_for, make_key
from test_storage import BB, open_small_tier, run_job, tier_ctx

from kvtier.tiers.base import TierContext
from kvtier.tiers.storage import StorageTier


def test_touch_protects_a_block_from_eviction(tmp_path: Path, namespace: str) -> None:
    ctx = tier_ctx(namespace, slots=4)
    tier = StorageTier(ctx, path=str(tmp_path), capacity_bytes=StorageTier.capacity_for(4, BB),
                       n_read_threads=1, n_write_threads=1)
    try:
        keys = [make_key(i) for i in range(6)]
        cap = tier.stats()["max_blocks"]
        assert cap == 4
        for k in keys[:4]:
            assert run_job(tier, "store", [k], [0]).success
        tier.touch([keys[0]])
        assert run_job(tier, "store", [keys[4]], [0]).success
        assert tier.lookup([keys[0]]) == 1 and tier.lookup([keys[1]]) == 0
        assert [e.keys for e in tier.take_events() if e.removed] == [[keys[1]]]
    finally:
        tier.shutdown()


def test_recency_of_a_load_survives_a_restart(tmp_path: Path, namespace: str) -> None:
    ctx = tier_ctx(namespace, slots=4)

    def open_tier() -> StorageTier:
        return open_small_tier(tmp_path, ctx, 4)

    keys = [make_key(i) for i in range(6)]
    tier = open_tier()
    try:
        for k in keys[:4]:
            ctx.primary[0] = block_bytes_for(k, BB)
            assert run_job(tier, "store", [k], [0]).success
        assert run_job(tier, "load", [keys[3]], [1]).success  # young: nothing to persist
        tier.sync_now()  # renewals are logged by an I/O thread after the load: now
        assert tier.stats()["recency_refreshes"] == 0
        assert run_job(tier, "load", [keys[0]], [1]).success  # the oldest write, used again
        tier.sync_now()
        assert tier.stats()["recency_refreshes"] == 1
    finally:
        tier.shutdown()
    tier = open_tier()  # recency now comes from disk
    try:
        assert tier.lookup(keys[:4]) == 4
        ctx.primary[0] = block_bytes_for(keys[4], BB)
        assert run_job(tier, "store", [keys[4]], [0]).success
        assert [e.keys for e in tier.take_events() if e.removed] == [[keys[1]]]
        assert tier.lookup([keys[0]]) == 1
        assert run_job(tier, "load", [keys[0]], [2]).success
        assert np.array_equal(ctx.primary[2], block_bytes_for(keys[0], BB))
    finally:
        tier.shutdown()


def test_one_load_renews_the_recency_of_each_old_block_it_reads(tmp_path: Path,
                                                                 namespace: str) -> None:
    """A load of several old blocks logs a new sequence for each (in one append): after a
    restart they are the most recent, and the blocks not loaded are evicted first."""
    ctx = tier_ctx(namespace, slots=8)

    def open_tier() -> StorageTier:
        return open_small_tier(tmp_path, ctx, 8)

    keys = [make_key(i) for i in range(12)]
    tier = open_tier()
    try:
        assert tier.stats()["max_blocks"] == 8
        for k in keys[:8]:
            ctx.primary[0] = block_bytes_for(k, BB)
            assert run_job(tier, "store", [k], [0]).success
        assert run_job(tier, "load", keys[:4], [0, 1, 2, 3]).success  # the four oldest, one job
        tier.sync_now()
        assert tier.stats()["recency_refreshes"] == 4
    finally:
        tier.shutdown()
    tier = open_tier()  # recency now comes from the log
    try:
        for k in keys[8:]:
            ctx.primary[0] = block_bytes_for(k, BB)
            assert run_job(tier, "store", [k], [0]).success
        evicted = [k for e in tier.take_events() if e.removed for k in e.keys]
        assert evicted == keys[4:8]
        assert tier.lookup(keys[:4]) == 4
        assert run_job(tier, "load", keys[:4], [4, 5, 6, 7]).success
        for i, k in enumerate(keys[:4]):
            assert np.array_equal(ctx.primary[4 + i], block_bytes_for(k, BB))
    finally:
        tier.shutdown()


def _store_one_by_one(tier: StorageTier, ctx: TierContext, keys: Sequence[bytes]) -> None:
    """Store ``keys`` one job each, in order (each through primary slot 0)."""
    for k in keys:
        ctx.primary[0] = block_bytes_for(k, BB)
        assert run_job(tier, "store", [k], [0]).success


def _held_renewals(tier: StorageTier) -> list[str]:
    """Keep the tier's housekeeping tasks from being queued (so load renewals stay pending);
    the kinds asked for."""
    asked: list[str] = []
    tier._io.housekeep = lambda kind, first=False: asked.append(kind)  # type: ignore[method-assign]
    return asked


def test_a_renewal_of_a_slot_rewritten_before_it_is_logged_is_dropped(tmp_path: Path,
                                                                      namespace: str) -> None:
    """A load's renewal logged after its slot took another block would name the old block in
    that slot again: it is left out, the log keeps the new block."""
    ctx = tier_ctx(namespace, slots=4)
    keys = [make_key(i) for i in range(8)]
    tier = open_small_tier(tmp_path, ctx, 4)
    try:
        _store_one_by_one(tier, ctx, keys[:4])
        asked = _held_renewals(tier)
        assert run_job(tier, "load", [keys[0]], [1]).success  # old: a renewal, not yet logged
        assert asked == ["renew"] and tier.stats()["recency_refreshes"] == 0
        _store_one_by_one(tier, ctx, keys[4:])  # every slot rewritten, keys[0]'s too
        assert tier.lookup([keys[0]]) == 0
        tier.sync_now()
        assert tier.stats()["recency_refreshes"] == 0
    finally:
        tier.shutdown()
    tier = open_small_tier(tmp_path, ctx, 4)
    try:
        assert tier.lookup([keys[0]]) == 0 and tier.lookup(keys[4:]) == 4
        assert run_job(tier, "load", keys[4:], [0, 1, 2, 3]).success
        for i, k in enumerate(keys[4:]):
            assert np.array_equal(ctx.primary[i], block_bytes_for(k, BB))
        assert tier.stats()["corrupt"] == 0
    finally:
        tier.shutdown()


def test_shutdown_logs_the_renewals_still_pending(tmp_path: Path, namespace: str) -> None:
    ctx = tier_ctx(namespace, slots=4)
    keys = [make_key(i) for i in range(5)]
    tier = open_small_tier(tmp_path, ctx, 4)
    try:
        _store_one_by_one(tier, ctx, keys[:4])
        _held_renewals(tier)
        assert run_job(tier, "load", [keys[0]], [1]).success
        assert tier.stats()["recency_refreshes"] == 0
    finally:
        tier.shutdown()
    assert tier.stats()["recency_refreshes"] == 1
    tier = open_small_tier(tmp_path, ctx, 4)
    try:  # keys[0] is now the newest but for none: keys[1] goes first
        ctx.primary[0] = block_bytes_for(keys[4], BB)
        assert run_job(tier, "store", [keys[4]], [0]).success
        assert [e.keys for e in tier.take_events() if e.removed] == [[keys[1]]]
    finally:
        tier.shutdown()


# -- invariants --------------------------------------------------------------------------------
