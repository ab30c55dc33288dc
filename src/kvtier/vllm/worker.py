"""Worker side: vLLM's ``OffloadingWorker`` over kvtier's, canonical KV tensors <-> primary slots.

vLLM's canonical KV tensors (``(num_blocks, page_bytes)`` int8) are handed to kvtier's
``OffloadingWorker``; loads that start or end inside an offloaded block (a GPU prefix-cache hit
covering part of it) copy those partial blocks themselves. With several workers (tensor or
pipeline parallel ranks) a slot holds every rank's pages side by side, and each rank copies its
own share.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

import kvtier
from kvtier.vllm._base import (
    BlockIDsLoadStoreSpec,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)

log = logging.getLogger("kvtier.vllm")


class _RankRegion:
    """One worker's share of each primary slot: a (num_slots, page bytes) view of the region."""

    def __init__(self, region: Any, rank: int, world_size: int) -> None:
        self._region = region
        self.block_bytes = region.block_bytes // world_size
        lo = rank * self.block_bytes
        self.array = region.array[:, lo : lo + self.block_bytes]

    def close(self) -> None:
        """Detach from the region."""
        self._region.close()


class KVTierWorker(OffloadingWorker):
    """vLLM's ``OffloadingWorker`` over kvtier's: canonical KV tensors <-> primary slots."""

    def __init__(self, worker: kvtier.OffloadingWorker, blocks_per_chunk: int) -> None:
        self.kv = worker
        self.f = blocks_per_chunk

    def submit_store(
        self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec
    ) -> bool:
        """Engine blocks -> primary slots, asynchronously."""
        assert isinstance(dst_spec, BlockIDsLoadStoreSpec)
        return self._submit(job_id, src_spec, dst_spec.block_ids, store=True)

    def submit_load(
        self,
        job_id: int,
        src_spec: LoadStoreSpec,
        dst_spec: GPULoadStoreSpec,
        expedited: bool = False,
    ) -> bool:
        """Primary slots -> engine blocks, asynchronously."""
        assert isinstance(src_spec, BlockIDsLoadStoreSpec)
        return self._submit(job_id, dst_spec, src_spec.block_ids, store=False)

    def _submit(
        self, job_id: int, gpu_spec: GPULoadStoreSpec, slots: np.ndarray, store: bool
    ) -> bool:
        gpu = np.asarray(gpu_spec.block_ids, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        f = self.f
        whole_gpu, whole_slots = gpu, slots
        if f > 1:
            split = self._split(gpu, slots, gpu_spec.group_sizes, gpu_spec.block_indices)
            if split is None:
                log.error(
                    "transfer %d: %d engine blocks in groups %s do not fit %d slots",
                    job_id, len(gpu), list(gpu_spec.group_sizes), len(slots),
                )
                return False
            whole_gpu, whole_slots, parts = split
            try:
                self._copy_parts(parts, store)
            except Exception:
                log.exception("transfer %d: partial-block copy failed", job_id)
                return False
        return self.kv.transfer_async(
            job_id,
            kvtier.GPULoadStoreSpec(whole_gpu) if store else kvtier.LoadStoreSpec(whole_slots),
            kvtier.LoadStoreSpec(whole_slots) if store else kvtier.GPULoadStoreSpec(whole_gpu),
        )

    def _split(
        self,
        gpu: np.ndarray,
        slots: np.ndarray,
        group_sizes: Sequence[int],
        block_indices: Sequence[int],
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]] | None:
        """Split a job into whole offloaded blocks and single engine blocks (partial ones).

        Engine blocks come group after group (``group_sizes``), each group's blocks logically
        consecutive from ``block_indices[g]``, its slots in the same order. A group may start
        and end inside an offloaded block (a GPU prefix hit, a window's edge): those engine
        blocks are returned as ``(engine block, slot, sub-block index)``. None: the sizes do
        not add up.
        """
        f = self.f
        if len(group_sizes) == 1 and block_indices[0] % f == 0 and len(gpu) == f * len(slots):
            return gpu, slots, []
        whole_gpu: list[np.ndarray] = []
        whole_slots: list[np.ndarray] = []
        parts: list[tuple[int, int, int]] = []
        g0 = s0 = 0
        for n, index in zip(group_sizes, block_indices):
            if n == 0:
                continue
            skip = int(index) % f
            n_slots = -(-(n + skip) // f)
            g, s = gpu[g0 : g0 + n], slots[s0 : s0 + n_slots]
            if len(g) != n or len(s) != n_slots:
                return None
            g0 += n
            s0 += n_slots
            head = min((f - skip) % f, n)
            n_whole = (n - head) // f
            tail = n - head - n_whole * f
            for j in range(head):
                parts.append((int(g[j]), int(s[0]), skip + j))
            first = 1 if head else 0
            whole_gpu.append(g[head : head + n_whole * f])
            whole_slots.append(s[first : first + n_whole])
            for j in range(tail):
                parts.append((int(g[head + n_whole * f + j]), int(s[first + n_whole]), j))
        if g0 != len(gpu) or s0 != len(slots):
            return None
        empty = np.empty(0, dtype=np.int64)
        return (
            np.concatenate(whole_gpu) if whole_gpu else empty,
            np.concatenate(whole_slots) if whole_slots else empty,
            parts,
        )

    def _copy_parts(self, parts: list[tuple[int, int, int]], store: bool) -> None:
        """Copy single engine blocks to/from one sub-block of a slot (on the job's stream)."""
        if not parts:
            return
        w = self.kv
        layout = w.layout
        f = layout.blocks_per_slot
        stream = None
        if w.is_cuda:
            import torch

            stream = w._store_stream if store else w._load_stream
            stream.wait_stream(torch.cuda.current_stream(w.device))
        ctx: Any
        if stream is not None:
            import torch

            ctx = torch.cuda.stream(stream)
        else:
            import contextlib

            ctx = contextlib.nullcontext()
        with ctx:
            for gid, slot, k in parts:
                for view, off, b in zip(w.views, layout.offsets, layout.per_block):
                    assert k < f
                    host = w.primary[slot, off + k * b : off + (k + 1) * b]
                    if store:
                        host.copy_(view[gid], non_blocking=stream is not None)
                    else:
                        view[gid].copy_(host, non_blocking=stream is not None)

    def get_finished(self) -> list[TransferResult]:
        """Transfers finished since the last call."""
        return [
            TransferResult(r.job_id, r.success, r.transfer_size, r.transfer_time)
            for r in self.kv.get_finished()
        ]

    def wait(self, job_ids: set[int]) -> None:
        """Block until the given transfers are done."""
        self.kv.wait(job_ids)

    def shutdown(self) -> None:
        """Finish in-flight copies and detach."""
        self.kv.shutdown()


