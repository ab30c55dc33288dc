"""Real faults for soak runs and tests: a disk whose I/O rate the kernel limits.

:class:`ThrottledDisk` makes an ext4 file system on a loop device and limits the I/O operations
per second that processes in its cgroup may send to that device (cgroup v2 ``io.max``, or v1
``blkio.throttle.*``). Under cgroup v1 only direct I/O is throttled (buffered writes are written
back outside the cgroup), which is what the storage tier uses on ext4. It needs root, ``losetup``
and ``mkfs.ext4``; :func:`throttle_unavailable` says why it cannot be used here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

_V2 = Path("/sys/fs/cgroup")
_V1 = Path("/sys/fs/cgroup/blkio")


def _cgroup_kind() -> str | None:
    try:
        if "io" in (_V2 / "cgroup.controllers").read_text().split():
            return "v2"
    except OSError:
        pass
    if (_V1 / "blkio.throttle.write_iops_device").exists():
        return "v1"
    return None


def throttle_unavailable() -> str | None:
    """Why a :class:`ThrottledDisk` cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mounts, cgroups)"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if _cgroup_kind() is None:
        return "no cgroup I/O controller (v2 io or v1 blkio) is mounted"
    if not Path("/dev/loop-control").exists():
        return "no loop devices"
    return None


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


class ThrottledDisk:
    """An ext4 file system on a loop device, with a kernel I/O limit for this process.

    ``path`` is the mount point. :meth:`set_iops` (operations) and :meth:`set_bps` (bytes)
    change the limit (None: unlimited) for every process in the cgroup; this process joins it on
    :meth:`start` and leaves on :meth:`close`.
    """

    def __init__(self, size_bytes: int = 256 << 20, workdir: str | None = None) -> None:
        why = throttle_unavailable()
        if why is not None:
            raise RuntimeError(f"cannot throttle a disk here: {why}")
        self._dir = Path(tempfile.mkdtemp(prefix="kvtier-throttle-", dir=workdir))
        self._image = self._dir / "disk.img"
        self.path = self._dir / "mnt"
        self._kind = _cgroup_kind()
        self._size = size_bytes
        self._loop: str | None = None
        self._mounted = False
        self._cgroup: Path | None = None
        self._home: Path | None = None
        self.device = ""

    def start(self) -> ThrottledDisk:
        """Make the disk, mount it, and move this process into the limiting cgroup."""
        try:
            with open(self._image, "wb") as f:
                f.truncate(self._size)
            self._loop = _run("losetup", "-f", "--show", str(self._image))
            _run("mkfs.ext4", "-q", "-F", self._loop)
            self.path.mkdir()
            _run("mount", self._loop, str(self.path))
            self._mounted = True
            st = os.stat(self._loop)
            self.device = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            root = _V2 if self._kind == "v2" else _V1
            self._home = root / self._current_cgroup()
            self._cgroup = root / f"kvtier-throttle-{os.getpid()}-{self._dir.name}"
            self._cgroup.mkdir()
            (self._cgroup / "cgroup.procs").write_text(str(os.getpid()))
        except BaseException:
            self.close()
            raise
        return self

    def _current_cgroup(self) -> str:
        want = "" if self._kind == "v2" else "blkio"
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            num, ctrls, path = line.split(":", 2)
            if (self._kind == "v2" and num == "0") or want in ctrls.split(","):
                return path.lstrip("/")
        return ""

    def set_iops(self, write: int | None, read: int | None = None) -> None:
        """Limit write (and read) operations per second to the device; None lifts the limit."""
        self._set_limit("iops", write, read)

    def set_bps(self, write: int | None, read: int | None = None) -> None:
        """Limit write (and read) bytes per second to the device; None lifts the limit. Unlike
        an operation limit, it holds whatever the size of each write."""
        self._set_limit("bps", write, read)

    def _set_limit(self, unit: str, write: int | None, read: int | None) -> None:
        """Write the cgroup's ``unit`` ("iops" or "bps") limits for the device."""
        assert self._cgroup is not None, "start() first"
        if self._kind == "v2":
            w = "max" if write is None else str(write)
            r = "max" if read is None else str(read)
            (self._cgroup / "io.max").write_text(f"{self.device} w{unit}={w} r{unit}={r}")
            return
        for name, value in (("write", write), ("read", read)):
            (self._cgroup / f"blkio.throttle.{name}_{unit}_device").write_text(
                f"{self.device} {0 if value is None else value}")

    def close(self) -> None:
        """Leave the cgroup, unmount, detach the loop device, delete the image. Idempotent."""
        if self._cgroup is not None:
            # This process goes home, and so do processes it started meanwhile that still run
            # (a cgroup with members cannot be removed).
            deadline = time.monotonic() + 5
            while True:
                with contextlib.suppress(OSError):
                    pids = (self._cgroup / "cgroup.procs").read_text().split()
                    for pid in pids:
                        with contextlib.suppress(OSError):
                            if self._home is not None:
                                (self._home / "cgroup.procs").write_text(pid)
                try:
                    self._cgroup.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
            self._cgroup = None
        if self._mounted:
            with contextlib.suppress(subprocess.CalledProcessError):
                _run("umount", str(self.path))
            self._mounted = False
        if self._loop is not None:
            with contextlib.suppress(subprocess.CalledProcessError):
                _run("losetup", "-d", self._loop)
            self._loop = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ThrottledDisk:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
