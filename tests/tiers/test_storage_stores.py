"""Storage tier stores: new slots are handed out a stripe at a time round the regions, and the
adjacent records of a store chunk go to disk with one write, each still verified on load and
named by the log only once written."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from helpers import block_bytes_for, make_key
from test_storage import open_small_tier, run_job, tier_ctx

from kvtier.tiers.storage.index import STRIPE
from kvtier.tiers.storage.layout import SLOT_HEADER

BB = 16 << 10


def test_new_slots_are_handed_out_a_stripe_at_a_time_round_the_regions(
        tmp_path: Path, namespace: str) -> None:
    n = 3 * STRIPE
    ctx = tier_ctx(namespace, n, BB)
    tier = open_small_tier(tmp_path, ctx, 1024)
    try:
        keys = [make_key(i, namespace) for i in range(n)]
        for j, k in enumerate(keys):
            ctx.primary[j] = block_bytes_for(k, BB)
        assert run_job(tier, "store", keys, range(n)).success
        where = [tier.record_location(k) for k in keys]
        assert all(w is not None for w in where)
        files = []
        for i in range(0, n, STRIPE):
            stripe = where[i : i + STRIPE]
            paths = {w[0] for w in stripe if w is not None}
            assert len(paths) == 1, "a stripe lies in one region"
            offs = [w[1] for w in stripe if w is not None]
            assert offs == [offs[0] + j * (SLOT_HEADER + BB) for j in range(STRIPE)]  # adjacent
            files.append(paths.pop())
        assert len(set(files)) == 3, "each stripe in the next region"
    finally:
        tier.shutdown()


def test_adjacent_records_are_written_together_and_each_verified(
        tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    n = STRIPE
    ctx = tier_ctx(namespace, n, BB)
    tier = open_small_tier(tmp_path, ctx, 1024)
    writes: list[int] = []
    real = os.pwritev

    def counting(fd: int, buffers: Sequence[object], offset: int, *a: int) -> int:
        got = real(fd, buffers, offset, *a)  # type: ignore[arg-type]
        if got >= SLOT_HEADER + BB:  # a slab write (log entries are 64 bytes each)
            writes.append(got // (SLOT_HEADER + BB))
        return got

    keys = [make_key(i, namespace) for i in range(n)]
    try:
        for j, k in enumerate(keys):
            ctx.primary[j] = block_bytes_for(k, BB)
        monkeypatch.setattr(os, "pwritev", counting)
        assert run_job(tier, "store", keys, range(n)).success  # one chunk (one write thread)
        monkeypatch.undo()
        assert sum(writes) == n and len(writes) < n, f"records per write: {writes}"
        # one payload byte of one record flipped on disk: that block alone fails
        path, off = tier.record_location(keys[5])  # type: ignore[misc]
        with open(path, "r+b") as f:
            f.seek(off + SLOT_HEADER + 7)
            b = f.read(1)
            f.seek(off + SLOT_HEADER + 7)
            f.write(bytes([b[0] ^ 0x01]))
        ctx.primary[:] = 0
        res = run_job(tier, "load", keys, range(n))
        assert res.failed_keys == {keys[5]}
        for j, k in enumerate(keys):
            if j != 5:
                assert np.array_equal(ctx.primary[j], block_bytes_for(k, BB))
    finally:
        tier.shutdown()
    # the logs named every record written together: a restart serves them
    tier = open_small_tier(tmp_path, ctx, 1024)
    try:
        rest = [k for j, k in enumerate(keys) if j != 5]
        assert tier.lookup(rest) == len(rest)
        ctx.primary[:] = 0
        assert run_job(tier, "load", rest, range(len(rest))).success
        for j, k in enumerate(rest):
            assert np.array_equal(ctx.primary[j], block_bytes_for(k, BB))
    finally:
        tier.shutdown()
