"""On-disk layout of the storage tier: fixed-size record slots in a few large slab files.

One directory per namespace (a *lane*) holds::

    NAMESPACE          the namespace string and block geometry, for people (never read back)
    lock               held with flock(LOCK_EX) by the process that owns the lane
    intent-NN          one 4096-byte file per I/O thread: the slots that thread is writing now
    slab-NNNNN.kvs     slots of ``slot_size`` bytes, ``slots_per_file`` of them per file

A slot holds one block record (see ``kvtier.format.record``) whose header is padded to 4096 bytes,
so the payload starts page-aligned and both parts move with one ``preadv``/``pwritev`` straight
from/to a primary slot (with O_DIRECT where the file system supports it). The last 16 bytes of
the header padding hold the record's write sequence number and a check of it; at start they
restore the recency order. Everything else about a block is in its header: the index is rebuilt
by reading headers, nothing else is persisted.

Crash safety: before a thread writes records it writes their slot numbers to its intent file.
At start, every slot named by an intent file is verified in full (header and payload checksum);
a torn record is invalidated there and then. Other slots were complete when written, so their
headers are checked at start and their payloads at every load.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import xxhash

from kvtier.format.record import (
    FIXED_HEADER_SIZE,
    RecordError,
    pack_header,
    parse_header,
    verify,
)

ALIGN = 4096
SLOT_HEADER = 4096  # header bytes of every record in a slot (payload starts here)
MAX_KEY_BYTES = SLOT_HEADER - FIXED_HEADER_SIZE - 16
_SEQ = struct.Struct("<QQ")  # write sequence, xxh3-64 of (sequence, key)
_INTENT_HEAD = struct.Struct("<4sI")
_INTENT_MAGIC = b"KVTI"
_INTENT_MAX = (SLOT_HEADER - _INTENT_HEAD.size - 8) // 8  # slots per intent write
_SCAN_CHUNK = 4 << 20  # bytes per read when scanning small slots in bulk
_SCAN_BULK_SLOT = 64 << 10  # slots up to this size are scanned in bulk, larger ones header by header
O_DIRECT = getattr(os, "O_DIRECT", 0)


def round_up(n: int, align: int) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align


def aligned_buffer(size: int) -> mmap.mmap:
    """Page-aligned anonymous memory (usable for O_DIRECT)."""
    return mmap.mmap(-1, round_up(max(size, 1), ALIGN))


def probe_direct_io(directory: str) -> bool:
    """True when O_DIRECT reads and writes work for files in ``directory``."""
    if not O_DIRECT:
        return False
    path = os.path.join(directory, ".direct-probe")
    buf = aligned_buffer(ALIGN)
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC | O_DIRECT, 0o644)
        try:
            os.pwritev(fd, [buf], 0)
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        buf.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


def _seq_check(seq: int, key: bytes) -> int:
    return xxhash.xxh3_64_intdigest(seq.to_bytes(8, "little") + key)


@dataclass(frozen=True)
class ScannedRecord:
    """A record found at start: where, which key, and how recently it was written."""

    slot: int
    key: bytes
    seq: int


class LaneBusyError(OSError):
    """Another live process owns this lane."""


class SlabStore:
    """The files of one lane and the I/O on them. Methods raise OSError; callers decide."""

    def __init__(
        self,
        directory: str,
        *,
        namespace: str,
        namespace_fp: bytes,
        block_bytes: int,
        slab_bytes: int,
        direct: bool,
        fsync: str,
        n_threads: int,
    ) -> None:
        self.directory = directory
        self.namespace_fp = namespace_fp
        self.block_bytes = block_bytes
        self.record_bytes = SLOT_HEADER + block_bytes
        self.slot_size = SLOT_HEADER + round_up(block_bytes, ALIGN)
        self.slots_per_file = max(1, slab_bytes // self.slot_size)
        self.direct = direct
        self.fsync = fsync
        self.n_threads = n_threads
        self._fds: dict[int, int] = {}
        self._alloc_end: dict[int, int] = {}  # slab file -> bytes allocated (its size)
        self._grow_lock = threading.Lock()
        self.grow_bytes = max(64 << 20, self.slot_size)
        self.limit_slots = 0  # allocation never covers slots at or beyond this
        self._intent_fds: list[int] = []
        self._lock_fd: int | None = None
        os.makedirs(directory, exist_ok=True)
        self._take_lock()
        try:
            self._write_namespace_file(namespace)
            for i in range(n_threads):
                p = self._intent_path(i)
                fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
                self._intent_fds.append(fd)
        except BaseException:
            self.close()
            raise

    # -- files -----------------------------------------------------------------------------
    def _take_lock(self) -> None:
        fd = os.open(os.path.join(self.directory, "lock"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LaneBusyError(errno.EBUSY, "lane in use by another process", self.directory) from e
            raise
        self._lock_fd = fd

    def _write_namespace_file(self, namespace: str) -> None:
        path = os.path.join(self.directory, "NAMESPACE")
        if os.path.exists(path):
            return
        text = (
            f"namespace: {namespace}\nfingerprint: {self.namespace_fp.hex()}\n"
            f"block_bytes: {self.block_bytes}\nslot_size: {self.slot_size}\n"
        )
        with open(path, "w") as f:
            f.write(text[: ALIGN - 1])

    def _intent_path(self, i: int) -> str:
        return os.path.join(self.directory, f"intent-{i:02d}")

    def slab_path(self, file_idx: int) -> str:
        """Path of slab file ``file_idx``."""
        return os.path.join(self.directory, f"slab-{file_idx:05d}.kvs")

    def slab_files(self) -> list[tuple[int, str]]:
        """Existing slab files as (index, path), in order."""
        out = []
        for name in os.listdir(self.directory):
            if name.startswith("slab-") and name.endswith(".kvs"):
                with contextlib.suppress(ValueError):
                    out.append((int(name[5:-4]), os.path.join(self.directory, name)))
        return sorted(out)

    def meta_bytes(self) -> int:
        """Bytes the lane's non-slab files occupy (each counted as at least one 4096 block)."""
        return (self.n_threads + 1) * ALIGN  # intent files + NAMESPACE (lock is empty)

    def fd(self, file_idx: int) -> int:
        """The descriptor of slab file ``file_idx`` (created on first use)."""
        fd = self._fds.get(file_idx)
        if fd is not None:
            return fd
        flags = os.O_CREAT | os.O_RDWR | (O_DIRECT if self.direct else 0)
        path = self.slab_path(file_idx)
        existed = os.path.exists(path)
        fd = os.open(path, flags, 0o644)
        prev = self._fds.setdefault(file_idx, fd)
        if prev != fd:  # another thread opened it first
            os.close(fd)
            return prev
        if not existed and self.fsync != "none":
            self._sync_dir()
        return fd

    def ensure_allocated(self, slot: int) -> None:
        """Make the file space of ``slot`` allocated, growing its file ahead in large steps.

        Growing ahead keeps O_DIRECT writes inside the file size (no serialising extension of the
        file on every write); it never goes beyond ``limit_slots``. Raises OSError (ENOSPC).
        """
        f, off = self.locate(slot)
        end = off + self.slot_size
        cur = self._alloc_end.get(f)
        if cur is not None and cur >= end:
            return
        with self._grow_lock:
            fd = self.fd(f)
            cur = self._alloc_end.get(f)
            if cur is None:
                cur = os.fstat(fd).st_size
            if cur >= end:
                self._alloc_end[f] = cur
                return
            first = f * self.slots_per_file
            limit = min(self.slots_per_file, max(0, self.limit_slots - first)) * self.slot_size
            target = max(end, min(cur + self.grow_bytes, limit))
            try:
                os.posix_fallocate(fd, cur, target - cur)
            except OSError:
                if target == end:
                    raise
                target = end
                os.posix_fallocate(fd, cur, target - cur)
            self._alloc_end[f] = target

    def allocated_bytes(self) -> int:
        """Bytes of slab file space allocated so far."""
        return sum(self._alloc_end.values())

    def _sync_dir(self) -> None:
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def locate(self, slot: int) -> tuple[int, int]:
        """(file index, byte offset) of a slot."""
        f, i = divmod(slot, self.slots_per_file)
        return f, i * self.slot_size

    # -- records ---------------------------------------------------------------------------
    def write_record(
        self, slot: int, key: bytes, payload: memoryview, seq: int, hdr: mmap.mmap
    ) -> int:
        """Write one record into ``slot``; returns the file index written (raises OSError)."""
        head = pack_header(self.namespace_fp, key, payload, align=SLOT_HEADER)
        hdr[: len(head)] = head
        hdr[SLOT_HEADER - _SEQ.size : SLOT_HEADER] = _SEQ.pack(seq, _seq_check(seq, key))
        self.ensure_allocated(slot)
        f, off = self.locate(slot)
        fd = self.fd(f)
        n = os.pwritev(fd, [memoryview(hdr)[:SLOT_HEADER], payload], off)
        if n != self.record_bytes:  # a short write to a regular file: out of space
            raise OSError(errno.ENOSPC, f"short write ({n} of {self.record_bytes} bytes)")
        if self.fsync == "always":
            os.fdatasync(fd)
        return f

    def sync_files(self, files: set[int]) -> None:
        """fdatasync the given slab files."""
        for f in files:
            os.fdatasync(self.fd(f))

    def read_record(self, slot: int, key: bytes, dest: memoryview, hdr: mmap.mmap) -> str | None:
        """Read ``slot`` into ``dest`` and verify it as ``key``'s record; None when valid."""
        f, off = self.locate(slot)
        n = os.preadv(self.fd(f), [memoryview(hdr)[:SLOT_HEADER], dest], off)
        if n < self.record_bytes:
            return "truncated record"
        try:
            h = parse_header(memoryview(hdr))
        except RecordError as e:
            return str(e)
        if h.header_len != SLOT_HEADER:
            return "unexpected header length"
        return verify(h, dest, namespace_fp=self.namespace_fp, key=key, payload_len=self.block_bytes)

    def stored_seq(self, key: bytes, hdr: mmap.mmap) -> int:
        """The write sequence in the header just read into ``hdr`` (0 when its check fails)."""
        seq, chk = _SEQ.unpack_from(hdr, SLOT_HEADER - _SEQ.size)
        return int(seq) if _seq_check(seq, key) == chk else 0

    def rewrite_seq(self, slot: int, key: bytes, seq: int, hdr: mmap.mmap) -> None:
        """Give the record in ``slot`` (its header in ``hdr``) a new sequence: one header write.

        The sequence lies outside the header checksum, so the record stays valid; a torn write
        of this page can only make the record unreadable (a miss), never wrong.
        """
        hdr[SLOT_HEADER - _SEQ.size : SLOT_HEADER] = _SEQ.pack(seq, _seq_check(seq, key))
        f, off = self.locate(slot)
        n = os.pwrite(self.fd(f), memoryview(hdr)[:SLOT_HEADER], off)
        if n != SLOT_HEADER:
            raise OSError(errno.EIO, f"short header write ({n} of {SLOT_HEADER} bytes)")

    def invalidate(self, slot: int, zeros: mmap.mmap) -> None:
        """Overwrite a slot's header with zeros so that no later start finds its record."""
        f, off = self.locate(slot)
        path_size = os.fstat(self.fd(f)).st_size
        if off >= path_size:
            return
        os.pwritev(self.fd(f), [memoryview(zeros)[:SLOT_HEADER]], off)

    # -- intents ---------------------------------------------------------------------------
    @staticmethod
    def intent_capacity() -> int:
        """How many slots one intent write can name."""
        return _INTENT_MAX

    def write_intent(self, thread: int, slots: list[int], buf: mmap.mmap) -> None:
        """Record that thread ``thread`` is about to write ``slots`` (at most intent_capacity)."""
        body = _INTENT_HEAD.pack(_INTENT_MAGIC, len(slots)) + struct.pack(f"<{len(slots)}Q", *slots)
        data = body + xxhash.xxh3_64_digest(body)
        fd = self._intent_fds[thread]
        os.pwrite(fd, data, 0)
        if self.fsync != "none":
            os.fdatasync(fd)

    def read_intents(self) -> set[int]:
        """Slots named by any intent file (including those of a previous, larger thread count)."""
        slots: set[int] = set()
        for name in os.listdir(self.directory):
            if not name.startswith("intent-"):
                continue
            try:
                with open(os.path.join(self.directory, name), "rb") as fh:
                    data = fh.read(SLOT_HEADER)
            except OSError:
                continue
            if len(data) < _INTENT_HEAD.size + 8:
                continue
            magic, count = _INTENT_HEAD.unpack_from(data)
            end = _INTENT_HEAD.size + 8 * count
            if magic != _INTENT_MAGIC or count > _INTENT_MAX or len(data) < end + 8:
                continue  # torn or empty: its records had not been started
            if xxhash.xxh3_64_digest(data[:end]) != data[end : end + 8]:
                continue
            slots.update(struct.unpack_from(f"<{count}Q", data, _INTENT_HEAD.size))
        return slots

    def clear_intents(self) -> None:
        """Empty every intent file; remove those of threads this run does not have."""
        keep = {os.path.basename(self._intent_path(i)) for i in range(self.n_threads)}
        for name in os.listdir(self.directory):
            if name.startswith("intent-") and name not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))
        for fd in self._intent_fds:
            os.ftruncate(fd, 0)
            os.pwrite(fd, b"\0" * SLOT_HEADER, 0)
            if self.fsync != "none":
                os.fdatasync(fd)

    # -- start -----------------------------------------------------------------------------
    def scan(self, max_slots: int) -> Iterator[ScannedRecord]:
        """Every slot below ``max_slots`` whose header verifies as one of this lane's records.

        Reads run on a few threads ahead of the parsing: small slots are read in 4 MiB sweeps,
        larger ones header by header (their payloads are never read here).
        """
        bulk = self.slot_size <= _SCAN_BULK_SLOT
        per = max(1, _SCAN_CHUNK // self.slot_size) if bulk else 64
        batches: list[tuple[int, int, int]] = []  # (fd, first slot index in file, count)
        bases: list[int] = []  # global slot number of each batch's first slot
        for file_idx, _path in self.slab_files():
            first = file_idx * self.slots_per_file
            if first >= max_slots:
                continue
            fd = self.fd(file_idx)
            size = os.fstat(fd).st_size
            self._alloc_end[file_idx] = size
            # a slot counts only if its whole record lies inside the file
            n = 0 if size < self.record_bytes else (size - self.record_bytes) // self.slot_size + 1
            n = min(n, self.slots_per_file, max_slots - first)
            for i0 in range(0, n, per):
                batches.append((fd, i0, min(per, n - i0)))
                bases.append(first + i0)
        stride = self.slot_size if bulk else SLOT_HEADER
        workers = 4 if bulk else 16  # header reads are small: latency-bound, so more at once
        depth = 2 * workers
        bufs = [aligned_buffer(per * stride) for _ in range(min(depth + 1, len(batches)))]
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvtier-scan") as pool:
                futures: deque[Future[int]] = deque()
                nxt = done = 0
                while done < len(batches):
                    while nxt < len(batches) and len(futures) < depth:
                        buf = bufs[nxt % len(bufs)]
                        futures.append(pool.submit(self._read_batch, buf, *batches[nxt], bulk))
                        nxt += 1
                    k = futures.popleft().result()
                    mv = memoryview(bufs[done % len(bufs)])
                    base = bases[done]
                    done += 1
                    for j in range(k):
                        rec = self._parse(mv[j * stride : j * stride + SLOT_HEADER], base + j)
                        if rec is not None:
                            yield rec
                    mv.release()
        finally:
            for b in bufs:
                with contextlib.suppress(BufferError):
                    b.close()

    def _read_batch(self, buf: mmap.mmap, fd: int, i0: int, count: int, bulk: bool) -> int:
        """Read the headers of ``count`` slots from slot ``i0`` of a file into ``buf``; how many."""
        mv = memoryview(buf)
        try:
            if bulk:
                got = os.preadv(fd, [mv[: count * self.slot_size]], i0 * self.slot_size)
                k = 0
                while k < count and k * self.slot_size + SLOT_HEADER <= got:
                    k += 1
                return k
            for j in range(count):
                if os.preadv(fd, [mv[j * SLOT_HEADER : (j + 1) * SLOT_HEADER]],
                             (i0 + j) * self.slot_size) < SLOT_HEADER:
                    return j
            return count
        finally:
            mv.release()

    def _parse(self, mv: memoryview, slot: int) -> ScannedRecord | None:
        if mv[:4] != b"KVTR":
            return None
        try:
            h = parse_header(mv)
        except RecordError:
            return None
        if (
            h.namespace_fp != self.namespace_fp
            or h.header_len != SLOT_HEADER
            or h.payload_len != self.block_bytes
        ):
            return None
        seq, chk = _SEQ.unpack_from(mv, SLOT_HEADER - _SEQ.size)
        if _seq_check(seq, h.key) != chk:
            seq = 0
        return ScannedRecord(slot, h.key, seq)

    def verify_slot(self, slot: int) -> bool:
        """Read a whole record and check its header and payload checksum."""
        f, off = self.locate(slot)
        fd = self.fd(f)
        buf = aligned_buffer(self.slot_size)
        try:
            n = os.preadv(fd, [memoryview(buf)[: self.slot_size]], off)
            if n < self.record_bytes:
                return False
            try:
                h = parse_header(memoryview(buf))
            except RecordError:
                return False
            if h.header_len != SLOT_HEADER:
                return False
            payload = memoryview(buf)[SLOT_HEADER : SLOT_HEADER + self.block_bytes]
            ok = verify(h, payload, namespace_fp=self.namespace_fp, key=h.key,
                        payload_len=self.block_bytes) is None
            del payload
            return ok
        finally:
            with contextlib.suppress(BufferError):
                buf.close()

    def truncate_to(self, n_slots: int) -> None:
        """Drop slab space at or beyond slot ``n_slots`` (after a capacity decrease)."""
        for file_idx, path in self.slab_files():
            first = file_idx * self.slots_per_file
            if first >= n_slots:
                fd = self._fds.pop(file_idx, None)
                if fd is not None:
                    os.close(fd)
                self._alloc_end.pop(file_idx, None)
                os.unlink(path)
            else:
                keep = (n_slots - first) * self.slot_size
                size = os.path.getsize(path)
                if size > keep and n_slots - first < self.slots_per_file:
                    os.truncate(path, keep)
                    size = keep
                self._alloc_end[file_idx] = size

    def file_bytes(self) -> int:
        """Current size of all slab files."""
        total = 0
        for _i, path in self.slab_files():
            with contextlib.suppress(OSError):
                total += os.path.getsize(path)
        return total

    def close(self) -> None:
        """Close every descriptor and release the lane lock."""
        for fd in list(self._fds.values()) + self._intent_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._intent_fds = []
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None
