"""A CPU-only stand-in for vLLM's engine loop around the real OffloadingConnector halves.

What is real: vLLM 0.33.0's ``OffloadingSpecFactory``, ``OffloadingConnectorScheduler`` (every
lookup, load, store, event and stats call the adapter sees comes from it), its
``OffloadingConnectorWorker`` (submits stores and loads, reports finished jobs), ``Request``
with vLLM's own block hasher, ``SchedulerOutput``/``NewRequestData``/``KVConnectorOutput``, and
torch CPU tensors as the engine's KV cache.

What stands in: the engine's outer loop (this file's ``Engine.step``) plays vLLM's ``Scheduler``
and model runner for one request at a time: it calls the connector hooks in the order the
scheduler does (``get_num_new_matched_tokens`` -> ``update_state_after_alloc`` ->
``build_connector_meta``; then the worker's ``handle_preemptions`` -> ``start_kv_transfers`` ->
forward -> ``prepare_store_kv`` -> ``get_finished``; then ``update_connector_output``), hands
out GPU block ids from a free list, and "computes" a prompt by writing bytes derived from each
block's hash into the KV tensors. It runs one request at a time so that tests can place single
calls precisely; ``real_engine.py`` drives the same connector halves from vLLM's real
``Scheduler``.

vLLM's ``TieringOffloadingSpec`` cannot run its worker here: ``CPUOffloadingWorker`` asserts
CUDA (or XPU) KV tensors. For that spec the engine acknowledges each transfer job the
scheduler issues without copying bytes, so only its scheduler-side behaviour is compared.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import numpy as np
import torch
from vllm.config import CacheConfig, KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
    OffloadingWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler import (
    OffloadingConnectorScheduler,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.worker import (
    OffloadingConnectorWorker,
)
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock, get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.kv_offload.base import (
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    CanonicalKVCacheTensor,
)
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.factory import OffloadingSpecFactory
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request, RequestStatus

TOKENS_PER_BLOCK = 16
STEP_S = 0.01  # how long the stand-in's model step takes
LAYERS = ("model.layers.0.attn", "model.layers.1.attn")
ATTN = FullAttentionSpec(
    block_size=TOKENS_PER_BLOCK, num_kv_heads=2, head_size=16, dtype=torch.float16
)
PAGE = ATTN.page_size_bytes  # bytes of one layer's page of one block
BYTES_PER_BLOCK = PAGE * len(LAYERS)

init_none_hash(sha256)


def offloading_config(
    extra: dict[str, Any], blocks_per_chunk: int = 1, engine_id: str | None = None,
    num_groups: int = 1, rank: int = 0, world_size: int = 1,
) -> OffloadingConfig:
    """vLLM's OffloadingConfig for a 2-layer float16 model on one worker."""
    groups = tuple(
        OffloadingGroupConfig(
            tokens_per_block=TOKENS_PER_BLOCK, layer_names=LAYERS, group_id=g
        )
        for g in range(num_groups)
    )
    return OffloadingConfig(
        groups=groups,
        worker_kv_bytes_per_block=BYTES_PER_BLOCK,
        enable_kv_cache_events=True,
        extra_config=extra,
        engine_id=engine_id or f"engine-{uuid.uuid4().hex[:8]}",
        model=OffloadingModelConfig(name="test/tiny-llama", dtype="float16", max_model_len=8192),
        cache=OffloadingCacheConfig(tokens_per_hash=TOKENS_PER_BLOCK,
                                    blocks_per_chunk=blocks_per_chunk),
        parallel=OffloadingParallelConfig(
            rank=rank, world_size=world_size, tp_size=world_size, pp_size=1, pcp_size=1,
            dcp_size=1,
            data_parallel_index=0, data_parallel_size=1, data_parallel_rank_local=None,
            is_parallelism_agnostic=True,
        ),
    )


def expected_block(block_hash: bytes) -> np.ndarray:
    """The KV bytes the fake forward pass writes for a block (a function of its hash)."""
    seed = int.from_bytes(bytes(block_hash)[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, BYTES_PER_BLOCK, dtype=np.uint8)


@dataclass
class ReqRun:
    """What happened to one request."""

    request: Request
    hit_tokens: int | None = None
    lookups: list[int | None] = field(default_factory=list)  # per step: tokens or None
    steps_to_schedule: int = 0
    loaded_blocks: list[int] = field(default_factory=list)  # GPU block ids loaded into
    block_ids: list[int] = field(default_factory=list)


class Engine:
    """One engine: the real connector scheduler and worker halves over CPU KV tensors."""

    def __init__(self, extra: dict[str, Any], *, blocks_per_chunk: int = 1,
                 num_gpu_blocks: int = 256) -> None:
        self.kind = "kvtier" if extra.get("spec_module_path") == "kvtier.vllm" else "vllm"
        self.blocks_per_chunk = blocks_per_chunk
        self.config = offloading_config(extra, blocks_per_chunk)
        self.spec = OffloadingSpecFactory.create_spec(self.config)
        self.vllm_config = VllmConfig(
            kv_transfer_config=KVTransferConfig(
                kv_connector="OffloadingConnector", kv_role="kv_both",
                kv_connector_extra_config=extra, engine_id=self.config.engine_id,
            ),
            cache_config=CacheConfig(block_size=TOKENS_PER_BLOCK, enable_prefix_caching=False),
        )
        self.kv_cache_config = KVCacheConfig(
            num_blocks=num_gpu_blocks, kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(list(LAYERS), ATTN)],
        )
        self.sched = OffloadingConnectorScheduler(self.spec, self.vllm_config,
                                                  self.kv_cache_config)
        self.manager: Any = self.sched.manager  # KVTierManager or vLLM's manager
        self.kv = [torch.zeros((num_gpu_blocks, PAGE), dtype=torch.int8) for _ in LAYERS]
        self.worker: OffloadingConnectorWorker | None = None
        if self.kind == "kvtier":
            self.worker = OffloadingConnectorWorker(self.spec, self.vllm_config,
                                                    self.kv_cache_config)
            self.worker._init_worker(CanonicalKVCaches(
                tensors=[CanonicalKVCacheTensor(t, PAGE) for t in self.kv],
                group_data_refs=[[CanonicalKVCacheRef(i, PAGE) for i in range(len(LAYERS))]],
            ))
        self.free = list(range(1, num_gpu_blocks))  # block 0 is vLLM's null block
        self.finished: set[str] = set()
        self.pending_finish: set[str] = set()
        self.events: list[Any] = []
        self._ids = 0

    # -- requests -------------------------------------------------------------------------
    def new_request(self, tokens: list[int]) -> Request:
        """A real vLLM Request with vLLM's block hasher."""
        self._ids += 1
        req = Request(
            request_id=f"req-{self._ids}", prompt_token_ids=list(tokens),
            sampling_params=SamplingParams(max_tokens=1), pooling_params=None,
            block_hasher=get_request_block_hasher(TOKENS_PER_BLOCK, sha256),
        )
        return req

    def run(self, tokens: list[int], max_steps: int = 50) -> ReqRun:
        """Add a request, step until its prompt is computed, then finish it."""
        req = self.new_request(tokens)
        run = ReqRun(req)
        self.sched.on_new_request(req)
        loading = False
        for _ in range(max_steps):
            out = SchedulerOutput.make_empty()
            out.finished_req_ids = self.pending_finish
            self.pending_finish = set()
            scheduled = False
            if loading:
                if req.request_id in self.finished:
                    loading = False
                    scheduled = True
            else:
                n, is_async = self.sched.get_num_new_matched_tokens(req, 0)
                run.lookups.append(n)
                if n is not None:
                    run.hit_tokens = n
                    nblocks = -(-req.num_tokens // TOKENS_PER_BLOCK)
                    run.block_ids = [self.free.pop(0) for _ in range(nblocks)]
                    blocks = KVCacheBlocks(
                        blocks=([KVCacheBlock(block_id=b) for b in run.block_ids],))
                    self.sched.update_state_after_alloc(req, blocks, n)
                    run.loaded_blocks = run.block_ids[: n // TOKENS_PER_BLOCK]
                    req.num_computed_tokens = n
                    if n and is_async:
                        loading = True
                    else:
                        scheduled = True
            if not scheduled:
                run.steps_to_schedule += 1
            if scheduled:
                out.scheduled_new_reqs = [NewRequestData.from_request(req, (run.block_ids,))]
                out.num_scheduled_tokens = {req.request_id: req.num_tokens - req.num_computed_tokens}
                out.total_num_scheduled_tokens = req.num_tokens - req.num_computed_tokens
            meta = self.sched.build_connector_meta(out)
            self._worker_step(meta, run if scheduled else None)
            if not scheduled:
                time.sleep(STEP_S)  # the model step: transfers and tier jobs run meanwhile
            if scheduled:
                req.num_computed_tokens = req.num_tokens
                req.status = RequestStatus.FINISHED_LENGTH_CAPPED
                self.sched.request_finished(req)
                self.pending_finish.add(req.request_id)
                self.events.extend(self.sched.take_events())
                return run
            self.events.extend(self.sched.take_events())
        raise AssertionError(f"request not scheduled in {max_steps} steps: {run.lookups}")

    def _worker_step(self, meta: Any, run: ReqRun | None) -> None:
        recv: set[str] = set()
        if self.worker is not None:
            self.worker.handle_preemptions(meta)
            self.worker.start_kv_transfers(meta)
            if run is not None:
                self._forward(run)
            self.worker.prepare_store_kv(meta)
            _, recv = self.worker.get_finished(set())
            wmeta = self.worker.build_connector_worker_meta()
        else:
            if run is not None:
                self._forward(run)
            wmeta = OffloadingWorkerMetadata()
            for job_id in list(meta.store_jobs) + list(meta.load_jobs):
                wmeta.mark_completed(job_id)
            recv = {job.req_id for job in meta.load_jobs.values()}
        self.finished |= recv
        self.sched.update_connector_output(
            KVConnectorOutput(finished_recving=recv, kv_connector_worker_meta=wmeta))

    def _forward(self, run: ReqRun) -> None:
        """Compute the blocks not loaded: write each block's bytes from its hash."""
        req = run.request
        done = req.num_computed_tokens // TOKENS_PER_BLOCK
        for j in range(done, req.num_tokens // TOKENS_PER_BLOCK):
            self.write_block(run.block_ids[j], req.block_hashes[j])
        for b in run.block_ids:  # the blocks go back to the pool after the request
            self.free.append(b)

    def write_block(self, block_id: int, block_hash: bytes) -> None:
        """Put a block's expected bytes into the engine KV tensors."""
        data = torch.from_numpy(expected_block(block_hash).view(np.int8))
        for i, t in enumerate(self.kv):
            t[block_id] = data[i * PAGE : (i + 1) * PAGE]

    def block_bytes(self, block_id: int) -> np.ndarray:
        """The KV bytes of one engine block, all layers."""
        return np.concatenate([t[block_id].numpy().view(np.uint8) for t in self.kv])

    def idle(self, steps: int = 1) -> None:
        """Empty engine steps (finished requests' stores, tier jobs, acks)."""
        for _ in range(steps):
            out = SchedulerOutput.make_empty()
            out.finished_req_ids = self.pending_finish
            self.pending_finish = set()
            meta = self.sched.build_connector_meta(out)
            self._worker_step(meta, None)
            self.events.extend(self.sched.take_events())

    def settle(self, timeout: float = 20.0) -> None:
        """Step until every transfer and tier job is done."""
        deadline = time.monotonic() + timeout
        self.idle(2)
        while self.sched._jobs or self.manager.has_pending_work():
            if time.monotonic() > deadline:
                raise TimeoutError("transfers did not finish")
            time.sleep(0.002)
            self.idle()

    def close(self) -> None:
        """Shut both halves down."""
        if self.worker is not None:
            self.worker.shutdown()
        self.sched.shutdown()


def kvtier_extra(**over: Any) -> dict[str, Any]:
    """kv_connector_extra_config selecting kvtier."""
    extra: dict[str, Any] = {"spec_name": "KVTierOffloadingSpec", "spec_module_path": "kvtier.vllm"}
    extra.update(over)
    return extra


def vllm_extra(**over: Any) -> dict[str, Any]:
    """kv_connector_extra_config selecting vLLM's own TieringOffloadingSpec."""
    extra: dict[str, Any] = {"spec_name": "TieringOffloadingSpec"}
    extra.update(over)
    return extra


