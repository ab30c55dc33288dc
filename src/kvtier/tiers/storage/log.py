"""The index log of one region: what its slots hold, written by the region's owner, read by all.

Every region (one slab file) has one log file beside it, ``log-NNNNN``, whose space (a fixed
size, counted in the capacity) is allocated when it is created. Only the engine that holds the
region's lock writes it; every engine on the directory reads it from where it stopped last
time. Entries are 64 bytes::

    offset  size  field
    0       1     kind (HEADER, CLAIM, PUT, DEL, HIT, RELEASE)
    1       1     key length (0-36), or 255 when ``key`` holds the key's 16-byte digest
    2       2     reserved (0)
    4       4     slot within the region (HEADER: format version)
    8       4     aux (HEADER: region number; HIT: the region the hit block lies in)
    12      8     value (HEADER: epoch; PUT/HIT: write sequence; CLAIM/RELEASE: engine id)
    20      36    key (zero padded), or its digest
    56      8     check: xxh3-64 of bytes 0..55, seeded with the file's epoch

The first entry is the HEADER; its epoch is fresh for every file written, so a reader that sees
a new epoch (a compaction or a new owner rewrote the log) re-reads from the start. The file ends
at its first entry that does not verify (zeros, or an append still in flight): readers stop
there and read on from that offset next time. A PUT is appended only after its record is
written, and a DEL before a slot is overwritten, so a log never names a record that was torn.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import struct
import threading
from collections.abc import Iterable, Sequence

import xxhash

ENTRY = 64
VERSION = 1
HEADER, CLAIM, PUT, DEL, HIT, RELEASE = 1, 2, 3, 4, 5, 6
KEY_INLINE = 36  # keys up to this long are stored as they are
DIGEST = 255  # key length marker: the key field holds the key's xxh3-128 digest
_BODY = struct.Struct("<BBHIIQ36s")  # 56 bytes
_CHECK = struct.Struct("<Q")
_FULL = struct.Struct("<BBHIIQ36sQ")
_U64 = 0xFFFFFFFFFFFFFFFF
_LONG_PREFIX = b"\xffkvtier-long-key:"  # 17 bytes + 16-byte digest + padding = 37 bytes
_LONG_LEN = len(_LONG_PREFIX) + 20
_READ_CHUNK = 1 << 20
_FALLOC_FL_KEEP_SIZE = 1


def _load_fallocate() -> object | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def reserve_space(fd: int, length: int) -> bool:
    """Allocate ``length`` bytes of disk space for ``fd`` without changing its size.

    So the file's space on disk is fixed when it is created (appends never allocate, and file
    systems that allocate ahead of appending writes have nothing to add). False when the file
    system cannot do it; the file then grows as it is written.
    """
    if _fallocate is None:
        return False
    rc = _fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, length)  # type: ignore[operator]
    return rc == 0


def index_key(key: bytes) -> bytes:
    """The key as the index holds it: itself up to 36 bytes, else a 37-byte form of its digest.

    Longer keys are logged by digest; a digest form is 37 bytes long, so it never equals a real
    key the log holds as it is. Loads still compare the full key in the record header.
    """
    if len(key) <= KEY_INLINE:
        return key
    return _LONG_PREFIX + xxhash.xxh3_128_digest(key) + b"\0" * 4


def log_bytes(slots: int) -> int:
    """Bytes reserved for the log of a region of ``slots`` slots (a multiple of 4096)."""
    n = ENTRY * (2 * slots + 8)
    return -(-n // 4096) * 4096


#: one parsed log entry: (kind, slot, aux, value, index key); the key is empty for
#: HEADER/CLAIM/DEL/RELEASE (plain tuples: logs of 100k entries are parsed at start)
Entry = tuple[int, int, int, int, bytes]


def pack(kind: int, slot: int = 0, aux: int = 0, value: int = 0, key: bytes = b"", *,
         epoch: int) -> bytes:
    """One 64-byte entry; ``key`` is a real key or an index key (both are accepted)."""
    return pack_many([(kind, slot, aux, value, key)], epoch=epoch)


def pack_many(entries: Sequence[tuple[int, int, int, int, bytes]], *, epoch: int) -> bytes:
    """Entries (kind, slot, aux, value, key) packed one after the other."""
    buf = bytearray(ENTRY * len(entries))
    mv = memoryview(buf)
    pack_into = _BODY.pack_into
    check_into = _CHECK.pack_into
    digest = xxhash.xxh3_64_intdigest
    off = 0
    for kind, slot, aux, value, key in entries:
        n = len(key)
        if n <= KEY_INLINE:
            pack_into(buf, off, kind, n, 0, slot, aux, value & _U64, key)
        else:
            if n == _LONG_LEN and key.startswith(_LONG_PREFIX):
                kb = key[len(_LONG_PREFIX) : len(_LONG_PREFIX) + 16]
            else:
                kb = xxhash.xxh3_128_digest(key)
            pack_into(buf, off, kind, DIGEST, 0, slot, aux, value & _U64, kb)
        check_into(buf, off + 56, digest(mv[off : off + 56], seed=epoch))
        off += ENTRY
    return bytes(buf)


def parse(data: bytes | memoryview, epoch: int) -> tuple[list[Entry], int]:
    """Entries at the start of ``data`` up to the first that does not verify; (entries, bytes)."""
    out: list[Entry] = []
    mv = memoryview(data)
    end = len(mv) // ENTRY * ENTRY
    digest = xxhash.xxh3_64_intdigest
    unpack = _FULL.unpack_from
    append = out.append
    long_prefix = _LONG_PREFIX
    pad = b"\0" * 4
    for off in range(0, end, ENTRY):
        kind, klen, _r, slot, aux, value, kb, chk = unpack(mv, off)
        if kind == 0 or digest(mv[off : off + 56], seed=epoch) != chk:
            return out, off
        if klen == DIGEST:
            key = long_prefix + kb[:16] + pad
        else:
            key = kb[:klen]
        append((kind, slot, aux, value, key))
    return out, end


def read_header(fd: int) -> int | None:
    """The epoch of the log open at ``fd``, or None when its header does not verify."""
    data = os.pread(fd, ENTRY, 0)
    if len(data) < ENTRY or data[0] != HEADER:
        return None
    _kind, _klen, _r, _ver, _aux, epoch, _kb = _BODY.unpack_from(data)
    if xxhash.xxh3_64_intdigest(data[:56], seed=epoch) != _CHECK.unpack_from(data, 56)[0]:
        return None
    return int(epoch)


class LogWriter:
    """The append side of one region's log (only the region's owner has one).

    Appends are serialised by ``lock`` (held by the caller) and written with ``pwrite`` at the
    tracked end; ``sync`` (fdatasync) is asked for where other hosts must see them at once or
    durability needs it.
    """

    def __init__(self, path: str, fd: int, epoch: int, end: int, size: int, reserved: bool) -> None:
        self.path = path
        self.fd = fd
        self.epoch = epoch
        self.end = end
        self.size = size
        self.reserved = reserved  # whether its ``size`` bytes of disk space are allocated
        self.lock = threading.Lock()
        self.dirty = False

    @classmethod
    def create(cls, path: str, region: int, size: int, entries: Iterable[tuple[int, int, int, int, bytes]],
               *, sync: bool) -> LogWriter:
        """Write a fresh log (header + ``entries``) beside ``path`` and rename it into place.

        ``entries`` are (kind, slot, aux, value, key). The file's disk space is allocated in full
        once it holds more than a header and a claim (an unused region costs one page). Raises
        OSError; the caller decides.
        """
        epoch = secrets.randbits(63) | 1
        rows = [(HEADER, VERSION, region, epoch, b""), *entries]
        reserve = len(rows) > 2
        data = pack_many(rows, epoch=epoch)
        if len(data) > size:
            raise OSError(errno.ENOSPC, f"log of {len(data)} bytes does not fit its {size} bytes")
        tmp = path + ".new"
        fd = os.open(tmp, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
        try:
            if reserve:
                reserve_space(fd, size)
            os.pwrite(fd, data, 0)
            if sync:
                os.fdatasync(fd)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return cls(path, fd, epoch, len(data), size, reserve)

    @classmethod
    def reopen(cls, path: str, epoch: int, end: int, size: int) -> LogWriter:
        """Append to an existing log that ends cleanly at ``end`` (read to there by a
        ``LogTail``, its writer gone): a new owner's claim needs no rewrite."""
        fd = os.open(path, os.O_RDWR)
        return cls(path, fd, epoch, end, size, False)

    def room(self, n_entries: int) -> bool:
        """True when ``n_entries`` more entries fit."""
        return self.end + n_entries * ENTRY <= self.size

    def append(self, entries: list[tuple[int, int, int, int, bytes]], *, sync: bool = False) -> bool:
        """Append entries (kind, slot, aux, value, key) with ``lock`` held by the caller;
        False when they do not fit (the caller rewrites the log first)."""
        if not entries:
            return True
        data = pack_many(entries, epoch=self.epoch)
        if self.end + len(data) > self.size:
            return False
        if not self.reserved:
            self.reserved = True
            reserve_space(self.fd, self.size)
        n = os.pwrite(self.fd, data, self.end)
        if n != len(data):
            raise OSError(errno.EIO, f"short log write ({n} of {len(data)} bytes)")
        self.end += n
        self.dirty = True
        if sync:
            os.fdatasync(self.fd)
            self.dirty = False
        return True

    def flush(self) -> None:
        """fdatasync what was appended since the last flush."""
        if self.dirty:
            self.dirty = False
            os.fdatasync(self.fd)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class LogTail:
    """The read side of one region's log: remembers the epoch and offset read so far."""

    __slots__ = ("path", "epoch", "offset", "ino", "clean")

    def __init__(self, path: str) -> None:
        self.path = path
        self.epoch = 0
        self.offset = 0
        self.ino = -1
        self.clean = False  # the last read ended at the end of the file (no partial entry)

    def read(self) -> tuple[bool, list[Entry]] | None:
        """New entries since the last call: (reset, entries); None when there is no log.

        ``reset`` is True when the log was rewritten since (a new epoch): the entries then
        describe the region from scratch. The file is opened anew each time, so on network file
        systems with close-to-open consistency the data of other hosts is seen.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            if self.ino != -1:  # the log was removed (the region was dropped)
                self.ino, self.epoch, self.offset = -1, 0, 0
                return True, []
            return None
        try:
            st = os.fstat(fd)
            reset = False
            epoch = read_header(fd)  # inode numbers are reused: the epoch tells files apart
            if epoch is None:  # damaged: nothing to read (a rewrite brings a new file)
                return None
            if st.st_ino != self.ino or epoch != self.epoch:
                reset = True
                self.ino, self.epoch, self.offset = st.st_ino, epoch, ENTRY
            out: list[Entry] = []
            while self.offset + ENTRY <= st.st_size:
                data = os.pread(fd, min(_READ_CHUNK, st.st_size - self.offset), self.offset)
                if not data:
                    break
                got, used = parse(data, self.epoch)
                out.extend(got)
                self.offset += used
                if used < len(data) - len(data) % ENTRY:
                    break  # an entry that does not verify yet: an append in flight
            self.clean = self.offset == st.st_size
            return reset, out
        finally:
            os.close(fd)
