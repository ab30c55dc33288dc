"""Record I/O on the slab files of a namespace directory: fixed-size slots, one per block.

Region ``N``'s slots live in ``slab-NNNNN.kvs``, slot ``i`` at byte ``i * slot_size``; a global
slot number is ``N * slots_per_region + i``. A slot holds one block record (see
``kvtier.format.record``) whose header is padded to 4096 bytes, so the payload starts
page-aligned and both parts move with one ``preadv``/``pwritev`` straight from/to a primary slot
(with O_DIRECT where the file system supports it). The last 16 bytes of the header padding hold
the record's write sequence number and a check of it.

Each slab file is opened once, read-write, and the same descriptor carries the region's flock
(closing another descriptor of the file would drop a lock where flock is emulated with POSIX
locks, as on NFS). Only the region's owner writes a slab file; anyone reads it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from kvtier.format.record import (
    FIXED_HEADER_SIZE,
    RecordError,
    header_prefix,
    match_header,
    pack_header,
    parse_header,
    verify,
)
from kvtier.tiers.storage.fastio import EngineRead, FastIO, native
from kvtier.tiers.storage.layout import ALIGN, SLOT_HEADER, Geometry, round_up, slab_name

MAX_KEY_BYTES = SLOT_HEADER - FIXED_HEADER_SIZE - 16
_SEQ = struct.Struct("<QQ")  # write sequence, xxh3-64 of (sequence, key)
O_DIRECT = getattr(os, "O_DIRECT", 0)

__all__ = ["ALIGN", "MAX_KEY_BYTES", "SLOT_HEADER", "ScannedRecord", "SlabStore", "aligned_buffer",
           "probe_direct_io", "round_up"]


def aligned_buffer(size: int) -> mmap.mmap:
    """Page-aligned anonymous memory (usable for O_DIRECT)."""
    return mmap.mmap(-1, round_up(max(size, 1), ALIGN))


def probe_direct_io(directory: str) -> bool:
    """True when O_DIRECT reads and writes work for files in ``directory``."""
    if not O_DIRECT:
        return False
    path = os.path.join(directory, f".direct-probe-{os.getpid()}-{threading.get_ident()}")
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


def record_header(namespace_fp: bytes, key: bytes, payload: memoryview, seq: int) -> bytes:
    """A slot's whole header page (``SLOT_HEADER`` bytes): the record header, padded, with the
    write sequence and its check in the last 16 bytes."""
    head = pack_header(namespace_fp, key, payload, align=SLOT_HEADER)
    return head[: SLOT_HEADER - _SEQ.size] + _SEQ.pack(seq, _seq_check(seq, key))


def native_record_io() -> FastIO | None:
    """The native record I/O where it is built and writes what ``record_header`` does."""
    return native(record_header)


@dataclass(frozen=True)
class ScannedRecord:
    """A record found by a header scan: where, which key, and how recently it was written."""

    slot: int
    key: bytes
    seq: int


@dataclass
class Reads:
    """Reads started by :meth:`SlabStore.start_reads`, for :meth:`SlabStore.finish_reads`."""

    runs: Sequence[tuple[int, Sequence[memoryview]]]
    hdr: mmap.mmap
    located: list[tuple[int, int, int]]  # (fd, offset, records) a run; fd -1: not opened
    unopened: dict[int, tuple[int, None] | OSError]  # run -> its result without a read
    job: EngineRead | None = None  # in flight on this native read job
    pinned: Any = None  # the buffers' pins while in flight


class SlabStore:
    """The slab files of one namespace directory and the I/O on them. Methods raise OSError."""

    def __init__(self, directory: str, geometry: Geometry, *, namespace_fp: bytes, direct: bool,
                 fsync: str, native_io: bool = True) -> None:
        self.directory = directory
        self.geo = geometry
        self.namespace_fp = namespace_fp
        self.block_bytes = geometry.block_bytes
        self.record_bytes = SLOT_HEADER + geometry.block_bytes
        self.slot_size = geometry.slot_size
        self.slots_per_file = geometry.slots_per_region
        self.direct = direct
        self.fsync = fsync
        self._fds: dict[int, int] = {}
        self._alloc_end: dict[int, int] = {}  # region -> bytes allocated (its file size)
        self.limits: dict[int, int] = {}  # region -> slots its file may grow to (owned regions)
        self._grow_lock = threading.Lock()
        self._open_lock = threading.Lock()
        self.grow_bytes = max(64 << 20, self.slot_size)
        #: adjacent slots can be read with one preadv (no padding between records)
        self.mergeable = self.slot_size == self.record_bytes
        self._prefixes: dict[int, bytes] = {}  # key length -> the header prefix every record has
        #: runs of records sealed and written, or read and summed, in one call without the GIL
        #: (None: in Python, where the native part is not built or ``native_io`` is false)
        self.fast = native_record_io() if native_io else None

    # -- files -----------------------------------------------------------------------------
    def slab_path(self, region: int) -> str:
        """Path of region ``region``'s slab file."""
        return os.path.join(self.directory, slab_name(region))

    def fd(self, region: int, *, create: bool = False) -> int:
        """The descriptor of ``region``'s slab file (opened on first use; FileNotFoundError when
        it does not exist and ``create`` is false)."""
        fd = self._fds.get(region)
        if fd is not None:
            return fd
        with self._open_lock:
            fd = self._fds.get(region)
            if fd is not None:
                return fd
            flags = os.O_RDWR | (O_DIRECT if self.direct else 0) | (os.O_CREAT if create else 0)
            path = self.slab_path(region)
            existed = os.path.exists(path)
            fd = os.open(path, flags, 0o644)
            self._fds[region] = fd
        if create and not existed and self.fsync != "none":
            self._sync_dir()
        return fd

    def close_region(self, region: int) -> None:
        """Close ``region``'s descriptor (dropping its lock, if this process held it)."""
        fd = self._fds.pop(region, None)
        self._alloc_end.pop(region, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def allocated_slots(self, region: int) -> int:
        """Slots whose file space exists in ``region``'s slab file (0 when there is none)."""
        try:
            size = os.fstat(self.fd(region)).st_size
        except FileNotFoundError:
            return 0
        self._alloc_end[region] = size
        return min(-(-size // self.slot_size), self.geo.slots_in(region))

    def ensure_allocated(self, slot: int) -> None:
        """Make the file space of ``slot`` allocated, growing its file ahead in large steps.

        Growing ahead keeps O_DIRECT writes inside the file size (no serialising extension of the
        file on every write); it never goes beyond the region's limit. Raises OSError (ENOSPC).
        """
        region, off = self.locate(slot)
        end = off + self.slot_size
        cur = self._alloc_end.get(region)
        if cur is not None and cur >= end:
            return
        with self._grow_lock:
            fd = self.fd(region, create=True)
            cur = self._alloc_end.get(region)
            if cur is None:
                cur = os.fstat(fd).st_size
            if cur >= end:
                self._alloc_end[region] = cur
                return
            limit = self.limits.get(region, self.geo.slots_in(region)) * self.slot_size
            target = max(end, min(cur + self.grow_bytes, limit))
            try:
                os.posix_fallocate(fd, cur, target - cur)
            except OSError:
                if target == end:
                    raise
                target = end
                os.posix_fallocate(fd, cur, target - cur)
            self._alloc_end[region] = target

    def _sync_dir(self) -> None:
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def locate(self, slot: int) -> tuple[int, int]:
        """(region, byte offset in its file) of a global slot."""
        r, i = divmod(slot, self.slots_per_file)
        return r, i * self.slot_size

    # -- records ---------------------------------------------------------------------------
    def write_record(
        self, slot: int, key: bytes, payload: memoryview, seq: int, hdr: mmap.mmap
    ) -> int:
        """Write one record into ``slot``; returns the region written (raises OSError)."""
        return self.write_run(slot, [(key, payload, seq)], hdr)

    def write_run(self, slot: int, records: Sequence[tuple[bytes, memoryview, int]],
                  hdr: mmap.mmap) -> int:
        """Write ``(key, payload, seq)`` records into adjacent slots of one region, from ``slot``
        on, with one ``pwritev`` (headers built in ``hdr``, ``SLOT_HEADER`` bytes each); returns
        the region. More than one record needs ``mergeable``. Raises OSError (ENOSPC when short).
        """
        done = self.write_runs([(slot, records)], hdr)[0]
        if isinstance(done, OSError):
            raise done
        return done

    def write_runs(self, runs: Sequence[tuple[int, Sequence[tuple[bytes, memoryview, int]]]],
                   hdr: mmap.mmap) -> list[int | OSError]:
        """Write runs of records in order, each ``(slot, records)`` as :meth:`write_run` writes
        one. On the native path every run is sealed and written in one call without the GIL,
        the headers numbered across the runs in ``hdr``. Per run: its region, or the OSError
        its write met (the runs after it are still written)."""
        out: list[int | OSError] = []
        plan: list[tuple[int, int, int]] = []  # (run, fd, offset) of the runs to write
        for i, (slot, records) in enumerate(runs):
            try:
                self.ensure_allocated(slot + len(records) - 1)
                region, off = self.locate(slot)
                plan.append((i, self.fd(region, create=True), off))
                out.append(region)
            except OSError as e:
                out.append(e)
        written = self._write_native(plan, runs, hdr) if self.fast is not None and plan else None
        for j, (i, fd, off) in enumerate(plan):
            records = runs[i][1]
            want = self.record_bytes * len(records)
            try:
                n = self._write_python(fd, off, records, hdr) if written is None else written[j]
                if n < 0:
                    raise OSError(-n, os.strerror(-n))
                if n != want:  # a short write to a regular file: out of space
                    raise OSError(errno.ENOSPC, f"short write ({n} of {want} bytes)")
                if self.fsync == "always":
                    os.fdatasync(fd)
            except OSError as e:
                out[i] = e
        return out

    def _write_python(self, fd: int, off: int, records: Sequence[tuple[bytes, memoryview, int]],
                      hdr: mmap.mmap) -> int:
        hv = memoryview(hdr)
        iov: list[memoryview] = []
        for i, (key, payload, seq) in enumerate(records):
            b = i * SLOT_HEADER
            hdr[b : b + SLOT_HEADER] = record_header(self.namespace_fp, key, payload, seq)
            iov.append(hv[b : b + SLOT_HEADER])
            iov.append(payload)
        return os.pwritev(fd, iov, off)

    def _write_native(self, plan: Sequence[tuple[int, int, int]],
                      runs: Sequence[tuple[int, Sequence[tuple[bytes, memoryview, int]]]],
                      hdr: mmap.mmap) -> list[int] | None:
        """The runs ``plan`` names ((run, fd, offset)), their records and ``pwritev``s as
        ``_write_python`` would write them, in one call without the GIL: per planned run, bytes
        written or -errno. None for records it does not take (keys of different lengths,
        read-only payloads, more headers than ``hdr`` holds: the Python path then writes them
        or fails as it would)."""
        fast = self.fast
        assert fast is not None
        records = [rec for i, _fd, _off in plan for rec in runs[i][1]]
        klen = len(records[0][0])
        if len(records) * SLOT_HEADER > len(hdr) or any(
                len(k) != klen or type(k) is not bytes or p.nbytes != self.block_bytes
                for k, p, _q in records):
            return None
        pinned = fast.pin_all([hdr, *[p for _k, p, _q in records]])
        if pinned is None:
            return None
        hdr_addr, *addrs = pinned[1]  # the pins hold the buffers meanwhile
        done = fast.write_runs([(fd, off, len(runs[i][1])) for i, fd, off in plan], hdr_addr,
                               SLOT_HEADER, self._prefix(klen),
                               [(k, a, q) for (k, _p, q), a in zip(records, addrs)], self.block_bytes)
        del pinned
        return done

    def _prefix(self, key_len: int) -> bytes:
        """The first bytes of every record header for a key of ``key_len`` bytes."""
        prefix = self._prefixes.get(key_len)
        if prefix is None:
            prefix = header_prefix(self.namespace_fp, key_len, self.block_bytes, align=SLOT_HEADER)
            self._prefixes[key_len] = prefix
        return prefix

    def sync_regions(self, regions: set[int]) -> None:
        """fdatasync the given regions' slab files."""
        for r in regions:
            os.fdatasync(self.fd(r))

    def read_record(self, slot: int, key: bytes, dest: memoryview, hdr: mmap.mmap) -> str | None:
        """Read ``slot`` into ``dest`` and verify it as ``key``'s record; None when valid."""
        region, off = self.locate(slot)
        try:
            fd = self.fd(region)
        except FileNotFoundError:
            return "no slab file"
        n = os.preadv(fd, [memoryview(hdr)[:SLOT_HEADER], dest], off)
        if n < self.record_bytes:
            return "truncated record"
        try:
            h = parse_header(memoryview(hdr))
        except RecordError as e:
            return str(e)
        if h.header_len != SLOT_HEADER:
            return "unexpected header length"
        return verify(h, dest, namespace_fp=self.namespace_fp, key=key, payload_len=self.block_bytes)

    def read_run(self, slot: int, dests: Sequence[memoryview], hdr: mmap.mmap
                 ) -> tuple[int, list[int] | None]:
        """Read the records of ``len(dests)`` adjacent slots of one region, from ``slot`` on, with
        one ``preadv``: headers into ``hdr`` (``SLOT_HEADER`` bytes each), payloads into ``dests``.

        Returns how many records were read whole (a short read ends the run early; -1 when the
        region has no slab file), and the xxh3-64 of each of their payloads where they were
        computed with the read (the native path), else None: pass them to ``check_record``.
        More than one record needs ``mergeable``. Raises OSError.
        """
        got = self.read_runs([(slot, dests)], hdr)[0]
        if isinstance(got, OSError):
            raise got
        return got

    def read_runs(self, runs: Sequence[tuple[int, Sequence[memoryview]]], hdr: mmap.mmap
                  ) -> list[tuple[int, list[int] | None] | OSError]:
        """Read runs of records in order, each ``(slot, dests)`` as :meth:`read_run` reads one,
        with the runs' headers numbered across them in ``hdr`` (the first header of a run
        follows the last of the run before it). On the native path every run is read and
        hashed in one call without the GIL. Per run: what :meth:`read_run` returns, or the
        OSError its read met (the runs after it are still read). ValueError when ``hdr`` cannot
        hold every header.
        """
        return self.finish_reads(self.start_reads(runs, hdr))

    def start_reads(self, runs: Sequence[tuple[int, Sequence[memoryview]]], hdr: mmap.mmap,
                    job: EngineRead | None = None) -> Reads:
        """:meth:`read_runs` in two steps: with a ``job`` (of a ``fast.read_engine``) and the
        native path, the reads are queued to the engine when this returns (``hdr`` and the
        destinations stay pinned until :meth:`finish_reads`, which is called once the engine
        handed the job back); otherwise they are made by :meth:`finish_reads`. Every start must
        be finished."""
        located: list[tuple[int, int, int]] = []  # (fd, offset, records); fd -1: not opened
        unopened: dict[int, tuple[int, None] | OSError] = {}  # run -> (-1, None): no slab file
        for i, (slot, dests) in enumerate(runs):
            region, off = self.locate(slot)
            try:
                fd = self.fd(region)
            except FileNotFoundError:
                fd, unopened[i] = -1, (-1, None)
            except OSError as e:
                fd, unopened[i] = -1, e
            located.append((fd, off, len(dests)))
        if sum(n for _fd, _off, n in located) * SLOT_HEADER > len(hdr):
            raise ValueError("the header buffer cannot hold every record of the runs")
        reads = Reads(runs, hdr, located, unopened)
        if job is not None and (pinned := self._pin_reads(runs, hdr)) is not None:
            hdr_addr, *addrs = pinned[1]
            if job.start(located, hdr_addr, SLOT_HEADER, addrs, self.block_bytes, self.stride):
                reads.pinned, reads.job = pinned, job
        return reads

    def finish_reads(self, reads: Reads) -> list[tuple[int, list[int] | None] | OSError]:
        """The reads of :meth:`start_reads`, ended (or made now): per run, what
        :meth:`read_runs` returns."""
        runs, hdr, located, unopened, stride = (reads.runs, reads.hdr, reads.located,
                                                reads.unopened, self.stride)
        done: list[tuple[int, list[int]]] | None = None
        if reads.job is not None:
            try:
                done = reads.job.wait()
            finally:
                reads.pinned = reads.job = None  # the buffers are ours again
        elif (pinned := self._pin_reads(runs, hdr)) is not None:
            assert self.fast is not None
            hdr_addr, *addrs = pinned[1]  # the pins hold the buffers meanwhile
            done = self.fast.read_runs(located, hdr_addr, SLOT_HEADER, addrs, self.block_bytes,
                                       stride)
            del pinned
        if done is not None:
            return [unopened[i] if i in unopened else
                    OSError(-g, os.strerror(-g)) if g < 0 else (min(g // stride, n), sums)
                    for i, ((_fd, _off, n), (g, sums)) in enumerate(zip(located, done))]
        out: list[tuple[int, list[int] | None] | OSError] = []
        hv = memoryview(hdr)
        first = 0
        for r, ((fd, off, n), (_slot, dests)) in enumerate(zip(located, runs)):
            iov: list[memoryview] = []
            for i, dest in enumerate(dests):
                iov.append(hv[(first + i) * SLOT_HEADER : (first + i + 1) * SLOT_HEADER])
                iov.append(dest)
            first += n
            if r in unopened:
                out.append(unopened[r])
                continue
            try:
                out.append((min(os.preadv(fd, iov, off) // stride, n), None))
            except OSError as e:
                out.append(e)
        return out

    @property
    def stride(self) -> int:
        """Bytes from one record to the next in a run."""
        return self.slot_size if self.mergeable else self.record_bytes

    def _pin_reads(self, runs: Sequence[tuple[int, Sequence[memoryview]]], hdr: mmap.mmap
                   ) -> tuple[list[Any], list[int]] | None:
        """Pins on ``hdr`` and every destination of ``runs`` for the native reads, with their
        addresses (``hdr``'s first); None where the native path does not take them (no native
        part, a destination of another size, or one that cannot be pinned)."""
        if self.fast is None or any(d.nbytes != self.block_bytes for _s, ds in runs for d in ds):
            return None
        return self.fast.pin_all([hdr, *[d for _s, ds in runs for d in ds]])

    def check_record(self, head: memoryview, key: bytes, dest: memoryview,
                     payload_sum: int | None = None) -> str | None:
        """Verify a record read into ``head`` (its header) and ``dest`` (its payload) as
        ``key``'s; None when valid, else why not. The checks are those of ``read_record``;
        ``payload_sum`` is the payload's xxh3-64 when it was computed as it was read."""
        pchk = match_header(head, self._prefix(len(key)), key)
        if pchk is not None:
            if dest.nbytes != self.block_bytes:
                return "length mismatch"
            if (xxhash.xxh3_64_intdigest(dest) if payload_sum is None else payload_sum) != pchk:
                return "payload checksum mismatch"
            return None
        try:  # not the header expected: learn why
            h = parse_header(head)
        except RecordError as e:
            return str(e)
        if h.header_len != SLOT_HEADER:
            return "unexpected header length"
        return verify(h, dest, namespace_fp=self.namespace_fp, key=key, payload_len=self.block_bytes)

    def invalidate(self, slot: int, zeros: mmap.mmap) -> None:
        """Overwrite a slot's header with zeros (only ever done to a slot of an owned region)."""
        region, off = self.locate(slot)
        fd = self.fd(region)
        if off >= os.fstat(fd).st_size:
            return
        os.pwritev(fd, [memoryview(zeros)[:SLOT_HEADER]], off)

    def truncate_region(self, region: int, slots: int) -> None:
        """Cut ``region``'s slab file to ``slots`` slots (a region that shrank with capacity)."""
        path = self.slab_path(region)
        keep = slots * self.slot_size
        with contextlib.suppress(FileNotFoundError):
            if os.path.getsize(path) > keep:
                os.truncate(path, keep)
                self._alloc_end.pop(region, None)

    def close(self) -> None:
        """Close every descriptor (dropping this process's region locks)."""
        for r in list(self._fds):
            self.close_region(r)
