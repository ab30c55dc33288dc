"""Kill -9 a process that is writing to the storage tier, restart on the same directory.

The writer is a real subprocess storing blocks as fast as it can through the manager API (with
evictions, so slots are being reused when it dies). After each kill a fresh manager must serve
exactly the blocks whose writes finished (never a torn one), leave no temporary files, and stay
within capacity.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import block_bytes_for, lookup_until, make_key

import kvtier
from kvtier.tiers.storage import StorageTier

BB = 256 << 10
CAPACITY = StorageTier.capacity_for(40, BB, 4 << 20)  # 40 blocks: the writer evicts all the time
NAMESPACE = "crash/test"

WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import kvtier
    from helpers import make_key, store_blocks
    start = int(sys.argv[1])
    cfg = {{"cpu_bytes_to_use": 16 * {bb}, "secondary_tiers": [{{"type": "storage",
            "path": {path!r}, "capacity_bytes": {cap}, "n_read_threads": 2,
            "n_write_threads": 2, "slab_bytes": 4 << 20, "direct_io": {direct!r}}}]}}
    spec = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block={bb},
                                        namespace={ns!r})
    m = spec.get_manager()
    print("ready", flush=True)
    i = start
    while True:
        store_blocks(m, [make_key(j, "crash") for j in range(i, i + 8)])
        m.on_schedule_end()
        i += 8
        print("stored", i, flush=True)
    """
)


def _manager(path: Path, direct: object) -> kvtier.TieringManager:
    cfg = {"cpu_bytes_to_use": 8 * BB, "secondary_tiers": [
        {"type": "storage", "path": str(path), "capacity_bytes": CAPACITY, "direct_io": direct,
         "n_read_threads": 2, "n_write_threads": 2, "slab_bytes": 4 << 20}]}
    spec = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BB,
                                        namespace=NAMESPACE)
    return spec.get_manager()


def _run_and_kill(script: Path, start: int, min_blocks: int, rng: random.Random) -> int:
    """Start the writer, let it store at least ``min_blocks`` more, SIGKILL it; last count seen."""
    proc = subprocess.Popen([sys.executable, str(script), str(start)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    last = start
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            m = re.match(r"stored (\d+)", line)
            if m:
                last = int(m.group(1))
                if last - start >= min_blocks:
                    break
            assert time.monotonic() < deadline, "writer too slow"
        time.sleep(rng.uniform(0, 0.03))  # die somewhere inside the next writes
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return last + 4000  # blocks it may have stored after the last line we read


@pytest.mark.parametrize("direct", ["auto", False])
def test_kill_minus_nine_mid_run_then_restart(tmp_path: Path, direct: object) -> None:
    rng = random.Random(1234)
    path = tmp_path / "kv"
    script = tmp_path / "writer.py"
    tests_dir = str(Path(__file__).resolve().parents[1])
    script.write_text(WRITER.format(tests=tests_dir, bb=BB, path=str(path), cap=CAPACITY,
                                    ns=NAMESPACE, direct=direct))
    upper = 0
    for rnd in range(3):
        upper = _run_and_kill(script, upper, 60 + 20 * rnd, rng)
        m = _manager(path, direct)
        try:
            st = m.get_stats()["tiers"]["storage0"]
            names = sorted(os.listdir(st["path"]))
            pattern = r"NAMESPACE|POOL|lock|engine-[0-9a-f]{16}|slab-\d{5}\.kvs|log-\d{5}"
            assert all(re.fullmatch(pattern, n) for n in names), names
            on_disk = sum(max(p.stat().st_size, p.stat().st_blocks * 512)
                          for p in Path(st["path"]).iterdir())
            assert on_disk <= CAPACITY and st["usage_bytes"] <= CAPACITY
            assert 0 < st["blocks"] <= 40
            # the writer's regions (and so its blocks) were taken over by the new engine
            assert st["regions_owned"] == st["regions"] and st["own_blocks"] == st["blocks"]
            # every block the restarted tier offers is whole: a record is named by its region's
            # log only after it was written, and a slot leaves the log before it is overwritten
            keys = [make_key(j, "crash") for j in range(upper)]
            present = [k for k in keys if m.tiers[0].lookup([k]) == 1]
            assert len(present) == st["blocks"]
            region = m.primary_blocks()
            ctx = kvtier.ReqContext("check")
            good = 0
            for k in present:
                if lookup_until(m, [k], ctx) != 1:
                    continue
                spec = m.prepare_load([k], ctx)
                assert np.array_equal(region[int(spec.block_ids[0])], block_bytes_for(k, BB))
                good += 1
                m.complete_load([k], ctx)
            st = m.get_stats()["tiers"]["storage0"]
            assert good == len(present) and st["corrupt"] == 0
        finally:
            m.shutdown()
