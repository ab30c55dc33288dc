"""``kvtier inspect|du|gc /dev/shm``: regions of live engines stay, those of dead ones go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from ops_helpers import kv

from kvtier.memory.region import BlockRegion

_ORPHAN = """
import sys, time
from multiprocessing import resource_tracker, shared_memory
s = shared_memory.SharedMemory(name=sys.argv[1], create=True, size=1 << 20)
resource_tracker.unregister(s._name, "shared_memory")  # as kvtier does: nobody unlinks it for us
s.buf[:4096] = b"x" * 4096
print("ready", flush=True)
time.sleep(120)
"""


def orphan_region(name: str) -> None:
    """A region whose creating process was killed (SIGKILL: no shutdown, no unlink)."""
    p = subprocess.Popen([sys.executable, "-c", _ORPHAN, name], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)


def test_gc_removes_regions_of_dead_engines_only(tmp_path: Path, capsys) -> None:
    prefix = f"kvtier-opstest-{uuid.uuid4().hex[:10]}-"
    dead, live = prefix + "dead", prefix + "live"
    orphan_region(dead)
    region = BlockRegion(live, 4, 4096, owner=True)  # this process maps it: an engine alive
    try:
        assert os.path.exists(f"/dev/shm/{dead}")
        rc, ins, _ = kv(capsys, "inspect", "/dev/shm", "--shm-prefix", prefix, "--json")
        assert rc == 0
        state = {r["name"]: r for r in ins["regions"]}
        assert state[dead]["state"] == "stale" and state[dead]["users"] == []
        assert state[live]["state"] == "live" and os.getpid() in state[live]["users"]
        assert [s["path"] for s in ins["stale"]] == [f"/dev/shm/{dead}"]

        # a storage tier's inspect lists them among its stale pieces too
        rc, ins, _ = kv(capsys, "inspect", str(tmp_path), "--shm-prefix", prefix, "--json")
        assert [s["kind"] for s in ins["stale"]] == ["shm_region"]

        rc, r, _ = kv(capsys, "gc", "/dev/shm", "--stale", "--shm-prefix", prefix, "--dry-run",
                      "--json")
        assert rc == 0 and [x["id"] for x in r["removed"]] == [dead]
        assert os.path.exists(f"/dev/shm/{dead}")
        rc, r, _ = kv(capsys, "gc", "/dev/shm", "--stale", "--shm-prefix", prefix, "--json")
        assert rc == 0 and [x["id"] for x in r["removed"]] == [dead]
        assert not os.path.exists(f"/dev/shm/{dead}")
        assert os.path.exists(f"/dev/shm/{live}")
        region.array[0, :4] = 7  # still usable
        rc, du, _ = kv(capsys, "du", "/dev/shm", "--shm-prefix", prefix, "--json")
        assert [g["name"] for g in du["regions"]] == [live]
    finally:
        region.close()
        if os.path.exists(f"/dev/shm/{dead}"):
            os.unlink(f"/dev/shm/{dead}")


def test_gc_of_dev_shm_takes_only_stale(capsys) -> None:
    rc, _out, err = kv(capsys, "gc", "/dev/shm", "--shrink-to", "1G")
    assert rc == 2 and "only --stale" in err
