"""Nothing left in /dev/shm after a crash: a process holding a manager or a worker is killed with
``kill -9`` and its primary region disappears; a start reclaims regions whose creators are gone;
``shutdown()`` releases threads and file descriptors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

import kvtier
from kvtier.memory.watchdog import OWNERS_DIR

SHM = Path("/dev/shm")

HOLDER = textwrap.dedent("""
    import sys, time
    import kvtier
    spec = kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20}, gpu_block_size=16,
                                        bytes_per_gpu_block=65536, instance_id=sys.argv[1])
    if sys.argv[2] == "manager":
        held = spec.get_manager()
    else:
        import torch
        held = spec.get_worker([torch.zeros(4, 65536, dtype=torch.uint8)])
    print("ready", flush=True)
    time.sleep(600)
""")


def _wait(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _hold(instance: str, what: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, instance, what],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize("what", ["manager", "worker"])
def test_kill_9_of_the_creator_leaves_no_region(what: str) -> None:
    instance = f"crash-{what}-{uuid.uuid4().hex[:8]}"
    region = SHM / f"kvtier-{instance}"
    proc = _hold(instance, what)
    try:
        assert region.exists()
    finally:
        _kill9(proc)
    _wait(lambda: not region.exists(), f"{region} left behind after kill -9 of a {what}")
    _wait(lambda: not (Path(OWNERS_DIR) / region.name).exists(), "ownership record left behind")


def test_a_killed_worker_leaves_the_managers_region_until_the_manager_ends() -> None:
    instance = f"crash-attached-{uuid.uuid4().hex[:8]}"
    region = SHM / f"kvtier-{instance}"
    spec = kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20}, gpu_block_size=16,
                                        bytes_per_gpu_block=65536, instance_id=instance)
    m = spec.get_manager()
    try:
        _kill9(_hold(instance, "worker"))
        time.sleep(0.5)
        assert region.exists(), "the manager still uses its region"
        m.primary_blocks()[0, :4] = 7  # still writable
    finally:
        m.shutdown()
    assert not region.exists()


def test_a_start_reclaims_regions_whose_creator_is_gone() -> None:
    """A creator and its watchdog both killed leave a region and its record: the next start
    removes it. A region nobody recorded (another tool's) stays."""
    name = f"kvtier-orphan-{uuid.uuid4().hex[:8]}"
    foreign = SHM / f"kvtier-foreign-{uuid.uuid4().hex[:8]}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (SHM / name).write_bytes(b"\0" * 4096)
    foreign.write_bytes(b"\0" * 4096)
    os.makedirs(OWNERS_DIR, exist_ok=True)
    (Path(OWNERS_DIR) / name).write_text(f"{dead.pid} {os.stat(SHM / name).st_ino}\n")
    m = kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20}, gpu_block_size=16,
                                     bytes_per_gpu_block=65536).get_manager()
    try:
        _wait(lambda: not (SHM / name).exists(), "an orphaned region was not reclaimed")
        assert not (Path(OWNERS_DIR) / name).exists()
        assert foreign.exists()
    finally:
        m.shutdown()
        foreign.unlink()


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_shutdown_releases_threads_and_descriptors(tmp_path: Path, namespace: str) -> None:
    cfg = {"cpu_bytes_to_use": 16 * 65536, "secondary_tiers": [
        {"type": "storage", "path": str(tmp_path), "capacity_bytes": 64 << 20},
        {"type": "example"}]}
    spec = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=65536,
                                        namespace=namespace)
    threads, fds = threading.active_count(), _fds()
    m = spec.get_manager()
    assert threading.active_count() > threads
    region = SHM / spec.region_name
    assert region.exists()
    m.shutdown()
    _wait(lambda: threading.active_count() == threads, "threads left running after shutdown")
    _wait(lambda: _fds() <= fds, "descriptors left open after shutdown")
    assert not region.exists()
