"""Fixtures for the vLLM integration tests (the engine stand-in is in vllm_engine.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

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
