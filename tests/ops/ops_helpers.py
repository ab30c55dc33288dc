"""Helpers for the operator command tests: run ``kvtier`` in-process, build storage managers,
patch files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

import kvtier
from kvtier.cli import main

BB = 64 << 10  # block bytes of the storage tests
SLOT = 4096 + BB  # one storage slot


def kv(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    """Run ``kvtier ARGS`` in this process: (exit status, parsed JSON or text, stderr)."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    if "--json" in args and out.strip():
        return rc, json.loads(out), err
    return rc, out, err


def storage_manager(root: Path, namespace: str, *, slots: int = 8, capacity: int = 32 << 20,
                    **tier: object) -> kvtier.TieringManager:
    """A manager with a CPU tier of ``slots`` blocks and one storage tier under ``root``."""
    params = {"type": "storage", "path": str(root), "capacity_bytes": capacity,
              "n_read_threads": 2, "n_write_threads": 2, **tier}
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": slots * BB, "secondary_tiers": [params]},
        gpu_block_size=16, bytes_per_gpu_block=BB, namespace=namespace)
    m = spec.get_manager()
    assert isinstance(m, kvtier.TieringManager)
    return m


def patch(path: str, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of a file."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str, offset: int, n: int) -> bytes:
    """``n`` bytes of a file at ``offset``."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` with the sha256 of its bytes (what 'byte for byte' compares)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
