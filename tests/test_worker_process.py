"""The worker, in its own process, moves engine KV (CPU torch tensors) to and from primary slots."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import pickle
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from helpers import lookup_until, make_key, settle

import kvtier

NUM_GPU_BLOCKS = 64
LAYERS = 3
# per layer: K and V of (16 tokens x 2 heads x 32 dims) fp16 = 2 KiB each; 3 layers -> 12 KiB
SHAPE = (NUM_GPU_BLOCKS, 2, 16, 2, 32)
BYTES_PER_GPU_BLOCK = LAYERS * 2 * 16 * 2 * 32 * 2


def _kv(seed: int | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    if g is None:
        return [torch.zeros(SHAPE, dtype=torch.float16) for _ in range(LAYERS)]
    return [torch.randn(SHAPE, generator=g, dtype=torch.float32).to(torch.float16)
            for _ in range(LAYERS)]


def _worker_main(spec_bytes: bytes, conn) -> None:
    spec = pickle.loads(spec_bytes)
    kv = _kv(seed=1234)  # the "engine" computed these
    worker = spec.get_worker(kv)
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            op, job_id, gpu_ids, slot_ids = msg
            if op == "store":
                ok = worker.transfer_async(job_id, kvtier.GPULoadStoreSpec(gpu_ids),
                                           kvtier.LoadStoreSpec(slot_ids))
            else:
                for t in kv:  # wipe the destination blocks first: the load must refill them
                    t[torch.as_tensor(gpu_ids)] = 0
                ok = worker.transfer_async(job_id, kvtier.LoadStoreSpec(slot_ids),
                                           kvtier.GPULoadStoreSpec(gpu_ids))
            worker.wait([job_id])
            done = worker.get_finished()
            same = None
            if op == "load":
                ref = _kv(seed=1234)
                idx = torch.as_tensor(np.asarray(gpu_ids))
                same = all(torch.equal(a[idx], b[idx]) for a, b in zip(kv, ref))
            conn.send((ok, [(r.job_id, r.success) for r in done], same))
    finally:
        worker.shutdown()


@pytest.mark.parametrize("block_size", [16, 32])
def test_round_trip_through_worker_process(block_size: int, namespace: str) -> None:
    f = block_size // 16
    slots = 8
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": slots * BYTES_PER_GPU_BLOCK * f, "block_size": block_size,
         "eviction_policy": "lru", "secondary_tiers": [{"type": "example", "custom_param": 67}]},
        gpu_block_size=16, bytes_per_gpu_block=BYTES_PER_GPU_BLOCK, namespace=namespace)
    manager = spec.get_manager()
    ctx_ = mp.get_context("spawn")
    parent, child = ctx_.Pipe()
    proc = ctx_.Process(target=_worker_main, args=(pickle.dumps(spec), child))
    proc.start()
    try:
        n_blocks = 3 * slots  # 3x what the primary holds
        gpu_for = {}
        keys = [make_key(i, namespace) for i in range(n_blocks)]
        rng = np.random.default_rng(0)
        gpu_perm = rng.permutation(NUM_GPU_BLOCKS)[: n_blocks * f]
        job = 0
        ctx = kvtier.ReqContext("r")
        for i, key in enumerate(keys):
            gpu_ids = gpu_perm[i * f : (i + 1) * f].tolist()
            gpu_for[key] = gpu_ids
            out = manager.prepare_store([key], ctx)
            for _ in range(5000):  # every slot may still be read by a cascade: step and retry
                if out is not None:
                    break
                time.sleep(0.002)
                manager.on_schedule_end()
                out = manager.prepare_store([key], ctx)
            assert out is not None
            job += 1
            parent.send(("store", job, gpu_ids, out.store_spec.block_ids.tolist()))
            ok, done, _ = parent.recv()
            assert ok and done == [(job, True)]
            manager.complete_store([key], ctx)
            manager.on_schedule_end()
        settle(manager)
        for key in keys:
            assert lookup_until(manager, [key], ctx) == 1
            spec_load = manager.prepare_load([key], ctx)
            job += 1
            parent.send(("load", job, gpu_for[key], spec_load.block_ids.tolist()))
            ok, done, same = parent.recv()
            manager.complete_load([key], ctx)
            assert ok and done == [(job, True)]
            assert same, "bytes loaded into the engine tensors differ from what was stored"
        assert manager.get_stats()["manager"]["promoted_blocks"] >= 2 * slots
    finally:
        parent.send(None)
        proc.join(timeout=30)
        manager.shutdown()
    assert proc.exitcode == 0


def test_worker_rejects_mismatched_geometry(namespace: str) -> None:
    spec = kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20}, gpu_block_size=16,
                                        bytes_per_gpu_block=BYTES_PER_GPU_BLOCK + 2,
                                        namespace=namespace)
    m = spec.get_manager()
    try:
        with pytest.raises(ValueError, match="bytes_per_gpu_block"):
            spec.get_worker(_kv())
    finally:
        m.shutdown()


def test_spec_pickles_with_instance_id() -> None:
    spec = kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20}, instance_id="engine-a")
    clone = pickle.loads(pickle.dumps(spec))
    assert clone.instance_id == "engine-a" and clone.region_name == spec.region_name
    other = kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20})
    assert other.instance_id != kvtier.TieringOffloadingSpec({"cpu_bytes_to_use": 1 << 20}).instance_id


@contextlib.contextmanager
def _manager_and_worker(namespace: str, seed: int) -> Iterator[tuple[Any, list[torch.Tensor], Any]]:
    """A manager with a CPU tier of 8 blocks, engine tensors and the worker over them."""
    spec = kvtier.TieringOffloadingSpec(
        {"cpu_bytes_to_use": 8 * BYTES_PER_GPU_BLOCK},
        gpu_block_size=16, bytes_per_gpu_block=BYTES_PER_GPU_BLOCK, namespace=namespace,
    )
    manager = spec.get_manager()
    kv = _kv(seed=seed)
    worker = spec.get_worker(kv)
    try:
        yield manager, kv, worker
    finally:
        worker.shutdown()
        manager.shutdown()


def test_wait_returns_for_finished_and_unknown_jobs() -> None:
    """An engine may flush a job again before it heard the job finished: wait must not hang."""
    with _manager_and_worker("wait-test", 7) as (manager, kv, worker):
        assert worker.transfer_async(1, kvtier.GPULoadStoreSpec([3]), kvtier.LoadStoreSpec([0]))
        worker.wait([1])
        worker.wait([1])  # asked again (as vLLM's connector does under async scheduling)
        worker.wait([99])  # never submitted here
        assert [(r.job_id, r.success) for r in worker.get_finished()] == [(1, True)]
        region = manager.primary_blocks()
        want = np.concatenate([t[3].numpy().view(np.uint8).reshape(-1) for t in kv])
        assert np.array_equal(region[0], want)


def test_wait_all_returns_once_every_started_copy_is_done() -> None:
    """``wait_all`` blocks until every copy started so far is finished; each is reported once."""
    with _manager_and_worker("wait-all-test", 11) as (manager, kv, worker):
        worker.wait_all()  # nothing in flight: returns at once
        for job, (gpu, slot) in enumerate([(1, 0), (2, 1), (5, 2)], start=1):
            assert worker.transfer_async(job, kvtier.GPULoadStoreSpec([gpu]), kvtier.LoadStoreSpec([slot]))
        worker.wait_all()
        assert sorted(r.job_id for r in worker.get_finished()) == [1, 2, 3]
        assert worker.get_finished() == []
        region = manager.primary_blocks()
        for gpu, slot in [(1, 0), (2, 1), (5, 2)]:
            want = np.concatenate([t[gpu].numpy().view(np.uint8).reshape(-1) for t in kv])
            assert np.array_equal(region[slot], want)
