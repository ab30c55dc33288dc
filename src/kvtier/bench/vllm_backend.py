"""Replaying through vLLM 0.33's own TieringOffloadingManager (CPU + its ``fs`` tier).

The engine simulator drives vLLM's manager through vLLM's own interface: one ``lookup`` per key
(HIT / HIT_PENDING / RETRY / MISS), ``prepare_load`` / ``prepare_store`` / ``complete_store``,
``on_schedule_end(ScheduleEndContext)``, under the manager's lock. vLLM's GPU worker needs CUDA,
so the copies between the engine's tensors and vLLM's primary region are done here, on the CPU,
with the same verification as for kvtier.
"""

from __future__ import annotations

import threading
import uuid
import warnings
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from kvtier.bench.engine import BenchError, EngineOptions
from kvtier.bench.offload import Offload
from kvtier.types import LoadStoreSpec, PrepareStoreOutput, ReqContext

_GROUP = (0).to_bytes(4, "big")


def vllm_unavailable() -> str | None:
    """Why vLLM's tiering manager cannot be used here, or None when it can."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # vLLM's optional dependencies warn on import
            from vllm.v1.kv_offload.tiering.fs.manager import FileSystemTierManager  # noqa: F401
            from vllm.v1.kv_offload.tiering.manager import TieringOffloadingManager  # noqa: F401
    except Exception as e:  # ImportError, or a missing dependency of vllm
        return f"{type(e).__name__}: {e}"
    return None


def _fake_spec(block_tokens: int) -> Any:
    """The few OffloadingSpec fields vLLM's fs tier reads (model identity, layout, events)."""
    parallel = SimpleNamespace(
        tp_size=1, pp_size=1, pcp_size=1, dcp_size=1, rank=0, is_parallelism_agnostic=True
    )
    config = SimpleNamespace(
        groups=[SimpleNamespace(tokens_per_block=block_tokens, layer_names=["bench"])],
        parallel=parallel,
        canonical_layout=False,
        kv_cache_layout=None,
        replicated_layout=False,
        model=SimpleNamespace(name="kvtier-bench", dtype="bfloat16"),
        cache=SimpleNamespace(tokens_per_hash=block_tokens),
    )
    return SimpleNamespace(
        config=config,
        blocks_per_chunk=1,
        kv_events_config=SimpleNamespace(enable_kv_cache_events=True),
    )


class VLLMOffload(Offload):
    """vLLM's TieringOffloadingManager with a CPU primary tier and an ``fs`` tier."""

    def __init__(self, cpu_blocks: int, fs_dir: str, tier_blocks: int | None = None) -> None:
        why = vllm_unavailable()
        if why:
            raise BenchError(f"vLLM's TieringOffloadingManager cannot be imported: {why}")
        self.name = "vllm"
        self.stores = True
        self.cpu_blocks = cpu_blocks
        self.num_slots = cpu_blocks
        self.fs_dir = fs_dir
        self.tier_blocks = tier_blocks  # vLLM's fs tier has no capacity bound: informative only
        self.media = ("CPU", "STORAGE")
        self._ctx: dict[str, Any] = {}
        self._new_ids: list[str] = []
        self._done: list[tuple[int, bool]] = []
        self._lock: Any = threading.Lock()
        self.manager: Any = None
        self._bytes = {"CPU": [0, 0], "STORAGE": [0, 0]}  # read, written
        self._engine_stored: set[bytes] = set()  # CPU "stored" events we caused (not promotions)

    def describe(self) -> dict[str, Any]:
        """The configuration, for the report."""
        return {"vllm": "TieringOffloadingManager", "primary_chunks": self.cpu_blocks,
                "secondary_tiers": [{"type": "fs", "root_dir": self.fs_dir}]}

    def attach(self, kv_caches: list[Any], opts: EngineOptions) -> None:
        from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
        from vllm.v1.kv_offload.tiering.fs.manager import FileSystemTierManager
        from vllm.v1.kv_offload.tiering.manager import (
            CPUPrimaryTierOffloadingManager,
            TieringOffloadingManager,
        )

        bb = opts.bytes_per_block
        self.block_bytes = bb
        self.region = SharedOffloadRegion(
            engine_id=f"kvtier-bench-{uuid.uuid4().hex[:10]}", num_chunks=self.cpu_blocks,
            rank=None, kv_bytes_per_chunk=bb, cpu_page_size=bb,
        )
        primary = CPUPrimaryTierOffloadingManager(
            num_chunks=self.cpu_blocks, mmap_region=self.region, cache_policy="lru",
            enable_events=True,
        )
        view = primary.get_kv_memoryview()
        self.rows: np.ndarray | None = np.asarray(view).reshape(self.cpu_blocks, bb)
        tier = FileSystemTierManager(
            _fake_spec(opts.block_tokens), view, "fs", self.fs_dir, n_read_threads=2,
            n_write_threads=2, enable_kv_events=True,
        )
        self.manager = TieringOffloadingManager(primary, [tier], tier_poll_interval_s=0)
        self._lock = self.manager.lock
        self._views = _engine_views(kv_caches, opts)

    # -- keys and contexts ---------------------------------------------------------------
    def _vctx(self, ctx: ReqContext) -> Any:
        from vllm.v1.kv_offload.base import ReqContext as VReqContext

        v = self._ctx.get(ctx.req_id)
        if v is None:
            v = self._ctx[ctx.req_id] = VReqContext(req_id=ctx.req_id)
        return v

    @staticmethod
    def _keys(keys: Sequence[bytes]) -> list[bytes]:
        return [k + _GROUP for k in keys]

    # -- the manager calls ---------------------------------------------------------------
    def new_request(self, ctx: ReqContext) -> None:
        with self._lock:
            self.manager.on_new_request(self._vctx(ctx))
        self._new_ids.append(ctx.req_id)

    def lookup(self, keys: Sequence[bytes], ctx: ReqContext) -> int | None:
        from vllm.v1.kv_offload.base import LookupResult

        vctx = self._vctx(ctx)
        hits = 0
        pending = False
        with self._lock:
            for key in self._keys(keys):
                res = self.manager.lookup(key, vctx)
                if res is LookupResult.HIT:
                    if not pending:
                        hits += 1
                    continue
                if res is LookupResult.MISS:
                    break
                pending = True  # HIT_PENDING or RETRY: ask again next step
        return None if pending else hits

    def prepare_load(self, keys: Sequence[bytes], ctx: ReqContext) -> LoadStoreSpec:
        with self._lock:
            spec = self.manager.prepare_load(self._keys(keys), self._vctx(ctx))
        return LoadStoreSpec(np.asarray(spec.block_ids, dtype=np.int64))

    def complete_load(self, keys: Sequence[bytes], ctx: ReqContext) -> None:
        with self._lock:
            self.manager.complete_load(self._keys(keys), self._vctx(ctx))

    def touch(self, keys: Sequence[bytes], ctx: ReqContext) -> None:
        with self._lock:
            self.manager.touch(self._keys(keys), self._vctx(ctx))

    def prepare_store(self, keys: Sequence[bytes], ctx: ReqContext) -> PrepareStoreOutput | None:
        with self._lock:
            out = self.manager.prepare_store(self._keys(keys), self._vctx(ctx))
        if out is None:
            return None
        return PrepareStoreOutput(
            keys_to_store=[k[:-4] for k in out.keys_to_store],
            store_spec=LoadStoreSpec(np.asarray(out.store_spec.block_ids, dtype=np.int64)),
            evicted_keys=[k[:-4] for k in out.evicted_keys],
        )

    def complete_store(self, keys: Sequence[bytes], ctx: ReqContext, success: bool = True) -> None:
        with self._lock:
            self.manager.complete_store(self._keys(keys), self._vctx(ctx), success)
        if success:
            self._engine_stored.update(keys)

    def request_finished(self, ctx: ReqContext) -> None:
        with self._lock:
            self.manager.on_request_finished(self._vctx(ctx))
        self._ctx.pop(ctx.req_id, None)

    def end_step(self) -> None:
        from vllm.v1.kv_offload.base import ScheduleEndContext

        with self._lock:
            self.manager.on_schedule_end(ScheduleEndContext(self._new_ids, ()))
        self._new_ids = []

    def take_events(self) -> list[tuple[str, list[bytes], bool]]:
        with self._lock:
            events = list(self.manager.take_events())
        out = []
        for e in events:
            medium = str(getattr(e.medium, "value", e.medium)).upper()
            keys = [k[:-4] for k in e.keys]
            if not e.removed and medium == "STORAGE":
                self._bytes["STORAGE"][1] += len(keys) * self.block_bytes
            elif not e.removed and medium == "CPU":
                for k in keys:  # a block that appears in the CPU tier unstored was promoted
                    if k in self._engine_stored:
                        self._engine_stored.discard(k)
                    else:
                        self._bytes["STORAGE"][0] += self.block_bytes
            out.append((medium, keys, bool(e.removed)))
        return out

    def pending(self) -> bool:
        with self._lock:
            return bool(self.manager.has_pending_work())

    # -- the copies (done here: vLLM's worker needs CUDA) ---------------------------------
    def transfer(self, job_id: int, src: LoadStoreSpec, dst: LoadStoreSpec) -> bool:
        from kvtier.types import GPULoadStoreSpec

        store = isinstance(src, GPULoadStoreSpec)
        gpu = (src if store else dst).block_ids
        slots = (dst if store else src).block_ids
        f = len(gpu) // max(1, len(slots))
        gpu = np.asarray(gpu).reshape(len(slots), f)
        rows = self.rows
        assert rows is not None
        for i, slot in enumerate(slots):
            row = rows[int(slot)]
            off = 0
            for view in self._views:
                per = view.shape[1]
                for j in range(f):
                    g = int(gpu[i, j])
                    if store:
                        row[off : off + per] = view[g]
                    else:
                        view[g] = row[off : off + per]
                    off += per
        n = len(slots) * self.block_bytes
        self._bytes["CPU"][1 if store else 0] += n
        self._done.append((job_id, True))
        return True

    def finished(self) -> list[tuple[int, bool]]:
        done, self._done = self._done, []
        return done

    def stats(self) -> dict[str, Any]:
        tiers = {
            "CPU": {"medium": "CPU", "bytes_read": self._bytes["CPU"][0],
                    "bytes_written": self._bytes["CPU"][1],
                    "capacity_bytes": self.cpu_blocks * self.block_bytes},
            "fs": {"medium": "STORAGE", "bytes_read": self._bytes["STORAGE"][0],
                   "bytes_written": self._bytes["STORAGE"][1]},
        }
        raw: Any = None
        try:
            with self._lock:
                raw = self.manager.get_stats()
        except Exception as e:  # stats are informative only
            raw = f"unavailable: {e}"
        return {"manager": {}, "tiers": tiers, "vllm_stats": str(raw)}

    def shutdown(self) -> None:
        self.rows = None  # drop our view of vLLM's region so that it can be unmapped
        self._views = []
        if self.manager is not None:
            self.manager.shutdown()
            self.manager = None


def _engine_views(kv_caches: list[Any], opts: EngineOptions) -> list[np.ndarray]:
    """(engine blocks, bytes) numpy views of CPU engine tensors."""
    import torch

    views = []
    for t in kv_caches:
        if t.device.type != "cpu":
            raise BenchError("--vllm replays need CPU engine tensors (--device cpu)")
        views.append(t.view(torch.uint8).numpy().reshape(t.shape[0], -1))
    return views
