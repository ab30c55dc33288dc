"""Changes to a storage tier's files for tools: erase bad records, remove stray files, drop a lane,
compact a lane to the records it should keep.

Two rules make these safe beside running engines:

* A lane an engine holds (its ``lock``) is changed only by :func:`erase_record`, and only for a
  bad record whose bytes stayed the same while it was checked twice and once more right before
  erasing (a slot an engine writes changes). Erasing is what an engine itself does with a bad
  record: its header page is zeroed, so no reader finds it.
* Everything else (truncating, deleting, moving records) needs the lane's lock, taken with
  :class:`kvtier.tiers.storage.scan.LaneLock`, so that no engine attaches meanwhile.

Compaction keeps the engine's crash safety: the target slots of each batch of moves are written
to an intent file first and synced, so that a crash mid-move leaves records an engine verifies at
its next start; the originals stay in place until every copy is synced.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvtier.tiers.storage.scan import INTENT_CAPACITY, Lane, SlotCheck, pack_intent, recheck
from kvtier.tiers.storage.slab import ALIGN, SLOT_HEADER


@dataclass(frozen=True)
class EraseResult:
    """What happened to one record :func:`erase_record` was asked to erase."""

    done: bool
    note: str  # why not, when not done


def erase_record(lane: Lane, check: SlotCheck, *, locked: bool) -> EraseResult:
    """Zero the header page of a record (a bad one, or an older copy of a key) so that no engine
    reads it again.

    ``locked``: the caller holds the lane's lock (no engine is attached). Otherwise an engine may
    write the slot at any time: the caller has seen the same bad bytes twice, a moment apart (an
    engine names a slot in its intent file before it writes it, and writes it with one system
    call, so a slot being written changes). Either way the record is left alone when the slot
    changed since ``check`` read it (other bytes, another record); it is read again right before
    the header page is zeroed. A record cut short by the end of its file is cut off there when
    the lane is locked. Raises OSError.
    """
    now = recheck(lane, check)
    if (now.status, now.key, now.seq, now.digest) != (check.status, check.key, check.seq,
                                                      check.digest):
        return EraseResult(False, "the slot changed since it was read: left alone")
    size = os.path.getsize(check.file)
    ss = lane.slot_size or 0
    if locked and check.offset + ss > size and check.offset < size:
        os.truncate(check.file, check.offset)  # the file's last, partial slot
        return EraseResult(True, "file cut at the record's start")
    n = min(SLOT_HEADER, size - check.offset)
    if n > 0:
        fd = os.open(check.file, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(n), check.offset)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    return EraseResult(True, "header erased")


def remove_files(paths: Iterable[str]) -> list[str]:
    """Remove regular files (never directories); returns those removed. Raises OSError."""
    removed = []
    for p in paths:
        if os.path.islink(p) or os.path.isfile(p):
            os.unlink(p)
            removed.append(p)
    return removed


def drop_lane(lane: Lane) -> None:
    """Delete a lane directory and everything in it (the caller holds its lock)."""
    shutil.rmtree(lane.path)


@dataclass(frozen=True)
class CompactResult:
    """What a compaction did."""

    kept: int
    dropped: int
    moved: int
    bytes_before: int
    bytes_after: int


def compact(
    lane: Lane,
    records: list[SlotCheck],
    keep: Iterable[SlotCheck],
    *,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> CompactResult:
    """Rewrite a lane so that it holds exactly the records ``keep``, in its lowest slots, and cut
    its files after them. ``records`` are all the lane's valid records (from a header scan), those
    not kept are erased. The caller holds the lane's lock. Raises OSError; ValueError when the
    slab files are not laid out regularly enough to number their slots.
    """
    if lane.slot_size is None or not lane.regular:
        raise ValueError(f"{lane.path}: slab files are not laid out regularly; not compacted")
    ss = lane.slot_size
    kept = sorted(keep, key=lambda c: c.slot)
    kept_slots = {c.slot for c in kept}
    k = len(kept)
    dropped = [c for c in records if c.slot not in kept_slots]
    before = lane.usage_bytes
    sources = [c for c in kept if c.slot >= k]
    holes = [s for s in range(k) if s not in kept_slots]
    assert len(holes) == len(sources)
    after = _size_after(lane, k) + ALIGN * (len(lane.intents) + int(lane.has_namespace_file))
    if dry_run:
        return CompactResult(k, len(dropped), len(sources), before, after)
    spf = lane.slots_per_file

    def where(slot: int) -> tuple[str, int]:
        f, i = (0, slot) if spf is None else divmod(slot, spf)
        return os.path.join(lane.path, f"slab-{f:05d}.kvs"), i * ss

    intent = lane.intents[0] if lane.intents else os.path.join(lane.path, "intent-00")
    fds: dict[str, int] = {}
    buf = mmap.mmap(-1, ss)
    try:
        def fd(path: str) -> int:
            if path not in fds:
                fds[path] = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            return fds[path]

        # Erase dropped records below the new end first: a crash now loses only blocks to drop.
        zeros = bytes(SLOT_HEADER)
        for c in dropped:
            if c.slot < k:
                os.pwrite(fd(c.file), zeros, c.offset)
        for f in list(fds.values()):
            os.fdatasync(f)
        cap = INTENT_CAPACITY
        moved = 0
        for b0 in range(0, len(sources), cap):
            batch = list(zip(sources[b0 : b0 + cap], holes[b0 : b0 + cap]))
            ifd = os.open(intent, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.pwrite(ifd, pack_intent([dst for _src, dst in batch]), 0)
                os.fdatasync(ifd)
            finally:
                os.close(ifd)
            touched: set[str] = set()
            for src, dst in batch:
                n = os.preadv(fd(src.file), [buf], src.offset)
                path, off = where(dst)
                os.pwrite(fd(path), memoryview(buf)[:n], off)
                touched.add(path)
                moved += 1
                if progress is not None:
                    progress(n)
            for p in touched:
                os.fdatasync(fd(p))
        _cut(lane, k, fds)
        for f in fds.values():
            os.fdatasync(f)
        ifd = os.open(intent, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(ifd, bytes(SLOT_HEADER), 0)
            os.fdatasync(ifd)
        finally:
            os.close(ifd)
    finally:
        for f in fds.values():
            with contextlib.suppress(OSError):
                os.close(f)
        buf.close()
    return CompactResult(k, len(dropped), moved, before, after)


def _size_after(lane: Lane, k: int) -> int:
    ss = lane.slot_size or 0
    spf = lane.slots_per_file
    total = 0
    for slab in lane.slabs:
        first = 0 if spf is None else slab.index * spf
        if first >= k:
            continue
        total += min(slab.size, (k - first) * ss)
    return total


def _cut(lane: Lane, k: int, fds: dict[str, int]) -> None:
    """Remove slab space at and after slot ``k``."""
    ss = lane.slot_size or 0
    spf = lane.slots_per_file
    for slab in lane.slabs:
        first = 0 if spf is None else slab.index * spf
        if first >= k:
            f = fds.pop(slab.path, None)
            if f is not None:
                os.close(f)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(slab.path)
        elif slab.size > (k - first) * ss:
            os.truncate(slab.path, (k - first) * ss)
