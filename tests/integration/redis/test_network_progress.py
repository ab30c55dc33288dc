"""The network tier reports a load job's blocks as they are verified (``poll_loaded``).

Against a real redis-server: a load job longer than one part reports the parts it has verified
before the job ends, in the request's prefix order, each block's bytes already in its slot; a
corrupt record is never reported, fails alone and is deleted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import block_bytes_for, make_key, settle, store_blocks
from redis_servers import RedisServer
from test_network_tier import make_manager, redis_key, tier_stats

import kvtier
from kvtier.tiers.base import TierJobResult

pytestmark = pytest.mark.redis

BLOCK = 16 * 1024
N = 150  # blocks; with 64 KiB windows a load part is 64 blocks: three parts


@pytest.fixture
def managers() -> Iterator[list[kvtier.OffloadingManager]]:
    """Managers made by a test; shut down at the end even when it fails."""
    made: list[kvtier.OffloadingManager] = []
    yield made
    for m in made:
        m.shutdown()


def _stored(server: RedisServer, managers: list, namespace: str
            ) -> tuple[kvtier.TieringManager, list[bytes]]:
    m = make_manager(server.url, namespace, slots=N + 10, block=BLOCK, max_batch_bytes=64 * 1024,
                     max_pinned_share=1.0)  # every block reaches the server
    managers.append(m)
    keys = [make_key(i, namespace) for i in range(N)]
    store_blocks(m, keys)
    settle(m)
    m.reset_cache()  # every slot free: the test's load job below owns them
    return m, keys


def _load(m: kvtier.TieringManager, order: list[bytes]
          ) -> tuple[TierJobResult, list[bytes]]:
    """Run one load job on the tier itself, slot i for ``order[i]``; check every reported
    block's bytes the moment it is reported. Returns the result and the keys reported early."""
    tier = m.tiers[0]
    region = m.primary_blocks()
    region[:] = 0
    slot = {k: i for i, k in enumerate(order)}
    tier.poll_loaded()  # reports from now on
    tier.submit_load(777, order, np.arange(len(order), dtype=np.int64))
    reported: list[bytes] = []
    deadline = time.monotonic() + 20
    while True:
        for job_id, keys in tier.poll_loaded():
            assert job_id == 777
            for k in keys:
                assert np.array_equal(region[slot[k]], block_bytes_for(k, BLOCK)), "unverified"
            reported.extend(keys)
        for res in tier.poll():
            assert res.job_id == 777
            return res, reported
        assert time.monotonic() < deadline, "the load job did not finish"
        time.sleep(0.0005)


def test_blocks_are_reported_as_their_part_is_verified(redis_server: RedisServer, managers,
                                                        namespace: str) -> None:
    m, keys = _stored(redis_server, managers, namespace)
    order = keys[::-1]  # the request's prefix order, not the order they were stored in
    res, reported = _load(m, order)
    assert res.success
    # Reported in prefix order, before the job ended (its last part comes with the job).
    assert reported == order[:len(reported)]
    assert 64 <= len(reported) < N
    region = m.primary_blocks()
    for i, k in enumerate(order):
        assert np.array_equal(region[i], block_bytes_for(k, BLOCK))


def test_a_corrupt_record_is_never_reported_and_fails_alone(redis_server: RedisServer,
                                                             managers, namespace: str) -> None:
    m, keys = _stored(redis_server, managers, namespace)
    bad = keys[5]  # in the first part
    with redis_server.client() as c:
        value = c.get(redis_key(m, bad))
        assert value is not None
        c.setrange(redis_key(m, bad), len(value) - 50, b"\x00\xff")  # payload bytes
    res, reported = _load(m, keys)
    assert res.failed_keys == {bad}
    assert bad not in reported and len(reported) == len(set(reported))
    assert set(reported) <= set(keys) - {bad} and len(reported) >= 63
    assert tier_stats(m)["corrupt"] == 1
    with redis_server.client() as c:
        assert c.exists(redis_key(m, bad)) == 0


def test_promoted_blocks_round_trip_through_the_manager(redis_server: RedisServer, managers,
                                                         namespace: str) -> None:
    m, keys = _stored(redis_server, managers, namespace)
    ctx = kvtier.ReqContext("r")
    assert m.lookup(keys, ctx) is None
    deadline = time.monotonic() + 20
    got = None
    while got is None:
        assert time.monotonic() < deadline
        m.on_schedule_end()
        time.sleep(0.001)
        got = m.lookup(keys, ctx)
    assert got == N
    spec = m.prepare_load(keys, ctx)
    region = m.primary_blocks()
    for k, s in zip(keys, spec.block_ids):
        assert np.array_equal(region[s], block_bytes_for(k, BLOCK))
    m.complete_load(keys, ctx)
    st = m.get_stats()["manager"]
    assert st["promoted_blocks"] == N and st["promotion_failures"] == 0
