"""Sharing one namespace directory with the other engines: the sync pass.

Every ``sync_seconds`` (and once, synchronously, when the tier opens) the sync thread:

1. lists the directory and probes every other engine's ``engine-<id>`` lock: a lock it can take
   belongs to an engine that exited or was killed (its file is removed);
2. reads every region log it does not own from where it stopped, and applies it: blocks other
   engines stored become loadable here, overwritten and dropped ones stop being offered;
3. rebalances capacity. With ``n`` live engines and ``R`` regions every engine may hold
   ``ceil(R / n)`` regions: it claims regions nobody holds (never used, released, or left by an
   engine that is gone, whose blocks it adopts; all of them while no other engine is short),
   and while another live engine holds fewer than ``R // n`` and nothing is free, an engine
   holding more releases its coldest region (the one whose most recently used block is the
   oldest) each pass, so the split converges to ``R // n`` or ``ceil(R / n)`` each. A released
   region's blocks stay readable; whoever claims it next evicts them first;
4. logs the loads it served from other engines' regions (HIT entries), so that their owners
   keep those blocks among their recent ones, and flushes its logs on network file systems.

Where the file system has no locks, one engine writes (the one that created ``writer``) and the
others only read; see ``NoLocks``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import Counter

from kvtier.tiers.storage import log as ilog
from kvtier.tiers.storage import slab_scan
from kvtier.tiers.storage.layout import (
    LocksUnsupported,
    engine_name,
    parse_engine_name,
    try_lock,
    unlock,
)
from kvtier.tiers.storage.shared import Shared

log = logging.getLogger("kvtier.tiers.storage")

HITS_PER_PASS = 4096
APPLY_BATCH = 2048  # log entries applied per hold of the index lock


class NoLocks:
    """Single-writer mode for file systems without locks (NFS mounted ``nolock``, Lustre
    without ``-o flock``): the engine that creates ``writer`` (O_EXCL) writes; the others read.

    The writer rewrites a heartbeat in ``writer`` every pass; a reader that sees it unchanged
    for ``takeover_seconds`` presumes the writer dead, renames the file away (only one reader
    can) and becomes the writer. A writer that exits removes the file.
    """

    def __init__(self, directory: str, engine_id: int, takeover_seconds: float) -> None:
        self.path = os.path.join(directory, "writer")
        self.engine_id = engine_id
        self.takeover_seconds = takeover_seconds
        self.writer = False
        self.beat = 0
        self._seen = b""
        self._seen_at = time.monotonic()

    def try_become_writer(self) -> bool:
        """Create ``writer`` if nobody has; True when this engine is the writer now."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        os.close(fd)
        self.writer = True
        self.heartbeat()
        return True

    def heartbeat(self) -> None:
        """The writer's proof of life."""
        self.beat += 1
        with open(self.path, "w") as f:
            f.write(f"{self.engine_id:016x} {os.getpid()} {self.beat}\n")

    def check(self) -> bool:
        """A reader's look at the writer; True when it just became the writer."""
        try:
            with open(self.path, "rb") as f:
                seen = f.read(128)
        except FileNotFoundError:
            return self.try_become_writer()
        now = time.monotonic()
        if seen != self._seen:
            self._seen, self._seen_at = seen, now
            return False
        if now - self._seen_at < self.takeover_seconds:
            return False
        try:
            os.rename(self.path, f"{self.path}.stale-{self.engine_id:016x}")
        except FileNotFoundError:
            return False  # another reader took over first
        log.warning("storage directory %s: the writer (%s) stopped its heartbeat %.0f s ago; "
                    "taking over", os.path.dirname(self.path), seen.decode(errors="replace").strip(),
                    now - self._seen_at)
        with contextlib.suppress(OSError):
            os.unlink(f"{self.path}.stale-{self.engine_id:016x}")
        return self.try_become_writer()

    def leave(self) -> None:
        """The writer exits: let a reader take over at once."""
        if self.writer:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.writer = False


class Fleet:
    """The sync pass and its thread (see the module docstring)."""

    def __init__(self, sh: Shared, *, sync_seconds: float, nolocks: NoLocks | None) -> None:
        self.sh = sh
        self.sync_seconds = sync_seconds
        self.nolocks = nolocks
        self.tails: dict[int, ilog.LogTail] = {}
        self.live: set[int] = {sh.engine_id}
        self.engine_fd = -1
        self.passes = 0
        self._stop = threading.Event()
        self._pass_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failing = False

    # -- presence --------------------------------------------------------------------------
    def join(self) -> None:
        """Create this engine's presence file, already locked: it is locked under a temporary
        name and renamed into place, so no other engine ever sees it unlocked (and takes it
        for the file of an engine that is gone)."""
        path = os.path.join(self.sh.directory, engine_name(self.sh.engine_id))
        tmp = path + ".new"
        fd = os.open(tmp, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            if self.nolocks is None and not try_lock(fd):
                raise OSError(errno.EBUSY, "engine id in use", path)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.engine_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.engine_fd)
        self.engine_fd = fd

    def leave(self) -> None:
        """Remove the presence file (this engine's regions become free to claim)."""
        if self.engine_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.sh.directory, engine_name(self.sh.engine_id)))
            with contextlib.suppress(OSError):
                os.close(self.engine_fd)
            self.engine_fd = -1
        if self.nolocks is not None:
            self.nolocks.leave()

    def _probe(self, names: list[str]) -> set[int]:
        """Ids of the live engines; presence files of dead ones are removed."""
        me = self.sh.engine_id
        live = {me}
        if self.nolocks is not None:
            return live
        for name in names:
            eid = parse_engine_name(name)
            if eid is None or eid == me:
                continue
            path = os.path.join(self.sh.directory, name)
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                if try_lock(fd):
                    with contextlib.suppress(OSError):  # gone: nobody else will need its file
                        os.unlink(path)
                else:
                    live.add(eid)
            finally:
                os.close(fd)
        return live

    # -- the pass --------------------------------------------------------------------------
    def sync(self, *, first: bool = False) -> None:
        """One sync pass (see the module docstring); raises OSError. Passes never overlap."""
        with self._pass_lock:
            self._sync(first)

    def _sync(self, first: bool) -> None:
        sh = self.sh
        names = os.listdir(sh.directory)
        if engine_name(sh.engine_id) not in names and self.nolocks is None:
            log.warning("tier %s: this engine's presence file was removed; writing it again",
                        sh.name)
            self.join()
        self.live = self._probe(names)
        with sh.index.lock:
            mine = set(sh.index.regions)
        for r in range(sh.geo.regions):
            if r not in mine:
                self.tail(r, quiet=first)
        self._finish_releases()
        if self.nolocks is not None:
            self._nolocks_pass()
        else:
            self._rebalance()
        self._log_hits()
        if sh.network_fs:
            self._flush_logs()
        self.passes += 1
        sh.count(sync_passes=1)

    def tail(self, region: int, *, quiet: bool = False) -> bool:
        """Read ``region``'s log on from where it stopped; False when it has no readable log."""
        sh = self.sh
        t = self.tails.get(region)
        if t is None:
            t = self.tails[region] = ilog.LogTail(sh.log_path(region))
        res = t.read()
        if res is None:
            return False
        reset, entries = res
        if reset:  # a rewritten log: one change, so lookups never see the region half known
            with sh.index.lock:
                if region not in sh.index.regions:
                    sh.index.replace_region(region, entries, quiet=quiet)
            return t.ino != -1
        for i in range(0, len(entries), APPLY_BATCH):  # the scheduler thread waits one batch at most
            with sh.index.lock:
                if region in sh.index.regions:
                    return True
                sh.index.apply(region, entries[i : i + APPLY_BATCH], quiet=quiet)
        return t.ino != -1

    def _nolocks_pass(self) -> None:
        nl = self.nolocks
        assert nl is not None
        if nl.writer:
            nl.heartbeat()
        elif not nl.check():
            return
        with self.sh.index.lock:
            free = [r for r in range(self.sh.geo.regions) if r not in self.sh.index.regions]
        self.claim(free)

    def _rebalance(self) -> None:
        sh = self.sh
        me = sh.engine_id
        live = self.live
        n_regions = sh.geo.regions
        with sh.index.lock:
            mine = set(sh.index.regions)
            owners = dict(sh.index.owners)
        held: Counter[int] = Counter()
        claimable: list[tuple[int, int]] = []  # (0: has blocks, 1: empty; region)
        for r in range(n_regions):
            if r in mine:
                held[me] += 1
                continue
            o = owners.get(r)
            if o is None or o.released or o.engine not in live:
                claimable.append((0 if o is not None else 1, r))
            else:
                held[o.engine] += 1
        hi = -(-n_regions // len(live))
        lo = n_regions // len(live)
        short = any(held[e] < lo for e in live if e != me)
        want = max(0, hi - held[me]) if short else len(claimable)
        claimable.sort()
        if want:
            held[me] += self.claim([r for _kind, r in claimable], want)
        if short and held[me] > lo and not claimable:  # some engine has less than its share
            for r in self._coldest(max(1, held[me] - hi)):
                self.release(r)

    def _coldest(self, n: int) -> list[int]:
        """Up to ``n`` owned regions whose most recently used block is the oldest."""
        index = self.sh.index
        spr = self.sh.geo.slots_per_region
        with index.lock:
            last: dict[int, int] = {}
            for pos, s in enumerate(index.own.values()):
                last[s // spr] = pos
            cands = [r for r, reg in index.regions.items() if not reg.releasing]
        cands.sort(key=lambda r: last.get(r, -1))
        return cands[:n]

    # -- claims and releases ---------------------------------------------------------------
    def claim(self, regions: list[int], limit: int | None = None) -> int:
        """Take over up to ``limit`` of ``regions`` whose locks are free: read each one's log to
        the end, rewrite it under this engine's name, then adopt all their blocks at once (in
        write order, at the least recently used end). Returns how many were taken."""
        sh = self.sh
        taken: list[tuple[int, ilog.LogWriter, int]] = []
        for region in regions:
            if limit is not None and len(taken) >= limit:
                break
            got = self._take(region)
            if got is not None:
                taken.append(got)
        if not taken:
            return 0
        with sh.index.lock:
            adopted = sh.index.claim(taken)
            for region, _w, _a in taken:
                sh.store.limits[region] = sh.geo.slots_in(region)
                for s in sh.index.occupied(region):
                    seq = sh.index.slots[s][1]
                    if seq >= sh.seq:
                        sh.seq = seq + 1
        for region, _w, _a in taken:
            self.tails.pop(region, None)
        sh.count(claims=len(taken), adopted_blocks=adopted)
        return len(taken)

    def _take(self, region: int) -> tuple[int, ilog.LogWriter, int] | None:
        """Lock ``region``, read its log to the end and rewrite it under this engine's name."""
        sh = self.sh
        store = sh.store
        try:
            fd = store.fd(region, create=True)
        except OSError as e:
            log.warning("tier %s: cannot open region %d: %s", sh.name, region, e)
            return None
        if self.nolocks is None:
            try:
                if not try_lock(fd):
                    return None
            except LocksUnsupported:
                return None
        try:
            has_log = self.tail(region)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sh.log_path(region) + ".new")
            allocated = store.allocated_slots(region)
            if not has_log and allocated:
                self._rebuild_from_headers(region, allocated)
            t = self.tails.get(region)
            claim = [(ilog.CLAIM, 0, 0, sh.engine_id, b"")]
            size = sh.geo.log_size(region)
            if has_log and t is not None and t.clean and t.offset + ilog.ENTRY <= size:
                # the log ends cleanly: say who holds the region now at its end
                writer = ilog.LogWriter.reopen(sh.log_path(region), t.epoch, t.offset, size)
                with writer.lock:
                    writer.append(claim, sync=sh.sync_logs)
            else:  # no log, or one that ends in a torn entry: write it afresh
                with sh.index.lock:
                    entries = sh.index.snapshot(region)
                writer = ilog.LogWriter.create(sh.log_path(region), region, size, entries,
                                               sync=sh.sync_logs)
        except OSError as e:
            if self.nolocks is None:
                unlock(fd)
            log.warning("tier %s: could not take region %d over: %s", sh.name, region, e)
            return None
        return region, writer, allocated

    def _rebuild_from_headers(self, region: int, allocated: int) -> None:
        """A region with records but no readable log: index it from its record headers."""
        sh = self.sh
        found: dict[bytes, tuple[int, int]] = {}
        for rec in slab_scan.scan(sh.store, region, allocated):
            ik = ilog.index_key(rec.key)
            prev = found.get(ik)
            if prev is None or prev[1] < rec.seq:
                found[ik] = (rec.slot, rec.seq)
        with sh.index.lock:
            for ik, (slot, seq) in found.items():
                sh.index.slots[slot] = (ik, seq)
        log.warning("tier %s: region %d had no readable log; %d records found in its headers",
                    sh.name, region, len(found))
        sh.count(regions_rebuilt=1)

    def release(self, region: int) -> None:
        """Start giving ``region`` up; it goes once its writes in flight have ended."""
        with self.sh.index.lock:
            reg = self.sh.index.regions.get(region)
            if reg is None:
                return
            reg.releasing = True
        self._finish_releases()

    def _finish_releases(self) -> None:
        sh = self.sh
        index = sh.index
        with index.lock:
            ready = [r for r in index.regions.values() if r.releasing and r.writing == 0]
        for reg in ready:
            try:
                sh.append(reg, [(ilog.RELEASE, 0, 0, sh.engine_id, b"")], sync=True)
            except OSError as e:
                log.warning("tier %s: could not log the release of region %d: %s", sh.name,
                            reg.region, e)
            with index.lock:
                index.release(reg.region)
                sh.store.limits.pop(reg.region, None)
            t = ilog.LogTail(sh.log_path(reg.region))
            with contextlib.suppress(OSError):
                t.ino = os.fstat(reg.log.fd).st_ino
                t.epoch, t.offset = reg.log.epoch, reg.log.end
            self.tails[reg.region] = t
            reg.log.close()
            with contextlib.suppress(OSError):
                if self.nolocks is None:
                    unlock(sh.store.fd(reg.region))
            sh.count(releases=1)

    # -- logs ------------------------------------------------------------------------------
    def _log_hits(self) -> None:
        """Report loads of other engines' blocks to their owners (in one of this engine's logs)."""
        sh = self.sh
        index = sh.index
        with index.lock:
            if not index.remote_hits:
                return
            reg = next((r for r in index.regions.values() if not r.releasing), None)
            hits = list(index.remote_hits.items())[:HITS_PER_PASS]
            index.remote_hits.clear()
        if reg is None:
            return
        spr = sh.geo.slots_per_region
        entries = [(ilog.HIT, s % spr, s // spr, seq, ik) for (s, ik), seq in hits]
        with contextlib.suppress(OSError):
            sh.append(reg, entries)

    def _flush_logs(self) -> None:
        with self.sh.index.lock:
            regs = list(self.sh.index.regions.values())
        for reg in regs:
            with reg.log.lock, contextlib.suppress(OSError):
                reg.log.flush()


    # -- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        """Run passes every ``sync_seconds`` on a thread of its own."""
        self._thread = threading.Thread(target=self._run, name=f"kvtier-{self.sh.name}-sync",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.sync_seconds):
            try:
                self.sync()
                if self._failing:
                    log.warning("tier %s: sync passes work again", self.sh.name)
                    self._failing = False
            except Exception as e:  # keep passing: a later pass may work
                if not self._failing:
                    log.warning("tier %s: sync pass failed: %s", self.sh.name, e)
                    self._failing = True
                self.sh.count(sync_failures=1)

    def stop(self) -> None:
        """Stop the thread (the current pass ends first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
