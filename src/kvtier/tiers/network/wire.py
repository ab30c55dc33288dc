"""The bulk path: pipelined GET and SET of block records on a connection's socket, no copies.

redis-py sets a connection up (TCP or TLS, authentication, database, client name) and hands it
out of its pool; for the two commands that move block bytes the tier then speaks RESP2 on that
connection's socket itself:

* ``SET``: the command head and the record header are one small buffer, the payload is the
  primary slot itself (a memoryview), and ``sendmsg`` gathers them (TLS sockets have no
  ``sendmsg``: each piece goes through ``sendall``, still without a copy).
* ``GET``: the reply's length line and the record header are read into a small buffer and the
  header is verified (magic, version, header checksum, namespace, key, payload length) before a
  byte lands in the slot; then the payload is read with ``recv_into`` straight into the slot and
  its checksum is checked there. A record that fails any check is reported bad: its slot is
  never marked loaded, so it is never served.

Replies are parsed by the rules of RESP2 (plus RESP3's ``_`` null): a ``$`` bulk string, a nil,
or an ``-`` error line; anything else means the stream cannot be trusted and raises
:class:`ProtocolError`. Any exception out of this module leaves the connection in an unknown
state: the caller closes it and never puts it back in use.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Sequence

import redis
import xxhash

from kvtier.format.record import (
    FIXED_HEADER_SIZE,
    RecordError,
    check_header,
    header_prefix,
    header_size,
    match_header,
    parse_header,
    payload_checksum,
    peek_lengths,
)

MAX_HEADER = 64 * 1024  # a record header longer than this is not one of ours
MAX_LINE = 64 * 1024  # a reply line (an error message) longer than this is a broken stream
_BUFFER = MAX_HEADER + MAX_LINE + 1024
_IOV_MAX = 1024  # buffers per sendmsg call (Linux's IOV_MAX)
_CRLF = b"\r\n"

_OK = b"+OK\r\n"

# What a GET reply came to.
HIT, MISS, BAD, ERROR = "hit", "miss", "bad", "error"
HIT_REPLY = (HIT, None)  # the one object every verified record's reply is


class ProtocolError(redis.ConnectionError):
    """The server's byte stream broke the protocol; the connection must be closed."""


class Wire:
    """Buffered RESP reading and gathered writing on one socket, for one exchange at a time.

    Reads go through a small buffer only for reply lines and record headers; bulk payloads are
    received straight into the caller's memory. ``hint`` bounds how much one refill of the
    buffer asks for, so that it does not read far into a payload that belongs in a slot.
    """

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.tls = False
        self.timeout: float | None = None  # the socket's own timeout, given back on detach
        self.waitall = 0  # MSG_WAITALL while the socket blocks in the kernel
        self.buf = bytearray(_BUFFER)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.hint = MAX_LINE

    def attach(self, sock: socket.socket) -> None:
        """Start an exchange on ``sock`` with an empty buffer.

        A plain socket blocks in the kernel for the exchange, its timeout kept as the kernel's
        ``SO_RCVTIMEO`` / ``SO_SNDTIMEO``: a wait for data is one system call instead of a
        ``poll`` before each read, and a payload is received by one ``MSG_WAITALL`` read. An
        expired kernel timeout surfaces as :class:`TimeoutError`, as the socket's own would.
        """
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.start = self.end = 0
        self.hint = MAX_LINE
        self.timeout = sock.gettimeout()
        self.waitall = 0
        if not self.tls and self.timeout is not None:
            _kernel_timeouts(sock, self.timeout)
            sock.settimeout(None)
            self.waitall = socket.MSG_WAITALL

    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return self.end - self.start

    def detach(self) -> None:
        """End the exchange (the buffer is kept for the next one); the socket's timeout is
        back as it was."""
        sock, self.sock = self.sock, None
        self.start = self.end = 0
        if sock is not None and self.waitall:
            self.waitall = 0
            try:
                sock.settimeout(self.timeout)
                _kernel_timeouts(sock, 0.0)
            except OSError:  # a closed socket: nothing to give back
                pass

    def _sock(self) -> socket.socket:
        sock = self.sock
        if sock is None:
            raise redis.ConnectionError("no connection attached")
        return sock

    # -- writing ---------------------------------------------------------------------------
    def send(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Write every piece, in order; partial writes are resumed where they stopped."""
        if self.tls:
            sendall = self._sock().sendall
            for piece in pieces:
                sendall(piece)
            return
        views = [memoryview(p).cast("B") for p in pieces]
        i = 0
        sendmsg = self._sock().sendmsg
        while i < len(views):
            sent = sendmsg(views[i:i + _IOV_MAX])
            while sent > 0:
                n = views[i].nbytes
                if sent >= n:
                    sent -= n
                    i += 1
                else:
                    views[i] = views[i][sent:]
                    sent = 0
            while i < len(views) and views[i].nbytes == 0:
                i += 1

    # -- reading ---------------------------------------------------------------------------
    def _fill(self, need: int) -> None:
        """Receive until at least ``need`` bytes are buffered (need <= the buffer's size)."""
        if self.start == self.end:
            self.start = self.end = 0
        elif self.start + need > len(self.buf):  # move what is left to the front
            n = self.end - self.start
            self.buf[:n] = self.view[self.start:self.end]
            self.start, self.end = 0, n
        recv_into = self._sock().recv_into
        while self.end - self.start < need:
            room = len(self.buf) - self.end
            ask = max(need - (self.end - self.start), min(self.hint, room))
            got = recv_into(self.view[self.end:self.end + ask], ask)
            if got == 0:
                raise redis.ConnectionError("the server closed the connection in a reply")
            self.end += got

    def line(self) -> bytes:
        """The next CRLF-terminated line, without its CRLF."""
        find = self.buf.find
        while True:
            i = find(_CRLF, self.start, self.end)
            if i >= 0:
                out = bytes(self.view[self.start:i])
                self.start = i + 2
                return out
            buffered = self.end - self.start
            if buffered > MAX_LINE:
                raise ProtocolError("a reply line longer than 64 KiB")
            self._fill(buffered + 1)

    def peek(self, n: int) -> memoryview:
        """A view of the next ``n`` buffered bytes (n <= MAX_HEADER), not consumed."""
        if self.end - self.start < n:
            self._fill(n)
        return self.view[self.start:self.start + n]

    def consume(self, n: int) -> None:
        """Drop ``n`` bytes already buffered (after a peek)."""
        self.start += n

    def read_into(self, dest: memoryview) -> None:
        """Fill ``dest`` exactly: what is buffered first, then straight from the socket."""
        n = dest.nbytes
        have = min(self.end - self.start, n)
        if have:
            dest[:have] = self.view[self.start:self.start + have]
            self.start += have
        if have < n:
            self.recv_exactly(dest[have:] if have else dest)

    def recv_exactly(self, dest: memoryview) -> None:
        """Fill ``dest`` from the socket alone (nothing may be buffered)."""
        n = dest.nbytes
        sock = self.sock
        if sock is None:
            raise redis.ConnectionError("no connection attached")
        have = 0
        got = sock.recv_into(dest, n, self.waitall) if n else 0  # all in one read, blocking
        while have + got < n:
            if got == 0:
                raise redis.ConnectionError("the server closed the connection in a reply")
            have += got
            got = sock.recv_into(dest[have:], n - have)

    def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes (the rest of a value that is not ours)."""
        have = min(self.end - self.start, n)
        self.start += have
        n -= have
        while n > 0:
            self.start = self.end = 0
            got = self._sock().recv_into(self.view, min(n, len(self.buf)))
            if got == 0:
                raise redis.ConnectionError("the server closed the connection in a reply")
            n -= got

    def crlf(self) -> None:
        """The CRLF that ends a bulk string."""
        if bytes(self.peek(2)) != _CRLF:
            raise ProtocolError("a bulk string not followed by CRLF")
        self.start += 2


def _kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Set the kernel's receive and send timeouts of ``sock`` (0: none)."""
    sec = int(seconds)
    usec = int(round((seconds - sec) * 1e6))
    if sec == 0 and usec == 0 and seconds > 0:
        usec = 1
    tv = struct.pack("@ll", sec, usec)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


# -- commands -------------------------------------------------------------------------------
ASKING = b"*1\r\n$6\r\nASKING\r\n"  # the next command is for a slot being imported here


def command(*args: bytes | int) -> bytes:
    """Any command in RESP (arguments are bytes or integers)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        v = a if isinstance(a, bytes) else b"%d" % a
        parts.append(b"$%d\r\n%s\r\n" % (len(v), v))
    return b"".join(parts)


def get_command(rkey: bytes) -> bytes:
    """``GET rkey`` in RESP."""
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(rkey), rkey)


def set_head(rkey: bytes, value_len: int, ttl_ms: int | None) -> bytes:
    """``SET rkey <value>`` [``PX ttl_ms``] in RESP, up to the value's bytes."""
    if ttl_ms is None:
        return b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(rkey), rkey, value_len)
    return b"*5\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(rkey), rkey, value_len)


def set_tail(ttl_ms: int | None) -> bytes:
    """What follows the value of a ``set_head`` command."""
    if ttl_ms is None:
        return _CRLF
    ms = b"%d" % ttl_ms
    return b"\r\n$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(ms), ms)


# -- replies --------------------------------------------------------------------------------
def read_status(wire: Wire) -> str | None:
    """One reply to SET: None for ``+OK``, else the error message."""
    line = wire.line()
    kind = line[:1]
    if kind == b"+":
        return None
    if kind == b"-":
        return line[1:].decode("utf-8", "replace")
    raise ProtocolError(f"unexpected reply to SET: {line[:40]!r}")


def read_statuses(wire: Wire, n: int) -> list[str | None]:
    """``n`` replies to SET, as :func:`read_status` gives each; a run of ``+OK`` already
    received is taken in one step."""
    out: list[str | None] = []
    buf = wire.buf
    while n:
        k = min(n, (wire.end - wire.start) // 5)
        # k non-overlapping "+OK\r\n" in exactly 5k bytes tile them: k replies, all +OK.
        if k and buf.count(_OK, wire.start, wire.start + 5 * k) == k:
            out += [None] * k
            wire.start += 5 * k
            n -= k
            continue
        out.append(read_status(wire))
        n -= 1
    return out


def read_records(wire: Wire, keys: Sequence[bytes], dests: Sequence[memoryview], *,
                 namespace_fp: bytes, block_bytes: int) -> list[tuple[str, str | None]]:
    """Replies to ``GET`` of each of ``keys``, in order: what :func:`read_record` gives each.

    The reply a loader expects, a bulk string holding exactly one record of its key and of
    ``block_bytes``, is recognised from its length line and header with a few comparisons
    on the receive buffer: header prefix (magic, version, lengths, namespace), key, header
    checksum. Its payload is then received straight into its slot and its checksum checked
    there; :data:`HIT_REPLY` means both held. Every other reply takes the general path.
    """
    out: list[tuple[str, str | None]] = []
    buf, view = wire.buf, wire.view
    digest = xxhash.xxh3_64_intdigest
    shapes: dict[int, tuple[bytes, bytes, int, int, int]] = {}
    for key, dest in zip(keys, dests):
        klen = len(key)
        shape = shapes.get(klen)
        if shape is None:
            hlen = header_size(klen)
            head = b"$%d\r\n" % (hlen + block_bytes)
            shape = shapes[klen] = (head, header_prefix(namespace_fp, klen, block_bytes),
                                    len(head), len(head) + hlen, hlen)
        head, prefix, hl, total, hlen = shape
        if wire.end - wire.start < total and not _expect(wire, head):
            out.append(read_record(wire, key, dest, namespace_fp=namespace_fp,
                                   block_bytes=block_bytes))
            continue
        if wire.end - wire.start < total:
            wire._fill(total)  # a bulk string this long is on its way: safe to wait for it
        h = wire.start + hl
        pchk = (match_header(buf, prefix, key, h) if buf.startswith(head, wire.start)
                else None)
        if pchk is None:
            out.append(read_record(wire, key, dest, namespace_fp=namespace_fp,
                                   block_bytes=block_bytes))  # says why, reads past it
            continue
        start = h + hlen
        have = min(wire.end - start, block_bytes)
        if have:  # the payload's first bytes came with the header
            dest[:have] = view[start:start + have]
            start += have
        wire.start = start
        if have < block_bytes:
            wire.recv_exactly(dest[have:] if have else dest)
        if wire.end - wire.start < 2:
            wire._fill(2)  # with the CRLF, the next reply's line and header (wire.hint)
        if not buf.startswith(_CRLF, wire.start):
            raise ProtocolError("a bulk string not followed by CRLF")
        wire.start += 2
        out.append(HIT_REPLY if digest(dest) == pchk else (BAD, "payload checksum mismatch"))
    return out


def _expect(wire: Wire, head: bytes) -> bool:
    """True once the buffered reply starts with ``head`` (a whole bulk length line), False as
    soon as it cannot. Waits only for bytes the reply must still send: a reply line whose
    first bytes match ``head`` cannot end before ``head`` does."""
    n = len(head)
    while True:
        have = wire.end - wire.start
        m = min(have, n)
        if bytes(wire.view[wire.start:wire.start + m]) != head[:m]:
            return False
        if have >= n:
            return True
        wire._fill(have + 1)


def read_record(wire: Wire, key: bytes, dest: memoryview, *, namespace_fp: bytes,
                block_bytes: int, prefix: bytes | None = None) -> tuple[str, str | None]:
    """One reply to ``GET``: (HIT, None) when a verified payload is in ``dest``.

    Otherwise (MISS, None) for a nil, (ERROR, message) for an error reply, or (BAD, reason)
    for a value that is not a valid record of ``key`` (``dest`` may then hold garbage: the
    caller must not use it). The whole reply is consumed in every case. ``prefix``, from
    ``header_prefix(namespace_fp, len(key), block_bytes)``, lets a valid record be checked
    with a few comparisons.
    """
    line = wire.line()
    kind = line[:1]
    if kind == b"$":
        try:
            length = int(line[1:])
        except ValueError:
            raise ProtocolError(f"bad bulk length {line[:40]!r}") from None
        if length < 0:
            return MISS, None
        if prefix is not None:
            hlen = FIXED_HEADER_SIZE + len(key)
            if length == hlen + block_bytes:
                pchk = match_header(wire.peek(hlen), prefix, key)
                if pchk is not None:
                    wire.consume(hlen)
                    wire.read_into(dest)
                    wire.crlf()
                    if payload_checksum(dest) != pchk:
                        return BAD, "payload checksum mismatch"
                    return HIT, None
        return _bulk_record(wire, length, key, dest, namespace_fp, block_bytes)
    if kind == b"_":
        return MISS, None
    if kind == b"-":
        return ERROR, line[1:].decode("utf-8", "replace")
    raise ProtocolError(f"unexpected reply to GET: {line[:40]!r}")


def _bulk_record(wire: Wire, length: int, key: bytes, dest: memoryview, namespace_fp: bytes,
                 block_bytes: int) -> tuple[str, str | None]:
    if length < FIXED_HEADER_SIZE:
        _reject(wire, length)
        return BAD, "truncated header"
    try:
        hlen, klen, plen = peek_lengths(wire.peek(FIXED_HEADER_SIZE))
    except RecordError as e:
        _reject(wire, length)
        return BAD, str(e)
    if (klen != len(key) or plen != block_bytes or hlen < FIXED_HEADER_SIZE + klen
            or hlen > MAX_HEADER or hlen + plen != length):
        _reject(wire, length)
        return BAD, "length mismatch"
    try:
        header = parse_header(wire.peek(hlen))
    except RecordError as e:
        _reject(wire, length)
        return BAD, str(e)
    reason = check_header(header, namespace_fp=namespace_fp, key=key, payload_len=block_bytes)
    wire.consume(hlen)
    if reason is not None:
        _reject(wire, plen)
        return BAD, reason
    wire.read_into(dest)
    wire.crlf()
    if payload_checksum(dest) != header.payload_checksum:
        return BAD, "payload checksum mismatch"
    return HIT, None


def _reject(wire: Wire, n: int) -> None:
    """Read past the ``n`` bytes left of a rejected value and its CRLF."""
    wire.skip(n)
    wire.crlf()
