"""Changes to a storage tier's files for tools: erase bad records, remove stray files, drop a
namespace directory, compact one to the records it should keep.

Two rules make these safe beside running engines:

* A directory an engine is attached to (it holds ``lock``) is changed only by
  :func:`erase_record`, and only for a bad record whose bytes stayed the same while it was checked
  twice and once more right before erasing (a slot an engine writes changes). Erasing is what an
  engine itself does with a bad record: its header page is zeroed, so no reader serves it; the
  engine that holds the region drops it from its log at its next load of it.
* Everything else (truncating, deleting, moving records, rewriting logs) needs the directory's
  ``lock`` exclusively, taken with :class:`kvtier.tiers.storage.scan_locks.LaneLock`: no engine is
  attached then, and none attaches meanwhile (a starting engine waits, then retries).

Compaction keeps the tier's crash safety: kept records are copied into the lowest free slots
first (free slots are named by no log, so a copy is invisible until the logs are rewritten), then
each region's log is rewritten to name what it holds, and only then are files cut. A crash at any
point leaves every block whole where some log names it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvtier.tiers.storage import log as ilog
from kvtier.tiers.storage.layout import ALIGN, dir_usage, log_name, round_up, slab_name
from kvtier.tiers.storage.scan import Lane, SlotCheck, recheck
from kvtier.tiers.storage.scan_logs import Logged
from kvtier.tiers.storage.slab import SLOT_HEADER


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
    if not now.same_as(check):
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
    logged: Logged,
    keep: Iterable[SlotCheck],
    *,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> CompactResult:
    """Rewrite a region-layout directory so that it holds exactly the records ``keep`` (records
    its logs name), in its lowest slots, region by region, and cut or remove its files after them.
    The caller holds the directory's lock. Raises OSError; ValueError for a directory of the
    single-engine layout (an engine converts it when it starts).
    """
    geo = lane.pool
    if geo is None or lane.slot_size is None:
        raise ValueError(f"{lane.path}: single-engine layout; start an engine on it once to "
                         "convert it, then compact")
    ss = lane.slot_size
    kept = sorted(keep, key=lambda c: c.slot)
    k = len(kept)
    targets: list[int] = []
    for r in range(geo.regions):
        if len(targets) >= k:
            break
        base = geo.base(r)
        targets.extend(range(base, base + min(geo.slots_in(r), k - len(targets))))
    target_set = set(targets)
    kept_slots = {c.slot for c in kept}
    holes = [t for t in targets if t not in kept_slots]
    sources = [c for c in kept if c.slot not in target_set]
    assert len(holes) == len(sources)
    dropped = len([s for s in logged.slots if s not in kept_slots])
    placed: dict[int, SlotCheck] = {c.slot: c for c in kept if c.slot in target_set}
    moves = list(zip(sources, holes))
    for src, dst in moves:
        placed[dst] = src
    by_region: dict[int, list[int]] = {}
    for t in targets:
        by_region.setdefault(t // geo.slots_per_region, []).append(t)
    before = lane.usage_bytes
    small = sum(round_up(max(os.path.getsize(p), 1), ALIGN) for p in
                (os.path.join(lane.path, n) for n in ("NAMESPACE", "POOL")) if os.path.exists(p))
    after = small + sum((max(ts) - geo.base(r) + 1) * ss
                        + round_up(ilog.ENTRY * (1 + len(ts)), ALIGN)
                        for r, ts in by_region.items())
    if dry_run:
        return CompactResult(k, dropped, len(moves), before, after)

    def path(slot: int) -> tuple[str, int]:
        r, i = divmod(slot, geo.slots_per_region)
        return os.path.join(lane.path, slab_name(r)), i * ss

    fds: dict[str, int] = {}
    buf = mmap.mmap(-1, ss)
    try:
        def fd(p: str) -> int:
            if p not in fds:
                fds[p] = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
            return fds[p]

        for src, dst in moves:  # 1. copies into free slots, invisible until the logs name them
            n = os.preadv(fd(src.file), [buf], src.offset)
            p, off = path(dst)
            os.pwrite(fd(p), memoryview(buf)[:n], off)
            if progress is not None:
                progress(n)
        for f in fds.values():
            os.fdatasync(f)
        for r in range(geo.regions):  # 2. each region's log names what it holds now
            ts = by_region.get(r)
            log_path = os.path.join(lane.path, log_name(r))
            if not ts:
                continue
            entries = []
            for t in ts:
                c = placed[t]
                assert c.key is not None
                seq = logged.slots.get(c.slot, (b"", c.seq))[1]
                entries.append((ilog.PUT, t - geo.base(r), 0, seq, ilog.index_key(c.key)))
            ilog.LogWriter.create(log_path, r, geo.log_size(r), entries, sync=True).close()
        for slab in lane.slabs:  # 3. then files are cut, or go with the regions left empty
            ts = by_region.get(slab.index)
            if not ts:
                if slab.path in fds:
                    os.close(fds.pop(slab.path))
                for p in (slab.path, os.path.join(lane.path, log_name(slab.index))):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)
            else:
                end = (max(ts) - geo.base(slab.index) + 1) * ss
                if os.path.getsize(slab.path) > end:
                    os.truncate(slab.path, end)
    finally:
        for f in fds.values():
            with contextlib.suppress(OSError):
                os.close(f)
        buf.close()
    return CompactResult(k, dropped, len(moves), before, lane_usage(lane))


def lane_usage(lane: Lane) -> int:
    """The directory's usage now, as the tier counts it."""
    return dir_usage(lane.path)


def drop_log_entries(lane: Lane, slots: Iterable[int]) -> int:
    """Rewrite the logs of a region-layout directory nobody is attached to (the caller holds its
    lock) so that they no longer name ``slots`` (records found bad, erased or missing); returns
    how many entries went."""
    geo = lane.pool
    assert geo is not None
    by_region: dict[int, set[int]] = {}
    for s in slots:
        r, i = divmod(s, geo.slots_per_region)
        by_region.setdefault(r, set()).add(i)
    dropped = 0
    for r, gone in by_region.items():
        path = os.path.join(lane.path, log_name(r))
        got = ilog.LogTail(path).read()
        if got is None:
            continue
        held: dict[int, tuple[bytes, int]] = {}
        for kind, slot, _aux, value, key in got[1]:
            if kind == ilog.PUT:
                held[slot] = (key, value)
            elif kind == ilog.DEL:
                held.pop(slot, None)
        entries = [(ilog.PUT, i, 0, seq, k) for i, (k, seq) in sorted(held.items()) if i not in gone]
        dropped += len(held) - len(entries)
        ilog.LogWriter.create(path, r, geo.log_size(r), entries, sync=True).close()
    return dropped
