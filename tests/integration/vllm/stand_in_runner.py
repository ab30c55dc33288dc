"""The stand-in model runner of the real-scheduler tests (see ``real_engine.py``).

For every scheduled token it writes, into each layer's slot for that token, bytes derived from
the request's tokens up to and including it; before each step it checks that every token the
scheduler calls computed (and that the layer still holds: the window of a sliding-window layer)
holds exactly its bytes, wherever they came from (this engine's forward passes, a load from the
CPU tier, or a block promoted from storage). It drives the connector's worker half in the model
runner's order (``handle_preemptions``, ``bind_connector_metadata``, ``start_load_kv``, forward,
``wait_for_save``, ``get_finished``, ``build_connector_worker_meta``) and samples a token derived
from the prefix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
    OffloadingWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
    OffloadingConnector,
)
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import (
    KVCacheConfig,
    KVCacheSpec,
    MambaSpec,
    SlidingWindowSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.worker.utils import allocate_kv_cache
from vllm_layouts import LAYOUT, VOCAB


def token_values(tokens: Sequence[int]) -> np.ndarray:
    """One 64-bit value per position, a function of the tokens up to and including it."""
    out = np.empty(len(tokens), dtype=np.uint64)
    v = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for i, t in enumerate(tokens):
        v = ((v ^ (t + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) & mask
        v ^= v >> 31
        out[i] = v
    return out


@dataclass
class RunnerRequest:
    """What the stand-in model runner knows about one request."""

    tokens: list[int]
    block_ids: list[list[int]]  # per KV cache group
    values: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))

    def value_range(self, lo: int, hi: int) -> np.ndarray:
        """Values for positions [lo, hi), computing more as tokens grow."""
        if len(self.values) < hi:
            self.values = token_values(self.tokens)
        return self.values[lo:hi]


class StandInRunner:
    """Writes and checks per-token KV bytes; drives the connector's worker half."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig,
                 connector: OffloadingConnector | None, salt: int = 0,
                 acknowledge: bool = False, sync_transfers: bool = False) -> None:
        self.cfg = kv_cache_config
        # Wait for the worker half's copies before each step's transfer results, so that each
        # step's copies are reported in that step however fast the copy thread runs.
        self.sync_transfers = sync_transfers
        # No worker half: report every transfer job done without copying (for vLLM's own
        # specs, whose worker needs CUDA); loaded tokens then hold no bytes, so nothing is
        # checked and only the scheduler's behaviour is observed.
        self.acknowledge = acknowledge
        self.salt = salt  # a tensor-parallel rank's bytes differ from another rank's
        self.kv = allocate_kv_cache(kv_cache_config, torch.device("cpu"), LAYOUT)
        self.connector = connector
        if connector is not None:
            connector.register_kv_caches(self.kv)
        self.groups: list[tuple[KVCacheSpec, list[tuple[int, torch.Tensor]]]] = []
        names = list(self.kv)
        for g in kv_cache_config.kv_cache_groups:
            layers = [(names.index(n), self.kv[n]) for n in g.layer_names]
            self.groups.append((g.kv_cache_spec, layers))
        self.reqs: dict[str, RunnerRequest] = {}
        self.checked_tokens = 0
        self.wrong_tokens = 0
        self.wrong: list[str] = []
        self.steps = 0

    # -- bytes ----------------------------------------------------------------------------
    def _pattern(self, values: np.ndarray, layer: int, width: int) -> np.ndarray:
        """(n, width) uint8: each row the value's 8 bytes (mixed with layer and rank), repeated."""
        mix = ((layer + 1) * 0x9E3779B97F4A7C15 + self.salt * 0xD1B54A32D192ED03) & ((1 << 64) - 1)
        v = values ^ np.uint64(mix)
        raw = v.view(np.uint8).reshape(-1, 8)
        reps = -(-width // 8)
        return np.tile(raw, (1, reps))[:, :width]

    def _token_view(self, t: torch.Tensor, block: int, slot: int) -> np.ndarray:
        """One token's bytes of one layer in one block: a (H, C) byte view."""
        return t[block, :, slot, :].numpy().view(np.uint8)

    def _state_view(self, t: torch.Tensor, block: int, width: int) -> np.ndarray:
        """The first ``width`` bytes of a Mamba layer's state page in ``block``."""
        flat = t.view(torch.uint8).reshape(-1) if t.dim() == 1 else None
        if flat is not None:  # a raw buffer: index pages ourselves
            page = self.cfg.kv_cache_tensors[0].block_stride
            return flat[block * page : block * page + width].numpy()
        return t[block].reshape(-1).view(torch.uint8)[:width].numpy()

    def _write(self, r: RunnerRequest, lo: int, hi: int) -> None:
        values = r.value_range(0, hi)
        for (spec, layers), blocks in zip(self.groups, r.block_ids):
            bs = spec.block_size
            if isinstance(spec, MambaSpec):
                width = 64
                for b in range(lo // bs + 1, hi // bs + 1):  # states at block boundaries
                    if b - 1 < len(blocks) and blocks[b - 1]:
                        for li, t in layers:
                            self._state_view(t, blocks[b - 1], width)[:] = self._pattern(
                                values[b * bs - 1 : b * bs], li, width)[0]
                continue
            for pos in range(lo, hi):
                blk = blocks[pos // bs]
                if not blk:
                    continue
                for li, t in layers:
                    view = self._token_view(t, blk, pos % bs)
                    view.reshape(-1)[:] = self._pattern(values[pos : pos + 1], li, view.size)[0]

    def _check(self, req_id: str, r: RunnerRequest, computed: int) -> None:
        if computed == 0 or self.acknowledge:
            return
        values = r.value_range(0, computed)
        for gi, ((spec, layers), blocks) in enumerate(zip(self.groups, r.block_ids)):
            bs = spec.block_size
            if isinstance(spec, MambaSpec):
                if computed % bs:
                    continue  # align mode resumes at block boundaries only
                b = computed // bs - 1
                if b >= len(blocks) or not blocks[b]:
                    self._bad(req_id, gi, computed, "state block missing")
                    continue
                for li, t in layers:
                    want = self._pattern(values[computed - 1 : computed], li, 64)[0]
                    self.checked_tokens += 1
                    if not np.array_equal(self._state_view(t, blocks[b], 64), want):
                        self._bad(req_id, gi, computed, f"layer {li} state")
                continue
            lo = 0
            if isinstance(spec, SlidingWindowSpec):
                lo = max(0, computed - spec.sliding_window + 1)
            for pos in range(lo, computed):
                bi = pos // bs
                if bi >= len(blocks) or not blocks[bi]:
                    self._bad(req_id, gi, pos, "no block")
                    continue
                for li, t in layers:
                    view = self._token_view(t, blocks[bi], pos % bs)
                    want = self._pattern(values[pos : pos + 1], li, view.size)[0]
                    self.checked_tokens += 1
                    if not np.array_equal(view.reshape(-1), want):
                        self._bad(req_id, gi, pos, f"layer {li}")

    def _bad(self, req_id: str, group: int, pos: int, what: str) -> None:
        self.wrong_tokens += 1
        if len(self.wrong) < 20:
            self.wrong.append(f"{req_id} group {group} token {pos}: {what}")

    # -- one step -------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput, prompts: dict[str, list[int]]) -> ModelRunnerOutput:
        """Run one step: the connector's worker half around a checked "forward"."""
        self.steps += 1
        for req_id in out.finished_req_ids:
            self.reqs.pop(req_id, None)
        for copy in out.kv_cache_block_copies or ():
            for t in self.kv.values():
                if t.dim() > 1:
                    t[copy.dst_block_id].copy_(t[copy.src_block_id])
        for nr in out.scheduled_new_reqs:
            self.reqs[nr.req_id] = RunnerRequest(list(prompts[nr.req_id]),
                                                 [list(b) for b in nr.block_ids])
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            r = self.reqs[req_id]
            new = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                assert new is not None
                r.block_ids = [list(b) for b in new]
            elif new is not None:
                for blocks, extra in zip(r.block_ids, new):
                    blocks.extend(extra)
        conn = self.connector
        meta = out.kv_connector_metadata
        if conn is not None:
            assert meta is not None
            conn.handle_preemptions(meta)
            conn.bind_connector_metadata(meta)
            if out.has_sync_kv_loads:
                conn.start_load_kv(None)  # type: ignore[arg-type]
        computed = {nr.req_id: nr.num_computed_tokens for nr in out.scheduled_new_reqs}
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        req_ids: list[str] = []
        sampled: list[list[int]] = []
        for req_id, n in out.num_scheduled_tokens.items():
            r = self.reqs[req_id]
            c = computed[req_id]
            self._check(req_id, r, c)
            self._write(r, c, c + n)
            req_ids.append(req_id)
            if c + n >= len(r.tokens):
                tok = int(r.value_range(0, len(r.tokens))[-1] % VOCAB)
                r.tokens.append(tok)
                sampled.append([tok])
            else:
                sampled.append([])
        kv_out = None
        if conn is not None:
            if not out.has_sync_kv_loads:
                conn.start_load_kv(None)  # type: ignore[arg-type]
            conn.wait_for_save()
            if self.sync_transfers:  # this step's copies end within it, whatever the threads' pace
                conn.connector_worker.worker.kv.wait_all()
            results = conn.get_transfer_results(out.finished_req_ids)
            kv_out = KVConnectorOutput(
                finished_sending=results.finished_sending,
                finished_recving=results.finished_recving,
                kv_connector_worker_meta=conn.build_connector_worker_meta(),
            )
            conn.clear_connector_metadata()
        elif self.acknowledge and meta is not None:
            done = OffloadingWorkerMetadata()
            for job_id in [*meta.store_jobs, *meta.load_jobs]:
                done.mark_completed(job_id)
            kv_out = KVConnectorOutput(
                finished_recving={j.req_id for j in meta.load_jobs.values() if not j.sync},
                kv_connector_worker_meta=done,
            )
        return ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled, kv_connector_output=kv_out,
        )
