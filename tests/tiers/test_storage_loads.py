"""Storage tier loads: adjacent records read together are each verified; blocks are reported
loaded in prefix order before their job ends; a request whose blocks are in is served while the
rest of its step's promotion is still running."""

from __future__ import annotations

import itertools
import mmap
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from helpers import block_bytes_for, lookup_until, make_key, settle, store_blocks

import kvtier
from kvtier.format.record import namespace_fingerprint
from kvtier.tiers.base import TierContext, TierJobResult
from kvtier.tiers.example import ExampleTier
from kvtier.tiers.storage import StorageTier
from kvtier.tiers.storage.layout import SLOT_HEADER

BB = 16 << 10
_ids = itertools.count(1)


def tier_ctx(namespace: str, slots: int, bb: int) -> TierContext:
    """A TierContext over page-aligned memory, like the manager's region."""
    primary = np.frombuffer(mmap.mmap(-1, slots * bb), dtype=np.uint8).reshape(slots, bb)
    return TierContext(namespace, namespace_fingerprint(namespace), bb, primary, "storage0")


def _tier(path: Path, ctx, n_read: int = 1) -> StorageTier:
    return StorageTier(ctx, path=str(path), capacity_bytes=StorageTier.capacity_for(1024, BB),
                       n_read_threads=n_read, n_write_threads=1)


def _job(tier: StorageTier, kind: str, keys: Sequence[bytes], slots: Sequence[int],
         progress: list[tuple[int, list[bytes]]] | None = None) -> TierJobResult:
    jid = next(_ids)
    submit = tier.submit_store if kind == "store" else tier.submit_load
    submit(jid, list(keys), np.asarray(slots, dtype=np.int64))
    deadline = time.monotonic() + 20
    while True:
        if progress is not None:
            progress.extend(p for p in tier.poll_loaded() if p[0] == jid)
        for res in tier.poll():
            if res.job_id == jid:
                return res
        assert time.monotonic() < deadline, "tier job did not finish"
        time.sleep(0.001)


def _store(tier: StorageTier, ctx, keys: list[bytes]) -> None:
    for j, k in enumerate(keys):
        ctx.primary[j] = block_bytes_for(k, BB)
    assert _job(tier, "store", keys, range(len(keys))).success


def test_adjacent_records_read_together_are_each_verified(tmp_path: Path, namespace: str) -> None:
    ctx = tier_ctx(namespace, slots=8, bb=BB)
    tier = _tier(tmp_path, ctx)
    try:
        keys = [make_key(i, namespace) for i in range(8)]
        _store(tier, ctx, keys)
        where = [tier.record_location(k) for k in keys]
        assert all(w is not None for w in where)
        offs = [w[1] for w in where if w is not None]
        assert offs == [offs[0] + i * (SLOT_HEADER + BB) for i in range(8)]  # adjacent slots
        # one payload byte of the fourth record flipped on disk
        path, off = where[3]  # type: ignore[misc]
        with open(path, "r+b") as f:
            f.seek(off + SLOT_HEADER + 100)
            b = f.read(1)
            f.seek(off + SLOT_HEADER + 100)
            f.write(bytes([b[0] ^ 0xFF]))
        ctx.primary[:] = 0
        res = _job(tier, "load", keys, range(8))
        assert res.failed_keys == {keys[3]}
        for j, k in enumerate(keys):
            if j != 3:
                assert np.array_equal(ctx.primary[j], block_bytes_for(k, BB))
        st = tier.stats()
        assert st["corrupt"] == 1 and st["hits"] == 7
        assert st["load_chunks"] == 1  # the eight blocks went as one chunk of one thread
        assert tier.lookup([keys[3]]) == 0  # the bad record is gone
        # out of slot order: the runs split where slots are not adjacent
        ctx.primary[:] = 0
        res = _job(tier, "load", [keys[0], keys[2], keys[1]], [0, 1, 2])
        assert res.success
        assert np.array_equal(ctx.primary[1], block_bytes_for(keys[2], BB))
    finally:
        tier.shutdown()


def test_loaded_blocks_are_reported_in_prefix_order_before_the_job_ends(tmp_path: Path,
                                                                       namespace: str) -> None:
    ctx = tier_ctx(namespace, slots=24, bb=BB)
    tier = _tier(tmp_path, ctx)
    try:
        keys = [make_key(i, namespace) for i in range(24)]
        _store(tier, ctx, keys)
        tier.poll_loaded()  # reports from now on
        ctx.primary[:] = 0
        progress: list[tuple[int, list[bytes]]] = []
        order = keys[::-1]  # the prefix order of this request: not the slots' order
        res = _job(tier, "load", order, range(24), progress)
        assert res.success
        reported = [k for _j, ks in progress for k in ks]
        assert reported == order  # one read thread: every block reported, in prefix order
        assert not tier.poll_loaded()
        for j, k in enumerate(order):
            assert np.array_equal(ctx.primary[j], block_bytes_for(k, BB))
    finally:
        tier.shutdown()


def test_a_failed_block_is_never_reported_loaded(tmp_path: Path, namespace: str) -> None:
    ctx = tier_ctx(namespace, slots=8, bb=BB)
    tier = _tier(tmp_path, ctx)
    try:
        keys = [make_key(i, namespace) for i in range(8)]
        _store(tier, ctx, keys)
        path, off = tier.record_location(keys[5])  # type: ignore[misc]
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(b"\0" * 64)  # header gone
        tier.poll_loaded()
        progress: list[tuple[int, list[bytes]]] = []
        res = _job(tier, "load", keys, range(8), progress)
        assert res.failed_keys == {keys[5]}
        reported = [k for _j, ks in progress for k in ks]
        assert keys[5] not in reported and len(reported) == len(set(reported))
        assert set(reported) <= set(keys)
    finally:
        tier.shutdown()


class HalfwayTier(ExampleTier):
    """The example tier, loading the first half of every load job at once (reported through
    ``poll_loaded``) and the rest when the test opens the gate."""

    def __init__(self, ctx, **params):
        super().__init__(ctx, **params)
        self.gate = threading.Event()
        self.progress: deque[tuple[int, list[bytes]]] = deque()

    def submit_load(self, job_id: int, keys: Sequence[bytes], slots: np.ndarray) -> None:
        half = len(keys) // 2
        with self._lock:
            first = [self._blocks[k] for k in keys[:half]]
        for data, s in zip(first, slots[:half]):
            self.ctx.primary[s] = np.frombuffer(data, dtype=np.uint8)
        self.progress.append((job_id, list(keys[:half])))
        self._in_flight += 1
        rest, rest_slots, gate = list(keys[half:]), slots[half:], self.gate

        def later() -> None:
            gate.wait(10)
            with self._lock:
                data = [self._blocks[k] for k in rest]
            for d, s in zip(data, rest_slots):
                self.ctx.primary[s] = np.frombuffer(d, dtype=np.uint8)
            self._done.put(TierJobResult(job_id))

        threading.Thread(target=later, daemon=True).start()

    def poll_loaded(self) -> list[tuple[int, list[bytes]]]:
        out = list(self.progress)
        self.progress.clear()
        return out


def test_a_request_is_served_while_the_rest_of_its_promotion_runs(namespace: str) -> None:
    kvtier.register_tier("halfway-example", HalfwayTier)
    cfg = {"cpu_bytes_to_use": 16 * 4096, "secondary_tiers": [{"type": "halfway-example"}]}
    m = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=4096,
                                     namespace=namespace).get_manager()
    try:
        a_keys = [make_key(i, namespace) for i in range(4)]
        b_keys = [make_key(100 + i, namespace) for i in range(4)]
        store_blocks(m, a_keys + b_keys)
        settle(m)
        m.reset_cache()
        a, b = kvtier.ReqContext("a"), kvtier.ReqContext("b")
        assert m.lookup(a_keys, a) is None
        assert m.lookup(b_keys, b) is None
        m.on_schedule_end()  # one promotion job for both: a's blocks first
        assert m.lookup(a_keys, a) == 4  # a's half is in; the job is still running
        assert m.lookup(b_keys, b) is None
        assert m.has_pending_work()
        spec = m.prepare_load(a_keys, a)
        region = m.primary_blocks()
        for k, s in zip(a_keys, spec.block_ids):
            assert np.array_equal(region[int(s)], block_bytes_for(k, 4096))
        m.complete_load(a_keys, a)
        m.primary.check()
        held = [m.primary.key_slot[k] for k in a_keys]
        # loadable, but not evictable while the rest of their job runs
        assert all(m.primary.ref[s] == 1 for s in held)
        m.tiers[0].gate.set()  # type: ignore[attr-defined]
        assert lookup_until(m, b_keys, b) == 4
        settle(m)
        assert all(m.primary.ref[s] == 0 for s in held)
        c = m.get_stats()["manager"]
        assert c["promoted_blocks"] == 8 and c["promotion_failures"] == 0
        m.primary.check()
    finally:
        m.shutdown()
