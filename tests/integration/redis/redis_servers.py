"""Real redis-server processes for the network tier's tests (used by conftest.py).

Every server runs on a free loopback port in a temporary directory, without persistence, and is
killed at teardown. A missing ``redis-server`` or ``redis-cli`` fails the tests with a message
that says what to install: these tests are never skipped.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

# Redis Cluster listens on port + 10000 for its bus, so cluster ports stay at or below 55535.
MAX_CLUSTER_PORT = 55535


def require_tool(name: str) -> str:
    """Path of ``name`` on PATH, or fail the test with what to install."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH: the network tier's tests run real Redis servers. "
            "Install it (Debian/Ubuntu: apt-get install redis-server; it provides redis-server "
            "and redis-cli) and run the tests again.",
            pytrace=False,
        )
    return path


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, cluster: bool = False) -> int:
    """A loopback port nobody listens on (and, for cluster nodes, its bus port too)."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randint(20000, MAX_CLUSTER_PORT if cluster else 60000)
        if _port_free(port) and (not cluster or _port_free(port + 10000)):
            return port
    raise RuntimeError("no free loopback port found")


@dataclass
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(workdir: Path) -> TlsFiles:
    """Generate the CA and server certificate with the openssl command."""
    openssl = require_tool("openssl")
    workdir.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (workdir / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    steps = [
        ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=kvtier test CA"],
        ["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.cnf"],
    ]
    for args in steps:
        res = subprocess.run([openssl, *args], cwd=workdir, capture_output=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {res.stderr.decode()[-500:]}")
    return TlsFiles(workdir / "ca.crt", workdir / "server.crt", workdir / "server.key")


class RedisServer:
    """One redis-server process on 127.0.0.1:<port>, with its own directory."""

    def __init__(self, workdir: Path, port: int, extra: list[str] | None = None,
                 tls: TlsFiles | None = None) -> None:
        self.binary = require_tool("redis-server")
        self.workdir = workdir
        self.port = port
        self.extra = list(extra or [])
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.password: str | None = None
        if "--requirepass" in self.extra:
            self.password = self.extra[self.extra.index("--requirepass") + 1]
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """redis:// (or, with TLS, rediss://) URL of the server."""
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _client_kwargs(self) -> dict[str, object]:
        kw: dict[str, object] = {"host": "127.0.0.1", "port": self.port,
                                 "password": self.password}
        if self.tls is not None:
            kw.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
        return kw

    def start(self, timeout: float = 10.0) -> None:
        """Start the process and wait until it answers PING."""
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            ports = ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                     "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]
        args = [
            self.binary, *ports, "--bind", "127.0.0.1",
            "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--protected-mode", "no",
            "--logfile", str(self.workdir / "redis.log"),
            "--maxmemory-policy", "allkeys-lru", *self.extra,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.workdir / "redis.log"
                err += log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} exited: {err}")
            try:
                with redis.Redis(socket_timeout=1, **self._client_kwargs()) as c:  # type: ignore[arg-type]
                    if c.ping():
                        return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no save) and wait for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def stop(self) -> None:
        """Stop the server if it runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def client(self) -> redis.Redis:
        """A plain redis-py client to inspect the server."""
        return redis.Redis(socket_timeout=5, **self._client_kwargs())  # type: ignore[arg-type]


def start_server(workdir: Path, extra: list[str] | None = None,
                 tls: TlsFiles | None = None) -> RedisServer:
    """A started standalone server on a fresh port (retries if the port is taken meanwhile)."""
    last: Exception | None = None
    for attempt in range(5):
        server = RedisServer(workdir / f"p{attempt}", free_port(), extra, tls)
        try:
            server.start()
            return server
        except RuntimeError as e:
            last = e
    raise RuntimeError(f"could not start redis-server: {last}")


class RedisClusterNodes:
    """Three cluster-enabled servers joined with ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """URL of one node (the client discovers the others)."""
        return self.nodes[0].url

    def start(self) -> None:
        """Start the nodes, create the cluster, wait until every node says cluster_state:ok."""
        cli = require_tool("redis-cli")
        for i in range(3):
            for attempt in range(5):
                node = RedisServer(
                    self.workdir / f"node{i}-{attempt}", free_port(cluster=True),
                    ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000"],
                )
                try:
                    node.start()
                    break
                except RuntimeError:
                    if attempt == 4:
                        raise
            self.nodes.append(node)
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        res = subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=60,
        )
        if res.returncode != 0:
            raise RuntimeError(
                "redis-cli --cluster create failed: " + (res.stdout + res.stderr).decode()[-2000:]
            )
        self.wait_ok()

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node reports cluster_state:ok."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for n in self.nodes:
                try:
                    with n.client() as c:
                        state = c.cluster("INFO").get("cluster_state")
                except redis.RedisError:
                    state = None
                states.append(state in ("ok", b"ok"))
            if all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop every node."""
        for n in self.nodes:
            n.stop()
