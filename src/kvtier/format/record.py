"""Block record layout.

A record is a header followed by the payload (the block's bytes, exactly as in a primary slot)::

    offset  size  field
    0       4     magic  b"KVTR"
    4       2     format version (1)
    6       2     flags (0)
    8       4     header_len: bytes before the payload (fixed part + key + padding)
    12      4     key_len
    16      8     payload_len
    24      16    namespace fingerprint: xxh3-128 of the namespace string
    40      8     payload checksum: xxh3-64 of the payload
    48      8     header checksum: xxh3-64 of bytes [0, 48) followed by the key
    56      ...   key (key_len bytes), then zero padding up to header_len

All integers are little-endian. ``header_len`` may be padded (to 4096, say) so that the payload
starts at an aligned offset for direct I/O. A reader checks, in order: magic, version, header
checksum, namespace, key, payload length, payload checksum. Any mismatch makes the record invalid.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"KVTR"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sHHIIQ16sQ")  # up to and excluding the header checksum
_FIXED_SIZE = _FIXED.size  # 48
_HCHK = struct.Struct("<Q")
FIXED_HEADER_SIZE = _FIXED_SIZE + _HCHK.size  # 56
_CHECKSUMS = struct.Struct("<QQ")  # payload checksum, header checksum
_PREFIX_SIZE = 40  # every field before the checksums


class RecordError(ValueError):
    """A record failed one of its checks."""


@dataclass(frozen=True)
class RecordHeader:
    """A parsed, header-checksum-verified record header."""

    header_len: int
    key: bytes
    payload_len: int
    namespace_fp: bytes
    payload_checksum: int

    @property
    def record_len(self) -> int:
        """Header plus payload."""
        return self.header_len + self.payload_len


def namespace_fingerprint(namespace: str) -> bytes:
    """16-byte fingerprint of a namespace string."""
    return xxhash.xxh3_128_digest(namespace.encode("utf-8"))


def namespace_key(namespace: str, block_bytes: int) -> str:
    """What persistent tiers fingerprint: an engine's namespace and its block size in bytes."""
    return f"{namespace}\x00block_bytes={block_bytes}"


def payload_checksum(payload: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of a payload (any buffer, no copy)."""
    return xxhash.xxh3_64_intdigest(payload)


def header_size(key_len: int, align: int = 0) -> int:
    """Bytes before the payload for a key of ``key_len`` bytes, padded to ``align`` if given."""
    n = FIXED_HEADER_SIZE + key_len
    if align > 1:
        n = -(-n // align) * align
    return n


def pack_header(
    namespace_fp: bytes,
    key: bytes,
    payload: bytes | bytearray | memoryview,
    *,
    align: int = 0,
    checksum: int | None = None,
) -> bytes:
    """Build a record header for ``payload`` (its checksum is computed unless given)."""
    if len(namespace_fp) != 16:
        raise ValueError("namespace fingerprint must be 16 bytes")
    plen = memoryview(payload).nbytes
    hlen = header_size(len(key), align)
    pchk = payload_checksum(payload) if checksum is None else checksum
    head = header_from_prefix(header_prefix(namespace_fp, len(key), plen, align=align), key, pchk)
    return head + b"\0" * (hlen - len(head))


def parse_header(buf: bytes | bytearray | memoryview) -> RecordHeader:
    """Parse and verify a header from the start of ``buf``; raises RecordError."""
    mv = memoryview(buf)
    if mv.nbytes < FIXED_HEADER_SIZE:
        raise RecordError("truncated header")
    fixed = bytes(mv[:_FIXED_SIZE])
    magic, version, _flags, hlen, klen, plen, ns_fp, pchk = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise RecordError("bad magic")
    if version != FORMAT_VERSION:
        raise RecordError(f"unsupported format version {version}")
    if hlen < FIXED_HEADER_SIZE + klen or mv.nbytes < FIXED_HEADER_SIZE + klen:
        raise RecordError("truncated header")
    key = bytes(mv[FIXED_HEADER_SIZE : FIXED_HEADER_SIZE + klen])
    (hchk,) = _HCHK.unpack(mv[_FIXED_SIZE:FIXED_HEADER_SIZE])
    if xxhash.xxh3_64_intdigest(fixed + key) != hchk:
        raise RecordError("header checksum mismatch")
    return RecordHeader(
        header_len=hlen, key=key, payload_len=plen, namespace_fp=ns_fp, payload_checksum=pchk
    )


def peek_lengths(buf: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(header_len, key_len, payload_len) from a record's first bytes, NOT verified.

    For a reader that must know how many bytes to take before it can verify anything (a
    stream); ``parse_header`` on the whole header checks them. Raises RecordError when ``buf``
    is shorter than the fixed header or does not start with the magic.
    """
    mv = memoryview(buf)
    if mv.nbytes < FIXED_HEADER_SIZE:
        raise RecordError("truncated header")
    magic, _version, _flags, hlen, klen, plen, _ns, _pchk = _FIXED.unpack(mv[:_FIXED_SIZE])
    if magic != MAGIC:
        raise RecordError("bad magic")
    return hlen, klen, plen


def header_prefix(namespace_fp: bytes, key_len: int, payload_len: int, *, align: int = 0) -> bytes:
    """The first 40 bytes of every valid header for a key of ``key_len`` bytes: magic, version,
    flags, lengths and namespace (everything before the checksums)."""
    hlen = header_size(key_len, align)
    return _FIXED.pack(MAGIC, FORMAT_VERSION, 0, hlen, key_len, payload_len, namespace_fp,
                       0)[:_PREFIX_SIZE]


def header_from_prefix(prefix: bytes, key: bytes, checksum: int) -> bytes:
    """The header :func:`pack_header` builds (unaligned) for ``key`` and a payload whose
    checksum is ``checksum``, from the :func:`header_prefix` of its shape: the same bytes in
    fewer steps, for a writer that makes many headers of one shape."""
    fixed = prefix + _HCHK.pack(checksum)
    return fixed + _HCHK.pack(xxhash.xxh3_64_intdigest(fixed + key)) + key


def match_header(buf: bytes | bytearray | memoryview, prefix: bytes, key: bytes,
                 at: int = 0) -> int | None:
    """The payload checksum when ``buf`` holds, from offset ``at``, exactly the header a reader
    expects.

    ``prefix`` comes from :func:`header_prefix`; the header must continue with the checksums
    and ``key``, and its header checksum must hold. This checks what :func:`parse_header` and
    :func:`check_header` check together, for the one header that can pass them; None means the
    header is not that one (parse it to learn why). ``at`` lets a reader check a header where
    it lies in its receive buffer, without slicing it out first.
    """
    mv = memoryview(buf)
    end = at + FIXED_HEADER_SIZE + len(key)
    if (mv.nbytes < end or mv[at:at + _PREFIX_SIZE] != prefix
            or mv[at + FIXED_HEADER_SIZE:end] != key):
        return None
    pchk, hchk = _CHECKSUMS.unpack_from(mv, at + _PREFIX_SIZE)
    if xxhash.xxh3_64_intdigest(bytes(mv[at:at + _FIXED_SIZE]) + key) != hchk:
        return None
    return int(pchk)


def check_header(
    header: RecordHeader, *, namespace_fp: bytes, key: bytes, payload_len: int
) -> str | None:
    """The checks of ``verify`` that need no payload: namespace, key, payload length."""
    if header.namespace_fp != namespace_fp:
        return "namespace mismatch"
    if header.key != key:
        return "key mismatch"
    if header.payload_len != payload_len:
        return "length mismatch"
    return None


def verify(
    header: RecordHeader,
    payload: bytes | bytearray | memoryview,
    *,
    namespace_fp: bytes,
    key: bytes,
    payload_len: int,
) -> str | None:
    """Check a parsed header and its payload against what the reader expects.

    Returns None when the record is valid, else the reason it is not.
    """
    reason = check_header(header, namespace_fp=namespace_fp, key=key, payload_len=payload_len)
    if reason is not None:
        return reason
    if memoryview(payload).nbytes != payload_len:
        return "length mismatch"
    if payload_checksum(payload) != header.payload_checksum:
        return "payload checksum mismatch"
    return None
