"""A loopback TCP proxy in front of a real redis-server that chops or cuts the byte stream.

The network tier's bulk path parses replies itself, so its tests need what a real network does
now and then: replies arriving a few bytes at a time (short reads), a peer that reads slowly
(short writes), and a connection that dies in the middle of a reply. The proxy does those to the
real server's bytes; it never invents any.
"""

from __future__ import annotations

import random
import socket
import threading
import time


class FaultProxy:
    """Forwards 127.0.0.1:<port> to an upstream port, optionally chopping or cutting replies.

    * ``chunk``: forward at most this many bytes per write, in both directions, with a short
      pause now and then (the client sees short reads; its writes back up: short writes);
    * :meth:`cut_next_reply_after`: once that many more server bytes have gone through, the
      connection carrying the next byte is closed in both directions (mid-reply).
    """

    def __init__(self, upstream_port: int, *, chunk: int = 0, seed: int = 0) -> None:
        self.upstream_port = upstream_port
        self.chunk = chunk
        self.rng = random.Random(seed)
        self.accepted = 0
        self.cuts = 0
        self._cut_at: int | None = None
        self._cut_times = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> FaultProxy:
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _close(s)
        for t in self._threads:
            t.join(timeout=5)
        self._listener.close()

    @property
    def url(self) -> str:
        """redis:// URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def cut_next_reply_after(self, nbytes: int, times: int = 1) -> None:
        """Forward ``nbytes`` more server bytes, then close the connection carrying the next.

        With ``times`` > 1 the same is done again on the following connections (a retry on a
        fresh connection is cut at the same point).
        """
        with self._lock:
            self._cut_at = nbytes
            self._cut_len = nbytes
            self._cut_times = times

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self.accepted += 1
                self._socks += [client, upstream]
            for src, dst, down in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(target=self._pump, args=(src, dst, down, client, upstream),
                                     daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool,
              client: socket.socket, upstream: socket.socket) -> None:
        dst.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while not self._stop.is_set():
                n = self.rng.randint(1, self.chunk) if self.chunk else 65536
                data = src.recv(n)
                if not data:
                    break
                if down:
                    with self._lock:
                        left = self._cut_at
                        if left is not None:
                            if len(data) > left:
                                self._cut_times -= 1
                                self._cut_at = self._cut_len if self._cut_times > 0 else None
                                self.cuts += 1
                                dst.sendall(data[:left])
                                raise ConnectionAbortedError("cut by the test")
                            self._cut_at = left - len(data)
                dst.sendall(data)
                if self.chunk and self.rng.random() < 0.02:
                    time.sleep(0.0005)  # let the other side drain what it has
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
