"""The storage tier's files as tools see them, without joining a directory as an engine.

A tier root holds one directory per namespace, ``<fingerprint>``, laid out as
:mod:`kvtier.tiers.storage.layout` describes: regions (``slab-NNNNN.kvs``) whose logs
(``log-NNNNN``) name the record in each slot, the region geometry in ``POOL``, the ``lock`` every
engine holds while attached and one ``engine-<id>`` presence file per engine. Directories of the
single-engine layout (``<fingerprint>[.N]`` with ``intent-NN`` files and no ``POOL``) are read
too, until an engine adopts them. This module finds those directories, reads their geometry,
their logs and who holds their ``lock``, and reads and checks every slot with the record
format's own checks. It never writes: :mod:`kvtier.tiers.storage.repair` holds the operations
that change files. The operator commands (``kvtier inspect|fsck|gc|du``) use these two modules
only, so a change of the on-disk layout is made here, next to the tier, and nowhere else.

What a slot is, as a reader sees it:

* ``empty``: the first 56 bytes (the fixed header) are zero: never written, or erased by an
  engine (a torn or corrupt record is erased by zeroing its header page);
* ``record``: the header verifies (magic, version, header checksum), names this lane's namespace
  and block size, the whole record lies inside the file and, when payloads are read, the payload
  checksum matches;
* ``bad``: anything else, with the reason the record format's reader gives.

In the region layout only the slots a log names hold blocks: the others are free space, whatever
bytes they still hold.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import xxhash

from kvtier.format.record import FIXED_HEADER_SIZE, RecordError, parse_header
from kvtier.tiers.storage.layout import Geometry, dir_usage, read_legacy_intents, read_pool
from kvtier.tiers.storage.scan_locks import lock_holders
from kvtier.tiers.storage.slab import (  # the formats SlabStore writes: sequences
    _SEQ,
    ALIGN,
    MAX_KEY_BYTES,
    O_DIRECT,
    SLOT_HEADER,
    _seq_check,
    round_up,
)

LANE_NAME = re.compile(r"^([0-9a-f]{32})(?:\.([1-9][0-9]*))?$")
SLAB_NAME = re.compile(r"^slab-([0-9]{5,})\.kvs$")
INTENT_NAME = re.compile(r"^intent-[0-9]{2,}$")
LOG_NAME = re.compile(r"^log-([0-9]{5,})$")
ENGINE_NAME = re.compile(r"^engine-[0-9a-f]{16}$")
LEFTOVER_NAME = re.compile(r"^(log-[0-9]{5,}|engine-[0-9a-f]{16}|POOL)\.new$")
PROBE_FILE = ".direct-probe"  # written and removed by an engine while it starts
_BULK_SLOT = 64 << 10  # header-only reads sweep slots up to this size in bulk
_GEOMETRY_PROBE = 16 << 20  # bytes searched for a first record when NAMESPACE is missing


@dataclass(frozen=True)
class SlabFile:
    """One ``slab-NNNNN.kvs`` file."""

    index: int
    path: str
    size: int


@dataclass
class Lane:
    """One namespace directory and what its files say about it."""

    path: str
    name: str  # the directory name, ``<fingerprint>[.N]``
    fingerprint: str  # hex
    index: int  # N, 0 for the first lane
    namespace: str | None  # from NAMESPACE, when readable
    block_bytes: int | None  # None when neither NAMESPACE nor any record says
    slot_size: int | None
    slabs: list[SlabFile] = field(default_factory=list)
    intents: list[str] = field(default_factory=list)
    has_namespace_file: bool = False
    has_lock_file: bool = False
    stray: list[str] = field(default_factory=list)  # files that are no part of the layout
    holders: list[int] = field(default_factory=list)  # pids holding ``lock`` (0: not visible)
    in_use: bool = False  # an engine holds ``lock``
    pool: Geometry | None = None  # the region geometry (region layout only)
    logs: list[str] = field(default_factory=list)  # log-NNNNN files
    engine_files: list[str] = field(default_factory=list)  # engine-<id> presence files
    leftovers: list[str] = field(default_factory=list)  # *.new files of an interrupted rewrite

    @property
    def capacity_bytes(self) -> int | None:
        """The capacity the directory was set up with (the single-engine layout records none)."""
        return self.pool.capacity_bytes if self.pool is not None else None

    @property
    def regions(self) -> bool:
        """True for a directory of the region layout (it has a ``POOL``)."""
        return self.pool is not None

    @property
    def fp(self) -> bytes:
        """The namespace fingerprint as bytes."""
        return bytes.fromhex(self.fingerprint)

    @property
    def slab_bytes(self) -> int:
        """Bytes of all slab files."""
        return sum(s.size for s in self.slabs)

    @property
    def usage_bytes(self) -> int:
        """Bytes that count against the tier's capacity, counted as the tier counts them."""
        if self.pool is not None:
            return dir_usage(self.path)
        return self.slab_bytes + ALIGN * (len(self.intents) + int(self.has_namespace_file))

    @property
    def slots_per_file(self) -> int | None:
        """Slots per slab file (from ``POOL``; in the single-engine layout as seen from the
        files, None while there is one file or none)."""
        if self.pool is not None:
            return self.pool.slots_per_region
        if self.slot_size is None or len(self.slabs) < 2:
            return None
        return self.slabs[0].size // self.slot_size

    @property
    def regular(self) -> bool:
        """True when slot numbers can be derived from the files: every slab file but the last is
        full, and files are numbered 0, 1, 2, ... (what compaction needs)."""
        if self.pool is not None:
            return True
        spf = self.slots_per_file
        if spf is None:
            return all(s.index == 0 for s in self.slabs)
        ss = self.slot_size or 1
        return spf > 0 and all(
            s.index == i and (s.size == spf * ss or i == len(self.slabs) - 1)
            for i, s in enumerate(self.slabs)
        )

    def slot_number(self, file_index: int, slot_in_file: int) -> int:
        """The global slot number (what intent files name) of a slot of a slab file."""
        spf = self.slots_per_file
        return slot_in_file if spf is None else file_index * spf + slot_in_file

    def file_slots(self, slab: SlabFile) -> int:
        """Slot positions a slab file covers, a partial last one included."""
        ss = self.slot_size or 0
        n = -(-slab.size // ss) if ss else 0
        if self.pool is not None:
            n = min(n, self.pool.slots_in(slab.index)) if slab.index < self.pool.regions else 0
        return n


@dataclass(frozen=True)
class SlotCheck:
    """What one slot holds."""

    slot: int
    file: str
    offset: int
    status: str  # "record", "empty" or "bad"
    key: bytes | None = None  # as the header names it (also for most bad records)
    seq: int = 0
    reason: str | None = None
    namespace_fp: bytes | None = None  # the fingerprint a header names, when it is another one
    digest: int = 0  # bad slots: xxh3-64 of the bytes read, to tell whether they change later

    def same_as(self, other: SlotCheck) -> bool:
        """Whether two reads of a slot found the same thing: the same status, key, write
        sequence and (bad slots) bytes. Valid records carry no digest: for them it is the key
        and sequence that tell a rewrite."""
        return (self.status, self.key, self.seq, self.digest) == (
            other.status, other.key, other.seq, other.digest)


# -- what SlabStore writes besides records ------------------------------------------------------
def slot_seq(header: bytes | bytearray | memoryview, key: bytes) -> int:
    """The write sequence kept at the end of a slot's header page (0 when its check fails)."""
    seq, chk = _SEQ.unpack_from(header, SLOT_HEADER - _SEQ.size)
    return int(seq) if _seq_check(seq, key) == chk else 0


# -- finding lanes ---------------------------------------------------------------------------
def is_lane_name(name: str) -> bool:
    """True for a directory name the tier uses for a lane."""
    return LANE_NAME.match(name) is not None


def looks_like_lane(path: str) -> bool:
    """True when ``path`` is a lane directory itself (a name the tier uses, and its files)."""
    if not is_lane_name(os.path.basename(os.path.normpath(path))) or not os.path.isdir(path):
        return False
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(n in ("NAMESPACE", "lock", "POOL") or SLAB_NAME.match(n) for n in names)


def find_lanes(root: str) -> list[Lane]:
    """Every lane directory directly under a tier root, in name order (raises OSError)."""
    lanes = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if is_lane_name(name) and os.path.isdir(path):
            lanes.append(describe_lane(path))
    return lanes


def describe_lane(path: str) -> Lane:
    """Read a lane directory's files (names, sizes, NAMESPACE, lock holders); raises OSError."""
    path = os.path.abspath(path)
    name = os.path.basename(path)
    m = LANE_NAME.match(name)
    if m is None:
        raise ValueError(f"{path}: not a lane directory name")
    lane = Lane(path=path, name=name, fingerprint=m.group(1), index=int(m.group(2) or 0),
                namespace=None, block_bytes=None, slot_size=None)
    info: dict[str, str] = {}
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        sm = SLAB_NAME.match(entry.name)
        if sm and entry.is_file(follow_symlinks=False):
            lane.slabs.append(SlabFile(int(sm.group(1)), entry.path, entry.stat().st_size))
        elif INTENT_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
            lane.intents.append(entry.path)
        elif entry.name == "NAMESPACE" and entry.is_file(follow_symlinks=False):
            lane.has_namespace_file = True
            info = _read_namespace_file(entry.path)
        elif entry.name == "lock" and entry.is_file(follow_symlinks=False):
            lane.has_lock_file = True
        elif entry.name == "POOL" and entry.is_file(follow_symlinks=False):
            try:
                lane.pool = read_pool(path)
            except ValueError:
                lane.stray.append(entry.path)
        elif LOG_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
            lane.logs.append(entry.path)
        elif (ENGINE_NAME.match(entry.name) or entry.name == "writer") and entry.is_file(
                follow_symlinks=False):
            lane.engine_files.append(entry.path)
        elif LEFTOVER_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
            lane.leftovers.append(entry.path)
        else:
            lane.stray.append(entry.path)
    lane.slabs.sort(key=lambda s: s.index)
    lane.namespace = info.get("namespace")
    with contextlib.suppress(KeyError, ValueError):
        bb = int(info["block_bytes"])
        if bb > 0:
            lane.block_bytes = bb
            lane.slot_size = SLOT_HEADER + round_up(bb, ALIGN)
    if lane.pool is not None and lane.block_bytes is None:
        lane.block_bytes = lane.pool.block_bytes
        lane.slot_size = lane.pool.slot_size
    if lane.block_bytes is None:
        lane.block_bytes = _geometry_from_records(lane)
        if lane.block_bytes is not None:
            lane.slot_size = SLOT_HEADER + round_up(lane.block_bytes, ALIGN)
    if lane.has_lock_file:
        lane.holders, lane.in_use = lock_holders(os.path.join(path, "lock"))
    return lane


def _read_namespace_file(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(ALIGN)
    except OSError:
        return out
    for line in text.splitlines():
        k, sep, v = line.partition(": ")
        if sep:
            out[k.strip()] = v
    return out


def _geometry_from_records(lane: Lane) -> int | None:
    """The block size the first verifying header of this lane's namespace names."""
    fp = lane.fp
    for slab in lane.slabs:
        try:
            with open(slab.path, "rb") as f:
                data = f.read(min(slab.size, _GEOMETRY_PROBE))
        except OSError:
            continue
        for off in range(0, len(data) - FIXED_HEADER_SIZE + 1, ALIGN):
            if data[off : off + 4] != b"KVTR":
                continue
            try:
                h = parse_header(memoryview(data)[off : off + SLOT_HEADER])
            except RecordError:
                continue
            if h.namespace_fp == fp and h.header_len == SLOT_HEADER and h.payload_len > 0:
                return h.payload_len
    return None


def intent_slots(lane: Lane) -> set[int]:
    """Slots an engine of the single-engine layout said it is writing (or was, when it
    crashed). The region layout has no intent files: a slot being written is named by no log."""
    return read_legacy_intents(lane.path) if lane.pool is None else set()


# -- reading slots ---------------------------------------------------------------------------
def check_slot(lane: Lane, mv: memoryview, avail: int, slot: int, path: str, offset: int,
               *, payload: bool) -> SlotCheck:
    """Check the ``avail`` bytes of one slot at the start of ``mv`` (a slot's bytes, or at least
    its header page when ``payload`` is False)."""
    fixed = mv[:FIXED_HEADER_SIZE].tobytes() if avail >= FIXED_HEADER_SIZE else mv[:avail].tobytes()
    if fixed.strip(b"\0") == b"":
        return SlotCheck(slot, path, offset, "empty")
    assert lane.block_bytes is not None

    def bad(reason: str, key: bytes | None = None, ns: bytes | None = None) -> SlotCheck:
        digest = xxhash.xxh3_64_intdigest(mv[: min(avail, len(mv))])
        return SlotCheck(slot, path, offset, "bad", key, 0, reason, ns, digest)

    head = mv[: min(avail, SLOT_HEADER)]
    try:
        h = parse_header(head)
    except RecordError as e:
        return bad(str(e), _named_key(head))
    if h.header_len != SLOT_HEADER:
        return bad("unexpected header length", h.key)
    if h.namespace_fp != lane.fp:
        return bad(f"namespace mismatch: a record of namespace {h.namespace_fp.hex()}", h.key,
                   h.namespace_fp)
    if h.payload_len != lane.block_bytes:
        return bad(f"length mismatch: {h.payload_len} payload bytes, the namespace's blocks "
                   f"have {lane.block_bytes}", h.key)
    if avail < SLOT_HEADER + h.payload_len:
        return bad("truncated record", h.key)
    seq = slot_seq(head, h.key)
    if payload:
        body = mv[SLOT_HEADER : SLOT_HEADER + h.payload_len]
        ok = xxhash.xxh3_64_intdigest(body) == h.payload_checksum  # without the GIL
        body.release()
        if not ok:
            return bad("payload checksum mismatch", h.key)
    return SlotCheck(slot, path, offset, "record", h.key, seq)


def _named_key(head: memoryview) -> bytes | None:
    """The key a header that fails its checks still names (magic right, key length sane)."""
    if len(head) < FIXED_HEADER_SIZE or head[:4].tobytes() != b"KVTR":
        return None
    klen = int.from_bytes(head[12:16], "little")
    if klen == 0 or klen > MAX_KEY_BYTES or FIXED_HEADER_SIZE + klen > len(head):
        return None
    return head[FIXED_HEADER_SIZE : FIXED_HEADER_SIZE + klen].tobytes()


@dataclass(frozen=True)
class _Task:
    slab: SlabFile
    first: int  # slot index within the file
    count: int
    bulk: bool  # one read of ``count`` whole slots, else the header page of each slot


class _Files:
    """Read-only descriptors of a lane's slab files, O_DIRECT where the file system allows."""

    def __init__(self, direct: bool) -> None:
        self.direct = direct and bool(O_DIRECT)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = -1
                if self.direct:
                    try:
                        fd = os.open(path, os.O_RDONLY | O_DIRECT)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        self.direct = False
                if fd < 0:
                    fd = os.open(path, os.O_RDONLY)
                self._fds[path] = fd
            return fd

    def pread(self, path: str, buf: memoryview, offset: int) -> int:
        """Read into ``buf`` at ``offset``; falls back to buffered reads if O_DIRECT is refused."""
        fd = self.fd(path)
        try:
            return os.preadv(fd, [buf], offset)
        except OSError as e:
            if e.errno != errno.EINVAL or not self.direct:
                raise
        with self._lock:  # this file system takes O_DIRECT opens but not reads: go buffered
            self.direct = False
            for f in self._fds.values():
                os.close(f)
            self._fds.clear()
        return os.preadv(self.fd(path), [buf], offset)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()


def read_slots(
    lane: Lane,
    *,
    payload: bool,
    workers: int = 4,
    chunk_bytes: int = 8 << 20,
    direct: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[SlotCheck]:
    """Every slot of a lane's slab files, in file and slot order.

    With ``payload`` each slot is read whole (chunks of ``chunk_bytes``, ``workers`` threads,
    O_DIRECT where the file system allows) and its payload checksum verified; without, only header
    pages are read (small slots in bulk). ``progress(bytes, slots)`` follows each chunk. Raises
    OSError when a file cannot be read; ValueError when the lane's geometry is unknown.
    """
    if lane.slot_size is None or lane.block_bytes is None:
        raise ValueError(f"{lane.path}: block size unknown (no NAMESPACE file and no record)")
    ss = lane.slot_size
    record = SLOT_HEADER + lane.block_bytes
    bulk = payload or ss <= _BULK_SLOT
    per = max(1, chunk_bytes // ss) if bulk else 64
    tasks = []
    for slab in lane.slabs:
        n = lane.file_slots(slab)
        for i0 in range(0, n, per):
            tasks.append(_Task(slab, i0, min(per, n - i0), bulk))
    if not tasks:
        return
    files = _Files(direct)
    local = threading.local()
    buf_bytes = per * ss if bulk else per * SLOT_HEADER

    def run(task: _Task) -> tuple[list[SlotCheck], int]:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = mmap.mmap(-1, round_up(buf_bytes, ALIGN))
        mv = memoryview(buf)
        out: list[SlotCheck] = []
        read = 0
        try:
            path = task.slab.path
            if task.bulk:
                want = task.count * ss
                base = task.first * ss
                got = files.pread(path, mv[:want], base)
                read = got
                for j in range(task.count):
                    lo = j * ss
                    avail = min(ss, got - lo)
                    if avail <= 0:
                        break
                    out.append(check_slot(
                        lane, mv[lo : lo + ss], avail,
                        lane.slot_number(task.slab.index, task.first + j), path, base + lo,
                        payload=payload))
            else:
                for j in range(task.count):
                    off = (task.first + j) * ss
                    view = mv[j * SLOT_HEADER : (j + 1) * SLOT_HEADER]
                    got = files.pread(path, view, off)
                    read += got
                    if got <= 0:
                        break
                    # header only: the record is whole when the file reaches its end
                    avail = min(task.slab.size - off, record)
                    c = check_slot(lane, view, min(got, avail) if avail < SLOT_HEADER else avail,
                                   lane.slot_number(task.slab.index, task.first + j), path, off,
                                   payload=False)
                    out.append(c)
            return out, read
        finally:
            mv.release()

    # Each thread takes the next task itself, as a plain parallel reader does; results are
    # handed back in order. At most ``window`` tasks run ahead of the caller, so memory stays
    # bounded, and a slow read never idles the other threads.
    n = len(tasks)
    window = 8 * max(1, workers)
    lock = threading.Lock()
    have_result = threading.Condition(lock)
    have_room = threading.Condition(lock)
    results: dict[int, tuple[list[SlotCheck], int] | BaseException] = {}
    state = {"next": 0, "consumed": 0, "stop": False}

    def worker() -> None:
        while True:
            with lock:
                while not state["stop"] and state["next"] < n \
                        and state["next"] - state["consumed"] >= window:
                    have_room.wait()
                if state["stop"] or state["next"] >= n:
                    return
                i = state["next"]
                state["next"] = i + 1
            res: tuple[list[SlotCheck], int] | BaseException
            try:
                res = run(tasks[i])
            except BaseException as e:  # handed to the caller, raised there
                res = e
            with lock:
                results[i] = res
                have_result.notify()

    threads = [threading.Thread(target=worker, name=f"kvtier-scan-{k}", daemon=True)
               for k in range(max(1, min(workers, n)))]
    for t in threads:
        t.start()
    try:
        for i in range(n):
            with lock:
                while i not in results:
                    have_result.wait()
                res = results.pop(i)
                state["consumed"] = i + 1
                have_room.notify()
            if isinstance(res, BaseException):
                raise res
            checks, nbytes = res
            if progress is not None:
                progress(nbytes, len(checks))
            yield from checks
    finally:
        with lock:
            state["stop"] = True
            have_room.notify_all()
        for t in threads:
            t.join()
        files.close()


def recheck(lane: Lane, check: SlotCheck) -> SlotCheck:
    """Read one slot again, whole, and check it as ``read_slots`` does (raises OSError).

    The read bypasses the page cache (O_DIRECT where the file system allows), as the scan's do:
    a buffered read racing an engine's O_DIRECT rewrite of the slot can leave torn pages in the
    cache, and a second buffered read would then find the same torn bytes again."""
    assert lane.slot_size is not None
    buf = mmap.mmap(-1, lane.slot_size)  # page-aligned, as O_DIRECT wants
    mv = memoryview(buf)
    files = _Files(direct=lane.slot_size % 4096 == 0)
    try:
        got = files.pread(check.file, mv, check.offset)
        if got <= 0:
            return SlotCheck(check.slot, check.file, check.offset, "empty")
        return check_slot(lane, mv, got, check.slot, check.file, check.offset, payload=True)
    finally:
        files.close()
        mv.release()
        with contextlib.suppress(BufferError):
            buf.close()


def newest_copies(records: list[SlotCheck]) -> tuple[list[SlotCheck], list[tuple[SlotCheck, SlotCheck]]]:
    """Split valid records into the copy of each key an engine keeps at start (the highest write
    sequence; on a tie the lowest slot) and the older copies, each paired with the kept one."""
    best: dict[bytes, SlotCheck] = {}
    dups: list[tuple[SlotCheck, SlotCheck]] = []
    for r in sorted(records, key=lambda c: c.slot):
        assert r.key is not None
        prev = best.get(r.key)
        if prev is None:
            best[r.key] = r
        elif prev.seq < r.seq:
            dups.append((prev, r))
            best[r.key] = r
        else:
            dups.append((r, prev))
    return list(best.values()), dups
