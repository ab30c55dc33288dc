"""Operator commands on a storage tier's directory: every namespace lane under a tier ``path``.

Reads never take a lane's lock, so they run beside engines. Changes follow
:mod:`kvtier.tiers.storage.repair`: a lane an engine holds only ever has bad records erased
(never one an engine is writing); everything else (removing files, dropping a lane, compacting it)
takes the lane's lock first and skips lanes an engine holds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from kvtier.ops.common import GcPlan, Options, gc_result, schema
from kvtier.ops.shm import remove_stale, stale_regions
from kvtier.ops.units import WRITE_EDGES, UsageError, fmt_bytes, histogram
from kvtier.tiers.storage.repair import compact, drop_lane, erase_record, remove_files
from kvtier.tiers.storage.scan import (
    PROBE_FILE,
    Lane,
    LaneLock,
    SlotCheck,
    describe_lane,
    find_lanes,
    intent_slots,
    newest_copies,
    process_name,
    read_slots,
    recheck,
)

_SETTLE_S = 0.25  # pause before a bad slot of a lane in use is read again


@dataclass
class Survey:
    """A lane's headers: the records an engine would index, older copies, bad headers."""

    lane: Lane
    records: list[SlotCheck] = field(default_factory=list)  # every valid header
    kept: list[SlotCheck] = field(default_factory=list)  # the newest copy of each key
    older: list[tuple[SlotCheck, SlotCheck]] = field(default_factory=list)
    bad: list[SlotCheck] = field(default_factory=list)
    slots: int = 0


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
        """Read every header of a lane."""
        sv = Survey(lane)
        if lane.slot_size is None:
            return sv

        def prog(_nbytes: int, nslots: int) -> None:
            if advance is not None:
                advance(nslots)

        for c in read_slots(lane, payload=False, workers=self.opts.threads,
                            chunk_bytes=4 << 20, progress=prog):
            sv.slots += 1
            if c.status == "record":
                sv.records.append(c)
            elif c.status == "bad":
                sv.bad.append(c)
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
            "unfinished_writes": 0 if ln.in_use else len(intent_slots(ln)),
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
                                      "program)" if os.path.basename(p) != PROBE_FILE else
                                      "left by an engine that died while starting"})
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
        suspects: list[SlotCheck] = []
        read = 0

        def prog(n: int, _slots: int) -> None:
            nonlocal read
            read += n
            advance(n)

        for c in read_slots(ln, payload=True, workers=self.opts.threads,
                            chunk_bytes=self.opts.chunk_bytes, progress=prog):
            if c.status == "record":
                records.append(c)
            elif c.status == "bad":
                suspects.append(c)
        # Unless this command holds the lane, an engine may be writing it (one on another host
        # of a network file system shows in no /proc/locks): bad slots are read again to be sure.
        online = not locked
        confirmed = self._confirm(ln, suspects) if online else suspects
        # a record being rewritten while it was read is no longer bad: count it as checked
        checked = len(records) + len(suspects)
        # Older copies of a key are what an engine drops at its next start; one that holds the
        # lane never reads them (its index names the newest), and it makes them itself for an
        # instant when a key evicted from one slot is stored again before that slot is rewritten.
        _kept, older = newest_copies(records) if locked or not ln.in_use else ([], [])
        findings: list[tuple[SlotCheck, str]] = [(c, c.reason or "bad record") for c in confirmed]
        for old, kept in older:
            findings.append((old, f"older copy of the record in {os.path.basename(kept.file)} "
                                  f"at offset {kept.offset} (an engine keeps the newest)"))
        out: list[dict[str, Any]] = []
        for c, reason in sorted(findings, key=lambda f: (f[0].file, f[0].offset)):
            entry: dict[str, Any] = {"key": c.key.hex() if c.key is not None else None,
                                     "reason": reason, "namespace": ln.name,
                                     "where": _where(c), "repaired": False}
            if c.namespace_fp is not None:
                entry["record_namespace"] = c.namespace_fp.hex()
            if repair:
                res = erase_record(ln, c, locked=locked)
                entry["repaired"] = res.done
                entry["note"] = res.note
            out.append(entry)
        strays: list[dict[str, Any]] = []
        for p in ln.stray:
            if ln.in_use and os.path.basename(p) == PROBE_FILE:
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
    def _confirm(ln: Lane, suspects: list[SlotCheck]) -> list[SlotCheck]:
        """Of the bad slots of a lane an engine holds, those that stay bad: read again after a
        pause, with the same bytes. A slot an engine is writing changes meanwhile (its intent file
        names it before the write starts, and the write is one system call); a torn read of a
        record being rewritten reads well the second time."""
        if not suspects:
            return []
        writing = intent_slots(ln)
        time.sleep(_SETTLE_S * (2 if any(c.slot in writing for c in suspects) else 1))
        out = []
        for c in suspects:
            now = recheck(ln, c)
            if now.status == "bad" and now.digest == c.digest:
                out.append(c)
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
        if not ln.regular:
            skipped.append({"id": ln.name, "reason": "slab files not laid out regularly: run the "
                            "tier once to let it truncate them, then again"})
            return
        lock = LaneLock(ln)
        if not plan.dry_run and not lock.acquire():
            skipped.append({"id": ln.name, "reason": "an engine attached to it just now"})
            return
        try:
            sv = self.survey(ln)
            suspects = intent_slots(ln)  # records a crashed engine may have left torn
            valid = [c for c in sv.records
                     if c.slot not in suspects or recheck(ln, c).status == "record"]
            kept, _older = newest_copies(valid)
            keep = sorted(kept, key=lambda c: (-c.seq, c.slot))
            why = []
            if plan.older_than_writes is not None:
                newest = max((c.seq for c in keep), default=0)
                keep = [c for c in keep if c.seq > 0 and newest - c.seq < plan.older_than_writes]
                why.append(f"written more than {plan.older_than_writes} writes ago")
            if plan.shrink_to is not None:
                meta = ln.usage_bytes - ln.slab_bytes
                fit = max(0, (plan.shrink_to - meta) // ln.slot_size)
                keep = keep[:fit]
                why.append(f"beyond {fmt_bytes(plan.shrink_to)}, oldest first")
            res = compact(ln, valid, keep, dry_run=True)
            if not res.dropped and res.bytes_after >= res.bytes_before:
                return  # nothing to drop, nothing to reclaim
            if not plan.dry_run:
                with self.opts.progress.task(f"compacting {ln.name[:12]}",
                                             res.moved * ln.slot_size) as advance:
                    res = compact(ln, valid, keep, progress=advance)
            if res.dropped or res.bytes_after < res.bytes_before:
                removed.append({"kind": "blocks", "id": ln.name, "namespace": ln.namespace,
                                "path": ln.path,
                                "blocks": len(kept) - res.kept,
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
