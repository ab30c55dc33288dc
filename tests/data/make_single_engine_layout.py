"""Writes tests/data/single_engine_layout.tar.gz with the single-engine storage layout.

Run it with a kvtier whose storage tier predates sharing (commit 284a424), for example
``PYTHONPATH=<that checkout>/src python tests/data/make_single_engine_layout.py``. It stores
blocks of 4096 bytes under namespace "legacy/ns" from two tiers open at once (the second one
gets ``<fingerprint>.1``), stops them, then leaves what a kill during a write would have left in
the first directory: an intent file naming one slot whose payload tail is damaged.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import sys
import tarfile
import tempfile
import time

import numpy as np
import xxhash

from kvtier.format.record import namespace_fingerprint
from kvtier.tiers.base import TierContext
from kvtier.tiers.storage import StorageTier

BB = 4096
NS = "legacy/ns\x00block_bytes=4096"  # what TieringOffloadingSpec fingerprints


def key(i: int) -> bytes:
    return hashlib.sha256(f"legacy-{i}".encode()).digest()


def payload(k: bytes) -> np.ndarray:
    return np.random.default_rng(int.from_bytes(k[:8], "little")).integers(0, 256, BB, dtype=np.uint8)


def ctx() -> TierContext:
    prim = np.frombuffer(mmap.mmap(-1, 16 * BB), dtype=np.uint8).reshape(16, BB)
    return TierContext("legacy/ns", namespace_fingerprint(NS), BB, prim, "storage0")


def store(tier: StorageTier, ids: range) -> None:
    for n, i in enumerate(ids):
        tier.ctx.primary[n] = payload(key(i))
    tier.submit_store(1, [key(i) for i in ids], np.arange(len(ids)))
    deadline = time.time() + 10
    while not tier.poll():
        assert time.time() < deadline
        time.sleep(0.01)


def main() -> None:
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "single_engine_layout.tar.gz")
    with tempfile.TemporaryDirectory() as d:
        cap = 12 * (BB + 4096) + 5 * 4096
        a = StorageTier(ctx(), path=d, capacity_bytes=cap, n_read_threads=2, n_write_threads=2,
                        slab_bytes=1 << 20)
        b = StorageTier(ctx(), path=d, capacity_bytes=cap, n_read_threads=2, n_write_threads=2,
                        slab_bytes=1 << 20)
        assert b.lane_dir.endswith(".1"), b.lane_dir
        store(a, range(0, 8))
        store(b, range(100, 103))
        torn_path, torn_off = a.record_location(key(5))
        lane = a.lane_dir
        slot = torn_off // a._store.slot_size
        a.shutdown()
        b.shutdown()
        fd = os.open(torn_path, os.O_RDWR)
        os.pwrite(fd, b"\x55" * 2048, torn_off + 4096 + BB - 2048)
        os.close(fd)
        body = struct.pack("<4sI", b"KVTI", 1) + struct.pack("<Q", slot)
        with open(os.path.join(lane, "intent-01"), "r+b") as f:
            f.write(body + xxhash.xxh3_64_digest(body))
        with tarfile.open(out, "w:gz") as tar:
            tar.add(d, arcname="kv")
    print(f"wrote {out} ({os.path.getsize(out)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
