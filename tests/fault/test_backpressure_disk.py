"""A storage tier on a disk the kernel throttles to a tenth of the store rate: the CPU tier keeps
taking the engine's stores, the slow tier pins no more than its bound, the other tier's hits are
unchanged, and the slow tier comes back to full use when the throttle ends."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from helpers import block_bytes_for, make_key, settle

import kvtier
from kvtier.bench.faults import ThrottledDisk, throttle_unavailable

BB = 64 << 10
SLOTS = 256
BLOCKS_PER_REQ = 16
WRITE_BLOCKS = 50  # the disk's limit, 50 blocks a second
# ... as bytes: the tier writes adjacent records with one call, so a limit on operations would
# let several blocks through per operation
WRITE_BPS = WRITE_BLOCKS * (BB + 4096)  # a record is the block and its 4 KiB header
STEP_S = BLOCKS_PER_REQ / (10 * WRITE_BLOCKS)  # the engine stores ten times what the disk takes


@pytest.fixture
def disk() -> Iterator[ThrottledDisk]:
    why = throttle_unavailable()
    if why is not None:
        pytest.skip(why)
    with ThrottledDisk(256 << 20) as d:
        cgroup, mount = d._cgroup, d.path
        yield d
    # Closing leaves nothing: the cgroup (processes started meanwhile moved out), the mount.
    assert cgroup is not None and not cgroup.exists()
    assert not os.path.ismount(mount)


def _manager(path: str, namespace: str) -> kvtier.TieringManager:
    cfg = {"cpu_bytes_to_use": SLOTS * BB, "secondary_tiers": [
        {"type": "storage", "path": path, "capacity_bytes": 200 << 20, "direct_io": True,
         "n_read_threads": 2, "n_write_threads": 2},
        {"type": "example"}]}
    return kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BB,
                                        namespace=namespace).get_manager()


def _serve(m: kvtier.TieringManager, reqs: list[list[bytes]], peak: list[int],
           step_s: float = STEP_S) -> int:
    """Store each request's blocks as an engine does, one request per step, ``step_s`` apart;
    returns the blocks the CPU tier refused. ``peak`` collects the slow tier's pinned slots per
    step."""
    region = m.primary_blocks()
    refused = 0
    for i, keys in enumerate(reqs):
        t0 = time.monotonic()
        ctx = kvtier.ReqContext(f"r{i}")
        out = m.prepare_store(keys, ctx)
        if out is None:
            refused += len(keys)
        else:
            for key, slot in zip(out.keys_to_store, out.store_spec.block_ids):
                region[slot] = block_bytes_for(key, BB)
            m.complete_store(out.keys_to_store, ctx)
        m.on_schedule_end()
        peak.append(m.get_stats()["tiers"]["storage0"]["pinned_slots"])
        time.sleep(max(0.0, step_s - (time.monotonic() - t0)))
    return refused


def test_throttled_disk_does_not_stall_the_cpu_tier(disk: ThrottledDisk, namespace: str) -> None:
    m = _manager(str(disk.path), namespace)
    try:
        storage, example = m.tiers
        bound = m.get_stats()["tiers"]["storage0"]["max_pinned_slots"]
        assert bound == SLOTS // 4
        disk.set_bps(WRITE_BPS)
        reqs = [[make_key(r * BLOCKS_PER_REQ + j, namespace) for j in range(BLOCKS_PER_REQ)]
                for r in range(120)]
        peak: list[int] = []
        refused = _serve(m, reqs, peak)
        total = len(reqs) * BLOCKS_PER_REQ
        st = m.get_stats()["tiers"]["storage0"]
        assert refused <= 0.03 * total, f"the CPU tier refused {refused} of {total} blocks"
        assert max(peak) <= bound
        assert st["backpressure_dropped"] > 0 and st["degraded"]
        # The example tier, which keeps up, got every block, throttle or not.
        assert sum(example.lookup(k) or 0 for k in reqs) == total
        assert m.get_stats()["manager"]["backpressure_dropped"] == st["backpressure_dropped"]

        # The throttle ends: the tier drains, and as its stores run fast again it recovers by
        # itself and takes every block.
        disk.set_bps(None)
        settle(m, timeout=120)
        deadline = time.monotonic() + 120
        r = 0
        while m.get_stats()["tiers"]["storage0"]["degraded"]:
            assert time.monotonic() < deadline, "the tier stayed degraded"
            r += 1
            _serve(m, [[make_key(-r * 100 - j, namespace) for j in range(BLOCKS_PER_REQ)]], [])
            settle(m, timeout=60)
        dropped = m.get_stats()["tiers"]["storage0"]["backpressure_dropped"]
        more = [[make_key(10_000 + r * BLOCKS_PER_REQ + j, namespace)
                 for j in range(BLOCKS_PER_REQ)] for r in range(4)]
        for keys in more:
            assert _serve(m, [keys], []) == 0
            settle(m, timeout=60)
        assert m.get_stats()["tiers"]["storage0"]["backpressure_dropped"] == dropped
        assert sum(storage.lookup(k) or 0 for k in more) == 4 * BLOCKS_PER_REQ
        assert not m.get_stats()["tiers"]["storage0"]["degraded"]
        m.primary.check()
    finally:
        m.shutdown()


def test_latency_signal_sees_a_disk_throttled_after_a_healthy_start(
    disk: ThrottledDisk, namespace: str
) -> None:
    """The latency signal against the tier's own baseline: with a bound of the whole CPU tier,
    only the signal can make the tier drop stores before it pins every slot. Healthy first (the
    baseline), then the disk is throttled to a third of the store rate: the signal turns slow
    with the first throttled jobs (in flight or ended), the bound is halved, and the tier sheds
    stores there instead of pinning the whole CPU tier."""
    cfg = {"cpu_bytes_to_use": SLOTS * BB, "secondary_tiers": [
        {"type": "storage", "path": str(disk.path), "capacity_bytes": 200 << 20,
         "direct_io": True, "n_read_threads": 2, "n_write_threads": 2, "max_pinned_share": 1.0}]}
    m = kvtier.TieringOffloadingSpec(cfg, gpu_block_size=16, bytes_per_gpu_block=BB,
                                     namespace=namespace).get_manager()
    try:
        healthy = [[make_key(r * BLOCKS_PER_REQ + j, namespace) for j in range(BLOCKS_PER_REQ)]
                   for r in range(24)]
        for keys in healthy:  # one request at a time: the tier's baseline is the disk's speed
            assert _serve(m, [keys], []) == 0
            settle(m)
        st = m.get_stats()["tiers"]["storage0"]
        assert st["max_pinned_slots"] == SLOTS and st["backpressure_dropped"] == 0
        disk.set_bps(WRITE_BPS)
        reqs = [[make_key(1000 + r * BLOCKS_PER_REQ + j, namespace)
                 for j in range(BLOCKS_PER_REQ)] for r in range(80)]
        peak: list[int] = []
        ratio = 0.0
        for keys in reqs:
            _serve(m, [keys], peak, step_s=BLOCKS_PER_REQ / (3 * WRITE_BLOCKS))
            ratio = max(ratio, m.get_stats()["tiers"]["storage0"]["store_latency_ratio"])
        st = m.get_stats()["tiers"]["storage0"]
        # Either half of the signal: jobs that ended slow, or a job in flight far past its time.
        assert ratio > 8 or st["stalled_steps"] > 0, (
            f"the signal did not see the throttled disk (peak ratio {ratio}, "
            f"{st['stalled_steps']} stalled steps)")
        assert st["backpressure_dropped"] > 0, "the halved bound shed nothing"
        assert max(peak) <= SLOTS // 2, f"the slow tier pinned {max(peak)} slots"
        disk.set_bps(None)
        settle(m, timeout=120)
        m.primary.check()
    finally:
        m.shutdown()
