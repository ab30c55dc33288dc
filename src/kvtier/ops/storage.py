"""Operator commands on a storage tier's directory: every namespace directory under a tier
``path`` (a *lane*: ``<fingerprint>``, and ``<fingerprint>.N`` of the single-engine layout).

Reads never take a lock, so they run beside engines. Changes follow
:mod:`kvtier.tiers.storage.repair`: a directory engines are attached to only ever has bad records
erased (never one an engine is writing); everything else (removing files, dropping a namespace,
compacting it, rewriting its logs) takes its lock first and skips directories engines hold.

In the region layout a slot holds a block only where a region log names it: the records checked
are those the logs name (a record of another block where a log names one is bad: no engine
serves it), and the bytes of other slots are free space. A region whose log is missing, and the
single-engine layout, are read by their record headers, as an engine adopting them would.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from kvtier.ops.common import GcPlan, Options, gc_result, schema
from kvtier.ops.shm import remove_stale, stale_regions
from kvtier.ops.units import WRITE_EDGES, UsageError, fmt_bytes, histogram
from kvtier.tiers.storage.repair import (
    compact,
    drop_lane,
    drop_log_entries,
    erase_record,
    remove_files,
)
from kvtier.tiers.storage.scan import (
    PROBE_FILE,
    Lane,
    SlotCheck,
    describe_lane,
    find_lanes,
    intent_slots,
    newest_copies,
    read_slots,
    recheck,
)
from kvtier.tiers.storage.scan_locks import LaneLock, lock_holders, process_name
from kvtier.tiers.storage.scan_logs import Logged, index_key, read_logs

_SETTLE_S = 0.25  # pause before a bad slot of a lane in use is read again


@dataclass
class Survey:
    """A lane's slots: the records an engine would serve, older copies, bad ones."""

    lane: Lane
    records: list[SlotCheck] = field(default_factory=list)  # every record an engine serves
    kept: list[SlotCheck] = field(default_factory=list)  # the newest copy of each key
    older: list[tuple[SlotCheck, SlotCheck]] = field(default_factory=list)
    bad: list[tuple[SlotCheck, str]] = field(default_factory=list)  # (as read, why it is bad)
    slots: int = 0
    logged: Logged | None = None  # what the region logs say (region layout)


def classify(lane: Lane, c: SlotCheck, logged: Logged | None) -> tuple[str, str | None]:
    """What a slot is worth: ("record", None), ("bad", reason) or ("free", None) (a slot no log
    names, or one whose record was erased)."""
    if logged is None or logged.region_of(lane, c.slot) in logged.without_log:
        if c.status == "record":
            return "record", None
        return ("bad", c.reason or "bad record") if c.status == "bad" else ("free", None)
    want = logged.slots.get(c.slot)
    if want is None or c.status == "empty":
        return "free", None
    if c.status == "bad":
        return "bad", c.reason or "bad record"
    assert c.key is not None
    if index_key(c.key) != want[0]:
        return "bad", ("another block's record: its region's log names another key in this slot"
                       " (no engine serves it)")
    return "record", None


def _missing(lane: Lane, logged: Logged, seen: set[int]) -> list[tuple[SlotCheck, str]]:
    """Slots a log names that lie beyond the end of their slab file."""
    out = []
    assert lane.pool is not None and lane.slot_size is not None
    for slot, (key, seq) in logged.slots.items():
        region, i = divmod(slot, lane.pool.slots_per_region)
        if slot in seen or region in logged.without_log:
            continue
        path = os.path.join(lane.path, f"slab-{region:05d}.kvs")
        out.append((SlotCheck(slot, path, i * lane.slot_size, "bad", key, seq,
                              "missing: its slab file ends before this slot"),
                    "missing: its slab file ends before this slot"))
    return out


def _where(c: SlotCheck) -> dict[str, Any]:
    return {"file": c.file, "offset": c.offset, "slot": c.slot}


def _dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


class StorageOps:
    """The commands on one storage tier root (or one lane directory of it)."""

    def __init__(self, root: str, lane: str | None, opts: Options) -> None:
        self.root = root
        self.only_lane = lane
        self.opts = opts

    # -- lanes --------------------------------------------------------------------------------
    def target_json(self) -> dict[str, Any]:
        """The ``target`` field."""
        return {"kind": "storage", "path": self.root, "lane": self.only_lane}

    def _all_lanes(self) -> list[Lane]:
        if self.only_lane is not None:
            return [describe_lane(os.path.join(self.root, self.only_lane))]
        return find_lanes(self.root)

    def lanes(self) -> list[Lane]:
        """The lanes the selection names (UsageError when a --namespace names none)."""
        lanes = self._all_lanes()
        sel = self.opts.selection
        chosen = [ln for ln in lanes if sel.matches(id=ln.name, fingerprint=ln.fingerprint,
                                                     namespace=ln.namespace,
                                                     block_bytes=ln.block_bytes)]
        sel.check_all_matched([ln.name for ln in lanes])
        return chosen

    def survey(self, lane: Lane, advance: Any = None) -> Survey:
        """Read every header of a lane (and its logs)."""
        sv = Survey(lane)
        if lane.slot_size is None:
            return sv
        logged = sv.logged = read_logs(lane) if lane.regions else None

        def prog(_nbytes: int, nslots: int) -> None:
            if advance is not None:
                advance(nslots)

        seen: set[int] = set()
        for c in read_slots(lane, payload=False, workers=self.opts.threads,
                            chunk_bytes=4 << 20, progress=prog):
            sv.slots += 1
            seen.add(c.slot)
            what, why = classify(lane, c, logged)
            if what == "record":
                sv.records.append(_with_logged_seq(c, logged))
            elif what == "bad":
                sv.bad.append((c, why or "bad record"))
        if logged is not None:
            sv.bad += _missing(lane, logged, seen)
        sv.kept, sv.older = newest_copies(sv.records)
        return sv

    def _surveys(self, lanes: list[Lane]) -> list[Survey]:
        total = sum(ln.file_slots(s) for ln in lanes for s in ln.slabs)
        with self.opts.progress.task("reading headers", total, unit="slots") as advance:
            return [self.survey(ln, advance) for ln in lanes]

    # -- inspect / du -------------------------------------------------------------------------
    def _namespace_json(self, sv: Survey, *, full: bool) -> dict[str, Any]:
        ln = sv.lane
        known = ln.slot_size is not None
        d: dict[str, Any] = {
            "id": ln.name, "fingerprint": ln.fingerprint, "namespace": ln.namespace,
            "lane": ln.index, "path": ln.path,
            "blocks": len(sv.kept) if known else None,
            "bytes": ln.usage_bytes,
            "data_bytes": len(sv.kept) * ln.slot_size if ln.slot_size else None,
        }
        if not full:
            return d
        seqs = [c.seq for c in sv.kept if c.seq > 0]
        newest = max(seqs, default=0)
        d.update({
            "block_bytes": ln.block_bytes, "record_bytes": ln.slot_size,
            "capacity_bytes": ln.capacity_bytes,
            "usage": None if not ln.capacity_bytes else ln.usage_bytes / ln.capacity_bytes,
            "slots": sv.slots, "slab_files": len(ln.slabs),
            "in_use": ln.in_use,
            "engines": [{"pid": p, "command": process_name(p)} for p in ln.holders],
            "age": {"unit": "writes", "newest_seq": newest,
                    "unknown": sum(1 for c in sv.kept if c.seq <= 0),
                    "buckets": histogram((newest - s for s in seqs), WRITE_EDGES)},
            "bad_headers": len(sv.bad), "older_copies": len(sv.older),
            "regions": ln.pool.regions if ln.pool is not None else None,
            "layout": "regions" if ln.regions else "single-engine",
            "unfinished_writes": 0 if ln.in_use else len(intent_slots(ln)) + len(ln.leftovers),
        })
        return d

    def _stale(self, surveys: list[Survey]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for sv in surveys:
            ln = sv.lane
            if ln.in_use:
                continue
            if ln.index > 0:
                out.append({"kind": "idle_lane", "path": ln.path, "bytes": _dir_bytes(ln.path),
                            "blocks": len(sv.kept),
                            "reason": f"no engine attached; lane {ln.index} of its namespace is "
                                      f"used only while {ln.index + 1} engines of it run at once"})
            elif not sv.kept and not sv.bad:
                out.append({"kind": "empty_lane", "path": ln.path, "bytes": _dir_bytes(ln.path),
                            "blocks": 0, "reason": "no records and no engine attached"})
            for p in ln.stray:
                out.append({"kind": "stray_file", "path": p, "bytes": _lsize(p),
                            "reason": "not part of the tier's layout (left by a crash or another "
                                      "program)" if not os.path.basename(p).startswith(PROBE_FILE)
                                      else "left by an engine that died while starting"})
            for p in ln.leftovers:
                out.append({"kind": "unfinished_file", "path": p, "bytes": _lsize(p),
                            "reason": "a log or presence file an engine was writing when it "
                                      "ended"})
            for p in _dead_engine_files(ln):
                out.append({"kind": "dead_engine", "path": p, "bytes": _lsize(p),
                            "reason": "the presence file of an engine that is gone (its regions "
                                      "are taken over by the next engine)"})
        return out

    def inspect(self) -> dict[str, Any]:
        """Namespaces, their blocks, bytes, ages and engines; stale pieces."""
        lanes = self.lanes()
        surveys = self._surveys(lanes)
        namespaces = [self._namespace_json(sv, full=True) for sv in surveys]
        stale = self._stale(surveys) + stale_regions(self.opts.shm_prefix)
        return {
            "schema": schema("inspect"), "target": self.target_json(),
            "medium": _fs_json(self.root), "namespaces": namespaces,
            "engines": sorted({p for ln in lanes for p in ln.holders}),
            "stale": stale,
            "totals": {"namespaces": len(namespaces),
                       "blocks": sum(n["blocks"] or 0 for n in namespaces),
                       "bytes": sum(n["bytes"] for n in namespaces)},
        }

    def du(self) -> dict[str, Any]:
        """Blocks and bytes per namespace."""
        surveys = self._surveys(self.lanes())
        namespaces = [self._namespace_json(sv, full=False) for sv in surveys]
        return {"schema": schema("du"), "target": self.target_json(), "namespaces": namespaces,
                "total_blocks": sum(n["blocks"] or 0 for n in namespaces),
                "total_bytes": sum(n["bytes"] for n in namespaces)}

    # -- fsck ---------------------------------------------------------------------------------
    def fsck(self, repair: bool) -> dict[str, Any]:
        """Read and verify every record; with ``repair`` erase the bad ones and remove strays."""
        lanes = self.lanes()
        t0 = time.perf_counter()
        checked = 0
        nbytes = 0
        bad: list[dict[str, Any]] = []
        stray: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        total = sum(ln.slab_bytes for ln in lanes)
        with self.opts.progress.task("fsck", total) as advance:
            for ln in lanes:
                if ln.slot_size is None:
                    if ln.slab_bytes:
                        skipped.append({"namespace": ln.name, "reason": "block size unknown: no "
                                        "NAMESPACE file and no readable record"})
                    advance(ln.slab_bytes)
                    continue
                lock = LaneLock(ln)
                locked = repair and not ln.in_use and lock.acquire()
                try:
                    n, b, lane_bad, lane_stray = self._fsck_lane(ln, repair, locked, advance)
                finally:
                    lock.release()
                checked += n
                nbytes += b
                bad += lane_bad
                stray += lane_stray
        secs = time.perf_counter() - t0
        return {
            "schema": schema("fsck"), "target": self.target_json(), "repair": repair,
            "records_checked": checked, "records_bad": len(bad), "bad": bad,
            "repaired": sum(1 for b in bad if b.get("repaired")),
            "stray": stray, "skipped": skipped,
            "bytes_read": nbytes, "seconds": secs,
            "read_bytes_per_s": nbytes / secs if secs > 0 else 0.0,
        }

    def _fsck_lane(self, ln: Lane, repair: bool, locked: bool,
                   advance: Any) -> tuple[int, int, list[dict[str, Any]], list[dict[str, Any]]]:
        records: list[SlotCheck] = []
        suspects: list[tuple[SlotCheck, str]] = []
        read = 0
        logged = read_logs(ln) if ln.regions else None

        def prog(n: int, _slots: int) -> None:
            nonlocal read
            read += n
            advance(n)

        seen: set[int] = set()
        for c in read_slots(ln, payload=True, workers=self.opts.threads,
                            chunk_bytes=self.opts.chunk_bytes, progress=prog):
            seen.add(c.slot)
            what, why = classify(ln, c, logged)
            if what == "record":
                records.append(_with_logged_seq(c, logged))
            elif what == "bad":
                suspects.append((c, why or "bad record"))
        if logged is not None:
            suspects += _missing(ln, logged, seen)
        # Unless this command holds the directory, an engine may be writing it (one on another
        # host of a network file system shows in no /proc/locks): bad slots are read again, with
        # the logs, to be sure.
        online = not locked
        confirmed = self._confirm(ln, suspects) if online else suspects
        # a record being rewritten while it was read is no longer bad: count it as checked
        checked = len(records) + len(suspects)
        findings: list[tuple[SlotCheck, str]] = list(confirmed)
        if logged is None or logged.without_log:
            # Older copies of a key are what an engine adopting these headers drops (in the
            # region layout two engines may each hold a copy: that is no fault).
            headers = [c for c in records if logged is None
                       or logged.region_of(ln, c.slot) in logged.without_log]
            _kept, older = newest_copies(headers) if locked or not ln.in_use else ([], [])
            for old, kept in older:
                findings.append((old, f"older copy of the record in "
                                      f"{os.path.basename(kept.file)} at offset {kept.offset} "
                                      f"(an engine keeps the newest)"))
        out: list[dict[str, Any]] = []
        unlink_from_logs: list[int] = []
        for c, reason in sorted(findings, key=lambda f: (f[0].file, f[0].offset)):
            entry: dict[str, Any] = {"key": c.key.hex() if c.key is not None else None,
                                     "reason": reason, "namespace": ln.name,
                                     "where": _where(c), "repaired": False}
            if c.namespace_fp is not None:
                entry["record_namespace"] = c.namespace_fp.hex()
            if repair:
                if reason.startswith("missing"):
                    entry["repaired"] = locked
                    entry["note"] = ("no longer named by its log" if locked else
                                     "the engine holding the region drops it at its next load")
                else:
                    res = erase_record(ln, c, locked=locked)
                    entry["repaired"] = res.done
                    entry["note"] = res.note
                if entry["repaired"] and logged is not None and c.slot in logged.slots:
                    unlink_from_logs.append(c.slot)
            out.append(entry)
        if unlink_from_logs and locked:
            drop_log_entries(ln, unlink_from_logs)
        strays: list[dict[str, Any]] = []
        for p in ln.stray:
            if ln.in_use and os.path.basename(p).startswith(PROBE_FILE):
                continue  # an engine is starting: its probe file comes and goes
            s: dict[str, Any] = {"path": p, "reason": "directory in a namespace directory"
                                 if os.path.isdir(p) and not os.path.islink(p)
                                 else "not part of the tier's layout", "removed": False}
            if repair and not os.path.isdir(p):
                s["removed"] = bool(remove_files([p]))  # no engine reads files it did not make
            elif repair:
                s["note"] = "directories are never removed"
            strays.append(s)
        return checked, read, out, strays

    @staticmethod
    def _confirm(ln: Lane, suspects: list[tuple[SlotCheck, str]]) -> list[tuple[SlotCheck, str]]:
        """Of the bad slots of a lane an engine holds, those that stay bad: read again after a
        pause, with the same bytes and (region layout) still named so by their log. A slot an
        engine is writing changes meanwhile, or leaves its log first; a torn read of a record
        being rewritten reads well the second time."""
        if not suspects:
            return []
        writing = intent_slots(ln)
        time.sleep(_SETTLE_S * (2 if any(c.slot in writing for c, _r in suspects) else 1))
        logged = read_logs(ln) if ln.regions else None
        out = []
        for c, reason in suspects:
            if reason.startswith("missing"):
                try:  # the file may have grown since the directory was listed
                    grown = os.path.getsize(c.file) >= c.offset + (ln.slot_size or 0)
                except OSError:
                    grown = False
                if grown:  # read it as any other slot: bad twice, a moment apart, to count
                    first = recheck(ln, c)
                    if classify(ln, first, logged)[0] == "bad":
                        time.sleep(_SETTLE_S)
                        now = recheck(ln, first)
                        what, why = classify(ln, now, read_logs(ln) if ln.regions else None)
                        if what == "bad" and now.same_as(first):
                            out.append((now, why or "bad record"))
                elif logged is not None and c.slot in logged.slots:
                    out.append((c, reason))
                continue
            now = recheck(ln, c)
            if not now.same_as(c):
                continue
            what, why = classify(ln, now, logged)
            if what == "bad" and why == reason:
                out.append((c, reason))
        return out

    # -- gc -----------------------------------------------------------------------------------
    def gc(self, plan: GcPlan) -> dict[str, Any]:
        """Drop namespaces, old blocks, blocks beyond a size, stale pieces."""
        if plan.older_than_s is not None:
            raise UsageError("--older-than: a storage tier records no times; its blocks age in "
                             "writes: use --older-than-writes N (blocks written since)")
        removed: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        lanes = self.lanes()
        gone: set[str] = set()
        if plan.drop:
            for ln in lanes:
                if self._drop(ln, "namespace", plan.dry_run, removed, skipped, "dropped"):
                    gone.add(ln.path)
        if plan.older_than_writes is not None or plan.shrink_to is not None:
            for ln in lanes:
                if ln.path not in gone:
                    self._shrink(ln, plan, removed, skipped)
        if plan.stale:
            self._gc_stale(lanes, gone, plan.dry_run, removed, skipped)
        return gc_result(self.target_json(), plan, removed, skipped)

    def _drop(self, ln: Lane, kind: str, dry_run: bool, removed: list[dict[str, Any]],
              skipped: list[dict[str, Any]], reason: str) -> bool:
        if ln.in_use:
            skipped.append({"id": ln.name, "reason": _in_use(ln)})
            return False
        lock = LaneLock(ln)
        if not dry_run and not lock.acquire():
            skipped.append({"id": ln.name, "reason": "an engine attached to it just now"})
            return False
        try:
            sv = self.survey(ln)
            size = _dir_bytes(ln.path)
            if not dry_run:
                drop_lane(ln)
            removed.append({"kind": kind, "id": ln.name, "namespace": ln.namespace,
                            "path": ln.path, "blocks": len(sv.kept), "bytes": size,
                            "reason": reason})
            return True
        finally:
            lock.release()

    def _shrink(self, ln: Lane, plan: GcPlan, removed: list[dict[str, Any]],
                skipped: list[dict[str, Any]]) -> None:
        if ln.in_use:
            skipped.append({"id": ln.name, "reason": _in_use(ln)})
            return
        if ln.slot_size is None:
            skipped.append({"id": ln.name, "reason": "block size unknown"})
            return
        if not ln.regions:
            skipped.append({"id": ln.name, "reason": "single-engine layout: start an engine on it "
                            "once to convert it, then again"})
            return
        lock = LaneLock(ln)
        if not plan.dry_run and not lock.acquire():
            skipped.append({"id": ln.name, "reason": "an engine attached to it just now"})
            return
        try:
            sv = self.survey(ln)
            keep = sorted(sv.kept, key=lambda c: (-c.seq, c.slot))
            why = []
            if plan.older_than_writes is not None:
                newest = max((c.seq for c in keep), default=0)
                keep = [c for c in keep if c.seq > 0 and newest - c.seq < plan.older_than_writes]
                why.append(f"written more than {plan.older_than_writes} writes ago")
            if plan.shrink_to is not None:
                keep = keep[: _fit(ln, sv, keep, plan.shrink_to)]
                why.append(f"beyond {fmt_bytes(plan.shrink_to)}, oldest first")
            assert sv.logged is not None
            res = compact(ln, sv.logged, keep, dry_run=True)
            if not res.dropped and res.bytes_after >= res.bytes_before:
                return  # nothing to drop, nothing to reclaim
            if not plan.dry_run:
                with self.opts.progress.task(f"compacting {ln.name[:12]}",
                                             res.moved * (ln.slot_size or 0)) as advance:
                    res = compact(ln, sv.logged, keep, progress=advance)
            if res.dropped or res.bytes_after < res.bytes_before:
                removed.append({"kind": "blocks", "id": ln.name, "namespace": ln.namespace,
                                "path": ln.path,
                                "blocks": len(sv.kept) - res.kept,
                                "bytes": res.bytes_before - res.bytes_after,
                                "kept_blocks": res.kept, "moved_blocks": res.moved,
                                "reason": "; ".join(why)})
        finally:
            lock.release()

    def _gc_stale(self, lanes: list[Lane], gone: set[str], dry_run: bool,
                  removed: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> None:
        live = [ln for ln in lanes if ln.path not in gone]
        for entry in self._stale([self.survey(ln) for ln in live if not ln.in_use]):
            path = entry["path"]
            if entry["kind"] in ("dead_engine", "unfinished_file"):
                size = entry["bytes"]
                if dry_run or remove_files([path]):
                    removed.append({"kind": entry["kind"], "id": os.path.basename(path),
                                    "path": path, "blocks": 0, "bytes": size})
                continue
            if entry["kind"] in ("idle_lane", "empty_lane"):
                ln = next(x for x in live if x.path == path)
                self._drop(ln, entry["kind"], dry_run, removed, skipped, entry["reason"])
                gone.add(path)
        for ln in live:
            if ln.path in gone or ln.in_use or not ln.stray:
                continue
            lock = LaneLock(ln)
            if not dry_run and not lock.acquire():
                skipped.append({"id": ln.name, "reason": "an engine attached to it just now"})
                continue
            try:
                for p in ln.stray:
                    if os.path.isdir(p) and not os.path.islink(p):
                        skipped.append({"id": p, "reason": "directories are never removed"})
                        continue
                    size = _lsize(p)
                    if dry_run or remove_files([p]):
                        removed.append({"kind": "stray_file", "id": ln.name, "path": p,
                                        "blocks": 0, "bytes": size})
            finally:
                lock.release()
        r, s = remove_stale(self.opts.shm_prefix, dry_run)
        removed += r
        skipped += s

    def close(self) -> None:
        """Nothing to release."""


def _with_logged_seq(c: SlotCheck, logged: Logged | None) -> SlotCheck:
    """A record with the write sequence its log gives it (a load can renew it there)."""
    if logged is None or c.slot not in logged.slots:
        return c
    return replace(c, seq=logged.slots[c.slot][1])


def _fit(ln: Lane, sv: Survey, keep: list[SlotCheck], size: int) -> int:
    """How many of ``keep`` (newest first) a compaction can leave within ``size`` bytes."""
    lo, hi = 0, len(keep)
    assert sv.logged is not None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if compact(ln, sv.logged, keep[:mid], dry_run=True).bytes_after <= size:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _dead_engine_files(ln: Lane) -> list[str]:
    """Presence files nobody holds (read from /proc/locks, no lock taken), when no engine is
    attached to the directory (an attached engine removes them itself)."""
    if ln.in_use:
        return []
    return [p for p in ln.engine_files
            if os.path.basename(p) != "writer" and not lock_holders(p)[1]]


def _in_use(ln: Lane) -> str:
    pids = ", ".join(str(p) for p in ln.holders) or "unknown"
    return f"in use by an engine (pid {pids}); stop it first"


def _lsize(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def _fs_json(path: str) -> dict[str, Any]:
    try:
        st = os.statvfs(path)
    except OSError:
        return {}
    return {"fs_bytes": st.f_blocks * st.f_frsize, "fs_free_bytes": st.f_bavail * st.f_frsize}
