"""Storage tier loads with a chunk's reads in flight: reads started on a native AIO batch end
with what the one-call read gives (headers, payloads, checksums, failed runs), an I/O thread
starts its next chunk's reads before it checks the chunk before, every record is still verified,
and for small blocks, or where no batch can be had, the thread reads as before."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import block_bytes_for, make_key
from test_storage import run_job, run_jobs, tier_ctx

from kvtier.tiers.storage import StorageTier
from kvtier.tiers.storage import io as sio
from kvtier.tiers.storage.layout import SLOT_HEADER
from kvtier.tiers.storage.slab import aligned_buffer

BB = 16 << 10


@pytest.fixture
def pipelined(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads keep a chunk in flight at this test's small block size too."""
    monkeypatch.setattr(sio, "PIPELINE_BYTES", BB)


def _stored(tmp_path: Path, namespace: str, n: int, n_read: int = 1
            ) -> tuple[list[bytes], np.ndarray, StorageTier]:
    keys = [make_key(i, namespace) for i in range(n)]
    ctx = tier_ctx(namespace, n, BB)
    for j, k in enumerate(keys):
        ctx.primary[j] = block_bytes_for(k, BB)
    tier = StorageTier(ctx, path=str(tmp_path), capacity_bytes=StorageTier.capacity_for(4 * n, BB),
                       n_read_threads=n_read, n_write_threads=1)
    assert run_job(tier, "store", keys, list(range(n))).success
    return keys, ctx.primary, tier


def _load_all_back(tier: StorageTier, keys: list[bytes], primary: np.ndarray
                   ) -> list[tuple[list[bytes], list[int]]]:
    """Load every key back into a cleared primary in jobs of 2 blocks (many chunks wait, so a
    thread always finds its next one), check every block, and return the jobs."""
    primary[:] = 0
    jobs = [(keys[j:j + 2], [j, j + 1]) for j in range(0, len(keys), 2)]
    assert all(r.success for r in run_jobs(tier, "load", jobs))
    for j, k in enumerate(keys):
        assert np.array_equal(primary[j], block_bytes_for(k, BB))
    return jobs


def test_reads_started_on_a_batch_end_as_the_one_call_read_ends(
        tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 8
    keys, _primary, tier = _stored(tmp_path, namespace, n)
    store = tier._sh.store  # type: ignore[union-attr]
    assert store.fast is not None and store.direct
    batch, other = store.fast.read_batch(), store.fast.read_batch()
    assert batch is not None and other is not None
    fd = store.fd

    def failing(region: int, **kw: bool) -> int:
        if region == 3:
            raise FileNotFoundError(store.slab_path(region))
        if region == 4:
            raise OSError(errno.EIO, "cannot open")
        return fd(region, **kw)

    monkeypatch.setattr(store, "fd", failing)
    spf = store.slots_per_file
    hdrs = [aligned_buffer(n * SLOT_HEADER) for _ in range(2)]
    bufs = [[aligned_buffer(BB) for _ in range(6)] for _ in range(2)]
    try:
        got = []
        for way, hdr in enumerate(hdrs):
            dests = [memoryview(b) for b in bufs[way]]
            runs = [(5, dests[0:2]), (1, dests[2:4]), (3 * spf, dests[4:5]), (4 * spf, dests[5:6])]
            if way == 0:
                reads = store.start_reads(runs, hdr, batch)
                assert reads.batch is batch and reads.pinned is not None  # in flight
                # one start at a time: the batch refuses another until its reads are waited for
                assert not batch.start([(fd(0), 0, 1)], 0, SLOT_HEADER, [0], BB, store.stride)
                results = store.finish_reads(reads)
                assert reads.batch is None and reads.pinned is None
            else:
                results = store.read_runs(runs, hdr)  # one native call
            assert results[2] == (-1, None)  # no slab file
            assert isinstance(results[3], OSError) and results[3].errno == errno.EIO
            got.append(results[:2])
            hv = memoryview(hdr)
            for at, slot in enumerate([5, 6, 1, 2]):
                res = results[at // 2]
                assert not isinstance(res, OSError) and res[0] == 2 and res[1] is not None
                head = hv[at * SLOT_HEADER:(at + 1) * SLOT_HEADER]
                assert store.check_record(head, keys[slot], dests[at], res[1][at % 2]) is None
                assert bytes(dests[at]) == bytes(block_bytes_for(keys[slot], BB))
            hv.release()
            for d in dests:
                d.release()
        assert got[0] == got[1]
        # a batch's read that fails in the kernel (a descriptor that is not open) is its run's error
        assert other.start([(1 << 20, 0, 1)], 0, SLOT_HEADER, [0], BB, store.stride)
        ((g, sums),) = other.wait()
        assert g == -errno.EBADF and sums == []
    finally:
        batch.close()
        other.close()
        tier.shutdown()


def test_a_thread_starts_its_next_chunks_reads_before_it_checks_the_last(
        tmp_path: Path, namespace: str, pipelined: None) -> None:
    n = 48
    keys, primary, tier = _stored(tmp_path, namespace, n)
    io = tier._io
    seen: list[tuple[str, str, int]] = []  # (thread, start or finish, first slot of the chunk)
    start, finish = io._start_load, io._finish_load

    def started(task, hdr, batch):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name, "start", task.items[0][1]))
        return start(task, hdr, batch)

    def finished(load, zeros):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name, "finish", load.task.items[0][1]))
        return finish(load, zeros)

    io._start_load, io._finish_load = started, finished  # type: ignore[method-assign]
    try:
        _load_all_back(tier, keys, primary)
        overlapped = 0
        for name in {t for t, _, _ in seen}:
            mine = [(what, slot) for t, what, slot in seen if t == name]
            held: list[int] = []
            for what, slot in mine:
                if what == "start":
                    held.append(slot)
                    overlapped += len(held) == 2
                else:
                    assert held and held.pop(0) == slot  # finished in the order started
                assert len(held) <= 2
            assert not held
        assert overlapped > 0
        assert tier.stats()["hits"] == n and tier.stats()["corrupt"] == 0
    finally:
        tier.shutdown()


def test_a_record_corrupted_on_disk_fails_its_load_on_the_asynchronous_path(
        tmp_path: Path, namespace: str, pipelined: None) -> None:
    n = 16
    keys, primary, tier = _stored(tmp_path, namespace, n)
    store = tier._sh.store  # type: ignore[union-attr]
    slot = tier._sh.index.own[next(iter(tier._sh.index.own))]  # type: ignore[union-attr]
    region, off = store.locate(slot)
    with open(store.slab_path(region), "r+b") as f:  # one payload byte flipped
        f.seek(off + SLOT_HEADER + 100)
        b = f.read(1)
        f.seek(off + SLOT_HEADER + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    try:
        primary[:] = 0
        jobs = [(keys[j:j + 2], [j, j + 1]) for j in range(0, n, 2)]
        results = run_jobs(tier, "load", jobs)
        failed = set().union(*[r.failed_keys for r in results])
        assert len(failed) == 1
        assert tier.stats()["corrupt"] == 1
        for j, k in enumerate(keys):
            if k not in failed:
                assert np.array_equal(primary[j], block_bytes_for(k, BB))
    finally:
        tier.shutdown()


@pytest.mark.parametrize("why", ["no AIO context", "small blocks"])
def test_without_a_batch_a_thread_reads_each_chunk_as_before(
        tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    n = 16
    keys, primary, tier = _stored(tmp_path, namespace, n, n_read=2)
    store = tier._sh.store  # type: ignore[union-attr]
    assert store.fast is not None
    if why == "no AIO context":
        monkeypatch.setattr(sio, "PIPELINE_BYTES", BB)
        monkeypatch.setattr(store.fast, "read_batch", lambda: None)
    else:
        assert BB < sio.PIPELINE_BYTES
    calls: list[int] = []
    read_runs = store.fast.read_runs

    def counted(*a: object) -> object:
        calls.append(1)
        return read_runs(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(store.fast, "read_runs", counted)
    try:
        jobs = _load_all_back(tier, keys, primary)
        assert len(calls) == tier.stats()["load_chunks"] >= len(jobs)  # one call a chunk
    finally:
        tier.shutdown()
