"""The storage index hands out a store job's slots in one pass (``alloc_many``) exactly as one
``alloc`` a slot would, in any state of its regions (free slots, some beyond a shrunk limit,
never used ones, stripes, releasing regions) and of its own blocks (pinned ones, an eviction
policy or none); and a store job refreshes the blocks it already holds before it takes slots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from helpers import block_bytes_for, make_key
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_storage import run_job, tier_ctx

from kvtier.policies import ARCPolicy
from kvtier.tiers.storage import StorageTier
from kvtier.tiers.storage.index import STRIPE, BlockIndex, OwnedRegion
from kvtier.tiers.storage.layout import Geometry


def _build(spec: dict[str, Any]) -> BlockIndex:
    """An index in the state ``spec`` describes (built anew for each side of a comparison)."""
    spr, n_regions = spec["spr"], len(spec["regions"])
    geo = Geometry(block_bytes=4096, slot_size=8192, slots_per_region=spr, regions=n_regions,
                   last_slots=spr, capacity_bytes=n_regions * spr * 8192)
    policy = ARCPolicy(n_regions * spr) if spec["arc"] else None
    index = BlockIndex(geo, engine_id=1, policy=policy)
    for r, reg in enumerate(spec["regions"]):
        index.regions[r] = OwnedRegion(r, spr, reg["fresh"], reg["limit"], None,  # type: ignore[arg-type]
                                       free=[r * spr + i for i in reg["free"]],
                                       releasing=reg["releasing"])
    for i, (s, pinned) in enumerate(spec["own"]):
        k = b"key-%d" % i
        index.own[k] = s
        index.slots[s] = (k, i)
        if pinned:
            index.pins[s] = 1
    for s in spec["named"]:  # named by the log, not served (a dropped or remote record)
        index.slots.setdefault(s, (b"other-%d" % s, 0))
    if spec["stripe"] is not None:
        index._stripe = index.regions[spec["stripe"]]
        index._stripe_left = spec["stripe_left"]
    return index


@st.composite
def _states(draw: st.DrawFn) -> dict[str, Any]:
    spr = draw(st.integers(2, 24))
    regions = []
    used: list[int] = []  # global slots handed out before and not free
    for r in range(draw(st.integers(1, 4))):
        fresh = draw(st.integers(0, spr))
        limit = draw(st.integers(0, spr))
        below = list(range(fresh))
        free = draw(st.lists(st.sampled_from(below), unique=True)) if below else []
        regions.append({"fresh": fresh, "limit": limit, "free": free,
                        "releasing": draw(st.booleans()) and draw(st.booleans())})
        used += [r * spr + i for i in below if i not in free]
    own = draw(st.lists(st.tuples(st.sampled_from(used), st.booleans()), unique_by=lambda t: t[0])
               ) if used else []
    named = draw(st.lists(st.integers(0, len(regions) * spr - 1), max_size=6))
    stripe = draw(st.none() | st.integers(0, len(regions) - 1))
    return {"spr": spr, "regions": regions, "own": own, "named": named, "stripe": stripe,
            "stripe_left": draw(st.integers(0, STRIPE)), "arc": draw(st.booleans()),
            "n": draw(st.integers(1, len(regions) * spr + 4))}


def _alloc_one(index: BlockIndex, evicted: list[bytes]) -> tuple[int, bool] | None:
    """What a slot for a new record is, one at a time: a free slot (region by region; those
    beyond a region's limit dropped), else a never used one (from the current stripe), else an
    own block's that can go."""
    for r in index.regions.values():
        if r.releasing:
            continue
        while r.free:
            s = r.free.pop()
            if s - index.geo.base(r.region) < r.limit:
                return s, s in index.slots
    fr = index._fresh_region()
    if fr is not None:
        fr.fresh += 1
        index._stripe_left -= 1
        s = index.geo.base(fr.region) + fr.fresh - 1
        return s, s in index.slots
    return index._evict_one(evicted)


def _state_of(index: BlockIndex) -> tuple[Any, ...]:
    return (list(index.own.items()),
            [(r.fresh, list(r.free)) for r in index.regions.values()],
            None if index._stripe is None else index._stripe.region, index._stripe_left)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_states())
@example(spec={"spr": 4, "regions": [{"fresh": 4, "limit": 2, "free": [3, 1], "releasing": False},
                                    {"fresh": 1, "limit": 4, "free": [], "releasing": False}],
               "own": [(0, True), (2, False), (4, False)], "named": [3], "stripe": 0,
               "stripe_left": 0, "arc": False, "n": 7})
def test_alloc_many_hands_out_what_one_alloc_a_slot_would(spec: dict[str, Any]) -> None:
    one_by_one, batch, single = _build(spec), _build(spec), _build(spec)
    ev_one: list[bytes] = []
    want = []
    for _ in range(spec["n"]):
        got = _alloc_one(one_by_one, ev_one)
        if got is None:
            break
        want.append(got)
    ev_batch: list[bytes] = []
    assert batch.alloc_many(spec["n"], ev_batch) == want
    assert ev_batch == ev_one
    assert _state_of(batch) == _state_of(one_by_one)
    if one_by_one.policy is not None:
        assert list(batch.policy.keys()) == list(one_by_one.policy.keys())  # type: ignore[union-attr]
    ev_single: list[bytes] = []
    assert single.alloc(ev_single) == (want[0] if want else None)
    assert ev_single == ev_one[:len(ev_single)]


def test_a_store_job_refreshes_its_own_blocks_before_it_takes_slots(
        tmp_path: Path, namespace: str) -> None:
    """A full tier: a job that stores the oldest block again and a new one keeps the old block
    (refreshed first, not evicted for the new one) and evicts the next oldest instead."""
    bb = 16 << 10
    ctx = tier_ctx(namespace, slots=8, bb=bb)
    cap = StorageTier.capacity_for(4, bb)
    tier = StorageTier(ctx, path=str(tmp_path), capacity_bytes=cap, n_read_threads=1,
                       n_write_threads=1)
    try:
        n = tier.stats()["max_blocks"]
        keys = [make_key(i, namespace) for i in range(n + 1)]
        for j, k in enumerate(keys):
            ctx.primary[j] = block_bytes_for(k, bb)
        for j in range(n):  # one at a time: keys[0] is the oldest
            assert run_job(tier, "store", [keys[j]], [j]).success
        before = tier.stats()
        # the new block first: taking its slot the job's own refresh of keys[0] already counts
        assert run_job(tier, "store", [keys[n], keys[0]], [n, 0]).success
        after = tier.stats()
        assert after["evictions"] - before["evictions"] == 1  # keys[1] only
        assert after["bytes_written"] - before["bytes_written"] == bb  # keys[0] not written again
        held = [k for k in keys if tier.lookup([k]) == 1]
        assert keys[0] in held and keys[n] in held and keys[1] not in held
        assert len(held) == n
        ctx.primary[:] = 0
        assert run_job(tier, "load", [keys[0], keys[n]], [0, n]).success
        assert np.array_equal(ctx.primary[0], block_bytes_for(keys[0], bb))
        assert np.array_equal(ctx.primary[n], block_bytes_for(keys[n], bb))
    finally:
        tier.shutdown()
