"""Header scans of slab files: adopting the single-engine layout, or a region whose log was lost.

A scan reads the headers of a region's slots (small slots in 4 MiB sweeps, larger ones header by
header) and yields the records of this namespace and block size; their payloads are checked at
load, or by :func:`verify_slot` where a whole record must be checked now.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from kvtier.format.record import RecordError, parse_header, verify
from kvtier.tiers.storage.layout import SLOT_HEADER
from kvtier.tiers.storage.slab import _SEQ, ScannedRecord, SlabStore, _seq_check, aligned_buffer

_SCAN_CHUNK = 4 << 20  # bytes per read when scanning small slots in bulk
_SCAN_BULK_SLOT = 64 << 10  # slots up to this size are scanned in bulk, larger ones header by header


def scan(store: SlabStore, region: int, file_slots: int) -> Iterator[ScannedRecord]:
    """Every slot of ``region`` below ``file_slots`` whose header verifies as a record of
    this namespace and block size (payloads are checked at load).

    Reads run on a few threads ahead of the parsing: small slots are read in 4 MiB sweeps,
    larger ones header by header (their payloads are never read here).
    """
    try:
        fd = store.fd(region)
    except FileNotFoundError:
        return
    size = os.fstat(fd).st_size
    n = 0 if size < store.record_bytes else (size - store.record_bytes) // store.slot_size + 1
    n = min(n, file_slots)
    bulk = store.slot_size <= _SCAN_BULK_SLOT
    per = max(1, _SCAN_CHUNK // store.slot_size) if bulk else 64
    batches = [(i0, min(per, n - i0)) for i0 in range(0, n, per)]
    stride = store.slot_size if bulk else SLOT_HEADER
    workers = 4 if bulk else 16  # header reads are small: latency-bound, so more at once
    depth = 2 * workers
    bufs = [aligned_buffer(per * stride) for _ in range(min(depth + 1, len(batches)))]
    base = store.geo.base(region)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvtier-scan") as pool:
            futures: deque[Future[int]] = deque()
            nxt = done = 0
            while done < len(batches):
                while nxt < len(batches) and len(futures) < depth:
                    buf = bufs[nxt % len(bufs)]
                    futures.append(pool.submit(_read_batch, store, buf, fd, *batches[nxt], bulk))
                    nxt += 1
                k = futures.popleft().result()
                mv = memoryview(bufs[done % len(bufs)])
                first = base + batches[done][0]
                done += 1
                for j in range(k):
                    rec = _parse(store, mv[j * stride : j * stride + SLOT_HEADER], first + j)
                    if rec is not None:
                        yield rec
                mv.release()
    finally:
        for b in bufs:
            with contextlib.suppress(BufferError):
                b.close()

def _read_batch(store: SlabStore, buf: mmap.mmap, fd: int, i0: int, count: int, bulk: bool) -> int:
    """Read the headers of ``count`` slots from slot ``i0`` of a file into ``buf``; how many."""
    mv = memoryview(buf)
    try:
        if bulk:
            got = os.preadv(fd, [mv[: count * store.slot_size]], i0 * store.slot_size)
            k = 0
            while k < count and k * store.slot_size + SLOT_HEADER <= got:
                k += 1
            return k
        for j in range(count):
            if os.preadv(fd, [mv[j * SLOT_HEADER : (j + 1) * SLOT_HEADER]],
                         (i0 + j) * store.slot_size) < SLOT_HEADER:
                return j
        return count
    finally:
        mv.release()

def _parse(store: SlabStore, mv: memoryview, slot: int) -> ScannedRecord | None:
    if mv[:4] != b"KVTR":
        return None
    try:
        h = parse_header(mv)
    except RecordError:
        return None
    if (
        h.namespace_fp != store.namespace_fp
        or h.header_len != SLOT_HEADER
        or h.payload_len != store.block_bytes
    ):
        return None
    seq, chk = _SEQ.unpack_from(mv, SLOT_HEADER - _SEQ.size)
    if _seq_check(seq, h.key) != chk:
        seq = 0
    return ScannedRecord(slot, h.key, seq)

def verify_slot(store: SlabStore, slot: int) -> bool:
    """Read a whole record and check its header and payload checksum."""
    region, off = store.locate(slot)
    fd = store.fd(region)
    buf = aligned_buffer(store.slot_size)
    try:
        n = os.preadv(fd, [memoryview(buf)[: store.slot_size]], off)
        if n < store.record_bytes:
            return False
        try:
            h = parse_header(memoryview(buf))
        except RecordError:
            return False
        if h.header_len != SLOT_HEADER:
            return False
        payload = memoryview(buf)[SLOT_HEADER : SLOT_HEADER + store.block_bytes]
        ok = verify(h, payload, namespace_fp=store.namespace_fp, key=h.key,
                    payload_len=store.block_bytes) is None
        del payload
        return ok
    finally:
        with contextlib.suppress(BufferError):
            buf.close()
