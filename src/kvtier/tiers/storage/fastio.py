"""Record I/O of runs of adjacent slots without Python's GIL, where the native part is built.

``_fastio.c`` seals and writes the runs of a store chunk (every checksum, then one ``pwritev`` a
run), or reads the runs of a load chunk (one ``preadv`` a run, then every payload's checksum), in
one call made through ctypes, which lets the GIL go for the whole call. In Python the same work
gives the GIL up and waits to take it back once per record; with many I/O threads on few cores
those waits, not the disk, set the pace of the storage tier (see docs/BENCHMARKS.md). A
:class:`ReadEngine` has native threads read queued load chunks (and compute their checksums)
and hands them back once read, so that no read waits for the GIL to be started.

The native part is optional: it is built when kvtier is installed with a C compiler at hand.
It is used only when the ``xxhash`` package exports the hash it is given (``XXH3_64bits``, or
its CPU-dispatched build ``XXH3_64bits_dispatch`` where exported) and a self-test at load agrees
byte for byte with the headers the slab store builds in Python. Otherwise :func:`native`
returns None and the slab store does the same work in Python. ``KVTIER_FASTIO=0`` in the
environment turns it off.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import xxhash

from kvtier.format.record import header_prefix
from kvtier.tiers.storage.layout import SLOT_HEADER

#: builds a slot's whole header (``SLOT_HEADER`` bytes) in Python: (namespace fingerprint, key,
#: payload, write sequence) -> bytes; the self-test compares the native headers with it
ReferenceHeader = Callable[[bytes, bytes, memoryview, int], bytes]

log = logging.getLogger("kvtier.tiers.storage")

_u64 = ctypes.c_uint64
_vp = ctypes.c_void_p
_sz = ctypes.c_size_t
_MAX_RECORDS = 64  # records (so runs too) of one native call: KVT_MAX_RECORDS in _fastio.c
MAX_ENGINE_THREADS = 256  # threads of one read engine: KVT_MAX_THREADS in _fastio.c


class FastIO:
    """The native record I/O (built by :func:`native`)."""

    def __init__(self, lib: ctypes.CDLL, held: ctypes.PyDLL, hash_addr: int) -> None:
        """``lib``: the native part's calls that let the GIL go; ``held``: the same library's,
        called with the GIL held: those that never wait for I/O or for a thread (a read
        engine's submit, wake and poll hold its lock only as long as its threads do, which is
        for a list's update), so that a pump that starts and reaps many chunks in a row does
        not give the GIL up, and wait behind other threads to have it back, for each."""
        self._hash = hash_addr
        self._seal = lib.kvt_seal_write_runs
        self._seal.restype = ctypes.c_int64
        self._seal.argtypes = [_vp, ctypes.c_int, _vp, _vp, _vp, _vp, _sz, ctypes.c_char_p,
                               _vp, _vp, _vp, _vp, _sz, _vp]
        self._read = lib.kvt_read_runs
        self._read.restype = ctypes.c_int64
        self._read.argtypes = [_vp, ctypes.c_int, _vp, _vp, _vp, _vp, _sz, _vp, _sz, _sz, _vp, _vp]
        self._engine_new = lib.kvt_engine_new
        self._engine_new.restype = _vp
        self._engine_new.argtypes = [_vp, ctypes.c_int]
        self._engine_free = lib.kvt_engine_free
        self._engine_free.restype = None
        self._engine_free.argtypes = [_vp]
        self._job_new = held.kvt_job_new
        self._job_new.restype = _vp
        self._job_new.argtypes = []
        self._job_free = held.kvt_job_free
        self._job_free.restype = None
        self._job_free.argtypes = [_vp]
        self._submit = held.kvt_engine_submit
        self._submit.restype = ctypes.c_int64
        self._submit.argtypes = [_vp, _vp, ctypes.c_int, _vp, _vp, _vp, _vp, _sz, _vp, _sz, _sz,
                                 _vp, _vp]
        self._reap = lib.kvt_engine_reap
        self._poll = held.kvt_engine_reap  # with a timeout of 0 only: it never waits then
        for fn in (self._reap, self._poll):
            fn.restype = ctypes.c_int64
            fn.argtypes = [_vp, _vp, ctypes.c_int, ctypes.c_int64]
        self._wake = held.kvt_engine_wake
        self._wake.restype = None
        self._wake.argtypes = [_vp]

    @staticmethod
    def pin_all(bufs: Sequence[memoryview | mmap.mmap]) -> tuple[list[ctypes.c_char], list[int]] | None:
        """Handles on writable buffers and their first bytes' addresses; None when one of them is
        read-only. While the handles are referenced no buffer can be closed or unmapped: hold
        them for as long as the native call that uses the addresses runs."""
        try:
            pins = [ctypes.c_char.from_buffer(b) for b in bufs]
        except (TypeError, ValueError, BufferError):
            return None
        return pins, [ctypes.addressof(p) for p in pins]

    def write_runs(self, runs: Sequence[tuple[int, int, int]], hdr: int, hdr_len: int,
                   prefix: bytes, records: Sequence[tuple[bytes, int, int]], payload_len: int
                   ) -> list[int] | None:
        """Write runs of records, each ``(fd, offset, records)`` with one ``pwritev``, in order:
        ``records`` (key, payload address, sequence), numbered across the runs, each sealed with
        a header built from ``prefix`` at address ``hdr`` on, ``hdr_len`` bytes apart. Per run:
        bytes written, or -errno. None when the native part does not take these arguments
        (nothing was written)."""
        n_runs, n = len(runs), len(records)
        fds, offs, counts = _run_arrays(runs)
        keys = (ctypes.c_char_p * n)(*[k for k, _, _ in records])
        lens = (_sz * n)(*[len(k) for k, _, _ in records])
        seqs = (_u64 * n)(*[q for _, _, q in records])
        pays = (_vp * n)(*[p for _, p, _ in records])
        done = (ctypes.c_int64 * n_runs)()
        if self._seal(self._hash, n_runs, fds, offs, counts, hdr, hdr_len, prefix, keys, lens,
                      seqs, pays, payload_len, done) < 0:
            return None
        return [int(d) for d in done]

    def read_runs(self, runs: Sequence[tuple[int, int, int]], hdr: int, hdr_len: int,
                  payloads: Sequence[int], payload_len: int, stride: int
                  ) -> list[tuple[int, list[int]]] | None:
        """Read runs of records, each ``(fd, offset, records)`` with one ``preadv``, in order:
        headers from address ``hdr`` on, ``hdr_len`` bytes apart, and payloads at the given
        addresses, both numbered across the runs. Per run: (bytes read or -errno, the payload
        checksums of its records read whole, each ``stride`` bytes in the file). None when the
        native part does not take these arguments (nothing was read)."""
        n_runs, total = len(runs), len(payloads)
        fds, offs, counts = _run_arrays(runs)
        pays = (_vp * total)(*payloads)
        sums = (_u64 * total)()
        got = (ctypes.c_int64 * n_runs)()
        if self._read(self._hash, n_runs, fds, offs, counts, hdr, hdr_len, pays, payload_len,
                      stride, sums, got) < 0:
            return None
        return _per_run(runs, got, sums, stride)

    def read_engine(self, n_threads: int) -> ReadEngine | None:
        """``n_threads`` native threads (at most ``MAX_ENGINE_THREADS``) that read load chunks
        without the GIL; None where they cannot be started (then read with :meth:`read_runs`)."""
        n_threads = max(1, min(n_threads, MAX_ENGINE_THREADS))
        handle = self._engine_new(self._hash, n_threads)
        return ReadEngine(self, handle, n_threads) if handle else None


class ReadEngine:
    """Native threads (``kvt_engine_*`` in ``_fastio.c``) that read load chunks without the
    GIL: a chunk is started with :meth:`EngineRead.start` on a job from :meth:`job`, read by
    the first free thread, and handed back by :meth:`reap` once read. Its threads keep the
    disk's reads going while the Python side, which checks what was read, waits for the GIL.
    One thread reaps; jobs can be started from any."""

    def __init__(self, fio: FastIO, handle: int, n_threads: int) -> None:
        self._fio = fio
        self._handle: int | None = handle
        self.n_threads = n_threads
        self._jobs: dict[int, EngineRead] = {}
        self._out = (_vp * _MAX_RECORDS)()
        self._lock = threading.Lock()  # a wake from another thread never meets a freed engine

    def job(self) -> EngineRead:
        """A new job (one chunk in flight at a time), freed with the engine."""
        assert self._handle is not None, "the engine is closed"
        handle = self._fio._job_new()
        if not handle:
            raise MemoryError("no memory for a read job")
        job = EngineRead(self, handle)
        self._jobs[handle] = job
        return job

    def reap(self, timeout: float | None = None) -> list[EngineRead]:
        """The started jobs whose reads ended (their :meth:`EngineRead.wait` returns at once),
        waiting up to ``timeout`` seconds (None: no limit) for the first, or until
        :meth:`wake`; the GIL is let go meanwhile. With a ``timeout`` of 0 it returns at once
        and keeps the GIL."""
        assert self._handle is not None, "the engine is closed"
        out = self._out
        if timeout == 0:
            n = self._fio._poll(self._handle, out, len(out), 0)
        else:
            n = self._fio._reap(self._handle, out, len(out), -1 if timeout is None else
                                max(1, int(timeout * 1e6)))
        jobs = []
        for i in range(n):
            job = self._jobs[out[i] or 0]  # a job's handle is never NULL
            job.ended = True
            jobs.append(job)
        return jobs

    def wake(self) -> None:
        """Make a waiting (or the next) :meth:`reap` return at once; any thread may call it, a
        closed engine's too."""
        with self._lock:
            if self._handle is not None:
                self._fio._wake(self._handle)

    def close(self) -> None:
        """Stop the threads once every started job is read, and free the jobs."""
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is None:
            return
        self._fio._engine_free(handle)
        for handle in self._jobs:
            self._fio._job_free(handle)
        self._jobs.clear()


class EngineRead:
    """A load chunk read by a :class:`ReadEngine`: started with :meth:`start`, and once the
    engine handed the job back, :meth:`wait` gives what :meth:`FastIO.read_runs` would have. One
    chunk at a time; the buffers whose addresses :meth:`start` was given must stay pinned until
    the job is handed back (pin them with :meth:`FastIO.pin_all`)."""

    def __init__(self, engine: ReadEngine, handle: int) -> None:
        self._engine = engine
        self._handle = handle
        self._sums = (_u64 * _MAX_RECORDS)()
        self._got = (ctypes.c_int64 * _MAX_RECORDS)()
        self._runs: Sequence[tuple[int, int, int]] = ()
        self._stride = 1
        self.ended = False

    def start(self, runs: Sequence[tuple[int, int, int]], hdr: int, hdr_len: int,
              payloads: Sequence[int], payload_len: int, stride: int) -> bool:
        """Queue ``runs`` for reading as :meth:`FastIO.read_runs` reads them; False when the
        native part does not take them (nothing was queued)."""
        eng = self._engine
        assert eng._handle is not None, "the engine is closed"
        fds, offs, counts = _run_arrays(runs)
        pays = (_vp * len(payloads))(*payloads)
        self.ended = False
        if eng._fio._submit(eng._handle, self._handle, len(runs), fds, offs, counts, hdr, hdr_len,
                            pays, payload_len, stride, self._sums, self._got) < 0:
            return False
        self._runs, self._stride = runs, stride
        return True

    def wait(self) -> list[tuple[int, list[int]]]:
        """Per run, what :meth:`FastIO.read_runs` returns; only once :meth:`ReadEngine.reap`
        handed this job back."""
        if not self.ended:
            raise RuntimeError("the job's reads have not ended (reap it first)")
        runs, self._runs = self._runs, ()
        return _per_run(runs, self._got, self._sums, self._stride)


def _per_run(runs: Sequence[tuple[int, int, int]], got: ctypes.Array[Any], sums: ctypes.Array[Any],
             stride: int) -> list[tuple[int, list[int]]]:
    """Per run: (bytes read or -errno, the payload checksums of its records read whole)."""
    out: list[tuple[int, list[int]]] = []
    first = 0
    for (_fd, _off, n), g in zip(runs, got):
        whole = min(n, g // stride) if g > 0 else 0
        out.append((int(g), list(sums[first:first + whole])))
        first += n
    return out


def _run_arrays(runs: Sequence[tuple[int, int, int]]
                ) -> tuple[ctypes.Array[Any], ctypes.Array[Any], ctypes.Array[Any]]:
    """The descriptors, offsets and record counts of ``(fd, offset, records)`` runs, as the
    native calls take them."""
    n = len(runs)
    return ((ctypes.c_int * n)(*[r[0] for r in runs]), (ctypes.c_int64 * n)(*[r[1] for r in runs]),
            (ctypes.c_int * n)(*[r[2] for r in runs]))


_lock = threading.Lock()
_loaded: list[FastIO | None] = []


def native(reference: ReferenceHeader) -> FastIO | None:
    """The native record I/O, or None where it is not built, turned off or fails its check
    against ``reference`` (checked once per process)."""
    if not _loaded:
        with _lock:
            if not _loaded:
                _loaded.append(_load(reference))
    return _loaded[0]


def _load(reference: ReferenceHeader) -> FastIO | None:
    if os.environ.get("KVTIER_FASTIO", "1") == "0":
        return None
    try:
        spec = importlib.util.find_spec("kvtier.tiers.storage._fastio")
        if spec is None or not spec.origin:
            return None
        lib, held = ctypes.CDLL(spec.origin), ctypes.PyDLL(spec.origin)
        xx = importlib.util.find_spec("xxhash._xxhash")
        if xx is None or not xx.origin:
            return None
        xlib = ctypes.CDLL(xx.origin)
        # the CPU-dispatched build (AVX2 where the CPU has it) when exported: the plain symbol is
        # the baseline build, about half as fast here as what xxh3_64_intdigest runs
        fn = getattr(xlib, "XXH3_64bits_dispatch", None) or xlib.XXH3_64bits
        hash_addr = ctypes.cast(fn, _vp).value
        if not hash_addr:
            return None
        fio = FastIO(lib, held, hash_addr)
    except (OSError, AttributeError, ImportError) as e:
        log.debug("native record I/O not available: %s", e)
        return None
    try:
        agrees = _self_test(fio, reference)
    except (OSError, ValueError, BufferError) as e:  # no temporary file, say: stay in Python
        log.warning("native record I/O could not be checked (%s); not used", e)
        return None
    if not agrees:
        log.warning("native record I/O disagrees with kvtier.format.record; not used")
        return None
    return fio


def _self_test(fio: FastIO, reference: ReferenceHeader) -> bool:
    """Seal and write two records to a temporary file, read them back natively, and compare
    with the headers ``reference`` builds and the checksums Python computes."""
    import tempfile

    hdr_len, plen = SLOT_HEADER, 8192
    ns = xxhash.xxh3_128_digest(b"kvtier fastio self-test")
    keys = [b"k" * 20, b"another key, longer"]
    seqs = [7, 1 << 40]
    payloads = [mmap.mmap(-1, plen) for _ in keys]
    hdr = mmap.mmap(-1, 2 * hdr_len)
    back = [mmap.mmap(-1, plen) for _ in keys]
    back_hdr = mmap.mmap(-1, 2 * hdr_len)
    pinned = back_pinned = None
    try:
        for i, p in enumerate(payloads):
            p[:] = bytes((i * 31 + j) % 251 for j in range(256)) * (plen // 256)
        pinned = fio.pin_all([hdr, *payloads])
        back_pinned = fio.pin_all([back_hdr, *back])
        if pinned is None or back_pinned is None:
            return False
        with tempfile.TemporaryFile() as f:
            hdr_addr, *addr = pinned[1]
            rec = hdr_len + plen
            for i in range(2):  # keys of two lengths: a call each, of one run
                prefix = header_prefix(ns, len(keys[i]), plen, align=hdr_len)
                done = fio.write_runs([(f.fileno(), i * rec, 1)], hdr_addr + i * hdr_len, hdr_len,
                                      prefix, [(keys[i], addr[i], seqs[i])], plen)
                if done != [rec]:
                    return False
            for i in range(2):
                header = reference(ns, keys[i], memoryview(payloads[i]), seqs[i])
                if hdr[i * hdr_len:(i + 1) * hdr_len] != header:
                    return False
            bh, *back_addr = back_pinned[1]  # read as two runs of one record, the second first
            runs = fio.read_runs([(f.fileno(), rec, 1), (f.fileno(), 0, 1)], bh, hdr_len,
                                 back_addr[::-1], plen, rec)
            want = [xxhash.xxh3_64_intdigest(p) for p in payloads]
            return (runs == [(rec, [want[1]]), (rec, [want[0]])]
                    and back_hdr[:hdr_len] == hdr[hdr_len:] and back_hdr[hdr_len:] == hdr[:hdr_len]
                    and all(back[i][:] == payloads[i][:] for i in range(2)))
    finally:
        pinned = back_pinned = None  # let go of the buffers (on every return) before closing them
        for m in (*payloads, hdr, *back, back_hdr):
            m.close()
