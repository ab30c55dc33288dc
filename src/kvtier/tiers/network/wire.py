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
from collections.abc import Sequence

import redis

from kvtier.format.record import (
    FIXED_HEADER_SIZE,
    RecordError,
    check_header,
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

# What a GET reply came to.
HIT, MISS, BAD, ERROR = "hit", "miss", "bad", "error"


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
        self.buf = bytearray(_BUFFER)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.hint = MAX_LINE

    def attach(self, sock: socket.socket) -> None:
        """Start an exchange on ``sock`` with an empty buffer."""
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.start = self.end = 0
        self.hint = MAX_LINE

    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return self.end - self.start

    def detach(self) -> None:
        """End the exchange (the buffer is kept for the next one)."""
        self.sock = None
        self.start = self.end = 0

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
        recv_into = self._sock().recv_into
        while have < n:
            got = recv_into(dest[have:], n - have)
            if got == 0:
                raise redis.ConnectionError("the server closed the connection in a reply")
            have += got

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
