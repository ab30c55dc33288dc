"""Who holds a storage lane: the holders of its ``lock`` as the kernel lists them, and an
exclusive hold taken the way an engine takes it (for the operator commands that change files).
Read-only apart from the lock itself; see :mod:`kvtier.tiers.storage.scan` for the lanes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtier.tiers.storage.scan import Lane


def lock_holders(lock_path: str) -> tuple[list[int], bool]:
    """(pids holding ``flock`` on the file, whether anybody holds it).

    Read from ``/proc/locks``, which takes no lock itself. A holder in another PID namespace
    shows as pid 0; one on another host of a network file system does not show at all (whatever
    changes a lane takes its lock first, which such a holder does stop). Where ``/proc/locks``
    cannot be read, a non-blocking shared lock is tried and released at once (no pids then).
    """
    try:
        st = os.stat(lock_path)
    except OSError:
        return [], False
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return [], _probe_lock(lock_path)
    pids: list[int] = []
    held = False
    for line in lines:
        parts = line.split()
        if "->" in parts:  # a waiter, not a holder
            continue
        # FLOCK here; POSIX where flock is emulated with POSIX locks (NFS); OFDLCK likewise
        if len(parts) < 6 or parts[1] not in ("FLOCK", "POSIX", "OFDLCK") or parts[5] != dev:
            continue
        with contextlib.suppress(ValueError):
            pid = int(parts[4])
            held = True
            if pid > 0 and pid not in pids:
                pids.append(pid)
    return sorted(pids), held


def _probe_lock(lock_path: str) -> bool:
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)


def process_name(pid: int) -> str | None:
    """The command name of a process (None when it is gone or not visible)."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


class LaneLock:
    """An exclusive hold on a lane, taken the way an engine takes it (``flock`` on ``lock``).

    While it is held no engine attaches to the lane: an engine that starts meanwhile takes the
    namespace's next lane instead. ``acquire`` never waits.
    """

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock if nobody holds it; True when taken (raises OSError on I/O errors)."""
        fd = os.open(os.path.join(self.lane.path, "lock"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Release the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> LaneLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
