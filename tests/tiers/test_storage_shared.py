"""Several engines, each its own process, sharing one storage directory.

Each engine is ``tests/storage_engine.py``: a kvtier manager with a storage tier, driven through
the public API. The tests check what users of a shared file system rely on: what one engine
stores the others load (within the sync delay), nothing an engine that was killed left half
written is ever served, the directory never grows past ``capacity_bytes`` whoever writes, and
the space of an engine that is gone is taken over by the others.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import mmap
import os
import random
import select
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import block_bytes_for, load_and_check, make_key, settle, store_blocks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvtier
from kvtier.format.record import namespace_fingerprint
from kvtier.tiers.base import TierContext
from kvtier.tiers.storage import StorageTier

BB = 64 << 10
ENGINE = str(Path(__file__).resolve().parents[1] / "storage_engine.py")


def dir_bytes(path: Path) -> int:
    """Bytes the files under ``path`` occupy: the larger of their sizes and their allocated blocks."""
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                st_ = p.stat()
                total += max(st_.st_size, st_.st_blocks * 512)
        except FileNotFoundError:  # removed while we looked (a log rewrite, a dead engine's file)
            continue
    return total


class Engine:
    """One engine process (see tests/storage_engine.py)."""

    def __init__(self, path: Path, capacity: int, *, namespace: str = "shared/test",
                 sync_seconds: float = 0.1, **tier: Any) -> None:
        cfg = {"cpu_bytes_to_use": 16 * BB, "secondary_tiers": [
            {"type": "storage", "path": str(path), "capacity_bytes": capacity,
             "n_read_threads": 2, "n_write_threads": 2, "slab_bytes": 1 << 20,
             "sync_seconds": sync_seconds, **tier}]}
        self.proc = subprocess.Popen(
            [sys.executable, ENGINE, json.dumps(cfg), namespace, str(BB)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._buf = b""
        self.ready = self.read()

    def read(self, timeout: float = 60.0) -> dict[str, Any]:
        """The next answer line."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([fd], [], [], 0)[0]:
                err = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""
                raise AssertionError(f"engine gave no answer: {err[-2000:]}")
            if select.select([fd], [], [], min(left, 0.5))[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    continue
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def cmd(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.read()

    def present(self, salt: str, ids: list[int]) -> list[int]:
        return list(self.cmd(op="present", salt=salt, ids=ids)["ids"])

    def wait_present(self, salt: str, ids: list[int], timeout: float = 30.0) -> list[int]:
        """Ask until every id is offered (the other engine's log is read every sync pass)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.present(salt, ids)
            if len(got) == len(ids) or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                self.cmd(op="quit")
            finally:
                self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        # a killed engine leaves its CPU tier's shared memory behind: not this test's subject
        with contextlib.suppress(OSError):
            os.unlink(os.path.join("/dev/shm", self.ready["region"]))


@pytest.fixture
def engines() -> Any:
    """Start engines with ``engines(path, capacity, ...)``; all are stopped at the end."""
    started: list[Engine] = []

    def start(*a: Any, **kw: Any) -> Engine:
        e = Engine(*a, **kw)
        started.append(e)
        return e

    yield start
    for e in started:
        try:
            e.quit()
        except Exception:
            e.kill()


def test_engines_share_blocks_both_ways_and_a_later_engine_serves_both(tmp_path: Path, engines: Any
                                                                        ) -> None:
    cap = StorageTier.capacity_for(128, BB, 1 << 20)
    a = engines(tmp_path, cap)
    b = engines(tmp_path, cap)
    ids = list(range(24))
    a.cmd(op="store", salt="a", ids=ids)
    assert b.wait_present("a", ids) == ids  # found by the other engine's sync thread
    res = b.cmd(op="load", salt="a", ids=ids)
    assert res["good"] == ids and res["wrong"] == [] and res["miss"] == 0
    b.cmd(op="store", salt="b", ids=ids)
    assert a.wait_present("b", ids) == ids
    res = a.cmd(op="load", salt="b", ids=ids)
    assert res["good"] == ids and res["wrong"] == []
    c = engines(tmp_path, cap)
    assert c.present("a", ids) == ids and c.present("b", ids) == ids  # known from its first pass
    for salt in ("a", "b"):
        res = c.cmd(op="load", salt=salt, ids=ids)
        assert res["good"] == ids and res["wrong"] == []
    # capacity is shared: every region has an owner, each engine holds some
    deadline = time.monotonic() + 30
    while True:
        stats = [e.cmd(op="stats") for e in (a, b, c)]
        owned = [s["regions_owned"] for s in stats]
        if (all(s["engines"] == 3 for s in stats) and sum(owned) == stats[0]["regions"]
                and min(owned) >= stats[0]["regions"] // 3) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(s["engines"] == 3 for s in stats) and sum(owned) == stats[0]["regions"], stats
    assert min(owned) >= stats[0]["regions"] // 3, owned
    assert all(s["corrupt"] == 0 and s["stale_misses"] == 0 for s in stats)
    assert dir_bytes(tmp_path) <= cap


def test_kill_minus_nine_while_writing_never_serves_a_torn_block(tmp_path: Path, engines: Any) -> None:
    """A writes as fast as it can (evicting all the time) and is killed mid-write. B, and an
    engine started afterwards, serve exactly A's finished blocks, and take its space over."""
    cap = StorageTier.capacity_for(48, BB, 1 << 20)
    b = engines(tmp_path, cap)
    b_ids = list(range(8))
    b.cmd(op="store", salt="b", ids=b_ids)
    a = engines(tmp_path, cap)
    deadline = time.monotonic() + 30
    while a.cmd(op="stats")["regions_owned"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # B hands A its share of the regions on a sync pass; A writes only then
    assert a.cmd(op="stats")["regions_owned"] > 0, "A was never given a share of the capacity"
    a.send(op="stream", salt="a", start=0)
    stored = 0
    while stored < 200:
        stored = a.read()["stored"]
    time.sleep(random.Random(10).uniform(0, 0.02))
    a.kill()
    a_ids = list(range(stored + 400))  # it may have stored more after the last line read
    b.cmd(op="sync")
    seen = b.present("a", a_ids)
    assert seen, "B saw none of A's blocks"
    res = b.cmd(op="load", salt="a", ids=seen)
    assert res["wrong"] == [] and res["good"] == seen  # every block offered is whole
    d = engines(tmp_path, cap)
    assert d.present("a", a_ids) == seen  # the same blocks, from A's logs
    res = d.cmd(op="load", salt="a", ids=seen)
    assert res["wrong"] == [] and res["good"] == seen
    # A's regions are taken over by the engines that remain
    deadline = time.monotonic() + 30
    while True:
        stats = [e.cmd(op="stats") for e in (b, d)]
        owned = [s["regions_owned"] for s in stats]
        if (sum(owned) == stats[0]["regions"] and max(owned) - min(owned) <= 1
                and all(s["engines"] == 2 for s in stats)) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(owned) == stats[0]["regions"] and max(owned) - min(owned) <= 1, stats
    assert all(s["engines"] == 2 for s in stats)
    assert sum(s["claims"] for s in stats) > 0
    # and reused: B and D fill their regions with new blocks, evicting A's (the coldest) first
    for e, salt in ((b, "b2"), (d, "d")):
        e.cmd(op="store", salt=salt, ids=list(range(48)))
    assert dir_bytes(tmp_path) <= cap
    for e in (b, d):
        e.cmd(op="sync")
        assert e.present("a", seen) == []
    for e, salt in ((b, "b2"), (d, "d")):
        got = e.present(salt, list(range(48)))
        res = e.cmd(op="load", salt=salt, ids=got)
        assert res["wrong"] == [] and res["good"] == got and len(got) >= 16
        st = e.cmd(op="stats")
        assert st["corrupt"] == 0, st


def test_four_engines_at_five_times_capacity_stay_within_it(tmp_path: Path, engines: Any) -> None:
    cap = StorageTier.capacity_for(64, BB, 1 << 20)
    es = [engines(tmp_path, cap) for _ in range(4)]
    per = 80  # each engine writes 80 blocks: 4 x 80 = 5x the 64 blocks the directory holds
    worst = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal worst
        while not done.is_set():
            worst = max(worst, dir_bytes(tmp_path))
            time.sleep(0.002)

    w = threading.Thread(target=watch)
    w.start()
    try:
        for i, e in enumerate(es):
            peers = {f"e{j}": list(range(4 * per)) for j in range(4) if j != i}
            # stores fail while capacity is being shared out: go on until 80 blocks were written
            e.send(op="churn", salt=f"e{i}", ids=list(range(4 * per)), peers=peers, seed=i,
                   target_bytes=per * BB)
        results = [e.read(timeout=120) for e in es]
    finally:
        done.set()
        w.join()
    assert worst <= cap, f"the directory reached {worst} bytes, capacity {cap}"
    assert all(r["wrong"] == [] for r in results), results
    assert sum(r["good"] for r in results) > 0  # engines did load each other's blocks
    offered: set[tuple[str, int]] = set()
    for e in es:
        e.cmd(op="sync")
    for e in es:
        for j in range(4):
            got = e.present(f"e{j}", list(range(4 * per)))
            res = e.cmd(op="load", salt=f"e{j}", ids=got)
            assert res["wrong"] == []
            offered.update((f"e{j}", i) for i in res["good"])
    assert 0 < len(offered) <= 64
    assert dir_bytes(tmp_path) <= cap
    stats = [e.cmd(op="stats") for e in es]
    assert all(s["corrupt"] == 0 for s in stats)
    written = sum(s["bytes_written"] for s in stats)
    assert written >= 4 * per * BB, [  # 5x the capacity, written
        {k: s[k] for k in ("bytes_written", "store_failures", "claims", "releases", "sync_passes",
                           "sync_failures", "regions_owned")} for s in stats]


# -- in one process: the tier's own behaviour ---------------------------------------------------
def manager(path: Path, capacity: int, namespace: str = "shared/inproc", slots: int = 16,
            **tier: Any) -> kvtier.TieringManager:
    params = {"type": "storage", "path": str(path), "capacity_bytes": capacity,
              "n_read_threads": 2, "n_write_threads": 2, "slab_bytes": 1 << 20,
              "sync_seconds": 3600, **tier}  # passes run only when the test asks
    cfg = {"cpu_bytes_to_use": slots * BB, "secondary_tiers": [params]}
    return kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BB,
                                        namespace=namespace).get_manager()


def tier_of(m: kvtier.TieringManager) -> StorageTier:
    t = m.tiers[0]
    assert isinstance(t, StorageTier)
    return t


def test_a_block_overwritten_since_it_was_indexed_is_a_verified_miss(tmp_path: Path) -> None:
    cap = StorageTier.capacity_for(16, BB, 1 << 20)
    a = manager(tmp_path, cap)
    b = manager(tmp_path, cap)
    try:
        tier_of(a).sync_now()  # A lets B have its share
        tier_of(b).sync_now()
        keys = [make_key(i, "ow") for i in range(8)]
        store_blocks(a, keys)
        settle(a)
        tier_of(b).sync_now()
        assert tier_of(b).lookup(keys) == 8
        before = {p: p.read_bytes() for p in tmp_path.rglob("slab-*")}
        # A overwrites all of its slots with other blocks; B has not read A's log since
        store_blocks(a, [make_key(i, "new") for i in range(40)])
        settle(a)
        after_a = {p: p.read_bytes() for p in tmp_path.rglob("slab-*")}
        assert after_a != before
        assert tier_of(b).lookup(keys) == 8  # B still believes they are there
        assert load_and_check(b, keys) == 0  # every load is a verified miss, never wrong bytes
        st = b.get_stats()["tiers"]["storage0"]
        assert st["stale_misses"] == 8 and st["corrupt"] == 0 and st["hits"] == 0
        assert {p: p.read_bytes() for p in tmp_path.rglob("slab-*")} == after_a  # B wrote nothing
        assert tier_of(b).lookup(keys) == 0  # learned lazily
    finally:
        a.shutdown()
        b.shutdown()


def test_an_engine_that_exits_leaves_its_blocks_to_the_others(tmp_path: Path) -> None:
    cap = StorageTier.capacity_for(32, BB, 1 << 20)
    a = manager(tmp_path, cap)
    b = manager(tmp_path, cap)
    tier_of(a).sync_now()
    tier_of(b).sync_now()
    keys = [make_key(i, "exit") for i in range(10)]
    try:
        store_blocks(a, keys)
        settle(a)
        held_a = tier_of(a).stats()["regions_owned"]
        assert 0 < held_a < tier_of(a).stats()["regions"]
    finally:
        a.shutdown()
    try:
        tb = tier_of(b)
        tb.sync_now()
        st = tb.stats()
        assert st["engines"] == 1 and st["regions_owned"] == st["regions"]  # adopted A's regions
        assert st["own_blocks"] == 10  # A's blocks are B's own now: served, evicted, reused
        assert load_and_check(b, keys) == 10
        store_blocks(b, [make_key(i, "more") for i in range(40)])
        settle(b)
        st = tb.stats()
        assert st["evictions"] > 0 and st["blocks"] <= 32 and dir_bytes(tmp_path) <= cap
        assert tb.lookup(keys[:1]) == 0  # the oldest, A's, went first
    finally:
        b.shutdown()


def test_directory_of_the_single_engine_layout_is_adopted(tmp_path: Path) -> None:
    """A directory written by the single-engine layout (tests/data, made with the previous
    version): its blocks are served, the torn record its intent file names is dropped, its
    second engine's directory is merged, and it is converted for sharing."""
    with tarfile.open(Path(__file__).resolve().parents[1] / "data" / "single_engine_layout.tar.gz") as t:
        t.extractall(tmp_path, filter="data")
    root = tmp_path / "kv"
    cfg = {"cpu_bytes_to_use": 8 * 4096, "secondary_tiers": [
        {"type": "storage", "path": str(root), "capacity_bytes": 4 << 20, "slab_bytes": 1 << 20,
         "n_read_threads": 1, "n_write_threads": 1}]}
    m = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=4096,
                                     namespace="legacy/ns").get_manager()
    try:
        import hashlib

        def key(i: int) -> bytes:
            return hashlib.sha256(f"legacy-{i}".encode()).digest()

        st = m.get_stats()["tiers"]["storage0"]
        assert st["start_verified"] == 1 and st["start_invalidated"] == 1
        assert st["blocks"] == 10
        ids = [0, 1, 2, 3, 4, 6, 7, 100, 101, 102]
        assert all(tier_of(m).lookup([key(i)]) == 1 for i in ids)
        assert tier_of(m).lookup([key(5)]) == 0  # torn when that engine ended
        region = m.primary_blocks()
        ctx = kvtier.ReqContext("legacy")
        for i in ids:
            r = 0
            while (r := m.lookup([key(i)], ctx)) is None:
                m.on_schedule_end()
                time.sleep(0.001)
            assert r == 1
            spec = m.prepare_load([key(i)], ctx)
            want = np.random.default_rng(int.from_bytes(key(i)[:8], "little")).integers(
                0, 256, 4096, dtype=np.uint8)
            assert np.array_equal(region[int(spec.block_ids[0])], want)
            m.complete_load([key(i)], ctx)
        names = sorted(os.listdir(st["path"]))
        assert "POOL" in names and not any(n.startswith("intent-") for n in names)
        assert not any(p.name.endswith(".1") for p in root.iterdir())  # the lane was merged
    finally:
        m.shutdown()
    assert dir_bytes(root) <= 4 << 20


def test_without_file_locks_one_engine_writes_and_the_others_read(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """NFS mounted with ``nolock``, Lustre without ``-o flock``: flock fails with ENOLCK. (The
    failure is injected: no such mount can be made here.)"""
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cap = StorageTier.capacity_for(32, BB, 1 << 20)
    a = manager(tmp_path, cap)
    b = manager(tmp_path, cap)
    keys = [make_key(i, "nolock") for i in range(8)]
    try:
        assert tier_of(a).stats()["mode"] == "writer" and tier_of(b).stats()["mode"] == "reader"
        assert tier_of(b).stats()["regions_owned"] == 0
        store_blocks(a, keys)
        settle(a)
        store_blocks(b, [make_key(i, "b") for i in range(4)])  # a reader stores nothing
        settle(b)
        assert tier_of(b).stats()["store_failures"] == 4
        tier_of(b).sync_now()
        assert load_and_check(b, keys) == 8
    finally:
        a.shutdown()
    try:
        tier_of(b).sync_now()  # the writer left: the reader takes over
        st = tier_of(b).stats()
        assert st["mode"] == "writer" and st["regions_owned"] == st["regions"]
        assert load_and_check(b, keys) == 8
    finally:
        b.shutdown()


_shared_op = st.one_of(
    st.tuples(st.just("store"), st.integers(0, 1), st.lists(st.integers(0, 23), min_size=1,
                                                          max_size=6, unique=True)),
    st.tuples(st.just("load"), st.integers(0, 1), st.lists(st.integers(0, 23), min_size=1,
                                                         max_size=6, unique=True)),
    st.tuples(st.just("sync"), st.integers(0, 1), st.just([])),
    st.tuples(st.just("restart"), st.integers(0, 1), st.just([])),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_shared_op, min_size=1, max_size=16))
def test_two_engines_any_interleaving_never_serve_wrong_bytes(
        tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, list[int]]]) -> None:
    """Two engines on one small directory, stores, loads, sync passes and restarts in any order:
    no load is ever wrong, capacity holds, and after both sync each offers what the other holds."""
    bb = 8192
    path = tmp_path_factory.mktemp("two")
    cap = StorageTier.capacity_for(12, bb, 1 << 20)
    keys = [make_key(i, "two") for i in range(24)]

    def open_tier(i: int) -> StorageTier:
        buf = mmap.mmap(-1, 8 * bb)
        prim = np.frombuffer(buf, dtype=np.uint8).reshape(8, bb)
        ctx = TierContext("two", namespace_fingerprint("two"), bb, prim, f"storage{i}")
        return StorageTier(ctx, path=str(path), capacity_bytes=cap, n_read_threads=1,
                           n_write_threads=1, slab_bytes=1 << 20, sync_seconds=3600)

    tiers = [open_tier(0), open_tier(1)]
    jid = itertools.count(1)

    def job(t: StorageTier, kind: str, ks: list[bytes]) -> frozenset[bytes]:
        j = next(jid)
        (t.submit_store if kind == "store" else t.submit_load)(j, ks, np.arange(len(ks)))
        deadline = time.monotonic() + 20
        while True:
            for res in t.poll():
                assert res.job_id == j
                return res.failed_keys
            assert time.monotonic() < deadline
            time.sleep(0.0005)

    try:
        for kind, e, idx in ops:
            t = tiers[e]
            ks = [keys[i] for i in idx]
            if kind == "store":
                for n, k in enumerate(ks):
                    t.ctx.primary[n] = block_bytes_for(k, bb)
                job(t, "store", ks)
            elif kind == "load":
                t.ctx.primary[: len(ks)] = 0
                failed = job(t, "load", ks)
                for n, k in enumerate(ks):
                    if k not in failed:
                        assert np.array_equal(t.ctx.primary[n], block_bytes_for(k, bb))
            elif kind == "sync":
                t.sync_now()
            else:
                t.shutdown()
                tiers[e] = open_tier(e)
            assert dir_bytes(path) <= cap
        for t in tiers + tiers:
            t.sync_now()
        for a, b in ((0, 1), (1, 0)):
            assert tiers[a]._sh is not None
            with tiers[a]._sh.index.lock:
                held = set(tiers[a]._sh.index.own)
            assert all(tiers[b].lookup([k]) == 1 for k in held)
        assert all(t.stats()["corrupt"] == 0 for t in tiers)
    finally:
        for t in tiers:
            t.shutdown()


def test_long_keys_are_shared_by_digest_and_verified_in_full(tmp_path: Path) -> None:
    cap = StorageTier.capacity_for(32, BB, 1 << 20)
    a = manager(tmp_path, cap)
    b = manager(tmp_path, cap)
    try:
        tier_of(a).sync_now()
        tier_of(b).sync_now()
        keys = [make_key(i, "long") * 3 + bytes([i]) for i in range(6)]  # 97 bytes each
        store_blocks(a, keys)
        settle(a)
        tier_of(b).sync_now()
        assert tier_of(b).lookup(keys) == 6
        assert load_and_check(b, keys) == 6
        # a different long key never matches, even where its digest form were to collide
        other = make_key(0, "long") * 3 + b"\xff"
        assert tier_of(b).lookup([other]) == 0
    finally:
        a.shutdown()
        b.shutdown()


def test_capacity_is_the_directorys_whoever_joins(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cap = StorageTier.capacity_for(32, BB, 1 << 20)
    a = manager(tmp_path, cap)
    try:
        b = manager(tmp_path, 2 * cap)  # joins: the directory's capacity stands, and it says so
        try:
            assert tier_of(b).stats()["capacity_bytes"] == cap
            assert "differs from the" in caplog.text
        finally:
            b.shutdown()
    finally:
        a.shutdown()
    c = manager(tmp_path, 2 * cap)  # alone: a new capacity is applied
    try:
        st = tier_of(c).stats()
        assert st["capacity_bytes"] == 2 * cap and st["max_blocks"] >= 64
    finally:
        c.shutdown()


def test_unusable_pool_file(tmp_path: Path) -> None:
    cap = StorageTier.capacity_for(32, BB, 1 << 20)
    keys = [make_key(i, "pool") for i in range(8)]
    a = manager(tmp_path, cap)
    store_blocks(a, keys)
    settle(a)
    pool = Path(tier_of(a).directory) / "POOL"
    pool.write_text("{not json")
    b = manager(tmp_path, cap)  # not alone: cannot use the directory now; never raises
    try:
        st = tier_of(b).stats()
        assert "error" in st and "POOL" in st["error"] and not st["available"]
    finally:
        b.shutdown()
        a.shutdown()
    c = manager(tmp_path, cap)  # alone: sets the directory up again, and keeps the blocks
    try:
        assert "error" not in tier_of(c).stats()
        assert load_and_check(c, keys) == 8
        assert dir_bytes(tmp_path) <= cap
    finally:
        c.shutdown()
