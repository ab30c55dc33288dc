"""What the storage tier's parts share once its directory is open, and the log appends.

``Shared`` is built by the tier when it opens the namespace directory and handed to the I/O
threads and to the sync thread. ``append`` is the one way entries reach an owned region's log:
under the log's lock, rewriting the log first when it is full, and applying the matching index
change before the lock is let go, so that a rewrite always reflects every entry appended.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvtier.tiers.base import Health
from kvtier.tiers.storage import log as ilog
from kvtier.tiers.storage.index import BlockIndex, OwnedRegion
from kvtier.tiers.storage.layout import Geometry, log_name
from kvtier.tiers.storage.slab import SlabStore

LogEntries = list[tuple[int, int, int, int, bytes]]


@dataclass
class Shared:
    """The open directory: geometry, slab files, index, counters and health."""

    name: str
    directory: str
    geo: Geometry
    store: SlabStore
    index: BlockIndex
    engine_id: int
    fsync: str
    network_fs: bool
    primary: np.ndarray
    read_health: Health
    write_health: Health
    stats: dict[str, float]
    stats_lock: threading.Lock = field(default_factory=threading.Lock)
    seq: int = 1  # the next write sequence (guarded by index.lock)

    def count(self, **deltas: float) -> None:
        """Add to counters."""
        with self.stats_lock:
            st = self.stats
            for k, v in deltas.items():
                st[k] = st.get(k, 0) + v

    def log_path(self, region: int) -> str:
        """Path of ``region``'s log."""
        return os.path.join(self.directory, log_name(region))

    @property
    def sync_logs(self) -> bool:
        """Whether appended PUT entries are flushed at once (durability, or other hosts)."""
        return self.fsync != "none" or self.network_fs

    def rewrite_log(self, reg: OwnedRegion) -> None:
        """Replace ``reg``'s log by a fresh one that states what it holds (log lock held)."""
        with self.index.lock:
            entries = self.index.snapshot(reg.region)
        new = ilog.LogWriter.create(self.log_path(reg.region), reg.region,
                                    self.geo.log_size(reg.region), entries,
                                    sync=self.fsync != "none" or self.network_fs)
        old = reg.log
        old.close()
        old.fd, old.epoch, old.end, old.size = new.fd, new.epoch, new.end, new.size
        old.reserved = new.reserved
        old.dirty = False
        self.count(log_rewrites=1)

    def append(self, reg: OwnedRegion, entries: LogEntries, apply: Callable[[], None] | None = None,
               *, sync: bool = False) -> None:
        """Append ``entries`` to ``reg``'s log, then run ``apply`` under the index lock."""
        with reg.log.lock:
            self._append_locked(reg, entries, apply, sync)

    def append_current(self, reg: OwnedRegion,
                       pick: Callable[[], tuple[LogEntries, Callable[[], None] | None]]) -> int:
        """Append the entries ``pick`` chooses, then run the ``apply`` it returns; the number
        appended.

        ``pick`` runs under the index lock with the log's lock held: an own region's slots
        change only under its log's lock, so what it finds still holds when its entries are
        logged (an entry decided earlier could follow a DEL and a PUT of the same slot).
        """
        with reg.log.lock:
            with self.index.lock:
                entries, apply = pick()
            if entries:
                self._append_locked(reg, entries, apply, False)
            return len(entries)

    def _append_locked(self, reg: OwnedRegion, entries: LogEntries,
                       apply: Callable[[], None] | None, sync: bool) -> None:
        w = reg.log
        if not w.room(len(entries)):
            self.rewrite_log(reg)
            if not w.room(len(entries)):
                raise OSError(errno.ENOSPC, f"{len(entries)} log entries do not fit region "
                                            f"{reg.region}'s log")
        w.append(entries, sync=sync)
        if apply is not None:
            with self.index.lock:
                apply()
