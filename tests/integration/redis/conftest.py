"""Fixtures: real redis-server processes (standalone, TLS, a 3-node cluster) on loopback ports.

A missing ``redis-server``, ``redis-cli`` (or, for TLS, ``openssl``) fails the tests with what to
install; they are never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_servers import RedisClusterNodes, RedisServer, require_tool, start_server


@pytest.fixture(scope="session")
def redis_tools() -> None:
    """Fail early, and clearly, when the Redis binaries are missing."""
    require_tool("redis-server")
    require_tool("redis-cli")


@pytest.fixture(scope="session")
def redis_server(
    redis_tools: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer]:
    """A standalone server shared by the tests that do not stop it (each uses its own namespace)."""
    server = start_server(tmp_path_factory.mktemp("redis-standalone"))
    yield server
    server.stop()


@pytest.fixture
def own_redis_server(redis_tools: None, tmp_path: Path) -> Iterator[RedisServer]:
    """A standalone server for one test (which may kill and restart it)."""
    server = start_server(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(
    redis_tools: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisClusterNodes]:
    """A 3-node Redis Cluster (no replicas), started once for the session."""
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
