"""Storage tier stores: new slots are handed out a stripe at a time round the regions, and the
adjacent records of a store chunk go to disk with one write, each still verified on load and
named by the log only once written; the native record I/O and the Python one write the same
bytes and check them the same way."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import block_bytes_for, make_key
from test_storage import open_small_tier, run_job, tier_ctx

from kvtier.tiers.storage import StorageTier, fastio
from kvtier.tiers.storage.index import STRIPE
from kvtier.tiers.storage.layout import SLOT_HEADER
from kvtier.tiers.storage.slab import aligned_buffer, native_record_io, record_header

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


@pytest.mark.parametrize("io_path", ["native", "python"])
def test_adjacent_records_are_written_together_and_each_verified(
        tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch, io_path: str) -> None:
    n = STRIPE
    ctx = tier_ctx(namespace, n, BB)
    tier = open_small_tier(tmp_path, ctx, 1024)
    store = tier._sh.store  # type: ignore[union-attr]
    writes: list[int] = []
    if io_path == "python":
        monkeypatch.setattr(store, "fast", None)
    fast = store.fast
    real = os.pwritev

    def counting(fd: int, buffers: Sequence[object], offset: int, *a: int) -> int:
        got = real(fd, buffers, offset, *a)  # type: ignore[arg-type]
        if got >= SLOT_HEADER + BB:  # a slab write (log entries are 64 bytes each)
            writes.append(got // (SLOT_HEADER + BB))
        return got

    def counting_native(runs: Sequence[tuple[int, int, int]], hdr: int, hdr_len: int, prefix: bytes,
                        records: Sequence[tuple[bytes, int, int]], payload_len: int) -> list[int] | None:
        assert fast is not None
        done = type(fast).write_runs(fast, runs, hdr, hdr_len, prefix, records, payload_len)
        assert done is not None
        writes.extend(got // (SLOT_HEADER + BB) for got in done)
        return done

    keys = [make_key(i, namespace) for i in range(n)]
    try:
        for j, k in enumerate(keys):
            ctx.primary[j] = block_bytes_for(k, BB)
        if fast is None:
            monkeypatch.setattr(os, "pwritev", counting)
        else:
            monkeypatch.setattr(fast, "write_runs", counting_native)
        assert run_job(tier, "store", keys, range(n)).success  # one chunk (one write thread)
        monkeypatch.undo()
        if io_path == "python":  # the loads below too
            monkeypatch.setattr(store, "fast", None)
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


def test_native_record_io_is_built_and_used(tmp_path: Path, namespace: str) -> None:
    """The native part is optional for users, not here: the test setup builds it."""
    if os.environ.get("KVTIER_FASTIO") == "0":
        pytest.fail("KVTIER_FASTIO=0 is set: the native record I/O is not tested")
    assert native_record_io() is not None, "kvtier.tiers.storage._fastio was not built or fails its check"
    tier = open_small_tier(tmp_path, tier_ctx(namespace, 4, BB), 1024)
    try:
        assert tier.stats()["native_io"] is True
    finally:
        tier.shutdown()


def test_the_native_self_test_refuses_headers_python_would_not_write() -> None:
    fast = native_record_io()
    assert fast is not None
    assert fastio._self_test(fast, record_header)

    def other_seq(ns: bytes, key: bytes, payload: memoryview, seq: int) -> bytes:
        return record_header(ns, key, payload, seq + 1)

    assert not fastio._self_test(fast, other_seq)


def test_native_io_false_moves_every_record_in_python(tmp_path: Path, namespace: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    n = 8
    ctx = tier_ctx(namespace, n, BB)
    keys = [make_key(i, namespace) for i in range(n)]
    for j, k in enumerate(keys):
        ctx.primary[j] = block_bytes_for(k, BB)
    tier = StorageTier(ctx, path=str(tmp_path), capacity_bytes=StorageTier.capacity_for(64, BB),
                       n_read_threads=1, n_write_threads=1, native_io=False)
    fast = native_record_io()
    assert fast is not None

    def refuse(*_a: object) -> int:
        raise AssertionError("the native record I/O was used")

    monkeypatch.setattr(fast, "write_runs", refuse)
    monkeypatch.setattr(fast, "read_runs", refuse)
    try:
        assert tier.stats()["native_io"] is False
        assert run_job(tier, "store", keys, range(n)).success
        ctx.primary[:] = 0
        assert run_job(tier, "load", keys, range(n)).success
        for j, k in enumerate(keys):
            assert np.array_equal(ctx.primary[j], block_bytes_for(k, BB))
    finally:
        tier.shutdown()


def test_native_and_python_record_io_write_the_same_bytes(tmp_path: Path, namespace: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    n = 8
    keys = [make_key(i, namespace) for i in range(n)]
    seen: dict[str, bytes] = {}
    for io_path in ("native", "python"):
        ctx = tier_ctx(namespace, n, BB)
        for j, k in enumerate(keys):
            ctx.primary[j] = block_bytes_for(k, BB)
        tier = open_small_tier(tmp_path / io_path, ctx, 1024)
        store = tier._sh.store  # type: ignore[union-attr]
        if io_path == "python":
            monkeypatch.setattr(store, "fast", None)
        else:
            assert store.fast is not None
        hdr = aligned_buffer(n * SLOT_HEADER)
        try:
            region = store.write_run(0, [(k, memoryview(ctx.primary[j]), 100 + j)
                                         for j, k in enumerate(keys)], hdr)
            monkeypatch.undo()
            assert store.fast is not None
            with open(store.slab_path(region), "rb") as f:
                seen[io_path] = f.read(n * (SLOT_HEADER + BB))
            # read back on both paths: every record whole and valid, a bad payload caught
            for read_path in ("native", "python"):
                if read_path == "python":
                    monkeypatch.setattr(store, "fast", None)
                bufs = [aligned_buffer(BB) for _ in keys]  # as primary slots are: page-aligned
                dests = [memoryview(b) for b in bufs]
                got, sums = store.read_run(0, dests, hdr)
                assert got == n and (sums is None) == (read_path == "python")
                hv = memoryview(hdr)
                for j, k in enumerate(keys):
                    head = hv[j * SLOT_HEADER:(j + 1) * SLOT_HEADER]
                    assert store.check_record(head, k, dests[j], None if sums is None else sums[j]) is None
                    assert bytes(dests[j]) == bytes(block_bytes_for(k, BB))
                other = keys[1]
                assert store.check_record(hv[:SLOT_HEADER], other, dests[0],
                                          None if sums is None else sums[0]) is not None
                if sums is not None:
                    assert store.check_record(hv[:SLOT_HEADER], keys[0], dests[0], sums[0] ^ 1) == \
                        "payload checksum mismatch"
                hv.release()
                for d in dests:
                    d.release()
            monkeypatch.undo()
        finally:
            del hdr
            tier.shutdown()
    assert seen["native"] == seen["python"]


def _tier_of(tmp_path: Path, namespace: str, n: int) -> tuple[list[bytes], Any, StorageTier, Any]:
    """Keys, a context whose primary slots hold their blocks, a small tier and its slab store."""
    keys = [make_key(i, namespace) for i in range(n)]
    ctx = tier_ctx(namespace, n, BB)
    for j, k in enumerate(keys):
        ctx.primary[j] = block_bytes_for(k, BB)
    tier = open_small_tier(tmp_path, ctx, 1024)
    return keys, ctx, tier, tier._sh.store  # type: ignore[union-attr]


def test_a_load_chunks_runs_are_read_in_one_call_with_headers_numbered_across_them(
        tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 8
    keys, ctx, tier, store = _tier_of(tmp_path, namespace, n)
    assert store.fast is not None
    hdr = aligned_buffer(n * SLOT_HEADER)
    no_file = store.slots_per_file * 3  # a slot of a region whose slab file is gone
    fd = store.fd

    def gone(region: int, **kw: bool) -> int:
        if region == 3:
            raise FileNotFoundError(store.slab_path(region))
        return fd(region, **kw)

    calls: list[int] = []
    read_runs = store.fast.read_runs

    def counted(runs: Sequence[tuple[int, int, int]], *a: object) -> object:
        calls.append(len(runs))
        return read_runs(runs, *a)  # type: ignore[arg-type]

    try:
        store.write_run(0, [(k, memoryview(ctx.primary[j]), 100 + j) for j, k in enumerate(keys)], hdr)
        for read_path in ("native", "python"):
            monkeypatch.setattr(store, "fd", gone)
            if read_path == "python":
                monkeypatch.setattr(store, "fast", None)
            else:
                monkeypatch.setattr(store.fast, "read_runs", counted)
            bufs = [aligned_buffer(BB) for _ in range(5)]
            dests = [memoryview(b) for b in bufs]
            # slots 5-6, then 1-3 (out of order), then one in a region with no file
            results = store.read_runs([(5, dests[0:2]), (1, dests[2:4]), (no_file, dests[4:5])], hdr)
            assert [r if isinstance(r, OSError) else r[0] for r in results] == [2, 2, -1]
            assert all((r[1] is None) == (read_path == "python") for r in results[:2])  # type: ignore[index]
            hv = memoryview(hdr)
            for at, (slot, run) in enumerate([(5, 0), (6, 0), (1, 1), (2, 1)]):
                got = results[run]
                assert not isinstance(got, OSError)
                sums = got[1]
                head = hv[at * SLOT_HEADER:(at + 1) * SLOT_HEADER]
                assert store.check_record(head, keys[slot], dests[at],
                                          None if sums is None else sums[at % 2]) is None
                assert bytes(dests[at]) == bytes(block_bytes_for(keys[slot], BB))
            hv.release()
            for d in dests:
                d.release()
            monkeypatch.undo()
        assert calls == [3]  # the native path: every run in one call
        with pytest.raises(ValueError):
            store.read_runs([(0, [memoryview(aligned_buffer(BB)) for _ in range(n + 1)])], hdr)
    finally:
        del hdr
        tier.shutdown()


@pytest.mark.parametrize("io_path", ["native", "python"])
def test_a_store_chunks_runs_are_written_in_one_call_and_a_failed_run_stops_no_other(
        tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch, io_path: str) -> None:
    n = 4
    keys, ctx, tier, store = _tier_of(tmp_path, namespace, n)
    hdr = aligned_buffer(n * SLOT_HEADER)
    broken = store.slots_per_file * 3  # a slot of a region whose file cannot be opened
    fd = store.fd

    def failing(region: int, **kw: bool) -> int:
        if region == 3:
            raise OSError(errno.EIO, "cannot open")
        return fd(region, **kw)

    calls: list[int] = []
    if io_path == "python":
        monkeypatch.setattr(store, "fast", None)
    else:
        assert store.fast is not None
        write_runs = store.fast.write_runs

        def counted(runs: Sequence[tuple[int, int, int]], *a: object) -> object:
            calls.append(len(runs))
            return write_runs(runs, *a)  # type: ignore[arg-type]

        monkeypatch.setattr(store.fast, "write_runs", counted)
    monkeypatch.setattr(store, "fd", failing)
    recs = [(k, memoryview(ctx.primary[j]), 10 + j) for j, k in enumerate(keys)]
    try:
        out = store.write_runs([(6, recs[2:4]), (broken, recs[:1]), (1, recs[:2])], hdr)
        assert out[0] == 0 and out[2] == 0
        assert isinstance(out[1], OSError) and out[1].errno == errno.EIO
        assert calls == ([2] if io_path == "native" else [])  # the two runs it could open
        monkeypatch.undo()
        back = aligned_buffer(BB)
        for slot, j in ((6, 2), (7, 3), (1, 0), (2, 1)):  # every record whole and its own
            assert store.read_record(slot, keys[j], memoryview(back), hdr) is None
            assert bytes(back) == bytes(block_bytes_for(keys[j], BB))
        del back
    finally:
        del hdr
        tier.shutdown()
