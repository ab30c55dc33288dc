"""``kvtier inspect|fsck|gc|du`` on real storage tiers written by real managers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import block_bytes_for, load_and_check, lookup_until, make_key, settle, store_blocks
from ops_helpers import BB, SLOT, kv, patch, read, storage_manager, tree_digest

import kvtier
from kvtier.format.record import namespace_fingerprint, namespace_key
from kvtier.ops.common import Options
from kvtier.ops.storage import StorageOps
from kvtier.tiers.storage import StorageTier
from kvtier.tiers.storage.slab import SLOT_HEADER

NS_A = "ops/model-a"
NS_B = "ops/model-b"


def fp(ns: str) -> str:
    return namespace_fingerprint(namespace_key(ns, BB)).hex()


def where(m, key: bytes) -> tuple[str, int]:
    tier = m.tiers[0]
    assert isinstance(tier, StorageTier)
    loc = tier.record_location(key)
    assert loc is not None
    return loc


def fill(root: Path, ns: str, *phases: int, **kw) -> tuple[list[bytes], dict]:
    """Store blocks of ``ns``, ``phases[0]`` of them, every write finished before the next
    ``phases[1]`` (so that those are newer), ...; shut the manager down; (keys, last stats)."""
    m = storage_manager(root, ns, **kw)
    try:
        keys: list[bytes] = []
        for n in phases:
            batch = [make_key(len(keys) + i, ns) for i in range(n)]
            store_blocks(m, batch)
            settle(m)
            keys += batch
        return keys, m.get_stats()["tiers"]["storage0"]
    finally:
        m.shutdown()


# -- inspect / du ------------------------------------------------------------------------------
def test_inspect_and_du_agree_with_what_a_workload_stored(tmp_path: Path, capsys) -> None:
    root = tmp_path / "tier"
    _keys, st_a = fill(root, NS_A, 30)
    # B overflows its capacity: it keeps only what fits, evicting the rest
    cap_b = 12 * SLOT + 6 * 4096
    _keys, st_b = fill(root, NS_B, 25, capacity=cap_b)
    assert st_b["blocks"] < 25

    rc, du, _ = kv(capsys, "du", str(root), "--json")
    assert rc == 0 and du["schema"] == "kvtier.du/1"
    by_id = {n["id"]: n for n in du["namespaces"]}
    assert by_id[fp(NS_A)]["blocks"] == st_a["blocks"] == 30
    assert by_id[fp(NS_A)]["bytes"] == st_a["usage_bytes"]
    assert by_id[fp(NS_B)]["blocks"] == st_b["blocks"]
    assert by_id[fp(NS_B)]["bytes"] == st_b["usage_bytes"] <= cap_b
    assert du["total_blocks"] == 30 + st_b["blocks"]

    rc, ins, _ = kv(capsys, "inspect", str(root), "--json")
    assert rc == 0 and ins["schema"] == "kvtier.inspect/1"
    a = next(n for n in ins["namespaces"] if n["id"] == fp(NS_A))
    assert a["namespace"] == NS_A and a["block_bytes"] == BB and a["record_bytes"] == SLOT
    assert a["blocks"] == 30 and a["bytes"] == st_a["usage_bytes"]
    assert a["in_use"] is False and a["engines"] == []
    assert sum(b["blocks"] for b in a["age"]["buckets"]) == 30
    assert a["age"]["newest_seq"] == st_a["next_seq"] - 1
    assert a["age"]["buckets"][0] == {"below": 10, "blocks": 10}  # the last 10 written
    assert ins["totals"]["blocks"] == du["total_blocks"]
    assert [s for s in ins["stale"] if s["kind"] != "shm_region"] == []

    # one namespace by its string, by a short fingerprint, and a lane directory as TARGET
    rc, one, _ = kv(capsys, "du", str(root), "--json", "--namespace", NS_B)
    assert [n["id"] for n in one["namespaces"]] == [fp(NS_B)]
    rc, one, _ = kv(capsys, "du", str(root), "--json", "--namespace", fp(NS_A)[:8])
    assert [n["id"] for n in one["namespaces"]] == [fp(NS_A)]
    rc, one, _ = kv(capsys, "du", str(root / fp(NS_A)), "--json")
    assert [n["blocks"] for n in one["namespaces"]] == [30]

    rc, text, _ = kv(capsys, "inspect", str(root))
    assert rc == 0 and NS_A in text and "30" in text


def test_inspect_names_the_engine_that_holds_a_namespace(tmp_path: Path, capsys) -> None:
    root = tmp_path / "tier"
    m = storage_manager(root, NS_A)
    try:
        store_blocks(m, [make_key(i, NS_A) for i in range(5)])
        settle(m)
        rc, ins, _ = kv(capsys, "inspect", str(root), "--json")
        (a,) = ins["namespaces"]
        assert a["in_use"] is True and a["blocks"] == 5
        assert [e["pid"] for e in a["engines"]] == [os.getpid()]
        assert ins["engines"] == [os.getpid()]
    finally:
        m.shutdown()


# -- fsck --------------------------------------------------------------------------------------
def test_fsck_finds_exactly_what_was_corrupted_and_repair_makes_the_tier_serve(
        tmp_path: Path, capsys) -> None:
    root = tmp_path / "tier"
    m = storage_manager(root, NS_A)
    keys = [make_key(i, NS_A) for i in range(16)]
    store_blocks(m, keys)
    settle(m)
    b = storage_manager(root, NS_B)
    keys_b = [make_key(i, NS_B) for i in range(4)]
    store_blocks(b, keys_b)
    settle(b)
    loc = {k: where(m, k) for k in keys}
    foreign_path, foreign_off = where(b, keys_b[0])
    m.shutdown()
    b.shutdown()
    b_before = tree_digest(root / fp(NS_B))

    expected: dict[int, tuple[str, bytes]] = {}  # offset -> (reason starts with, key named)
    flipped, header, sa, sb, foreign, swapped1, swapped2 = keys[1:8]
    # a flipped bit in a payload
    p, off = loc[flipped]
    patch(p, off + SLOT_HEADER + 777, bytes([read(p, off + SLOT_HEADER + 777, 1)[0] ^ 0x10]))
    expected[off] = ("payload checksum mismatch", flipped)
    # a flipped bit in a header's key
    p, off = loc[header]
    patch(p, off + 60, bytes([read(p, off + 60, 1)[0] ^ 0x01]))
    expected[off] = ("header checksum mismatch", header[:4] + bytes([header[4] ^ 0x01]) + header[5:])
    # payloads swapped between two records
    (p, oa), (_, ob) = loc[sa], loc[sb]
    pa, pb = read(p, oa + SLOT_HEADER, BB), read(p, ob + SLOT_HEADER, BB)
    patch(p, oa + SLOT_HEADER, pb)
    patch(p, ob + SLOT_HEADER, pa)
    expected[oa] = ("payload checksum mismatch", sa)
    expected[ob] = ("payload checksum mismatch", sb)
    # a record of another namespace where one of A's was
    p, off = loc[foreign]
    patch(p, off, read(foreign_path, foreign_off, SLOT_HEADER + BB))
    expected[off] = ("namespace mismatch", keys_b[0])
    # two whole records swapped: each is still a valid record of its key (slots carry no meaning)
    (p, o1), (_, o2) = loc[swapped1], loc[swapped2]
    r1, r2 = read(p, o1, SLOT_HEADER + BB), read(p, o2, SLOT_HEADER + BB)
    patch(p, o1, r2)
    patch(p, o2, r1)
    # a truncated file: the record at the highest offset is cut in its payload
    last = max(keys, key=lambda k: loc[k][1])
    assert last not in keys[1:8]
    p, off = loc[last]
    os.truncate(p, off + SLOT_HEADER + BB // 2)
    expected[off] = ("truncated record", last)
    # a stray file
    (root / fp(NS_A) / "leftover.tmp").write_bytes(b"x" * 100)

    rc, r, _ = kv(capsys, "fsck", str(root), "--json")
    assert rc == 1 and r["schema"] == "kvtier.fsck/1"
    assert r["records_bad"] == len(expected) == 6
    assert r["records_checked"] == 16 + 4
    found = {x["where"]["offset"]: (x["reason"], x["key"]) for x in r["bad"]}
    assert set(found) == set(expected)
    for off, (reason, key) in expected.items():
        assert found[off][0].startswith(reason), (off, found[off])
        assert found[off][1] == key.hex()
    assert all(x["namespace"] == fp(NS_A) for x in r["bad"])
    assert [s["path"] for s in r["stray"]] == [str(root / fp(NS_A) / "leftover.tmp")]
    assert (root / fp(NS_A) / "leftover.tmp").exists()  # read-only without --repair

    rc, r, _ = kv(capsys, "fsck", str(root), "--json", "--repair")
    assert rc == 1 and r["records_bad"] == 6 and r["repaired"] == 6
    assert r["stray"][0]["removed"] is True
    rc, r, _ = kv(capsys, "fsck", str(root), "--json")
    assert rc == 0 and r["records_bad"] == 0 and r["stray"] == [] and r["records_checked"] == 14
    assert tree_digest(root / fp(NS_B)) == b_before  # the other namespace was never touched

    # an engine now serves every intact block right and finds nothing left to erase
    m = storage_manager(root, NS_A)
    try:
        st = m.get_stats()["tiers"]["storage0"]
        assert st["start_invalidated"] == 0
        damaged = {flipped, header, sa, sb, foreign, last}
        intact = [k for k in keys if k not in damaged]
        assert load_and_check(m, intact) == len(intact) == 10
        assert load_and_check(m, sorted(damaged)) == 0  # misses, not wrong bytes
        assert m.get_stats()["tiers"]["storage0"]["corrupt"] == 0
    finally:
        m.shutdown()


def test_fsck_reports_older_copies_and_a_record_of_another_block_size(tmp_path: Path,
                                                                      capsys) -> None:
    root = tmp_path / "tier"
    m = storage_manager(root, NS_A)
    keys = [make_key(i, NS_A) for i in range(6)]
    store_blocks(m, keys)
    settle(m)
    loc = {k: where(m, k) for k in keys}
    m.shutdown()
    # an old copy of keys[0]'s record over keys[1]: both valid, the engine keeps the newer one
    p, o0 = loc[keys[0]]
    _, o1 = loc[keys[1]]
    rec = bytearray(read(p, o0, SLOT_HEADER + BB))
    rec[SLOT_HEADER - 16 : SLOT_HEADER] = bytes(16)  # sequence 0: older than any other
    patch(p, o1, bytes(rec))
    rc, r, _ = kv(capsys, "fsck", str(root), "--json")
    assert rc == 1 and r["records_bad"] == 1
    (bad,) = r["bad"]
    assert bad["where"]["offset"] == o1 and bad["key"] == keys[0].hex()
    assert bad["reason"].startswith("older copy")


def test_fsck_beside_a_writing_engine_reports_nothing_and_repair_touches_nothing(
        tmp_path: Path) -> None:
    """An engine keeps storing (evicting and rewriting its slots) while fsck --repair runs over
    and over beside it: reads that catch a record half rewritten are never reported as bad, and
    afterwards every block the engine holds is served intact."""
    big = 256 << 10  # large records: a read often overlaps a write
    root = tmp_path / "tier"
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": 16 * big, "secondary_tiers": [
            {"type": "storage", "path": str(root), "capacity_bytes": 24 * (big + 4096) + 5 * 4096,
             "n_read_threads": 2, "n_write_threads": 2}]},
        gpu_block_size=16, bytes_per_gpu_block=big, namespace=NS_A)
    m = spec.get_manager()
    results: list[dict] = []
    stop = threading.Event()

    def fsck_loop() -> None:
        while not stop.is_set():
            results.append(StorageOps(str(root), None, Options(threads=4)).fsck(repair=True))

    try:
        store_blocks(m, [make_key(i, NS_A) for i in range(16)])
        reader = threading.Thread(target=fsck_loop)
        reader.start()
        i, t0 = 16, time.monotonic()
        try:
            while len(results) < 80 and time.monotonic() - t0 < 60:
                store_blocks(m, [make_key(i + j, NS_A) for j in range(16)])
                i += 16
        finally:
            stop.set()
            reader.join()
        assert len(results) >= 20
        assert [r["records_bad"] for r in results if r["records_bad"]] == []
        settle(m)
        m.reset_cache()
        held: set[bytes] = set()  # what the tier says it holds, from its events
        for ev in m.take_events():
            if ev.medium == "STORAGE":
                held = held - set(ev.keys) if ev.removed else held | set(ev.keys)
        assert len(held) == m.get_stats()["tiers"]["storage0"]["blocks"] >= 16
        assert load_and_check(m, sorted(held)) == len(held)
        assert m.get_stats()["tiers"]["storage0"]["corrupt"] == 0
    finally:
        m.shutdown()


def test_fsck_repair_on_a_namespace_in_use_erases_only_the_bad_record(tmp_path: Path,
                                                                       capsys) -> None:
    root = tmp_path / "tier"
    m = storage_manager(root, NS_A)
    try:
        keys = [make_key(i, NS_A) for i in range(8)]
        store_blocks(m, keys)
        settle(m)
        m.reset_cache()
        p, off = where(m, keys[3])
        patch(p, off + SLOT_HEADER + 5, bytes([read(p, off + SLOT_HEADER + 5, 1)[0] ^ 0xFF]))
        (root / fp(NS_A) / "junk").write_text("x")
        rc, r, _ = kv(capsys, "fsck", str(root), "--json", "--repair")
        assert rc == 1 and r["records_bad"] == 1 and r["bad"][0]["repaired"] is True
        assert r["stray"][0]["removed"] is True  # no engine reads a file it did not make
        assert read(p, off, 4) == b"\0\0\0\0"
        others = keys[:3] + keys[4:]
        assert load_and_check(m, others) == 7
        assert load_and_check(m, [keys[3]]) == 0
    finally:
        m.shutdown()


def test_fsck_progress_and_text_output(tmp_path: Path, capsys) -> None:
    root = tmp_path / "tier"
    fill(root, NS_A, 4)
    rc, text, err = kv(capsys, "fsck", str(root))
    assert rc == 0 and "checked 4 records" in text and ": 0 bad" in text
    assert "Traceback" not in err


_WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
import kvtier
from helpers import make_key, store_blocks
bb = 256 << 10
cfg = {"cpu_bytes_to_use": 16 * bb, "secondary_tiers": [{"type": "storage", "path": sys.argv[2],
       "capacity_bytes": 40 * (bb + 4096) + 5 * 4096, "n_read_threads": 2, "n_write_threads": 2,
       "slab_bytes": 4 << 20}]}
m = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=bb,
                                 namespace="ops/crash").get_manager()
i = 0
while True:
    store_blocks(m, [make_key(j, "crash") for j in range(i, i + 8)])
    m.on_schedule_end()
    i += 8
    print(i, flush=True)
"""


def test_after_a_crash_fsck_repair_leaves_nothing_for_the_engine_to_erase(tmp_path: Path,
                                                                          capsys) -> None:
    """An engine killed while writing (several slab files, slots being reused): fsck checks the
    lane as the engine's own start would, and after --repair the engine finds nothing to erase
    and serves every block it finds intact; compaction keeps that true."""
    big = 256 << 10
    root = tmp_path / "tier"
    tests = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, tests, str(root)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        n = 0
        while n < 120:
            n = int(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    rc, ins, _ = kv(capsys, "inspect", str(root), "--json", "--shm-prefix", "kvtier-opstest-x-")
    (lane,) = ins["namespaces"]
    assert lane["in_use"] is False and lane["slab_files"] == 3
    rc, r, _ = kv(capsys, "fsck", str(root), "--json", "--repair")
    assert rc in (0, 1) and r["repaired"] == r["records_bad"]
    rc, r, _ = kv(capsys, "fsck", str(root), "--json")
    assert rc == 0 and r["records_bad"] == 0

    def check() -> int:
        spec = kvtier.TieringOffloadingSpec(
            {"cpu_bytes_to_use": 8 * big, "secondary_tiers": [
                {"type": "storage", "path": str(root), "capacity_bytes": 40 * (big + 4096) + 5 * 4096,
                 "n_read_threads": 2, "n_write_threads": 2, "slab_bytes": 4 << 20}]},
            gpu_block_size=16, bytes_per_gpu_block=big, namespace="ops/crash")
        m = spec.get_manager()
        try:
            st = m.get_stats()["tiers"]["storage0"]
            assert st["start_invalidated"] == 0
            held = st["blocks"]
            region = m.primary_blocks()
            good = 0
            for j in range(n + 16):
                k = make_key(j, "crash")
                if lookup_until(m, [k]) != 1:
                    continue
                ctx = kvtier.ReqContext("check")
                slot = int(m.prepare_load([k], ctx).block_ids[0])
                good += int(np.array_equal(region[slot], block_bytes_for(k, big)))
                m.complete_load([k], ctx)
            assert good == held and m.get_stats()["tiers"]["storage0"]["corrupt"] == 0
            return held
        finally:
            m.shutdown()

    held = check()
    assert held > 10
    # compaction across the three slab files keeps the newest blocks, intact
    size = 12 * (big + 4096) + 5 * 4096
    rc, r, _ = kv(capsys, "gc", str(root), "--shrink-to", str(size), "--json")
    assert rc == 0 and r["removed"][0]["kept_blocks"] == 12
    rc, du, _ = kv(capsys, "du", str(root), "--json")
    assert du["total_blocks"] == 12 and du["total_bytes"] <= size
    assert check() == 12


# -- gc ----------------------------------------------------------------------------------------
def test_gc_drop_leaves_the_other_namespace_byte_for_byte(tmp_path: Path, capsys) -> None:
    root = tmp_path / "tier"
    cap = 32 << 20
    fill(root, NS_A, 20)
    keys_b, st_b = fill(root, NS_B, 12, capacity=cap)
    before = tree_digest(root / fp(NS_B))

    rc, r, _ = kv(capsys, "gc", str(root), "--namespace", NS_A, "--drop", "--dry-run", "--json")
    assert rc == 0 and r["dry_run"] and r["removed"][0]["blocks"] == 20
    assert (root / fp(NS_A)).exists()
    rc, r, _ = kv(capsys, "gc", str(root), "--namespace", NS_A, "--drop", "--json")
    assert rc == 0 and r["schema"] == "kvtier.gc/1"
    assert r["removed_blocks"] == 20 and r["freed_bytes"] > 20 * SLOT
    assert not (root / fp(NS_A)).exists()
    assert tree_digest(root / fp(NS_B)) == before
    rc, du, _ = kv(capsys, "du", str(root), "--json")
    (b,) = du["namespaces"]
    assert b["blocks"] == 12 and b["bytes"] == st_b["usage_bytes"] <= cap
    m = storage_manager(root, NS_B, capacity=cap)
    try:
        assert load_and_check(m, keys_b) == 12
    finally:
        m.shutdown()


def test_gc_skips_a_namespace_an_engine_holds(tmp_path: Path, capsys) -> None:
    root = tmp_path / "tier"
    m = storage_manager(root, NS_A)
    try:
        keys = [make_key(i, NS_A) for i in range(6)]
        store_blocks(m, keys)
        settle(m)
        m.reset_cache()
        for args in (["--drop"], ["--shrink-to", "1M"], ["--older-than-writes", "2"]):
            rc, r, _ = kv(capsys, "gc", str(root), "--namespace", NS_A, "--json", *args)
            assert rc == 1 and r["removed"] == [] and "in use" in r["skipped"][0]["reason"]
        assert load_and_check(m, keys) == 6
    finally:
        m.shutdown()


def test_gc_shrink_keeps_the_newest_blocks_within_the_size(tmp_path: Path, capsys) -> None:
    root = tmp_path / "tier"
    keys, _st = fill(root, NS_A, 24, 16)
    fill(root, NS_B, 10)
    before_b = tree_digest(root / fp(NS_B))
    fit = 16
    size = fit * SLOT + 5 * 4096 + 100  # 4 intent files and NAMESPACE take a page each
    rc, r, _ = kv(capsys, "gc", str(root), "--namespace", NS_A, "--shrink-to", str(size),
                  "--json")
    assert rc == 0
    (x,) = r["removed"]
    assert x["kept_blocks"] == fit and x["blocks"] == 40 - fit
    rc, du, _ = kv(capsys, "du", str(root), "--json", "--namespace", NS_A)
    assert du["namespaces"][0]["bytes"] <= size and du["namespaces"][0]["blocks"] == fit
    assert tree_digest(root / fp(NS_B)) == before_b
    rc, r, _ = kv(capsys, "fsck", str(root), "--json")
    assert rc == 0 and r["records_checked"] == fit + 10
    m = storage_manager(root, NS_A)
    try:
        assert load_and_check(m, keys[-fit:]) == fit  # the newest ones, intact
        assert load_and_check(m, keys[:-fit]) == 0
    finally:
        m.shutdown()


def test_gc_older_than_writes(tmp_path: Path, capsys) -> None:
    root = tmp_path / "tier"
    keys, _st = fill(root, NS_A, 18, 12)
    rc, r, _ = kv(capsys, "gc", str(root), "--older-than-writes", "12", "--json")
    assert rc == 0 and r["removed"][0]["blocks"] == 18 and r["removed"][0]["kept_blocks"] == 12
    rc, ins, _ = kv(capsys, "inspect", str(root), "--json")
    assert ins["namespaces"][0]["blocks"] == 12
    m = storage_manager(root, NS_A)
    try:
        assert load_and_check(m, keys[-12:]) == 12
        assert load_and_check(m, keys[:-12]) == 0
    finally:
        m.shutdown()


def test_gc_stale_removes_idle_lanes_and_stray_files_only(tmp_path: Path, capsys) -> None:
    root = tmp_path / "tier"
    first = storage_manager(root, NS_A)
    second = storage_manager(root, NS_A)  # the first holds the lane: this one takes lane 1
    keys = [make_key(i, NS_A) for i in range(5)]
    try:
        store_blocks(first, keys)
        settle(first)
        store_blocks(second, [make_key(i, "other") for i in range(3)])
        settle(second)
    finally:
        first.shutdown()
        second.shutdown()
    lane0, lane1 = root / fp(NS_A), root / (fp(NS_A) + ".1")
    assert lane1.is_dir()
    (lane0 / "crash.tmp").write_bytes(b"y" * 10)
    before0 = tree_digest(lane0)
    no_shm = ("--shm-prefix", "kvtier-opstest-none-")  # leave this host's regions out of it
    rc, ins, _ = kv(capsys, "inspect", str(root), "--json", *no_shm)
    kinds = sorted((s["kind"], s["path"]) for s in ins["stale"])
    assert kinds == [("idle_lane", str(lane1)), ("stray_file", str(lane0 / "crash.tmp"))]
    rc, r, _ = kv(capsys, "gc", str(root), "--stale", "--dry-run", "--json", *no_shm)
    assert rc == 0 and lane1.exists() and len(r["removed"]) == 2
    rc, r, _ = kv(capsys, "gc", str(root), "--stale", "--json", *no_shm)
    assert rc == 0 and {x["kind"] for x in r["removed"]} == {"idle_lane", "stray_file"}
    assert not lane1.exists() and not (lane0 / "crash.tmp").exists()
    after0 = tree_digest(lane0)
    assert after0 == {k: v for k, v in before0.items() if k != "crash.tmp"}
    m = storage_manager(root, NS_A)
    try:
        assert load_and_check(m, keys) == 5
    finally:
        m.shutdown()


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["inspect", "/nonexistent/kvtier"], "no such directory"),
    (["fsck", "ftp://host/x"], "unsupported URL scheme"),
    (["gc", "{root}"], "nothing to do"),
    (["gc", "{root}", "--drop"], "--drop needs --namespace"),
    (["gc", "{root}", "--older-than", "2h"], "--older-than-writes"),
    (["gc", "{root}", "--shrink-to", "lots"], "--shrink-to: expected a size"),
    (["du", "{root}", "--namespace", "nope"], "--namespace nope: no such namespace"),
    (["fsck", "/dev/shm"], "/dev/shm holds no records"),
    (["du", "{file}"], "not a directory"),
    (["fsck", "{root}", "--threads", "0"], "--threads"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys, args, message) -> None:
    root = tmp_path / "tier"
    fill(root, NS_A, 2)
    f = tmp_path / "file"
    f.write_text("x")
    args = [a.format(root=root, file=f) for a in args]
    rc, _out, err = kv(capsys, *args)
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_data_is_unchanged_by_read_only_commands(tmp_path: Path, capsys) -> None:
    root = tmp_path / "tier"
    fill(root, NS_A, 8)
    before = tree_digest(root)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    for cmd in ("inspect", "du", "fsck"):
        rc, _r, _ = kv(capsys, cmd, str(root), "--json")
        assert rc == 0
    time.sleep(0.01)
    assert tree_digest(root) == before
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
