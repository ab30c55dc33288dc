"""Invariants of the chain eviction policy and the reuse admission policy (hypothesis)."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvtier.manager.primary import PrimaryTier
from kvtier.policies import AdaptivePolicy, ChainPolicy, resolve_policy
from kvtier.policies.admission import AdmitAll, ReuseAdmission, resolve_admission_policy

requests = st.lists(st.lists(st.integers(0, 60), min_size=1, max_size=12), min_size=1,
                    max_size=80)


def _chain(ids: list[int]) -> list[bytes]:
    """Prefix-chained keys: a key names its whole prefix."""
    out, prefix = [], b""
    for i in ids:
        prefix = prefix + bytes([i])
        out.append(prefix[-4:] + len(prefix).to_bytes(2, "big"))
    return out


@settings(max_examples=150, deadline=None)
@given(requests, st.integers(1, 16), st.sets(st.integers(0, 60), max_size=6))
def test_chain_never_exceeds_capacity_nor_evicts_pinned(reqs, capacity, pinned_ids) -> None:
    p = ChainPolicy(capacity)
    resident: set[bytes] = set()
    pinned = {k for i in pinned_ids for k in _chain([i])}
    for ids in reqs:
        keys = list(dict.fromkeys(_chain(ids)))
        p.access_many(keys)
        new = [k for k in keys if k not in resident]
        over = len(resident) + len(new) - capacity
        if over > 0:
            victims = p.evict_many(over, lambda k: k not in pinned)
            assert not set(victims) & pinned, "a pinned key was evicted"
            assert set(victims) <= resident
            resident.difference_update(victims)
        room = capacity - len(resident)
        add = new[:room]
        p.insert_many(add)
        resident.update(add)
        assert len(p) == len(resident) <= capacity
        assert set(p.keys()) == resident
        assert len(p.ghosts) <= p.ghost_limit, "the ghost list grew past its bound"


def test_chain_evicts_the_leaf_before_its_prefix() -> None:
    p = ChainPolicy(8)
    keys = _chain([1, 2, 3, 4])
    p.insert_many(keys)
    assert p.evict(lambda k: True) == keys[-1]


@settings(max_examples=100, deadline=None)
@given(requests, st.integers(1, 12), st.lists(st.integers(0, 60), max_size=40))
def test_reuse_admission_bounds_its_history_and_shadows(reqs, capacity, offered) -> None:
    adm = ReuseAdmission(capacity, history=32)
    adm.window = 4
    for j, ids in enumerate(reqs):
        keys = _chain(ids)
        adm.observe(keys)
        for k in keys[: (offered[j] % 5) if j < len(offered) else 0]:
            adm.admit(k)
        assert len(adm.predictor.seen) <= 32
        assert adm.shadow_all is not None and adm.shadow_filtered is not None
        assert len(adm.shadow_all) <= capacity and len(adm.shadow_filtered) <= capacity
        assert set(adm.shadow_filtered) <= set(adm.shadow_all) | set(adm.shadow_filtered)


def test_reuse_admission_declines_a_fresh_suffix_and_admits_a_second_sighting() -> None:
    adm = ReuseAdmission(None)
    keys = _chain(list(range(10)))
    adm.observe(keys)
    assert not adm.admit(keys[-1]), "the end of a request seen once is predicted cold"
    adm.observe(keys)
    assert adm.admit(keys[-1]), "seen in two requests: written"
    assert adm.admit(b"never-seen"), "nothing known: written"


def _offer(adm: ReuseAdmission, keys: list[bytes], request: str) -> list[bool]:
    adm.observe(keys, request)
    return [adm.admit(k) for k in keys]


def test_reuse_admission_filters_once_its_shadows_say_it_costs_nothing() -> None:
    adm = ReuseAdmission(capacity=8)
    adm.window = 4
    prefix = _chain([1, 2, 3, 4])
    assert adm.fallback, "until the shadows are full, everything is written"
    decided = []
    for i in range(64):  # a shared prefix, then a fresh 3-block tail nobody asks for again
        tail = [bytes([200, i, j, 0]) for j in range(3)]
        decided = _offer(adm, prefix + tail, f"r{i}")
    assert not adm.fallback
    assert decided[:4] == [True] * 4, "the shared prefix is written"
    assert decided[4:] == [False] * 3, "the one-off tail is not"
    assert adm.declined > 0


def test_reuse_admission_falls_back_when_filtering_costs_hits() -> None:
    adm = ReuseAdmission(capacity=8)
    adm.window = 4
    prefix = _chain([1, 2, 3, 4])
    for i in range(64):
        _offer(adm, prefix + [bytes([200, i, j, 0]) for j in range(3)], f"a{i}")
    assert not adm.fallback
    # Now every fresh tail is asked for again at once: the shadow that wrote it hits, the
    # filtered one does not, and the policy goes back to writing everything.
    for i in range(64):
        tail = [bytes([201, i, j, 0]) for j in range(3)]
        _offer(adm, prefix + tail, f"b{i}")
        adm.observe(prefix + tail, f"c{i}")
    assert adm.fallback
    assert adm.admit(bytes([202, 0, 0, 0]))


def test_registries() -> None:
    assert resolve_policy("chain") is ChainPolicy
    assert resolve_admission_policy("reuse", None, "secondary_tiers[0]") is ReuseAdmission
    assert resolve_admission_policy("all", None, "secondary_tiers[0]") is AdmitAll


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["store", "finish", "fail", "pin"]),
                          st.lists(st.integers(0, 30), min_size=1, max_size=5)),
                min_size=1, max_size=60),
       st.integers(2, 8), st.sampled_from(["lru", "arc", "chain", "adaptive"]))
# an allocation that evicts one victim and then fails (the other is retained) leaves the freed
# slot FREE (it was left READY in the free list once)
@example(ops=[("store", [3, 1]), ("store", [0]), ("fail", [0]), ("store", [0]), ("pin", [1]),
              ("finish", [0]), ("store", [0, 2])], slots=2, policy="lru")
def test_primary_tier_with_retained_victims_keeps_its_invariants(ops, slots, policy) -> None:
    prim = PrimaryTier(slots, resolve_policy(policy)(slots))
    owed: set[bytes] = set()
    pins: list[bytes] = []
    for op, ids in ops:
        keys = [bytes([i]) for i in dict.fromkeys(ids)]
        if op == "store":
            new = [k for k in keys if k not in prim.key_slot][:slots]
            got = prim.allocate(new, lambda k: k in owed)
            if got is not None:
                prim.mark_ready_many(new)
                owed.update(new)
        elif op == "pin":
            ready = [k for k in keys if prim.is_ready(k)]
            prim.pin_many(ready)
            pins.extend(ready)
        else:
            for k in list(prim.retained)[: len(keys)]:
                if op == "finish":
                    owed.discard(k)
                    prim.finish_retained(k)
                else:
                    prim.readmit(k)
        for k in prim.retained:
            assert prim.ref[prim.key_slot[k]] >= 1, "a retained victim lost its pin"
        assert len(prim.key_slot) <= slots
        prim.check()
        if pins and op == "finish":
            prim.unpin_many(pins)
            pins.clear()


@settings(max_examples=100, deadline=None)
@given(requests, st.integers(1, 16), st.sets(st.integers(0, 60), max_size=6),
       st.integers(1, 4))
def test_adaptive_keeps_capacity_pins_and_bounded_shadows(reqs, capacity, pinned_ids,
                                                          window) -> None:
    p = AdaptivePolicy(capacity)
    p.window = window
    resident: set[bytes] = set()
    pinned = {k for i in pinned_ids for k in _chain([i])}
    leaders = set()
    for j, ids in enumerate(reqs):
        keys = list(dict.fromkeys(_chain(ids)))
        p.observe(keys, f"r{j}")
        p.access_many(keys)
        new = [k for k in keys if k not in resident]
        over = len(resident) + len(new) - capacity
        if over > 0:
            victims = p.evict_many(over, lambda k: k not in pinned)
            assert not set(victims) & pinned
            resident.difference_update(victims)
        add = new[: capacity - len(resident)]
        p.insert_many(add)
        resident.update(add)
        leaders.add(p.leader)
        assert len(p) == len(resident) <= capacity
        for live in p.live:  # both orderings hold exactly the resident keys
            assert set(live.keys()) == resident
        for sh in p.shadows:
            assert len(sh) <= capacity, "a shadow cache grew past the capacity"
        chain = p.live[0]
        assert isinstance(chain, ChainPolicy) and len(chain.ghosts) <= chain.ghost_limit
        assert len(chain.predictor.seen) <= chain.predictor.history


def test_adaptive_follows_the_policy_whose_shadow_hits_more() -> None:
    # A loop one block longer than the cache: LRU misses every time; chain's probation keeps
    # most of it. Then the shadows say chain, and the real cache follows.
    p = AdaptivePolicy(20)
    p.window = 4
    resident: set[bytes] = set()
    loop = [bytes([i]) * 4 for i in range(21)]
    for j in range(60):
        keys = loop[j % 21 : j % 21 + 1]
        p.observe(keys, f"r{j}")
        p.access_many(keys)
        new = [k for k in keys if k not in resident]
        if len(resident) + len(new) > 20:
            resident.difference_update(p.evict_many(1, lambda k: True))
        p.insert_many(new)
        resident.update(new)
    assert p.hits[0] > p.hits[1]
    assert p.leader == 0


def test_every_policy_bounds_the_example_tier(namespace: str) -> None:
    """The example tier takes any registered ``eviction_policy`` and stays within capacity."""
    from helpers import load_and_check, make_key, settle, store_blocks

    import kvtier

    for policy in ("lru", "arc", "chain", "adaptive"):
        cfg = {"cpu_bytes_to_use": 8 * 4096, "secondary_tiers": [
            {"type": "example", "capacity_bytes": 12 * 4096, "eviction_policy": policy}]}
        m = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=4096,
                                         namespace=f"{namespace}/{policy}").get_manager()
        try:
            keys = [make_key(i, policy) for i in range(40)]
            store_blocks(m, keys)
            settle(m)
            tier = m.tiers[0]
            assert tier.stats()["blocks"] <= 12
            assert "eviction_policy" not in tier.stats()["custom_params"]
            if tier.policy is not None:
                assert set(tier.policy.keys()) == set(tier._blocks)
            held = [k for k in keys if tier.lookup([k]) == 1]
            assert 0 < len(held) <= 12
            m.reset_cache()
            assert load_and_check(m, held) == len(held)
        finally:
            m.shutdown()
