"""The offloading worker: engine KV tensors <-> primary slots, asynchronously.

Slot layout. ``kv_caches`` is a list of tensors whose first dimension indexes engine blocks; an
offloaded block covers ``f = block_size // gpu_block_size`` engine blocks. Its slot holds, for
each tensor in list order, the ``f`` engine blocks' bytes of that tensor back to back::

    slot = [t0: blk0 blk1 .. blk(f-1)] [t1: blk0 .. blk(f-1)] ...

so one tensor's part of a slot is a ``(f, bytes_per_block_t)`` array and a whole job is one gather
(or scatter) per tensor.

On CPU tensors a background thread does the copies (torch releases the GIL while copying). On
CUDA tensors each direction has its own stream: a store gathers the engine blocks into a staging
buffer in slot layout on the GPU, then copies it to the (pinned) primary region with one DMA per
run of consecutive slots; a load does the reverse. Completion is tracked with CUDA events, so
``get_finished`` never waits.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtier.types import GPULoadStoreSpec, LoadStoreSpec, TransferResult

log = logging.getLogger("kvtier.transfer")

# Largest staging buffer one CUDA copy step uses; bigger jobs go in pieces on the same stream.
STAGING_BYTES = 256 << 20


@dataclass(frozen=True)
class SlotLayout:
    """Where each engine tensor's bytes sit inside a slot."""

    per_block: tuple[int, ...]  # bytes of one engine block, per tensor
    offsets: tuple[int, ...]  # byte offset of each tensor's part of a slot
    blocks_per_slot: int

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot."""
        return sum(self.per_block) * self.blocks_per_slot

    @classmethod
    def for_tensors(cls, per_block: Sequence[int], blocks_per_slot: int) -> SlotLayout:
        """Layout for tensors with the given per-engine-block sizes."""
        offsets, off = [], 0
        for b in per_block:
            offsets.append(off)
            off += b * blocks_per_slot
        return cls(tuple(per_block), tuple(offsets), blocks_per_slot)


def _byte_view(t: Any) -> Any:
    """A (num_blocks, bytes_per_block) uint8 view of an engine tensor (no copy)."""
    import torch

    if t.dim() == 1:
        t = t.view(t.shape[0], 1)
    flat = t.reshape(t.shape[0], -1)
    if flat.data_ptr() != t.data_ptr() or (flat.shape[1] > 1 and flat.stride(1) != 1):
        raise ValueError("each engine block of a KV tensor must be contiguous in memory")
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return flat


def _runs(slots: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive slot ids: (index in job, first slot, length)."""
    if len(slots) == 0:
        return []
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(slots)]))
    return [(int(a), int(slots[a]), int(b - a)) for a, b in zip(starts, ends)]


class OffloadingWorker:
    """Async block copies between engine KV tensors and the primary region."""

    def __init__(self, kv_caches: Sequence[Any], region: Any, blocks_per_slot: int,
                 bytes_per_gpu_block: int) -> None:
        import torch

        self._torch = torch
        if not kv_caches:
            raise ValueError("kv_caches is empty")
        self.region = region
        self.views = [_byte_view(t) for t in kv_caches]
        per_block = [int(v.shape[1]) for v in self.views]
        if sum(per_block) != bytes_per_gpu_block:
            raise ValueError(
                f"kv_caches hold {sum(per_block)} bytes per engine block, "
                f"bytes_per_gpu_block says {bytes_per_gpu_block}"
            )
        self.layout = SlotLayout.for_tensors(per_block, blocks_per_slot)
        if self.layout.slot_bytes != region.block_bytes:
            raise ValueError("slot size does not match the engine block geometry")
        self.device = kv_caches[0].device
        self.is_cuda = self.device.type == "cuda"
        self.primary = torch.from_numpy(region.array)  # (num_slots, slot_bytes) uint8, shared
        self._finished: deque[TransferResult] = deque()
        self._closed = False
        self._registered = False
        if self.is_cuda:
            self._pin_region()
            self._store_stream = torch.cuda.Stream(device=self.device)
            self._load_stream = torch.cuda.Stream(device=self.device)
            self._pending: list[tuple[int, Any, float, int]] = []  # job, event, t0, bytes
        else:
            self._jobs: queue.Queue[tuple[int, bool, np.ndarray, np.ndarray] | None] = queue.Queue()
            self._cv = threading.Condition()
            self._inflight: set[int] = set()  # CPU jobs submitted and not finished
            self._thread = threading.Thread(target=self._run_cpu, name="kvtier-worker", daemon=True)
            self._thread.start()

    # -- pinning ---------------------------------------------------------------------------
    def _pin_region(self) -> None:
        torch = self._torch
        ptr = self.primary.data_ptr()
        size = self.primary.numel()
        try:
            err = torch.cuda.cudart().cudaHostRegister(ptr, size, 0)
            code = int(err.value) if hasattr(err, "value") else int(err)
            self._registered = code == 0
            if not self._registered:
                log.warning("cudaHostRegister failed (%s): primary copies will not be async", code)
        except Exception as e:  # pragma: no cover - depends on the CUDA runtime
            log.warning("could not pin the primary region: %s", e)

    # -- the public calls ------------------------------------------------------------------
    def transfer_async(self, job_id: int, src: LoadStoreSpec, dst: LoadStoreSpec) -> bool:
        """Start copying ``src`` to ``dst`` (one engine spec, one primary spec). False: refused."""
        if self._closed:
            return False
        if isinstance(src, GPULoadStoreSpec) and not isinstance(dst, GPULoadStoreSpec):
            store, gpu, slots = True, src.block_ids, dst.block_ids
        elif isinstance(dst, GPULoadStoreSpec) and not isinstance(src, GPULoadStoreSpec):
            store, gpu, slots = False, dst.block_ids, src.block_ids
        else:
            log.error("transfer %d: need one GPULoadStoreSpec and one LoadStoreSpec", job_id)
            return False
        f = self.layout.blocks_per_slot
        if len(gpu) != f * len(slots):
            log.error(
                "transfer %d: %d engine blocks for %d slots (expected %d per slot)",
                job_id, len(gpu), len(slots), f,
            )
            return False
        gpu = np.asarray(gpu, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        if self.is_cuda:
            try:
                self._cuda_copy(job_id, store, gpu, slots)
            except Exception:
                log.exception("transfer %d failed to start", job_id)
                return False
        else:
            with self._cv:
                self._inflight.add(job_id)
            self._jobs.put((job_id, store, gpu, slots))
        return True

    def get_finished(self) -> list[TransferResult]:
        """Transfers finished since the last call."""
        if self.is_cuda:
            still = []
            for job_id, ev, t0, nbytes in self._pending:
                if ev.query():
                    self._finished.append(
                        TransferResult(job_id, True, nbytes, time.perf_counter() - t0)
                    )
                else:
                    still.append((job_id, ev, t0, nbytes))
            self._pending = still
        out = []
        while self._finished:
            out.append(self._finished.popleft())
        return out

    def wait(self, job_ids: Iterable[int]) -> None:
        """Block until the given transfers are finished (they are still reported once).

        Ids of transfers that already finished, or that this worker never started, return at
        once: an engine may ask again for a job it flushed before it heard the job was done.
        """
        ids = set(job_ids)
        if self.is_cuda:
            for job_id, ev, _t0, _n in self._pending:
                if job_id in ids:
                    ev.synchronize()
            return
        with self._cv:
            self._cv.wait_for(lambda: self._inflight.isdisjoint(ids) or self._closed)

    def wait_all(self) -> None:
        """Block until every transfer started so far is finished (they are still reported once
        by ``get_finished``): a caller that wants each step's copies done within the step."""
        if self.is_cuda:
            ids = {job_id for job_id, _ev, _t0, _n in self._pending}
        else:
            with self._cv:
                ids = set(self._inflight)
        self.wait(ids)

    def shutdown(self) -> None:
        """Finish in-flight copies, stop the thread, unpin. Idempotent."""
        if self._closed:
            return
        if self.is_cuda:
            self.wait_all()
            if self._registered:
                with contextlib.suppress(Exception):
                    self._torch.cuda.cudart().cudaHostUnregister(self.primary.data_ptr())
        else:
            self._jobs.put(None)
            self._thread.join(timeout=10)
        self._closed = True
        with contextlib.suppress(Exception):
            self.region.close()

    # -- CPU -------------------------------------------------------------------------------
    def _run_cpu(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                with self._cv:
                    self._cv.notify_all()
                return
            job_id, store, gpu, slots = item
            t0 = time.perf_counter()
            ok = True
            try:
                self._copy_cpu(store, gpu, slots)
            except Exception:
                log.exception("transfer %d failed", job_id)
                ok = False
            nbytes = len(slots) * self.layout.slot_bytes
            self._finished.append(TransferResult(job_id, ok, nbytes, time.perf_counter() - t0))
            with self._cv:
                self._inflight.discard(job_id)
                self._cv.notify_all()

    def _copy_cpu(self, store: bool, gpu: np.ndarray, slots: np.ndarray) -> None:
        torch = self._torch
        n, f = len(slots), self.layout.blocks_per_slot
        if n == 0:
            return
        gi = torch.from_numpy(gpu)
        si = torch.from_numpy(slots)
        P = self.primary
        for view, off, b in zip(self.views, self.layout.offsets, self.layout.per_block):
            part = P[:, off : off + f * b].view(P.shape[0], f, b)
            if store:
                part[si] = view.index_select(0, gi).view(n, f, b)
            else:
                view.index_copy_(0, gi, part.index_select(0, si).view(n * f, b))

    # -- CUDA ------------------------------------------------------------------------------
    def _cuda_copy(self, job_id: int, store: bool, gpu: np.ndarray, slots: np.ndarray) -> None:
        torch = self._torch
        t0 = time.perf_counter()
        stream = self._store_stream if store else self._load_stream
        f = self.layout.blocks_per_slot
        B = self.layout.slot_bytes
        chunk = max(1, STAGING_BYTES // B)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            gi_all = torch.from_numpy(gpu).to(self.device, non_blocking=True)
            for a in range(0, len(slots), chunk):
                s_part = slots[a : a + chunk]
                n = len(s_part)
                gi = gi_all[a * f : (a + n) * f]
                staging = torch.empty((n, B), dtype=torch.uint8, device=self.device)
                if store:
                    for view, off, b in zip(self.views, self.layout.offsets, self.layout.per_block):
                        dst = staging[:, off : off + f * b].view(n, f, b)
                        dst.copy_(view.index_select(0, gi).view(n, f, b))
                    for i, s, ln in _runs(s_part):
                        self.primary[s : s + ln].copy_(staging[i : i + ln], non_blocking=True)
                else:
                    for i, s, ln in _runs(s_part):
                        staging[i : i + ln].copy_(self.primary[s : s + ln], non_blocking=True)
                    for view, off, b in zip(self.views, self.layout.offsets, self.layout.per_block):
                        src = staging[:, off : off + f * b].reshape(n * f, b)
                        view.index_copy_(0, gi, src)
                staging.record_stream(stream)
            ev = torch.cuda.Event()
            ev.record(stream)
        self._pending.append((job_id, ev, t0, len(slots) * B))
