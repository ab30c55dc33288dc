"""LRU and ARC against independent models written here, on fixed reference sequences."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtier.policies import ARCPolicy, LRUPolicy, resolve_policy


def drive(policy, refs: list[int], capacity: int) -> int:
    """Run ``refs`` through a cache of ``capacity`` entries ordered by ``policy``; count hits."""
    resident: set[int] = set()
    hits = 0
    for x in refs:
        if x in resident:
            hits += 1
            policy.access(x)
            continue
        if len(resident) >= capacity:
            victim = policy.evict(lambda k: True, incoming=x)
            resident.remove(victim)
        policy.insert(x)
        resident.add(x)
        assert len(policy) == len(resident)
    return hits


def model_lru_hits(refs: list[int], c: int) -> int:
    """Textbook LRU on a Python list (most recent last)."""
    stack: list[int] = []
    hits = 0
    for x in refs:
        if x in stack:
            hits += 1
            stack.remove(x)
        elif len(stack) == c:
            stack.pop(0)
        stack.append(x)
    return hits


def model_arc_hits(refs: list[int], c: int) -> int:
    """ARC(c) transcribed from Megiddo & Modha's pseudo-code, lists with LRU at index 0."""
    T1: list[int] = []
    T2: list[int] = []
    B1: list[int] = []
    B2: list[int] = []
    p = 0.0
    hits = 0

    def replace(x: int) -> None:
        if T1 and ((x in B2 and len(T1) == p) or len(T1) > p):
            B1.append(T1.pop(0))
        else:
            B2.append(T2.pop(0))

    for x in refs:
        if x in T1 or x in T2:  # Case I
            hits += 1
            (T1 if x in T1 else T2).remove(x)
            T2.append(x)
        elif x in B1:  # Case II
            p = min(float(c), p + max(len(B2) / len(B1), 1.0))
            replace(x)
            B1.remove(x)
            T2.append(x)
        elif x in B2:  # Case III
            p = max(0.0, p - max(len(B1) / len(B2), 1.0))
            replace(x)
            B2.remove(x)
            T2.append(x)
        else:  # Case IV
            if len(T1) + len(B1) == c:
                if len(T1) < c:
                    B1.pop(0)
                    replace(x)
                else:
                    T1.pop(0)
            elif len(T1) + len(B1) < c and len(T1) + len(T2) + len(B1) + len(B2) >= c:
                if len(T1) + len(T2) + len(B1) + len(B2) == 2 * c:
                    B2.pop(0)
                replace(x)
            T1.append(x)
    return hits


def reference_sequence(seed: int, n: int = 6000, universe: int = 300) -> list[int]:
    """A mix of a skewed hot set, scans and loops: the patterns ARC is meant to adapt to."""
    rng = random.Random(seed)
    refs: list[int] = []
    while len(refs) < n:
        mode = rng.random()
        if mode < 0.5:
            refs.extend(int(rng.paretovariate(1.2)) % universe for _ in range(50))
        elif mode < 0.8:
            start = rng.randrange(universe)
            refs.extend((start + i) % (universe * 3) for i in range(rng.randrange(20, 120)))
        else:
            loop = [rng.randrange(universe) for _ in range(rng.randrange(5, 40))]
            refs.extend(loop * 3)
    return refs[:n]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("capacity", [8, 50, 120])
def test_lru_matches_model(seed: int, capacity: int) -> None:
    refs = reference_sequence(seed)
    assert drive(LRUPolicy(capacity), refs, capacity) == model_lru_hits(refs, capacity)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("capacity", [8, 50, 120])
def test_arc_matches_model(seed: int, capacity: int) -> None:
    refs = reference_sequence(seed)
    got = drive(ARCPolicy(capacity), refs, capacity)
    assert got == model_arc_hits(refs, capacity)


def test_arc_beats_lru_on_scan_resistance() -> None:
    # A hot set used over and over, interrupted by long one-time scans: LRU loses the hot set
    # to every scan, ARC keeps it in T2.
    hot = list(range(20))
    refs: list[int] = []
    nxt = 1000
    for _ in range(40):
        refs += hot * 2
        refs += list(range(nxt, nxt + 60))
        nxt += 60
    c = 40
    assert drive(ARCPolicy(c), refs, c) > drive(LRUPolicy(c), refs, c) * 1.2


@given(st.lists(st.integers(0, 40), min_size=1, max_size=400), st.integers(1, 12))
def test_arc_directory_bounds(refs: list[int], c: int) -> None:
    arc = ARCPolicy(c)
    drive(arc, refs, c)
    assert len(arc.t1) + len(arc.t2) <= c
    assert len(arc.t1) + len(arc.b1) <= c
    assert len(arc.t1) + len(arc.t2) + len(arc.b1) + len(arc.b2) <= 2 * c
    assert 0 <= arc.p <= c


@given(st.lists(st.integers(0, 30), min_size=1, max_size=300), st.integers(2, 10),
       st.sets(st.integers(0, 30), max_size=5))
def test_evict_respects_pins(refs: list[int], c: int, pinned: set[int]) -> None:
    for policy in (LRUPolicy(c), ARCPolicy(c)):
        resident: set[int] = set()
        for x in refs:
            if x in resident:
                policy.access(x)
                continue
            if len(resident) >= c:
                victim = policy.evict(lambda k: k not in pinned, incoming=x)
                if victim is None:
                    assert resident <= pinned
                    continue
                assert victim not in pinned
                resident.remove(victim)
            policy.insert(x)
            resident.add(x)


def test_registry() -> None:
    assert resolve_policy("lru") is LRUPolicy
    assert resolve_policy("arc") is ARCPolicy
