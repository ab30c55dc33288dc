"""Record I/O of a run of adjacent slots without Python's GIL, where the native part is built.

``_fastio.c`` seals and writes a run of records (every checksum, then one ``pwritev``), or reads
one (one ``preadv``, then every payload's checksum), in one call made through ctypes, which lets
the GIL go for the whole call. In Python the same work gives the GIL up and waits to take it
back once per record; with many I/O threads on few cores those waits, not the disk, set the
pace of the storage tier (see docs/BENCHMARKS.md).

The native part is optional: it is built when kvtier is installed with a C compiler at hand,
and it is used only when the ``xxhash`` package exports ``XXH3_64bits`` (the hash it is given:
its CPU-dispatched build ``XXH3_64bits_dispatch`` where exported)
and a self-test at load agrees byte for byte with ``kvtier.format.record``. Otherwise
:func:`native` returns None and the slab store does the same work in Python. ``KVTIER_FASTIO=0``
in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import mmap
import os
import threading
from collections.abc import Sequence

import xxhash

from kvtier.format.record import header_prefix, pack_header

log = logging.getLogger("kvtier.tiers.storage")

_u64 = ctypes.c_uint64
_vp = ctypes.c_void_p
_sz = ctypes.c_size_t


class FastIO:
    """The native record I/O (built by :func:`native`)."""

    def __init__(self, lib: ctypes.CDLL, hash_addr: int) -> None:
        self._hash = hash_addr
        self._seal = lib.kvt_seal_write
        self._seal.restype = ctypes.c_int64
        self._seal.argtypes = [_vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int, _vp, _sz, ctypes.c_char_p,
                               _vp, _vp, _vp, _vp, _sz]
        self._read = lib.kvt_read_sums
        self._read.restype = ctypes.c_int64
        self._read.argtypes = [_vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int, _vp, _sz, _vp, _sz, _sz, _vp]

    @staticmethod
    def pin(buf: memoryview | mmap.mmap) -> ctypes.c_char | None:
        """A handle on a writable buffer (None for a read-only one): while it is referenced the
        buffer cannot be closed or unmapped, and ``addr(handle)`` is its first byte's address.
        Hold it for as long as the native call that uses the address runs."""
        try:
            return ctypes.c_char.from_buffer(buf)
        except (TypeError, ValueError, BufferError):
            return None

    addr = staticmethod(ctypes.addressof)

    def seal_write(self, fd: int, offset: int, hdr: int, hdr_len: int, prefix: bytes,
                   records: Sequence[tuple[bytes, int, int]], payload_len: int) -> int:
        """Build the headers of ``records`` (key, payload address, sequence) at address ``hdr``
        and write each header and payload with one ``pwritev``: bytes written, or -errno
        (-EINVAL: arguments the native part does not take; nothing was written)."""
        n = len(records)
        keys = (ctypes.c_char_p * n)(*[k for k, _, _ in records])
        lens = (_sz * n)(*[len(k) for k, _, _ in records])
        seqs = (_u64 * n)(*[q for _, _, q in records])
        pays = (_vp * n)(*[p for _, p, _ in records])
        return int(self._seal(self._hash, fd, offset, n, hdr, hdr_len, prefix, keys, lens, seqs,
                              pays, payload_len))

    def read_sums(self, fd: int, offset: int, hdr: int, hdr_len: int, payloads: Sequence[int],
                  payload_len: int, stride: int) -> tuple[int, list[int]]:
        """Read ``len(payloads)`` records (headers at address ``hdr``, payloads at the given
        addresses) with one ``preadv``; returns (bytes read or -errno, the payload checksums of
        the records read whole, each ``stride`` bytes in the file)."""
        n = len(payloads)
        pays = (_vp * n)(*payloads)
        sums = (_u64 * n)()
        got = int(self._read(self._hash, fd, offset, n, hdr, hdr_len, pays, payload_len, stride, sums))
        whole = min(n, got // stride) if got > 0 else 0
        return got, list(sums[:whole])


_lock = threading.Lock()
_loaded: list[FastIO | None] = []


def native() -> FastIO | None:
    """The native record I/O, or None where it is not built, turned off or fails its check."""
    if not _loaded:
        with _lock:
            if not _loaded:
                _loaded.append(_load())
    return _loaded[0]


def _load() -> FastIO | None:
    if os.environ.get("KVTIER_FASTIO", "1") == "0":
        return None
    try:
        spec = importlib.util.find_spec("kvtier.tiers.storage._fastio")
        if spec is None or not spec.origin:
            return None
        lib = ctypes.CDLL(spec.origin)
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
        fio = FastIO(lib, hash_addr)
    except (OSError, AttributeError, ImportError) as e:
        log.debug("native record I/O not available: %s", e)
        return None
    if not _self_test(fio):
        log.warning("native record I/O disagrees with kvtier.format.record; not used")
        return None
    return fio


def _self_test(fio: FastIO) -> bool:
    """Seal and write two records to a temporary file, read them back natively, and compare
    with the headers and checksums Python computes."""
    import tempfile

    hdr_len, plen = 4096, 8192
    ns = xxhash.xxh3_128_digest(b"kvtier fastio self-test")
    keys = [b"k" * 20, b"another key, longer"]
    seqs = [7, 1 << 40]
    payloads = [mmap.mmap(-1, plen) for _ in keys]
    hdr = mmap.mmap(-1, 2 * hdr_len)
    back = [mmap.mmap(-1, plen) for _ in keys]
    back_hdr = mmap.mmap(-1, 2 * hdr_len)
    try:
        for i, p in enumerate(payloads):
            p[:] = bytes((i * 31 + j) % 251 for j in range(256)) * (plen // 256)
        with tempfile.TemporaryFile() as f:
            prefixes = [header_prefix(ns, len(k), plen, align=hdr_len) for k in keys]
            pins = [p for p in (fio.pin(b) for b in (hdr, *payloads)) if p is not None]
            if len(pins) != 1 + len(payloads):
                return False
            hdr_addr, *addr = [fio.addr(p) for p in pins]
            at = 0
            for i in range(2):
                got = fio.seal_write(f.fileno(), at, hdr_addr + i * hdr_len, hdr_len, prefixes[i],
                                     [(keys[i], addr[i], seqs[i])], plen)
                if got != hdr_len + plen:
                    return False
                at += got
            for i in range(2):
                want = bytearray(pack_header(ns, keys[i], memoryview(payloads[i]), align=hdr_len))
                want[-16:-8] = seqs[i].to_bytes(8, "little")
                want[-8:] = xxhash.xxh3_64_intdigest(seqs[i].to_bytes(8, "little") + keys[i]).to_bytes(
                    8, "little")
                if hdr[i * hdr_len:(i + 1) * hdr_len] != bytes(want):
                    return False
            back_pins = [p for p in (fio.pin(b) for b in (back_hdr, *back)) if p is not None]
            if len(back_pins) != 1 + len(back):
                return False
            bh, *back_addr = [fio.addr(p) for p in back_pins]
            got, sums = fio.read_sums(f.fileno(), 0, bh, hdr_len, back_addr, plen, hdr_len + plen)
            del pins, back_pins
            return (got == 2 * (hdr_len + plen) and back_hdr[:] == hdr[:]
                    and all(back[i][:] == payloads[i][:] for i in range(2))
                    and sums == [xxhash.xxh3_64_intdigest(p) for p in payloads])
    finally:
        for m in (*payloads, hdr, *back, back_hdr):
            m.close()
