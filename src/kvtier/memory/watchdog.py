"""A small process that removes a primary region once no process uses it, however they ended.

The process that creates a region (``kvtier-<instance id>`` in ``/dev/shm``) starts one watchdog
for it: ``python -I -S watchdog.py NAME INODE PID``, in a session of its own so that a signal to
the engine's process group does not reach it. The creator keeps a pipe to the watchdog's standard
input open; the watchdog blocks on it. When the pipe ends — a clean shutdown closes it, a crash
(``kill -9``, OOM, segfault) closes it too — the watchdog waits until no process maps the region or
holds it open (``/proc/PID/maps`` and ``fd``, see :mod:`scan`), then unlinks it if it is still the
same segment (same inode). A creator that unlinked the region itself writes ``done`` first.

Each created region also has an ownership record ``/dev/shm/.kvtier-owners/NAME`` (creator pid and
the region's inode). At start every watchdog reclaims regions whose record names a process that is
gone and that nobody uses — left behind when a watchdog itself was killed. Regions without a
record (made by other tools, or by hand) are never touched here; ``kvtier gc /dev/shm --stale``
is the operator's command for those.

Run as a script it imports only the standard library and :mod:`scan` (loaded by path), so it
starts in a few milliseconds and does not load numpy or torch.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

SHM_DIR = "/dev/shm"
OWNERS_DIR = os.path.join(SHM_DIR, ".kvtier-owners")
_POLL_MAX_S = 5.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _scan_users():  # type: ignore[no-untyped-def]
    try:
        from kvtier.memory.scan import _users  # imported as a package module
    except ImportError:  # run as a script: scan.py sits next to this file
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from scan import _users  # type: ignore[import-not-found,no-redef]
    return _users


def in_use(path: str) -> bool:
    """True while some process maps ``path`` or holds it open (or may, unreadably)."""
    users, hidden = _scan_users()({path})
    if users.get(path):
        return True
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return False
    return any(u in (uid, 0) for u in hidden)


def write_owner(name: str, inode: int) -> None:
    """Record this process as the creator of region ``name`` (best effort)."""
    with contextlib.suppress(OSError):
        os.makedirs(OWNERS_DIR, mode=0o700, exist_ok=True)
        tmp = os.path.join(OWNERS_DIR, f".{name}.{os.getpid()}")
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()} {inode}\n")
        os.replace(tmp, os.path.join(OWNERS_DIR, name))


def drop_owner(name: str) -> None:
    """Remove the ownership record of ``name``."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(OWNERS_DIR, name))


def reclaim(skip: str = "") -> list[str]:
    """Unlink regions whose recorded creator is gone and that nobody uses; their names."""
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(OWNERS_DIR) if not n.startswith(".") and n != skip]
    except OSError:
        return removed
    for name in names:
        rec = os.path.join(OWNERS_DIR, name)
        try:
            with open(rec, encoding="ascii") as f:
                pid_s, ino_s = f.read().split()[:2]
            pid, ino = int(pid_s), int(ino_s)
        except (OSError, ValueError):
            continue
        if _pid_alive(pid):
            continue
        path = os.path.join(SHM_DIR, name)
        if _inode(path) == ino:
            if in_use(path):
                continue
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(name)
        with contextlib.suppress(OSError):
            os.unlink(rec)
    return removed


def watch(name: str, inode: int) -> None:
    """Wait for the creator's pipe to end, then for the region to be unused; unlink it."""
    path = os.path.join(SHM_DIR, name)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(0, 64):
            data += chunk
    if b"done" in data:
        return
    delay = 0.2
    while _inode(path) == inode:
        if not in_use(path):
            if _inode(path) == inode:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            break
        time.sleep(delay)
        delay = min(delay * 2, _POLL_MAX_S)
    drop_owner(name)


class Watchdog:
    """The creator's handle on a region's watchdog process."""

    def __init__(self, name: str, inode: int) -> None:
        """Start the watchdog for region ``name`` (whose inode is ``inode``)."""
        self.name = name
        write_owner(name, inode)
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), name, str(inode)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=True, start_new_session=True,
        )

    @property
    def pid(self) -> int | None:
        """The watchdog's process id (None once stopped)."""
        return self._proc.pid if self._proc is not None else None

    def stop(self, unlinked: bool) -> None:
        """End the watch: ``unlinked`` when the region is gone already, else it takes over."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            if unlinked:
                proc.stdin.write(b"done")
            proc.stdin.close()
        if unlinked:
            drop_owner(self.name)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        # Otherwise it goes on watching on its own; it is not this process's child to wait for.


def main(argv: list[str]) -> int:
    """``watchdog.py NAME INODE``: reclaim dead creators' regions, then watch NAME."""
    name, inode = argv[1], int(argv[2])
    with contextlib.suppress(Exception):
        reclaim(skip=name)
    watch(name, inode)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
