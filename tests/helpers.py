"""Shared test helpers: driving a manager through the public API like an engine does."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import numpy as np

import kvtier


def make_key(i: int, salt: str = "") -> bytes:
    """A 32-byte block key for block number ``i``."""
    return hashlib.sha256(f"{salt}block-{i}".encode()).digest()


def block_bytes_for(key: bytes, n: int) -> np.ndarray:
    """Deterministic payload for ``key`` (n bytes)."""
    seed = int.from_bytes(key[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def settle(manager: kvtier.OffloadingManager, timeout: float = 20.0) -> None:
    """Step the manager until no tier job is in flight."""
    deadline = time.monotonic() + timeout
    while manager.has_pending_work():
        manager.on_schedule_end()
        if time.monotonic() > deadline:
            raise TimeoutError("tier jobs did not finish")
        time.sleep(0.002)
    manager.on_schedule_end()


def store_blocks(manager: kvtier.OffloadingManager, keys: Sequence[bytes], ctx=None) -> None:
    """Store ``keys`` writing their expected bytes straight into primary slots (no worker)."""
    ctx = ctx or kvtier.ReqContext("store")
    region = manager.primary_blocks()
    for i in range(0, len(keys), 8):
        batch = list(keys[i : i + 8])
        out = None
        for _ in range(2000):
            out = manager.prepare_store(batch, ctx)
            if out is not None:
                break
            manager.on_schedule_end()
            time.sleep(0.001)
        assert out is not None, "prepare_store kept failing"
        for key, slot in zip(out.keys_to_store, out.store_spec.block_ids):
            region[slot] = block_bytes_for(key, region.shape[1])
        manager.complete_store(out.keys_to_store, ctx)
        manager.on_schedule_end()


def lookup_until(manager: kvtier.OffloadingManager, keys: Sequence[bytes], ctx=None,
                 timeout: float = 20.0) -> int:
    """Ask ``lookup`` each step until it gives an answer."""
    ctx = ctx or kvtier.ReqContext("load")
    deadline = time.monotonic() + timeout
    while True:
        r = manager.lookup(keys, ctx)
        if r is not None:
            return r
        if time.monotonic() > deadline:
            raise TimeoutError("lookup kept answering None")
        manager.on_schedule_end()
        time.sleep(0.001)


def load_and_check(manager: kvtier.OffloadingManager, keys: Sequence[bytes]) -> int:
    """Look up, load and verify each key (one at a time); returns how many came back intact."""
    ctx = kvtier.ReqContext("check")
    region = manager.primary_blocks()
    good = 0
    for key in keys:
        r = lookup_until(manager, [key], ctx)
        if r != 1:
            continue
        spec = manager.prepare_load([key], ctx)
        slot = int(spec.block_ids[0])
        if np.array_equal(region[slot], block_bytes_for(key, region.shape[1])):
            good += 1
        manager.complete_load([key], ctx)
    return good
