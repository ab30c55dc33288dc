"""Fixtures for the vLLM integration tests (the engine stand-in is in vllm_engine.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # before vLLM is imported: no GPU here

import pytest
from vllm_engine import Engine


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    """Engines a test builds; shut down after it."""
    made: list[Engine] = []
    yield made
    for e in made:
        e.close()


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "redis"))
from redis_servers import RedisServer, require_tool, start_server  # noqa: E402


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, for the network-tier runs here."""
    require_tool("redis-server")
    require_tool("redis-cli")
    server = start_server(tmp_path_factory.mktemp("redis-vllm"))
    yield server
    server.stop()
