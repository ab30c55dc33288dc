"""Fixtures: real SeaweedFS S3 servers on loopback ports (see s3_servers.py).

A missing ``weed`` binary fails the tests with what to install; they are never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_servers import S3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A server shared by the tests that do not stop it (each uses its own namespace)."""
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_s3_server(tmp_path: Path) -> Iterator[S3Server]:
    """A server for one test (which may kill and restart it)."""
    server = S3Server(tmp_path / "seaweedfs")
    server.start()
    yield server
    server.stop()
