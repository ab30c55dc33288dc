"""Storage tier faults on real files: corrupted, truncated and swapped records, torn writes,
a full file system, failing writes and an unusable directory. Nothing bad is ever served, and
nothing raises into the manager."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import block_bytes_for, load_and_check, lookup_until, make_key, settle, store_blocks

import kvtier
from kvtier.tiers.storage import StorageTier
from kvtier.tiers.storage.slab import SLOT_HEADER

BB = 64 << 10


def make_manager(path: Path, namespace: str, *, slots: int = 8, **tier: object) -> kvtier.TieringManager:
    params = {"type": "storage", "path": str(path), "capacity_bytes": 32 << 20,
              "n_read_threads": 2, "n_write_threads": 2, **tier}
    cfg = {"cpu_bytes_to_use": slots * BB, "secondary_tiers": [params]}
    spec = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BB,
                                        namespace=namespace)
    return spec.get_manager()


def storage(m: kvtier.TieringManager) -> StorageTier:
    tier = m.tiers[0]
    assert isinstance(tier, StorageTier)
    return tier


def loc(m: kvtier.TieringManager, key: bytes) -> tuple[str, int]:
    """(slab file, offset) of ``key``'s record."""
    where = storage(m).record_location(key)
    assert where is not None
    return where


def tier_stats(m: kvtier.TieringManager) -> dict:
    return m.get_stats()["tiers"]["storage0"]


def served(m: kvtier.TieringManager, key: bytes) -> bool | None:
    """Ask for one block from storage: None when it is a miss, else whether its bytes are right."""
    if lookup_until(m, [key]) != 1:
        return None
    ctx = kvtier.ReqContext("check")
    spec = m.prepare_load([key], ctx)
    ok = bool(np.array_equal(m.primary_blocks()[int(spec.block_ids[0])],
                             block_bytes_for(key, BB)))
    m.complete_load([key], ctx)
    return ok


def patch(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


@pytest.fixture
def stored(tmp_path: Path, namespace: str) -> Iterator[tuple[kvtier.TieringManager, list[bytes]]]:
    """A manager whose storage tier holds 6 blocks, none of them in the primary tier."""
    m = make_manager(tmp_path, namespace)
    keys = [make_key(i, namespace) for i in range(6)]
    store_blocks(m, keys)
    settle(m)
    m.reset_cache()
    yield m, keys
    m.shutdown()


def test_flipped_payload_byte_is_a_miss_removed_and_counted(stored) -> None:
    m, keys = stored
    path, off = loc(m, keys[2])
    b = read(path, off + SLOT_HEADER + 1234, 1)
    patch(path, off + SLOT_HEADER + 1234, bytes([b[0] ^ 0x01]))
    assert served(m, keys[2]) is None
    st = tier_stats(m)
    assert st["corrupt"] == 1 and st["hits"] == 0
    assert storage(m).lookup([keys[2]]) == 0  # removed from the index
    removed = [k for e in m.take_events() if e.medium == "STORAGE" and e.removed for k in e.keys]
    assert removed == [keys[2]]
    assert read(path, off, 4) == b"\0\0\0\0"  # its header is gone from disk too
    for k in keys[:2] + keys[3:]:
        assert served(m, k) is True


def test_flipped_header_byte_is_a_miss(stored) -> None:
    m, keys = stored
    path, off = loc(m, keys[0])
    b = read(path, off + 60, 1)  # inside the key
    patch(path, off + 60, bytes([b[0] ^ 0x80]))
    assert served(m, keys[0]) is None
    assert tier_stats(m)["corrupt"] == 1
    assert load_and_check(m, keys[1:]) == 5


def test_truncated_record_is_a_miss(stored) -> None:
    m, keys = stored
    locs = {k: loc(m, k) for k in keys}
    last = max(keys, key=lambda k: locs[k][1])
    path, off = locs[last]
    os.truncate(path, off + SLOT_HEADER + BB // 2)
    assert served(m, last) is None
    assert tier_stats(m)["corrupt"] == 1
    assert load_and_check(m, [k for k in keys if k != last]) == 5


def test_swapped_records_are_misses(stored) -> None:
    m, keys = stored
    (pa, oa), (pb, ob) = loc(m, keys[1]), loc(m, keys[4])
    ra, rb = read(pa, oa, SLOT_HEADER + BB), read(pb, ob, SLOT_HEADER + BB)
    patch(pa, oa, rb)
    patch(pb, ob, ra)
    assert served(m, keys[1]) is None
    assert served(m, keys[4]) is None
    assert tier_stats(m)["corrupt"] == 2


def test_swapped_payloads_are_misses_after_restart(tmp_path: Path, namespace: str) -> None:
    m = make_manager(tmp_path, namespace)
    keys = [make_key(i, namespace) for i in range(6)]
    store_blocks(m, keys)
    settle(m)
    (pa, oa), (pb, ob) = loc(m, keys[1]), loc(m, keys[4])
    m.shutdown()
    a, b = read(pa, oa + SLOT_HEADER, BB), read(pb, ob + SLOT_HEADER, BB)
    patch(pa, oa + SLOT_HEADER, b)
    patch(pb, ob + SLOT_HEADER, a)
    m = make_manager(tmp_path, namespace)
    try:
        assert tier_stats(m)["blocks"] == 6  # start checks headers; payloads at every load
        assert served(m, keys[1]) is None and served(m, keys[4]) is None
        assert tier_stats(m)["corrupt"] == 2
        assert load_and_check(m, keys[:1] + keys[2:4] + keys[5:]) == 4
    finally:
        m.shutdown()


def test_what_a_kill_mid_write_leaves_is_never_served(tmp_path: Path, namespace: str) -> None:
    """A writer killed while overwriting a slot had logged the slot's DEL (it always does before
    overwriting), the record is half new, and the log ends in a half-written entry."""
    m = make_manager(tmp_path, namespace, n_read_threads=1, n_write_threads=1)
    keys = [make_key(i, namespace) for i in range(6)]
    store_blocks(m, keys)
    settle(m)
    path, off = loc(m, keys[3])
    tier = storage(m)
    assert tier._sh is not None
    geo = tier._sh.geo
    slot = off // geo.slot_size
    region = int(os.path.basename(path)[5:10])
    m.shutdown()
    from kvtier.tiers.storage import log as ilog

    log_path = os.path.join(os.path.dirname(path), f"log-{region:05d}")
    with open(log_path, "rb") as f:
        data = f.read()
    epoch = ilog.read_header(os.open(log_path, os.O_RDONLY))
    assert epoch is not None
    _entries, end = ilog.parse(data, epoch)
    patch(log_path, end, ilog.pack(ilog.DEL, slot, epoch=epoch))  # logged before overwriting
    patch(path, off + SLOT_HEADER + BB - 4096, b"\x55" * 4096)  # the record half rewritten
    patch(log_path, end + ilog.ENTRY, ilog.pack(ilog.PUT, slot, 0, 99, keys[3], epoch=epoch)[:40])
    m = make_manager(tmp_path, namespace, n_read_threads=1, n_write_threads=1)
    try:
        st = tier_stats(m)
        assert st["blocks"] == 5
        assert storage(m).lookup([keys[3]]) == 0
        assert load_and_check(m, keys[:3] + keys[4:]) == 5
        assert tier_stats(m)["corrupt"] == 0
    finally:
        m.shutdown()


# -- the file system fails -----------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a file system that really fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_file_system_fails_jobs_and_keeps_working(small_fs: Path, namespace: str) -> None:
    m = make_manager(small_fs, namespace, capacity_bytes=16 << 20)  # more than the disk has
    try:
        keys = [make_key(i, namespace) for i in range(60)]  # ~4 MiB
        for i in range(0, 60, 6):
            store_blocks(m, keys[i : i + 6])  # never raises
            settle(m)
            time.sleep(0.05)  # let the write side's backoff pass now and then
        st = tier_stats(m)
        assert st["store_failures"] > 0
        assert 0 < st["blocks"] < 30 and st["max_blocks"] < 30
        m.reset_cache()
        present = [k for k in keys if storage(m).lookup([k]) == 1]
        assert load_and_check(m, present) == len(present) == st["blocks"]
        # the newest blocks made it in by evicting within the space the disk really has
        assert any(storage(m).lookup([k]) for k in keys[-6:])
    finally:
        m.shutdown()


def _chattr(flag: str, path: str) -> bool:
    return subprocess.run(["chattr", flag, path], capture_output=True).returncode == 0


def test_write_errors_mark_the_tier_down_and_it_recovers(tmp_path: Path, namespace: str) -> None:
    m = make_manager(tmp_path, namespace)
    keys = [make_key(i, namespace) for i in range(24)]
    store_blocks(m, keys[:4])
    settle(m)
    slabs = [str(p) for p in Path(storage(m).directory).glob("slab-*")]
    if not all(_chattr("+i", p) for p in slabs):
        pytest.skip("chattr +i is not supported here")
    try:
        store_blocks(m, keys[4:12])  # permission denied on every write: no exception
        settle(m)
        st = tier_stats(m)
        assert st["store_failures"] + m.get_stats()["manager"]["cascade_failures"] >= 1
        assert not storage(m).available
        assert storage(m).lookup(keys[:4]) == 4  # reads still work
    finally:
        for p in slabs:
            _chattr("-i", p)
    deadline = time.monotonic() + 10
    while storage(m).lookup([keys[-1]]) == 0 and time.monotonic() < deadline:
        store_blocks(m, keys[12:])  # a probe gets through once the backoff passed
        settle(m)
        time.sleep(0.05)
    try:
        assert storage(m).available
        m.reset_cache()
        assert load_and_check(m, keys[:4] + keys[-2:]) == 6
    finally:
        m.shutdown()


def test_unusable_directory_at_start_never_raises_and_recovers(tmp_path: Path, namespace: str) -> None:
    blocker = tmp_path / "kv"
    blocker.write_text("a file where the directory should be")
    m = make_manager(blocker, namespace)
    try:
        st = tier_stats(m)
        assert "error" in st and not st["available"]
        keys = [make_key(i, namespace) for i in range(12)]
        store_blocks(m, keys)  # the CPU tier works on; the storage tier counts failures
        settle(m)
        assert storage(m).lookup(keys) == 0
        blocker.unlink()
        deadline = time.monotonic() + 10
        while not storage(m).available and time.monotonic() < deadline:
            m.on_schedule_end()  # poll re-probes: the directory is opened off the scheduler thread
            time.sleep(0.02)
        assert storage(m).available and "error" not in tier_stats(m)
        store_blocks(m, keys[:4])
        settle(m)
        m.reset_cache()
        assert load_and_check(m, keys[:4]) == 4
    finally:
        with contextlib.suppress(Exception):
            m.shutdown()


def test_fs_default_capacity_keeps_its_own_blocks_across_restarts(small_fs: Path, namespace: str
                                                                  ) -> None:
    """vLLM's fs type sizes itself from free space; its own files count as space it may keep."""
    cfg = {"cpu_bytes_to_use": 8 * BB, "secondary_tiers": [
        {"type": "fs", "root_dir": str(small_fs), "n_read_threads": 1, "n_write_threads": 1}]}

    def manager() -> kvtier.TieringManager:
        return kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BB,
                                            namespace=namespace).get_manager()

    m = manager()
    keys = [make_key(i, namespace) for i in range(20)]
    try:
        cap = m.get_stats()["tiers"]["fs0"]["capacity_bytes"]
        assert 1.5 * 2**20 < cap <= 0.9 * 2 * 2**20
        store_blocks(m, keys)
        settle(m)
        stored = m.get_stats()["tiers"]["fs0"]["blocks"]
        assert stored >= 16
    finally:
        m.shutdown()
    m = manager()
    try:
        st = m.get_stats()["tiers"]["fs0"]
        assert st["capacity_bytes"] >= cap - 64 * 1024 and st["blocks"] == stored
        assert load_and_check(m, keys) == stored
    finally:
        m.shutdown()


def test_after_a_full_file_system_the_tier_grows_back(small_fs: Path, namespace: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StorageTier, "REGROW_CHECK_S", 0.05)
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (1 << 20))  # half of the 2 MiB file system
    m = make_manager(small_fs, namespace, capacity_bytes=16 << 20)
    try:
        keys = [make_key(i, namespace) for i in range(40)]
        for i in range(0, 24, 6):
            store_blocks(m, keys[i : i + 6])
            settle(m)
            time.sleep(0.05)
        shrunk = tier_stats(m)["max_blocks"]
        assert 0 < shrunk < 16, "the tier should have kept to the space the disk had"
        filler.unlink()  # the operator frees space
        deadline = time.monotonic() + 10
        while tier_stats(m)["max_blocks"] <= shrunk and time.monotonic() < deadline:
            m.on_schedule_end()
            time.sleep(0.02)
        grown = tier_stats(m)["max_blocks"]
        assert grown > shrunk, "the tier never grew back after space was freed"
        for i in range(24, 40, 4):
            store_blocks(m, keys[i : i + 4])
            settle(m)
            time.sleep(0.05)
        st = tier_stats(m)
        assert st["blocks"] > shrunk
        assert st["usage_bytes"] <= st["capacity_bytes"]
        m.reset_cache()
        present = [k for k in keys if storage(m).lookup([k]) == 1]
        assert load_and_check(m, present) == len(present) == st["blocks"]
    finally:
        m.shutdown()


def test_write_back_keeps_blocks_whose_write_fails_on_a_real_disk_error(
        tmp_path: Path, namespace: str) -> None:
    """Write-back to a storage tier whose slab files stop accepting writes mid-run: the blocks
    whose write failed stay in the CPU tier, intact, and reach the tier once it recovers."""
    m = make_manager(tmp_path, namespace, write_policy="back")
    slots = 8
    keys = [make_key(i, namespace) for i in range(64)]
    store_blocks(m, keys[:slots + 4])  # 4 evicted and written: the slab files exist now
    settle(m)
    assert m.get_stats()["manager"]["written_back_blocks"] == 4
    slabs = [str(p) for p in Path(storage(m).directory).glob("slab-*")]
    if not slabs or not all(_chattr("+i", p) for p in slabs):
        for p in slabs:
            _chattr("-i", p)
        m.shutdown()
        pytest.skip("chattr +i is not supported here")
    try:
        resident = [k for k in keys[: slots + 4] if m.primary.is_ready(k)]
        ctx = kvtier.ReqContext("w")
        assert m.prepare_store(keys[slots + 4 : slots + 8], ctx) is None  # victims wait
        waiting = list(m.primary.retained)
        assert len(waiting) == 4
        settle(m)  # their writes fail with EPERM
        st = m.get_stats()["manager"]
        assert st["writeback_failures"] == 4
        assert not m.primary.retained
        assert all(m.primary.is_ready(k) for k in waiting), "failed writes keep the blocks"
        assert all(storage(m).lookup([k]) == 0 for k in waiting)
        assert load_and_check(m, resident) == len(resident), "nothing acknowledged was lost"
        m.primary.check()
    finally:
        for p in slabs:
            _chattr("-i", p)
    # The disk takes writes again: once a probe gets through, evicted blocks are written.
    # (Blocks evicted while the tier was down were let go unwritten, as write-through stores
    # to a down tier are: counted in writeback_skipped_blocks.)
    # (The manager's counters are read directly: get_stats() asks the tier whether it is
    # available, which would spend the probes the write-backs need.)
    before = m.counters["written_back_blocks"]
    deadline = time.monotonic() + 20
    j = 16
    while m.counters["written_back_blocks"] == before:
        assert time.monotonic() < deadline, "the tier never took writes again"
        store_blocks(m, keys[j : j + 4])  # fresh blocks: each batch evicts owed ones
        settle(m)
        j = 16 + (j - 16 + 4) % 48
        time.sleep(0.02)
    try:
        st = m.get_stats()["manager"]
        assert st["written_back_blocks"] > 4
        m.reset_cache()
        written = [k for k in keys if storage(m).lookup([k]) == 1]
        assert len(written) > 4
        assert load_and_check(m, written) == len(written)
    finally:
        m.shutdown()
