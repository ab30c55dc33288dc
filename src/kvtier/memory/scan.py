"""Primary-tier regions on this host as tools see them: ``/dev/shm/kvtier-*`` segments, who uses
them, and which ones no live process uses any more.

A region records nothing about its owner: an engine's manager creates it (``kvtier-<instance
id>``), maps it for its lifetime and unlinks it at shutdown; workers map it by name. So a region
is *live* while some process maps it or holds it open (``/proc/PID/maps``, ``/proc/PID/fd``; the
descriptor is open from the moment the segment is created, so there is no window in which a new
region looks unused), and *stale* when nobody does: its engine died before shutting down.
Without the privilege to read every process (CAP_SYS_PTRACE, which root normally has), a process
whose /proc entries cannot be read and that could open the region (same user, or root) makes
its state *unknown*, never stale. With that privilege, a process that still cannot be read is
outside this user namespace (a supervisor of the container, say) and is not counted. Processes of
another PID namespace that share this ``/dev/shm`` (containers started with ``--ipc=host``) are
invisible here: run the command where the engines run.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass, field

SHM_DIR = "/dev/shm"
REGION_PREFIX = "kvtier-"


@dataclass
class Region:
    """One shared-memory segment whose name starts with the prefix asked for."""

    name: str
    path: str
    size: int
    allocated: int  # bytes of memory the segment holds (pages touched)
    uid: int
    mtime: float
    users: list[int] = field(default_factory=list)  # pids that map it or hold it open
    state: str = "live"  # "live", "stale" or "unknown"


def _proc_pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


_CAP_SYS_PTRACE = 19


def _can_read_all() -> bool:
    """True when this process may read every process's maps and descriptors it can see."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_PTRACE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _users(paths: set[str]) -> tuple[dict[str, set[int]], list[int]]:
    """Which processes map or hold open each path, and the uids of processes that could use them
    but cannot be read (see the module docstring)."""
    found: dict[str, set[int]] = {p: set() for p in paths}
    hidden_uids: list[int] = []
    privileged = _can_read_all()
    for pid in _proc_pids():
        base = f"/proc/{pid}"
        readable = True
        try:
            with open(f"{base}/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    i = line.find("/dev/shm/")
                    if i >= 0:
                        p = line[i:].rstrip("\n")
                        if p in found:
                            found[p].add(pid)
        except PermissionError:
            readable = False
        except OSError:
            continue  # the process ended
        try:
            for fd in os.listdir(f"{base}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"{base}/fd/{fd}")
                    if target in found:
                        found[target].add(pid)
        except PermissionError:
            readable = False
        except OSError:
            pass
        if not readable and not privileged:
            with contextlib.suppress(OSError):
                hidden_uids.append(os.stat(base).st_uid)
    return found, hidden_uids


def list_regions(prefix: str = REGION_PREFIX, shm_dir: str = SHM_DIR) -> list[Region]:
    """Every segment in ``shm_dir`` whose name starts with ``prefix``, with its users and state."""
    regions: list[Region] = []
    try:
        entries = sorted(os.scandir(shm_dir), key=lambda e: e.name)
    except OSError:
        return regions
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        regions.append(Region(e.name, e.path, st.st_size, st.st_blocks * 512, st.st_uid,
                              st.st_mtime))
    if not regions:
        return regions
    users, hidden = _users({r.path for r in regions})
    for r in regions:
        r.users = sorted(users.get(r.path, ()))
        if r.users:
            r.state = "live"
        elif any(uid in (r.uid, 0) for uid in hidden) or hidden and _shared(r.path):
            r.state = "unknown"
        else:
            r.state = "stale"
    return regions


def _shared(path: str) -> bool:
    """True when users other than the owner may open the segment."""
    try:
        return bool(os.stat(path).st_mode & 0o066)
    except OSError:
        return False


def remove_region(region: Region) -> bool:
    """Unlink a stale region after checking once more that nobody uses it; True when removed."""
    users, hidden = _users({region.path})
    if users.get(region.path) or any(uid in (region.uid, 0) for uid in hidden):
        return False
    try:
        os.unlink(region.path)
    except FileNotFoundError:
        return False
    return True
