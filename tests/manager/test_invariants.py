"""Hypothesis state machine: the manager's invariants hold under any sequence of engine calls."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
from helpers import block_bytes_for, make_key
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvtier

BLOCK = 4096
SLOTS = 6
KEYS = [make_key(i, "inv") for i in range(24)]
key_lists = st.lists(st.sampled_from(KEYS), min_size=1, max_size=5, unique=True)


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.spec = kvtier.TieringOffloadingSpec(
            {"cpu_bytes_to_use": SLOTS * BLOCK, "eviction_policy": "arc",
             # A synchronous tier keeps every run deterministic, as hypothesis requires.
             "secondary_tiers": [{"type": "DictTier", "module_path": "plugin_example"}]},
            gpu_block_size=16, bytes_per_gpu_block=BLOCK, namespace="inv")
        self.m = self.spec.get_manager()
        self.region = self.m.primary_blocks()
        self.pins: list[tuple[list[bytes], dict[bytes, int]]] = []
        self.stores: list[list[bytes]] = []
        self.ctx = kvtier.ReqContext("r")

    @rule(keys=key_lists)
    def store(self, keys: list[bytes]) -> None:
        out = self.m.prepare_store(keys, self.ctx)
        if out is None:
            return
        for k in out.evicted_keys:
            assert all(k not in pinned for pinned, _ in self.pins), "a pinned block was evicted"
        for k, s in zip(out.keys_to_store, out.store_spec.block_ids):
            self.region[s] = block_bytes_for(k, BLOCK)
        self.stores.append(out.keys_to_store)

    @precondition(lambda self: self.stores)
    @rule(ok=st.booleans())
    def complete_store(self, ok: bool) -> None:
        self.m.complete_store(self.stores.pop(0), self.ctx, success=ok)

    @rule(keys=key_lists)
    def lookup_and_pin(self, keys: list[bytes]) -> None:
        r = self.m.lookup(keys, self.ctx)
        if not r:
            return
        spec = self.m.prepare_load(keys[:r], self.ctx)
        slots = {k: int(s) for k, s in zip(keys[:r], spec.block_ids)}
        for k, s in slots.items():
            assert np.array_equal(self.region[s], block_bytes_for(k, BLOCK)), "wrong bytes served"
        self.pins.append((keys[:r], slots))

    @precondition(lambda self: self.pins)
    @rule()
    def unpin(self) -> None:
        keys, _ = self.pins.pop(0)
        self.m.complete_load(keys, self.ctx)

    @rule()
    def step(self) -> None:
        self.m.on_schedule_end()

    @rule(keys=key_lists)
    def touch(self, keys: list[bytes]) -> None:
        self.m.touch(keys, self.ctx)

    @invariant()
    def table_is_consistent(self) -> None:
        self.m.primary.check()
        for keys, slots in self.pins:
            for k in keys:
                assert self.m.primary.key_slot.get(k) == slots[k], "a pinned block moved"

    def teardown(self) -> None:
        self.m.shutdown()


TestManagerInvariants = ManagerMachine.TestCase
TestManagerInvariants.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
