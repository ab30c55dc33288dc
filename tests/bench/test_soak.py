"""A short soak: every fault phase runs, nothing wrong is served, nothing escapes or is left."""

from __future__ import annotations

import shutil

import pytest

from kvtier.bench.soak import PHASES, Soak

pytestmark = pytest.mark.redis


def test_short_soak_serves_nothing_wrong_and_leaves_nothing() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    report = Soak(1.5 * len(PHASES), storage_bytes=24 << 20, disk_bytes=96 << 20).run()
    assert [p["phase"] for p in report["phases"]] == list(PHASES)
    assert all(p["requests"] > 0 for p in report["phases"])
    assert report["wrong_blocks"] == 0
    assert report["exceptions_escaped"] == 0, report["first_exception"]
    assert report["manager"]["tier_errors"] == 0
    assert sum(p["blocks_hit"] for p in report["phases"]) > 0
    assert report["fds"]["left_open"] == []
    assert report["threads"]["end"] == report["threads"]["start"]
    assert not report["shm_entries"]["region_left_behind"]
    # The faults reached the tiers: corrupt records were caught, Redis went down and came back.
    tiers = report["tiers"]
    assert tiers["storage0"]["corrupt"] + tiers["network1"]["corrupt"] > 0
    assert tiers["network1"]["down_events"] >= 1
