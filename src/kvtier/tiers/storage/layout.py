"""The namespace directory: file names, the region geometry, locks and file-system facts.

One directory per namespace, ``<path>/<namespace fingerprint>/``, shared by every engine that
uses the same ``path`` and namespace::

    NAMESPACE          the namespace string and block geometry, for people (never read back)
    POOL               the region geometry (JSON), fixed by the first engine; see ``Geometry``
    lock               every engine holds a shared flock on it; an exclusive one means "alone"
    engine-<id>        one empty file per engine, flock'd by it for as long as it runs
    slab-NNNNN.kvs     region N: slots of ``slot_size`` bytes; its flock is the region's lock
    log-NNNNN          region N's index log (see ``log``), written by the region's owner only

Capacity is split into regions of equal size (the last may be smaller). A region's bytes, its
slab file and twice its log (a rewrite writes the new log before the old one goes), are counted
in full, so the directory never outgrows ``capacity_bytes`` whoever writes: nothing else in it
has a size beyond the ``NS_META`` bytes of the small files.

The directories of the single-engine layout (``<fingerprint>/`` with ``intent-NN`` files and no
``POOL``, and ``<fingerprint>.N/`` of second engines) are read and adopted by the first engine
that finds itself alone there (see ``tier``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import struct
from dataclasses import asdict, dataclass

import xxhash

from kvtier.tiers.storage.log import log_bytes

ALIGN = 4096
SLOT_HEADER = 4096
NS_META = 4 * ALIGN  # NAMESPACE, POOL, the O_DIRECT probe file, the no-locks ``writer`` file
POOL_FORMAT = 2
MIN_REGIONS = 16  # aim for at least this many regions, so that many engines can share
MAX_REGIONS = 1024  # and at most this many (each is read every sync pass)
_INTENT_HEAD = struct.Struct("<4sI")
_INTENT_MAGIC = b"KVTI"

_NETWORK_FS = (
    "nfs", "nfs4", "lustre", "ceph", "fuse", "glusterfs", "gpfs", "beegfs", "cifs", "smb3",
    "9p", "wekafs", "orangefs", "pvfs2", "afs", "ocfs2", "gfs2",
)


def round_up(n: int, align: int) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align


def slot_size_for(block_bytes: int) -> int:
    """Bytes of one slot: a 4096-byte header and the block rounded up to 4096."""
    return SLOT_HEADER + round_up(block_bytes, ALIGN)


@dataclass(frozen=True)
class Geometry:
    """How a namespace directory's capacity is cut into regions of slots."""

    block_bytes: int
    slot_size: int
    slots_per_region: int
    regions: int
    last_slots: int  # slots of the last region (it may be smaller than the others)
    capacity_bytes: int

    @staticmethod
    def region_bytes(slots: int, slot_size: int) -> int:
        """What a region of ``slots`` slots may occupy: its slab file and twice its log."""
        return slots * slot_size + 2 * log_bytes(slots)

    @classmethod
    def plan(cls, capacity_bytes: int, block_bytes: int, slab_bytes: int,
             slots_per_region: int | None = None) -> Geometry:
        """The geometry for a capacity: regions of at most ``slab_bytes`` (and at least 16 of
        them when there is room), unless ``slots_per_region`` is given (fixed by data)."""
        slot = slot_size_for(block_bytes)
        budget = max(0, capacity_bytes - NS_META)
        spr = slots_per_region
        if spr is None:
            est = budget // (slot + 2 * 2 * 64)
            spr = min(max(1, slab_bytes // slot), max(4, est // MIN_REGIONS))
            if est // spr > MAX_REGIONS:
                spr = -(-est // MAX_REGIONS)
        spr = max(1, spr)
        full = budget // cls.region_bytes(spr, slot)
        rest = budget - full * cls.region_bytes(spr, slot)
        last = 0
        for k in range(min(spr - 1, rest // slot), 0, -1):
            if cls.region_bytes(k, slot) <= rest:
                last = k
                break
        regions = full + (1 if last else 0)
        return cls(block_bytes, slot, spr, regions, last if last else spr, capacity_bytes)

    @classmethod
    def capacity_for(cls, blocks: int, block_bytes: int, slab_bytes: int) -> int:
        """The smallest ``capacity_bytes`` whose geometry holds at least ``blocks`` blocks."""
        slot = slot_size_for(block_bytes)
        lo, hi = NS_META, NS_META + blocks * (slot + 3 * ALIGN) + 2 * ALIGN
        while cls.plan(hi, block_bytes, slab_bytes).total_slots < blocks:
            hi *= 2
        while lo < hi:
            mid = (lo + hi) // 2
            if cls.plan(mid, block_bytes, slab_bytes).total_slots >= blocks:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def slots_in(self, region: int) -> int:
        """Slots of ``region``."""
        return self.last_slots if region == self.regions - 1 else self.slots_per_region

    @property
    def total_slots(self) -> int:
        """Slots of all regions."""
        if not self.regions:
            return 0
        return (self.regions - 1) * self.slots_per_region + self.last_slots

    def log_size(self, region: int) -> int:
        """Bytes of ``region``'s log file."""
        return log_bytes(self.slots_in(region))

    def base(self, region: int) -> int:
        """Global number of ``region``'s first slot (global slot = region * spr + index)."""
        return region * self.slots_per_region

    def to_json(self) -> str:
        """The POOL file's text."""
        return json.dumps({"format": POOL_FORMAT, **asdict(self)}, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Geometry:
        """Parse a POOL file (raises ValueError)."""
        d = json.loads(text)
        if not isinstance(d, dict) or d.get("format") != POOL_FORMAT:
            raise ValueError(f"unsupported POOL format {d.get('format') if isinstance(d, dict) else d!r}")
        try:
            return cls(**{k: int(d[k]) for k in ("block_bytes", "slot_size", "slots_per_region",
                                                  "regions", "last_slots", "capacity_bytes")})
        except (KeyError, TypeError) as e:
            raise ValueError(f"POOL is missing {e}") from None


# -- names -------------------------------------------------------------------------------------
def slab_name(region: int) -> str:
    """File name of region ``region``'s slab file."""
    return f"slab-{region:05d}.kvs"


def log_name(region: int) -> str:
    """File name of region ``region``'s log."""
    return f"log-{region:05d}"


def engine_name(engine_id: int) -> str:
    """File name of an engine's presence file."""
    return f"engine-{engine_id:016x}"


def parse_engine_name(name: str) -> int | None:
    """The engine id in ``engine-<id>``, or None."""
    if not name.startswith("engine-") or len(name) != 23:
        return None
    try:
        return int(name[7:], 16)
    except ValueError:
        return None


def parse_slab_name(name: str) -> int | None:
    """The region number in ``slab-NNNNN.kvs``, or None."""
    if name.startswith("slab-") and name.endswith(".kvs"):
        with contextlib.suppress(ValueError):
            return int(name[5:-4])
    return None


def read_pool(directory: str) -> Geometry | None:
    """The directory's geometry, or None when it has no POOL file (raises ValueError if bad)."""
    try:
        with open(os.path.join(directory, "POOL")) as f:
            return Geometry.from_json(f.read())
    except FileNotFoundError:
        return None


def write_pool(directory: str, geo: Geometry) -> None:
    """Write the POOL file atomically."""
    tmp = os.path.join(directory, "POOL.new")
    with open(tmp, "w") as f:
        f.write(geo.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(directory, "POOL"))


def write_namespace_file(directory: str, namespace: str, fp_hex: str, geo_block: int, slot: int) -> None:
    """The NAMESPACE file, for people (written once)."""
    path = os.path.join(directory, "NAMESPACE")
    if os.path.exists(path):
        return
    text = (f"namespace: {namespace}\nfingerprint: {fp_hex}\nblock_bytes: {geo_block}\n"
            f"slot_size: {slot}\n")
    with open(path, "w") as f:
        f.write(text[: ALIGN - 1])


def dir_usage(directory: str) -> int:
    """Bytes a namespace directory's files occupy, as counted against its capacity: each file's
    size or allocated space, whichever is more, in whole pages."""
    total = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for e in entries:
        with contextlib.suppress(OSError):
            if e.is_file(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
                total += round_up(max(st.st_size, st.st_blocks * 512), ALIGN)
    return total


# -- locks -------------------------------------------------------------------------------------
class LocksUnsupported(OSError):
    """The file system does not implement flock (for example NFS mounted with ``nolock``)."""


_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Take a flock without waiting: True when taken, False when another holder has it.

    Raises LocksUnsupported when the file system has no locks, OSError on other errors.
    """
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in _NO_LOCKS:
            raise LocksUnsupported(e.errno, f"file locks are not supported here ({e.strerror})") from e
        raise


def unlock(fd: int) -> None:
    """Drop a flock (errors ignored: the lock goes with the descriptor anyway)."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)


# -- file systems ------------------------------------------------------------------------------
def fs_type(path: str) -> str:
    """The type of the file system ``path`` is on (from /proc/self/mountinfo; "" if unknown)."""
    try:
        real = os.path.realpath(path)
        best, kind = "", ""
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mnt = fields[4].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, right.split()[0]
        return kind
    except OSError:
        return ""


def is_network_fs(kind: str) -> bool:
    """True for file systems shared between hosts (NFS, Lustre, CephFS, FUSE, ...)."""
    return any(kind == n or kind.startswith(n + ".") or kind.startswith(n) for n in _NETWORK_FS)


# -- the single-engine layout ------------------------------------------------------------------
def read_legacy_intents(directory: str) -> set[int]:
    """Slots named by the ``intent-NN`` files of a single-engine-layout directory."""
    slots: set[int] = set()
    try:
        names = os.listdir(directory)
    except OSError:
        return slots
    for name in names:
        if not name.startswith("intent-"):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as fh:
                data = fh.read(SLOT_HEADER)
        except OSError:
            continue
        if len(data) < _INTENT_HEAD.size + 8:
            continue
        magic, count = _INTENT_HEAD.unpack_from(data)
        end = _INTENT_HEAD.size + 8 * count
        if magic != _INTENT_MAGIC or len(data) < end + 8:
            continue  # torn or empty: its records had not been started
        if xxhash.xxh3_64_digest(data[:end]) != data[end : end + 8]:
            continue
        slots.update(struct.unpack_from(f"<{count}Q", data, _INTENT_HEAD.size))
    return slots
