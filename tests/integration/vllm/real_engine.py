"""vLLM 0.33's real ``Scheduler`` / ``AsyncScheduler`` and both halves of its real
``OffloadingConnector`` around kvtier, with a stand-in model runner that checks every token.

What is real: the ``VllmConfig`` (a ``ModelConfig`` built offline from a folder that holds only
a tiny model's ``config.json``), vLLM's KV cache planning (``get_kv_cache_configs``) from
per-layer KV cache specs, its KV allocation (``allocate_kv_cache``: one CPU backing buffer, one
``[B, H, N, C]`` view per layer, groups aliasing each other as on a GPU), the scheduler with
its KV cache manager, prefix cache, chunked prefill and preemption, the connector's scheduler
half (created by the scheduler) and its worker half (``register_kv_caches`` on those views),
and kvtier behind them.

What stands in: the model runner. For every scheduled token it writes, into each layer's slot
for that token, bytes derived from the request's tokens up to and including it; before each
step it checks that every token the scheduler calls computed (and that the layer still holds:
the window of a sliding-window layer) holds exactly its bytes, wherever they came from (this
engine's forward passes, a load from the CPU tier, or a block promoted from storage). It drives
the worker half in the model runner's order (``handle_preemptions``, ``bind_connector_metadata``,
``start_load_kv``, forward, ``wait_for_save``, ``get_finished``, ``build_connector_worker_meta``)
and samples a token derived from the prefix. The engine loop follows ``EngineCore.step`` or,
with ``async_scheduling``, ``step_with_batch_queue`` (two batches in flight).
"""

from __future__ import annotations

import json
import os
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import numpy as np
import torch
from vllm.config import (
    CacheConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
    OffloadingWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import (
    OffloadingConnector,
)
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_planning import get_global_kv_cache_groups, get_kv_cache_configs
from vllm.v1.core.kv_cache_utils import (
    generate_scheduler_kv_cache_config,
    get_request_block_hasher,
    init_none_hash,
    resolve_cache_hit_alignment_tokens,
    resolve_kv_cache_block_sizes,
)
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheSpec,
    MambaSpec,
    SlidingWindowSpec,
)
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.utils import allocate_kv_cache

BLOCK = 16  # tokens per GPU block
HEADS, HEAD_SIZE = 2, 16
VOCAB = 32000
LAYOUT = KVCacheLayout.LBNHC

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": HEADS,
    "head_dim": HEAD_SIZE, "num_hidden_layers": 2, "vocab_size": VOCAB,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "torch_dtype": "float16",
}

init_none_hash(sha256)


def full() -> FullAttentionSpec:
    """A full-attention layer's KV cache spec."""
    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_SIZE,
                             dtype=torch.float16)


def window(tokens: int) -> SlidingWindowSpec:
    """A sliding-window layer's KV cache spec."""
    return SlidingWindowSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_SIZE,
                             dtype=torch.float16, sliding_window=tokens)


def mamba() -> MambaSpec:
    """A Mamba layer's state spec in vLLM's "align" cache mode."""
    return MambaSpec(block_size=BLOCK, shapes=((4, 64), (2, 16, 16)),
                     dtypes=(torch.float16, torch.float32), mamba_cache_mode="align")


# Model layouts tested: the shape of their KV cache groups.
LAYOUTS: dict[str, Callable[[], dict[str, KVCacheSpec]]] = {
    # One full-attention group (Llama, Qwen, Mistral, ...).
    "full": lambda: {f"model.layers.{i}.self_attn.attn": full() for i in range(2)},
    # Full and sliding-window layers alternating (gpt-oss): one group of each.
    "full+swa": lambda: {
        f"model.layers.{i}.self_attn.attn": window(48) if i % 2 == 0 else full()
        for i in range(4)
    },
    # Five sliding-window layers to one full layer (Gemma 3): six groups of one layer.
    "gemma3": lambda: {
        f"model.layers.{i}.self_attn.attn": full() if i % 6 == 5 else window(64)
        for i in range(6)
    },
    # Mamba layers with one attention layer (Jamba, Nemotron-H, Granite 4): four groups.
    "mamba": lambda: {
        f"model.layers.{i}.mixer": full() if i == 3 else mamba() for i in range(4)
    },
}


def model_dir(root: Path) -> str:
    """A folder that holds only a tiny Llama's config.json (vLLM loads nothing else)."""
    d = root / "tiny-llama"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(d)


def make_vllm_config(
    model: str, extra: dict[str, Any], *, layout: str = "full", async_scheduling: bool = False,
    max_num_seqs: int = 8, max_batched_tokens: int = 128, max_model_len: int = 256,
    engine_id: str | None = None, world_size: int = 1, rank: int = 0,
) -> VllmConfig:
    """vLLM's config for the tiny model with kvtier behind the OffloadingConnector."""
    model_config = ModelConfig(model=model, skip_tokenizer_init=True, dtype="float16",
                               max_model_len=max_model_len)
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=True,
                        mamba_cache_mode="align" if layout == "mamba" else "none")
    cfg = VllmConfig(
        model_config=model_config,
        cache_config=cache,
        scheduler_config=SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched_tokens,
            max_model_len=max_model_len, is_encoder_decoder=False,
            enable_chunked_prefill=True, async_scheduling=async_scheduling,
        ),
        kv_transfer_config=KVTransferConfig(
            kv_connector="OffloadingConnector", kv_role="kv_both",
            kv_connector_extra_config=extra, engine_id=engine_id,
        ),
    )
    cfg.cache_config.kv_cache_layout = LAYOUT.name
    if world_size > 1:
        cfg.parallel_config.tensor_parallel_size = world_size
        cfg.parallel_config.world_size = world_size
        cfg.parallel_config.rank = rank
    return cfg


def plan_kv_cache(vllm_config: VllmConfig, specs: dict[str, KVCacheSpec],
                  num_gpu_blocks: int) -> tuple[KVCacheConfig, KVCacheConfig, int, int]:
    """vLLM's KV cache plan for ``num_gpu_blocks`` blocks, as EngineCore makes it.

    Returns (worker config, scheduler config, scheduler block size, hash block size).
    """
    vllm_config.cache_config.num_gpu_blocks_override = num_gpu_blocks
    groups = get_global_kv_cache_groups(vllm_config, [specs])
    (worker_cfg,) = get_kv_cache_configs(vllm_config, [specs], [1 << 40], groups)
    worker_cfg.kv_cache_layout = vllm_config.cache_config.kv_cache_layout
    sched_cfg = generate_scheduler_kv_cache_config([worker_cfg])
    vllm_config.cache_config.num_gpu_blocks = sched_cfg.num_blocks
    block_size, hash_block_size = resolve_kv_cache_block_sizes(sched_cfg, vllm_config)
    align = resolve_cache_hit_alignment_tokens(sched_cfg, vllm_config, block_size,
                                               hash_block_size)
    for c in (worker_cfg, sched_cfg):
        c.hash_block_size = hash_block_size
        c.cache_hit_alignment_tokens = align
    return worker_cfg, sched_cfg, block_size, hash_block_size


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
                 acknowledge: bool = False) -> None:
        self.cfg = kv_cache_config
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


@dataclass
class Job:
    """One request of a workload."""

    tokens: list[int]
    max_tokens: int = 4
    arrive_step: int = 0


class RealEngine:
    """vLLM's scheduler, the real connector halves, kvtier, and the stand-in runner."""

    def __init__(self, root: Path, extra: dict[str, Any] | None, *, layout: str = "full",
                 async_scheduling: bool = False, num_gpu_blocks: int = 256,
                 max_num_seqs: int = 8, max_batched_tokens: int = 128,
                 world_size: int = 1, max_model_len: int = 256,
                 worker_half: bool = True) -> None:
        self.layout = layout
        self.vllm_config = make_vllm_config(
            model_dir(root), extra or {}, layout=layout, async_scheduling=async_scheduling,
            max_num_seqs=max_num_seqs, max_batched_tokens=max_batched_tokens,
            world_size=world_size, max_model_len=max_model_len)
        if extra is None:
            self.vllm_config.kv_transfer_config = None
        specs = LAYOUTS[layout]()
        if world_size > 1:  # each tensor-parallel rank holds its share of the KV heads
            specs = {n: replace(sp, num_kv_heads=HEADS // world_size)  # type: ignore[call-arg]
                     for n, sp in specs.items()}
        worker_cfg, sched_cfg, block_size, hash_block_size = plan_kv_cache(
            self.vllm_config, specs, num_gpu_blocks)
        cls = AsyncScheduler if async_scheduling else Scheduler
        self.scheduler = cls(
            vllm_config=self.vllm_config, kv_cache_config=sched_cfg,
            structured_output_manager=StructuredOutputManager(self.vllm_config),
            block_size=block_size, hash_block_size=hash_block_size, log_stats=True,
        )
        self.connector: Any = self.scheduler.connector
        if self.connector is not None:  # observe the tokens each request gets from kvtier
            matched = self.connector.get_num_new_matched_tokens

            def observe(request: Request, *args: Any, **kwargs: Any) -> Any:
                n, is_async = matched(request, *args, **kwargs)
                if n:
                    rid = request.request_id
                    self.hit_tokens[rid] = max(self.hit_tokens.get(rid, 0), n)
                return n, is_async

            self.connector.get_num_new_matched_tokens = observe
            sources = self.connector.get_external_cache_hit_sources

            def observe_sources(request: Request, n: int) -> Any:
                got = sources(request, n)
                for source, tokens in got.items():
                    self.hit_sources[str(source.value)] += tokens
                return got

            self.connector.get_external_cache_hit_sources = observe_sources
        self.worker_kv_cache_config = worker_cfg
        self.worker_connector: OffloadingConnector | None = None
        self.runner: Any = None  # set by the caller when the workers live elsewhere
        if world_size == 1:
            if extra is not None and worker_half:
                self.worker_connector = OffloadingConnector(
                    self.vllm_config, KVConnectorRole.WORKER, worker_cfg)
            self.runner = StandInRunner(self.vllm_config, worker_cfg, self.worker_connector,
                                        acknowledge=extra is not None and not worker_half)
        self.hasher = get_request_block_hasher(hash_block_size, sha256)
        self.async_scheduling = async_scheduling
        self.prompts: dict[str, list[int]] = {}
        self.finished: dict[str, RequestStatus] = {}
        self.hit_tokens: dict[str, int] = {}
        self.hit_sources: Counter[str] = Counter()  # tokens loaded, by vLLM's hit source
        self.steps = 0
        self._ids = 0
        self._queue: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()
        self.on_step: list[Callable[[RealEngine, SchedulerOutput], None]] = []
        self.schedule_seconds = 0.0

    @property
    def manager(self) -> Any:
        """The connector's offloading manager (kvtier's adapter)."""
        return self.connector.connector_scheduler.manager

    def add(self, tokens: list[int], max_tokens: int = 4) -> str:
        """Add a request; its id."""
        self._ids += 1
        req_id = f"r{self._ids}"
        req = Request(request_id=req_id, prompt_token_ids=list(tokens),
                      sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                      pooling_params=None, block_hasher=self.hasher)
        self.prompts[req_id] = list(tokens)
        self.scheduler.add_request(req)
        return req_id

    def _update(self, out: SchedulerOutput, result: ModelRunnerOutput) -> None:
        outputs = self.scheduler.update_from_output(out, result)
        for eco in outputs.values():
            for o in eco.outputs:
                if o.finish_reason is not None:
                    self.finished[o.request_id] = RequestStatus.FINISHED_LENGTH_CAPPED

    def step(self) -> bool:
        """One engine step (with async scheduling: keep two batches in flight).

        True when the step scheduled tokens.
        """
        import time

        self.steps += 1
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        self.schedule_seconds += time.perf_counter() - t0
        for hook in self.on_step:
            hook(self, out)
        result = self.runner.execute(out, self.prompts)
        if not self.async_scheduling:
            self._update(out, result)
            return out.total_num_scheduled_tokens > 0
        self._queue.appendleft((out, result))
        if len(self._queue) >= 2:
            self._update(*self._queue.pop())
        if out.total_num_scheduled_tokens == 0:  # nothing new in flight: take every result
            while self._queue:
                self._update(*self._queue.pop())
        return out.total_num_scheduled_tokens > 0

    def busy(self) -> bool:
        """Requests or connector work remain."""
        return bool(self._queue) or self.scheduler.has_requests()

    def run(self, jobs: Sequence[Job], max_seconds: float = 100.0) -> None:
        """Feed the jobs at their arrival steps and step until everything is done.

        A step that schedules nothing (requests wait for kvtier's tiers) yields the CPU for a
        millisecond, as a model step would take time; ``max_seconds`` bounds the whole run.
        """
        import time

        pending = sorted(jobs, key=lambda j: j.arrive_step)
        i = 0
        deadline = time.monotonic() + max_seconds
        while i < len(pending) or self.busy():
            while i < len(pending) and pending[i].arrive_step <= self.steps:
                self.add(pending[i].tokens, pending[i].max_tokens)
                i += 1
            if not self.step():
                time.sleep(0.001)
            if time.monotonic() > deadline:
                raise AssertionError(f"not done after {max_seconds} s\n{self.diagnose()}")

    def diagnose(self) -> str:
        """What the unfinished requests wait for (for a failing test's message)."""
        lines = []
        cs = self.connector.connector_scheduler if self.connector is not None else None
        for r in list(self.scheduler.requests.values())[:6]:
            lines.append(f"{r.request_id} {r.status.name} computed {r.num_computed_tokens}"
                         f" of {r.num_tokens}")
            st = cs._req_status.get(r.request_id) if cs is not None else None
            if st is None:
                continue
            lines.append(f"  jobs {sorted(st.transfer_jobs)} being loaded "
                         f"{len(cs._chunks_being_loaded or ())}")
            for gi, g in enumerate(st.group_states):
                answers = [self.manager.lookup(k, st.req_context).name[0] for k in g.offload_keys]
                lines.append(f"  group {gi}: {''.join(answers)}")
        if cs is not None:
            kv = self.manager.kv
            lines.append(f"connector jobs {len(cs._jobs)}; kvtier promoting {len(kv._promoting)}"
                         f", tier jobs {len(kv._jobs)}, free {len(kv.primary.free)}, evictable "
                         f"{kv.primary.evictable}")
            for job_id, job in kv._jobs.items():
                lines.append(f"  tier job {job_id}: {job.kind} tier {job.tier} {len(job.keys)} keys"
                             f" since step {job.step} (now {kv._step})")
            for tier in kv.tiers:
                q = (len(getattr(tier, "_load_q", ())), len(getattr(tier, "_store_q", ())))
                lines.append(f"  {tier.name}: queues {q} in flight "
                             f"{getattr(tier, '_in_flight', '?')}")
            import sys
            import threading
            import traceback

            frames = sys._current_frames()
            for t in threading.enumerate():
                if t.name.startswith("kvtier") and t.ident in frames:
                    top = traceback.extract_stack(frames[t.ident])[-3:]
                    lines.append(f"  {t.name}: " + " <- ".join(
                        f"{f.name}:{f.lineno}" for f in reversed(top)))
        return "\n".join(lines)

    def settle(self, max_seconds: float = 120.0) -> None:
        """Step until the connector and kvtier have nothing in flight."""
        import time

        deadline = time.monotonic() + max_seconds
        while self.busy() or (self.connector is not None and self.manager.has_pending_work()):
            self.step()
            time.sleep(0.001)
            if time.monotonic() > deadline:
                raise AssertionError(f"kvtier did not settle\n{self.diagnose()}")

    def close(self) -> None:
        """Shut both connector halves down."""
        if self.worker_connector is not None:
            self.worker_connector.shutdown()
        if self.connector is not None:
            self.connector.shutdown()
