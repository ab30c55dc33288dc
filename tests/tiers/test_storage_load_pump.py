"""Storage tier loads read by native threads (the load pump): a chunk read by the read engine
ends with what the one-call read gives (headers, payloads, checksums, failed runs), loads are
started and checked on the pump's thread with several chunks in flight and every record still
verified, and where the engine cannot be had, or the pump stops, the I/O threads read them."""

from __future__ import annotations

import errno
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import block_bytes_for, make_key
from test_storage import run_job, run_jobs, tier_ctx

from kvtier.tiers.storage import StorageTier
from kvtier.tiers.storage import fastio as sfast
from kvtier.tiers.storage import pump as spump
from kvtier.tiers.storage.layout import SLOT_HEADER
from kvtier.tiers.storage.slab import aligned_buffer, native_record_io

BB = 16 << 10


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
    """Load every key back into a cleared primary in jobs of 2 blocks (many chunks wait at
    once), check every block, and return the jobs."""
    primary[:] = 0
    jobs = [(keys[j:j + 2], [j, j + 1]) for j in range(0, len(keys), 2)]
    assert all(r.success for r in run_jobs(tier, "load", jobs))
    for j, k in enumerate(keys):
        assert np.array_equal(primary[j], block_bytes_for(k, BB))
    return jobs


def test_a_chunk_read_by_the_engine_ends_as_the_one_call_read_ends(
        tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 8
    keys, _primary, tier = _stored(tmp_path, namespace, n)
    store = tier._sh.store  # type: ignore[union-attr]
    assert store.fast is not None
    many = store.fast.read_engine(10_000)  # as many threads as one engine takes, no more
    assert many is not None and many.n_threads == sfast.MAX_ENGINE_THREADS
    many.close()
    engine = store.fast.read_engine(2)
    assert engine is not None and engine.n_threads == 2
    job, other = engine.job(), engine.job()
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
        assert engine.reap(timeout=0) == []  # a poll: nothing ended, it returns at once
        assert engine.reap(timeout=0.01) == []  # nothing started: the wait ends at its timeout
        engine.wake()
        assert engine.reap() == []  # woken: returns at once, however long it would wait
        got = []
        for way, hdr in enumerate(hdrs):
            dests = [memoryview(b) for b in bufs[way]]
            runs = [(5, dests[0:2]), (1, dests[2:4]), (3 * spf, dests[4:5]), (4 * spf, dests[5:6])]
            if way == 0:
                reads = store.start_reads(runs, hdr, job)
                assert reads.job is job and reads.pinned is not None  # queued
                # one chunk at a time: the job refuses another until the engine hands it back
                assert not job.start([(fd(0), 0, 1)], 0, SLOT_HEADER, [0], BB, store.stride)
                with pytest.raises(RuntimeError):
                    job.wait()
                handed: list[sfast.EngineRead] = []
                while not handed:
                    handed = engine.reap(timeout=5.0)
                assert handed == [job]
                results = store.finish_reads(reads)
                assert reads.job is None and reads.pinned is None
            else:
                results = store.read_runs(runs, hdr)  # one native call on this thread
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
        # a read that fails in the kernel (a descriptor that is not open) is its run's error
        assert other.start([(1 << 20, 0, 1)], 0, SLOT_HEADER, [0], BB, store.stride)
        polled: list[sfast.EngineRead] = []
        deadline = time.monotonic() + 5.0
        while not polled and time.monotonic() < deadline:
            polled = engine.reap(timeout=0)  # a poll hands an ended job back as a wait does
        assert polled == [other]
        ((g, sums),) = other.wait()
        assert g == -errno.EBADF and sums == []
    finally:
        engine.close()
        tier.shutdown()


def test_the_pumps_short_native_calls_keep_the_gil() -> None:
    """An engine's submit, wake and poll (and a job's making and freeing) wait for no I/O and
    are called with the GIL held, so that a pump that starts and reaps many chunks in a row
    does not give the GIL up for each, and wait behind the other Python threads (an engine's
    busy scheduler loop) to have it back; the calls that wait (a reap with a timeout, the
    one-call reads and writes, freeing an engine) let it go."""
    import ctypes

    fio = native_record_io()
    if fio is None:
        pytest.skip("the native record I/O is not built")

    def keeps_gil(fn: object) -> bool:
        return bool(type(fn)._flags_ & ctypes._FUNCFLAG_PYTHONAPI)  # type: ignore[attr-defined]

    assert all(keeps_gil(fn) for fn in (fio._submit, fio._wake, fio._poll, fio._job_new,
                                        fio._job_free))
    assert not any(keeps_gil(fn) for fn in (fio._reap, fio._read, fio._seal, fio._engine_free,
                                            fio._engine_new))


def test_loads_are_read_by_the_engine_and_checked_on_the_pump_thread(
        tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 48
    keys, primary, tier = _stored(tmp_path, namespace, n, n_read=2)
    io = tier._io
    store = tier._sh.store  # type: ignore[union-attr]
    assert store.fast is not None
    python_reads: list[int] = []
    read_runs = store.fast.read_runs
    monkeypatch.setattr(store.fast, "read_runs",
                        lambda *a: python_reads.append(1) or read_runs(*a))  # type: ignore[func-returns-value]
    seen: list[tuple[str, str, int]] = []  # (thread, start or finish, first slot of the chunk)
    start, finish = io._start_load, io._finish_load

    def started(task, hdr, job):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name, "start", task.items[0][1]))
        return start(task, hdr, job)

    def finished(load, zeros):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name, "finish", load.task.items[0][1]))
        return finish(load, zeros)

    io._start_load, io._finish_load = started, finished  # type: ignore[method-assign]
    try:
        _load_all_back(tier, keys, primary)
        assert {t for t, _, _ in seen} == {f"kvtier-{tier.name}-loads"}
        assert python_reads == []  # no chunk was read on a Python thread
        cap = spump.JOBS_PER_THREAD * 3
        in_flight: set[int] = set()
        most = 0
        for _t, what, slot in seen:
            if what == "start":
                in_flight.add(slot)
            else:
                in_flight.remove(slot)
            most = max(most, len(in_flight))
        assert not in_flight
        assert 1 < most <= cap  # chunks were queued to the engine together, up to the cap
        assert tier.stats()["hits"] == n and tier.stats()["corrupt"] == 0
        assert tier.stats()["load_chunks"] == len(seen) // 2  # each chunk started, then checked
        assert tier.stats()["native_read_threads"] == 3
    finally:
        tier.shutdown()


def test_a_record_corrupted_on_disk_fails_its_load_on_the_engine_path(
        tmp_path: Path, namespace: str) -> None:
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
        assert tier._io.pump is not None
        failed = set().union(*[r.failed_keys for r in results])
        assert len(failed) == 1
        assert tier.stats()["corrupt"] == 1
        for j, k in enumerate(keys):
            if k not in failed:
                assert np.array_equal(primary[j], block_bytes_for(k, BB))
    finally:
        tier.shutdown()


def test_without_a_read_engine_the_io_threads_read_each_chunk(
        tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    n = 16
    keys, primary, tier = _stored(tmp_path, namespace, n, n_read=2)
    store = tier._sh.store  # type: ignore[union-attr]
    assert store.fast is not None
    monkeypatch.setattr(store.fast, "read_engine", lambda n_threads: None)
    calls: list[str] = []
    read_runs = store.fast.read_runs

    def counted(*a: object) -> object:
        calls.append(threading.current_thread().name)
        return read_runs(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(store.fast, "read_runs", counted)
    try:
        with caplog.at_level(logging.WARNING, logger="kvtier.tiers.storage"):
            jobs = _load_all_back(tier, keys, primary)
            _load_all_back(tier, keys, primary)
        assert tier._io.pump is None and tier.stats()["native_read_threads"] == 0
        assert len(calls) == tier.stats()["load_chunks"] >= 2 * len(jobs)  # one call a chunk
        assert all(name.startswith(f"kvtier-{tier.name}-io") for name in calls)
        warned = [r for r in caplog.records if "native read threads" in r.getMessage()]
        assert len(warned) == 1  # said once, not once a load
    finally:
        tier.shutdown()


def test_a_pump_that_stops_fails_its_chunks_and_later_loads_go_to_the_io_threads(
        tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    n = 16
    keys, primary, tier = _stored(tmp_path, namespace, n, n_read=2)

    def broken(self: sfast.ReadEngine, timeout: float | None = None) -> list[sfast.EngineRead]:
        raise RuntimeError("reap failed")

    monkeypatch.setattr(sfast.ReadEngine, "reap", broken)
    try:
        primary[:] = 0
        jobs = [(keys[j:j + 2], [j, j + 1]) for j in range(0, n, 2)]
        with caplog.at_level(logging.ERROR, logger="kvtier.tiers.storage"):
            first = run_jobs(tier, "load", jobs)
        assert not all(r.success for r in first)  # the chunks in flight failed, none hung
        assert any("load pump stopped" in r.getMessage() for r in caplog.records)
        pump = tier._io.pump
        assert pump is not None
        pump.thread.join(timeout=10)
        assert not pump.thread.is_alive() and tier.stats()["native_read_threads"] == 0
        assert tier._sh.index.pins == {}  # type: ignore[union-attr]  # every slot let go
        _load_all_back(tier, keys, primary)  # on the I/O threads now
        assert tier.stats()["corrupt"] == 0
    finally:
        tier.shutdown()


def test_shutdown_with_loads_in_flight_ends_every_thread(tmp_path: Path, namespace: str) -> None:
    n = 64
    keys, _primary, tier = _stored(tmp_path, namespace, n, n_read=2)
    for j in range(0, n, 2):
        tier.submit_load(10_000 + j, keys[j:j + 2], np.asarray([j, j + 1], dtype=np.int64))
    pump = tier._io.pump
    assert pump is not None
    tier.shutdown()
    assert not pump.thread.is_alive()
    assert all(not t.is_alive() for t in tier._io.threads)
